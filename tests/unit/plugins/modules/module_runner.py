# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Helpers for running modules' main(): stand-in guest agents and a runner that returns the module's JSON."""
from __future__ import annotations

import json
import threading
import time

import pytest

from ansible.module_utils.testing import patch_module_args


class Agents:
    """Stand-in guest agents: answer dom0's requests for the domids given in ``values`` (per-domid raw dicts)."""

    def __init__(self, fake):
        self.fake = fake
        self.values = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.seen = {}
        self.requests = {}

    def publish(self, domid, committed_mib=40, oom_kill=0, **extra):
        vals = {'committed_as_kb': committed_mib * 1024, 'mem_total_kb': 400 * 1024, 'mem_available_kb': 300 * 1024,
                'sunreclaim_kb': 10 * 1024, 'page_tables_kb': 1024, 'kernel_stack_kb': 1024, 'mapped_kb': 20 * 1024,
                'oom_kill': oom_kill, 'seq': 1, 'version': '1'}
        vals.update(extra)
        self.values[domid] = vals

    def loop(self):
        while not self.stop.is_set():
            for domid, vals in list(self.values.items()):
                base = '/local/domain/%d/data/fleetckpt/' % domid
                req = self.fake.get(base + 'request')
                if req and req != self.seen.get(domid):
                    self.seen[domid] = req
                    self.requests[domid] = self.requests.get(domid, 0) + 1
                    if callable(vals):
                        vals = vals(self.requests[domid])
                    vals = dict(vals, ts=int(time.time()))
                    for key, value in vals.items():
                        if value is not None:
                            self.fake.write(base + key, str(value).encode())
                    self.fake.write(base + 'reply', req)
            time.sleep(0.01)


def run_module(module, args, check_mode=False, diff=False, capsys=None):
    args = dict(args)
    if check_mode:
        args['_ansible_check_mode'] = True
    if diff:
        args['_ansible_diff'] = True
    with patch_module_args(args):
        with pytest.raises(SystemExit) as exc:
            module.main()
    out = capsys.readouterr().out
    result = json.loads(out)
    result['_rc'] = exc.value.code
    return result
