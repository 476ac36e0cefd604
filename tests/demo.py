#!/usr/bin/env python
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""`make demo`: bring the local Xen lab up (or reuse it), install the guest agent, checkpoint every guest natively
and with memory exclusion, restore one on the other host from the NFS store, and print the comparison.

Everything goes through ansible-playbook runs of the collection's modules. Results: build/demo/results.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests' / 'lab'))

import labctl  # noqa: E402
import lablib  # noqa: E402
from playbook import run_task  # noqa: E402

STORE = '/srv/fleetckpt/checkpoints'


def step(msg):
    print('[demo %6.0fs] %s' % (time.monotonic() - T0, msg), flush=True)


def must(res, what):
    if res.rc != 0:
        print(res.output[-4000:], file=sys.stderr)
        sys.exit('demo: %s failed (rc=%d)' % (what, res.rc))
    return res


def mib(kb):
    return '%d' % (kb // 1024)


def main():
    step('bringing the Xen lab up (or reusing it)')
    state = labctl.up()
    lab = lablib.Lab(state)
    inv = lab.inventory_path
    step('installing the guest agent on every guest')
    must(run_task(inv, 'xen_guests', 'guest_agent', {}), 'guest_agent')
    rows = []
    for mode in ('native', 'vmme'):
        step('checkpointing every guest, mode %s (VMs keep running)' % mode)
        # the memory is compared: disks stay where they are (memory-only, forced for running VMs)
        args = {'store': STORE, 'init_store': True, 'mode': mode, 'keep_last': 2, 'disks': 'none',
                'force_memory_only': True}
        res = must(run_task(inv, 'xen_hosts', 'checkpoint', args), 'checkpoint %s' % mode)
        for host, result in sorted(res.results.items()):
            for c in result['checkpoints']:
                rows.append(dict(c, host=host))
    step('DR drill: stop g1 on xen1 with a memory-exclusion checkpoint, restore it on xen2 from NFS')
    ckpt = must(run_task(inv, 'xen1', 'checkpoint', {'store': STORE, 'name': ['g1'], 'keep_running': False}),
                'checkpoint g1')['xen1']['checkpoints'][0]
    moved = must(run_task(inv, 'xen2', 'restore', {'store': STORE, 'vm': 'g1'}), 'restore g1 on xen2')['xen2']['restored']
    step('moving g1 back to xen1')
    must(run_task(inv, 'xen2', 'checkpoint', {'store': STORE, 'name': ['g1'], 'keep_running': False}), 'checkpoint g1')
    back = must(run_task(inv, 'xen1', 'restore', {'store': STORE, 'vm': 'g1'}), 'restore g1 on xen1')['xen1']['restored']

    table = []
    by_vm = {}
    for r in rows:
        by_vm.setdefault(r['vm'], {})[r['mode']] = r
    print()
    print('| VM | host | RAM MiB | native size MB | native time s | vmme RAM saved at MiB | vmme size MB | vmme time s '
          '| overhead s (query+balloon+deflate) | size vmme/native |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for vm in sorted(by_vm):
        n, v = by_vm[vm].get('native'), by_vm[vm].get('vmme')
        if not n or not v:
            continue
        t = v['timings']
        overhead = t['query_s'] + t['balloon_s'] + t['deflate_s']
        row = {'vm': vm, 'host': v['host'], 'ram_mib': v['original_kb'] // 1024, 'native_bytes': n['size_bytes'],
               'native_s': n['timings']['total_s'], 'vmme_saved_mib': v['saved_kb'] // 1024, 'vmme_bytes': v['size_bytes'],
               'vmme_s': t['total_s'], 'overhead_s': round(overhead, 2),
               'size_ratio': round(v['size_bytes'] / float(n['size_bytes']), 3)}
        table.append(row)
        print('| %s | %s | %d | %.0f | %.1f | %d | %.0f | %.1f | %.1f | %.2f |' % (
            vm, row['host'], row['ram_mib'], row['native_bytes'] / 1e6, row['native_s'], row['vmme_saved_mib'],
            row['vmme_bytes'] / 1e6, row['vmme_s'], row['overhead_s'], row['size_ratio']))
    print()
    print('DR drill: g1 saved on xen1 (%.0f MB, %.1fs), restored on xen2 in %.1fs with memory given back: %s, agent: %s; '
          'back on xen1 in %.1fs' % (ckpt['size_bytes'] / 1e6, ckpt['timings']['total_s'], moved['timings']['total_s'],
                                     moved['memory_restored'], moved['agent'], back['timings']['total_s']))
    print('Measured on this machine under QEMU TCG (software emulation): times are emulation times.')
    out = REPO / 'build' / 'demo'
    out.mkdir(parents=True, exist_ok=True)
    (out / 'results.json').write_text(json.dumps({'table': table, 'checkpoints': rows, 'dr': {
        'checkpoint': ckpt, 'restore_other_host': moved, 'restore_back': back}}, indent=2))
    step('results written to %s' % (out / 'results.json'))
    if not table:
        sys.exit('demo: no comparison rows were produced')


if __name__ == '__main__':
    T0 = time.monotonic()
    main()
