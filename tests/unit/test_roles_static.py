# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Cheap static checks of the roles and playbooks: defaults and argument specs agree, naming rules, syntax."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p for p in (REPO / 'roles').iterdir() if (p / 'tasks' / 'main.yml').exists())
PLAYBOOKS = sorted((REPO / 'playbooks').glob('*.yml'))


def _load(path):
    with open(path) as handle:
        return yaml.safe_load(handle)


def _options(role):
    specs = _load(role / 'meta' / 'argument_specs.yml')['argument_specs']
    merged = {}
    for entry, spec in specs.items():
        for name, option in (spec.get('options') or {}).items():
            merged.setdefault(name, []).append((entry, option))
    return specs, merged


def test_the_expected_roles_exist():
    assert {r.name for r in ROLES} >= {'xen_host', 'guest_agent', 'checkpoint', 'restore'}


@pytest.mark.parametrize('role', ROLES, ids=lambda r: r.name)
def test_defaults_and_argument_specs_agree(role):
    defaults = _load(role / 'defaults' / 'main.yml') or {}
    specs, options = _options(role)
    assert 'main' in specs
    assert set(defaults) == set(options), 'only in defaults: %s; only in argument_specs: %s' % (
        sorted(set(defaults) - set(options)), sorted(set(options) - set(defaults)))
    for name, entries in options.items():
        for entry, option in entries:
            assert option.get('description'), '%s: %s (%s) has no description' % (role.name, name, entry)
            assert option.get('type'), '%s: %s (%s) has no type' % (role.name, name, entry)
            if 'default' in option:
                assert option['default'] == defaults[name], '%s: %s default differs: spec %r, defaults %r' % (
                    role.name, name, option['default'], defaults[name])
            if option.get('choices'):
                assert defaults[name] in option['choices'], (role.name, name)


@pytest.mark.parametrize('role', ROLES, ids=lambda r: r.name)
def test_role_layout_and_variable_names(role):
    for part in ('README.md', 'meta/main.yml', 'tasks/preflight.yml', 'defaults/main.yml', 'meta/argument_specs.yml'):
        assert (role / part).exists(), '%s lacks %s' % (role.name, part)
    for name in _load(role / 'defaults' / 'main.yml') or {}:
        assert name.startswith(role.name + '_'), '%s: public variable %s lacks the role prefix' % (role.name, name)
    readme = (role / 'README.md').read_text()
    for name in _load(role / 'defaults' / 'main.yml') or {}:
        assert name in readme, '%s: README does not mention %s' % (role.name, name)
    for tasks in (role / 'tasks').glob('*.yml'):
        for line in tasks.read_text().splitlines():
            stripped = line.strip()
            for key in ('register:', ):
                if stripped.startswith(key):
                    value = stripped.split(':', 1)[1].strip()
                    assert value.startswith('__%s_' % role.name), '%s: %s registers %s' % (role.name, tasks.name, value)


def _ansible_playbook():
    candidate = Path(sys.executable).parent / 'ansible-playbook'
    return str(candidate) if candidate.exists() else shutil.which('ansible-playbook')


@pytest.mark.parametrize('playbook', PLAYBOOKS, ids=lambda p: p.name)
def test_playbook_syntax(playbook, tmp_path):
    exe = _ansible_playbook()
    if not exe:
        pytest.skip('ansible-playbook is not installed')
    top = tmp_path / 'collections'
    (top / 'ansible_collections' / 'fleetckpt').mkdir(parents=True)
    (top / 'ansible_collections' / 'fleetckpt' / 'xen').symlink_to(REPO)
    inventory = REPO / 'playbooks' / 'inventory.example'
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(top), ANSIBLE_NOCOLOR='1', ANSIBLE_LOCALHOST_WARNING='False')
    for target in (str(playbook), 'fleetckpt.xen.' + playbook.stem):  # by path and by collection name
        proc = subprocess.run([exe, '--syntax-check', '-i', str(inventory), target], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout


def _role_refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'roles' and isinstance(value, list):
                for entry in value:
                    yield entry['role'] if isinstance(entry, dict) else entry
            elif key in ('ansible.builtin.include_role', 'ansible.builtin.import_role', 'include_role', 'import_role'):
                yield value['name']
            else:
                yield from _role_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _role_refs(item)


def test_playbooks_call_roles_by_fqcn():
    for playbook in PLAYBOOKS:
        refs = list(_role_refs(_load(playbook)))
        assert refs, '%s calls no role' % playbook.name
        for ref in refs:
            assert ref.startswith('fleetckpt.xen.'), '%s: role %s is not called by its FQCN' % (playbook.name, ref)
