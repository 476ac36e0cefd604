# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A live move on real Xen: the rebalance playbook drains xen1 of a PVH guest with rebalance_move_method=live, that
is fleetckpt.xen.migrate (balloon down to the policy target, xl migrate through the destination's migration gate,
the memory given back on xen2).

Debian's Xen has no shadow paging, so it cannot move a PV guest live (test_playbooks.py shows the refusal and the
cold move); it can an HVM/PVH guest, whose dirty pages hardware-assisted paging tracks. The lab's emulated CPU has
nested paging (labctl.py: -cpu qemu64,+npt), so Xen has HAP and runs this file's own PVH guest, g5, booted on xen1
for this file and destroyed after it.

In CI (xen1's suite) since it passed four runs in a row (280-477 s): PVH guests under QEMU's software emulation of
AMD-V crashed twice in the lab, each with a double fault and garbage RFLAGS right after a cmpxchg16b
(tests/lab/README.md); the lab hides that instruction from PVH guests (labctl.PVH_CPUID). Alone:
.venv/bin/python -m pytest -v -s -m e2e --lab-host xen1 tests/e2e/test_live_move.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

import labctl  # noqa: E402
import lablib  # noqa: E402
from playbook import run_playbook, run_task  # noqa: E402

from moves import keep_in_guest, kept_in_guest, remove_migration_setup  # noqa: E402

GUEST = lablib.GuestSpec('g5', 'xen1', 6, 256, 'pvh')
SOURCE, DEST = 'xen1', 'xen2'
MIB = 1024
STORE = '/srv/fleetckpt/e2e-live-move'


@pytest.fixture(scope='module')
def pvh_guest(lab, tmp_path_factory):
    """g5 booted, in an inventory of its own (the lab's plus g5), with the guest agent (its memory-policy target)."""
    inventory = tmp_path_factory.mktemp('live-move') / 'inventory.yml'
    try:
        labctl.start_extra_guests(lab, [GUEST])
        labctl.write_inventory(dict(lab.state, inventory=str(inventory)))
        res = run_task(str(inventory), GUEST.name, 'guest_agent', {}, timeout=1800)
        assert res.rc == 0 and res.ok(GUEST.name), res.output
        yield GUEST.name, str(inventory)
    finally:
        labctl.stop_extra_guests(lab, [GUEST])


def virt_caps(lab, host):
    return lab.sh(host, "xl info | sed -n 's/^virt_caps *: //p'").stdout.split()


def test_rebalance_moves_a_pvh_guest_live(lab, pvh_guest):
    vm, inventory = pvh_guest
    assert lab.sh(vm, 'cat /sys/hypervisor/guest_type').stdout.strip() == 'PVH'
    for host in (SOURCE, DEST):  # Debian's Xen: HAP from the emulated CPU's nested paging, no shadow paging
        caps = virt_caps(lab, host)
        assert 'hap' in caps and 'shadow' not in caps, (host, caps)
    # xen1's memory lock for the whole of it: test_playbooks.py's rebalance test sets up and removes the same keys
    with lablib.host_memory_lock(SOURCE):
        remove_migration_setup(lab)
        try:
            res = run_playbook(inventory, 'fleetckpt.xen.prepare_hosts', {'xen_host_migration': True},
                               tags=['xen_host_migration'])
            assert res.rc == 0, res.output
            kept = keep_in_guest(lab, vm, SOURCE)
            # rebalance_store: where a cold move would go; a live move writes nothing there
            ev = {'rebalance_evacuate_hosts': [SOURCE], 'rebalance_vms': [vm], 'rebalance_apply': True,
                  'rebalance_reclaim': False, 'rebalance_move_method': 'live', 'rebalance_store': STORE}
            res = run_playbook(inventory, 'fleetckpt.xen.rebalance', ev)
            print(res.output[-3000:])
            assert res.rc == 0, res.output
            [move] = res.fact('rebalance_moved')
            assert (move['vm'], move['from'], move['to'], move['method']) == (vm, SOURCE, DEST, 'live'), move
            # ballooned to its policy target on the way: less than its memory crossed the wire
            assert 0 < int(move['moved_kb']) < GUEST.memory_mb * MIB, move
            print('live move of %s: %s MiB moved in %s s' % (vm, int(move['moved_kb']) // MIB, move['seconds']))
            assert lab.domain_row(SOURCE, vm) is None
            row = lab.domain_row(DEST, vm)
            assert row is not None and row[0] == GUEST.memory_mb, row  # its memory given back
            assert kept_in_guest(lab, vm, DEST, kept)
            assert not lab.sh(DEST, 'ls %s 2>/dev/null || true' % STORE).stdout.split(), 'a live move wrote a checkpoint'
        finally:
            remove_migration_setup(lab)
