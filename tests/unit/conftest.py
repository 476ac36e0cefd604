# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Make ``ansible_collections.fleetckpt.xen`` importable when pytest runs from the repository root.

The repository root is the collection root. Under ``ansible-test units`` the collection already sits in an
``ansible_collections/fleetckpt/xen`` tree; under plain pytest we build a throwaway tree whose
``fleetckpt/xen`` is a symlink to this checkout and put it first on ``sys.path``.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def _ensure_collection_on_path():
    try:
        import ansible_collections.fleetckpt.xen  # noqa: F401  pylint: disable=unused-import
        return
    except ImportError:
        pass
    top = tempfile.mkdtemp(prefix='fleetckpt-units-')
    atexit.register(shutil.rmtree, top, True)
    os.makedirs(os.path.join(top, 'ansible_collections', 'fleetckpt'))
    os.symlink(_REPO, os.path.join(top, 'ansible_collections', 'fleetckpt', 'xen'))
    sys.path.insert(0, top)
    for name in [m for m in sys.modules if m == 'ansible_collections' or m.startswith('ansible_collections.')]:
        del sys.modules[name]


_ensure_collection_on_path()


import json  # noqa: E402

import pytest  # noqa: E402

FAKE_XL = os.path.join(os.path.dirname(__file__), 'fake_xl.py')


class FakeXlHost:
    """A fake Xen host: an ``xl`` executable backed by a JSON state file."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.state_path = str(tmp_path / 'xl-state.json')
        self.path = str(tmp_path / 'xl')
        with open(self.path, 'w') as handle:
            handle.write('#!/bin/sh\nFAKE_XL_STATE=%s exec %s %s "$@"\n' % (self.state_path, sys.executable, FAKE_XL))
        os.chmod(self.path, 0o755)
        self.write({'host': 'xen1', 'xen_version': '4.20.1', 'hw_caps': 'caps-a', 'free_mib': 2048,
                    'next_domid': 10, 'domains': {}, 'fail': {}, 'log': []})

    def read(self):
        with open(self.state_path) as handle:
            return json.load(handle)

    def write(self, state):
        with open(self.state_path, 'w') as handle:
            json.dump(state, handle)

    def add(self, name, mem_mib, max_mib=None, domid=None, **extra):
        state = self.read()
        dom = {'domid': domid or state['next_domid'], 'uuid': '00000000-0000-0000-0000-%012d' % len(state['domains']),
               'type': 'pv', 'max_mib': max_mib or mem_mib, 'target_mib': mem_mib, 'mem_mib': mem_mib, 'state': '-b----'}
        dom.update(extra)
        state['next_domid'] = max(state['next_domid'], dom['domid']) + 1
        state['domains'][name] = dom
        state['free_mib'] -= mem_mib
        self.write(state)
        return dom

    def update(self, name=None, **changes):
        state = self.read()
        target = state['domains'][name] if name else state
        target.update(changes)
        self.write(state)

    def fail(self, subcommand, message):
        state = self.read()
        state['fail'][subcommand] = message
        self.write(state)

    def domain(self, name):
        return self.read()['domains'].get(name)

    def commands(self):
        return [argv[0] for argv in self.read()['log']]


@pytest.fixture
def fake_xl(tmp_path):
    return FakeXlHost(tmp_path)
