# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Drive the collection through real ``ansible-playbook`` runs against the lab, and collect results.

``run_task(inventory, hosts, module, args)`` writes a one-task playbook that runs ``fleetckpt.xen.<module>``,
registers its result, and has the controller save each host's result as JSON; it returns a ``PlayResult``
with the exit code, the per-host results and the output. The collection is this checkout, exposed to Ansible
through a symlink tree ``<tmp>/ansible_collections/fleetckpt/xen``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def collections_path() -> str:
    top = Path(tempfile.gettempdir()) / 'fleetckpt-collections'
    link = top / 'ansible_collections' / 'fleetckpt' / 'xen'
    if not link.is_symlink() or link.resolve() != REPO:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO)
    return str(top)


@dataclass
class PlayResult:
    rc: int
    results: dict = field(default_factory=dict)
    output: str = ''
    seconds: float = 0.0

    def __getitem__(self, host):
        return self.results[host]

    def ok(self, host) -> bool:
        res = self.results.get(host)
        return res is not None and not res.get('failed') and not res.get('unreachable')


def _ansible_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_task(inventory: str, hosts: str, module: str, args: dict | None = None, check: bool = False,
             diff: bool = False, timeout: float = 1800, forks: int = 4, extra_vars: dict | None = None) -> PlayResult:
    with tempfile.TemporaryDirectory(prefix='fleetckpt-play-') as tmp:
        out_dir = Path(tmp) / 'results'
        out_dir.mkdir()
        play = [{
            'name': 'fleetckpt.xen.%s on %s' % (module, hosts),
            'hosts': hosts,
            'gather_facts': False,
            'tasks': [
                {'name': 'Run fleetckpt.xen.%s' % module, 'fleetckpt.xen.%s' % module: args or {},
                 'register': 'result', 'ignore_errors': True},
                {'name': 'Save the result on the controller', 'ansible.builtin.copy': {
                    'content': '{{ result | to_json }}', 'dest': '%s/{{ inventory_hostname }}.json' % out_dir},
                 'delegate_to': 'localhost', 'check_mode': False},
                {'name': 'Fail when the module failed', 'ansible.builtin.fail': {'msg': '{{ result.msg | default("failed") }}'},
                 'when': 'result is failed'},
            ],
        }]
        path = Path(tmp) / 'play.yml'
        path.write_text(json.dumps(play, indent=2))  # JSON is YAML
        cmd = [_ansible_bin('ansible-playbook'), '-i', inventory, str(path), '--forks', str(forks)]
        if check:
            cmd.append('--check')
        if diff:
            cmd.append('--diff')
        if extra_vars:
            cmd += ['-e', json.dumps(extra_vars)]
        env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections_path(), ANSIBLE_HOST_KEY_CHECKING='False',
                   ANSIBLE_NOCOLOR='1', ANSIBLE_RETRY_FILES_ENABLED='False', ANSIBLE_PYTHON_INTERPRETER='auto_silent',
                   ANSIBLE_TIMEOUT='60', ANSIBLE_PIPELINING='True')
        env.setdefault('ANSIBLE_LOCALHOST_WARNING', 'False')
        start = time.monotonic()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False)
        results = {}
        for item in out_dir.glob('*.json'):
            results[item.stem] = json.loads(item.read_text())
        return PlayResult(rc=proc.returncode, results=results, output=proc.stdout,
                          seconds=round(time.monotonic() - start, 1))
