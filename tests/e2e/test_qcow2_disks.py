# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The qcow2 disk strategy on Xen's qdisk backend, through the CI-snapshot and restore-drill playbooks (#8).

xen2's dom0 gets Xen's QEMU (qemu-system-xen) and qemu-img from the packages in its image (lablib.Lab.install_qemu).
A guest of this test, q1, boots from a qcow2 root disk on the NFS store, served by its own device model (qdisk).
`playbooks/ci_snapshot.yml` snapshots it: after the save q1 stands paused while its device model takes the internal
snapshot `fleetckpt-<id>` inside the image (QMP), then runs on. A restore drill brings a copy up from a clone of the
snapshot (qemu-img convert) and removes it; the "test job" dirties the disk, memory and processes; the revert puts
the image back to the snapshot (qemu-img snapshot -a) and restores the memory: files read from disk with the page
cache dropped, processes, in-memory files as they were. Then xen2 is "lost" with q1 dirtied again, and xen1 (QEMU
installed there too) restores the checkpoint from the shared store: the image reverted, the memory back. Discard, on
xen1 where q1 now runs, deletes the snapshot from the image through its device model. Runs last in xen2's suite;
q1 is destroyed and its disk removed after.
"""
from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

import ci_job  # noqa: E402  (tests/e2e is on sys.path: its conftest.py)
import labctl  # noqa: E402
import lablib  # noqa: E402
from lablib import host_memory_lock  # noqa: E402
from playbook import run_task  # noqa: E402

GUEST = lablib.QCOW2_GUEST
HOST, OTHER = GUEST.host, 'xen1'
VM = GUEST.name
STORE = '/srv/fleetckpt/ci-snapshots'
IMAGE = labctl.guest_disk_dom0(GUEST)
FILES = ['/root/ci-file']


def ci(lab, action, check=False):
    return ci_job.ci(lab, HOST, VM, STORE, action, check=check)


def snapshots(lab):
    """The internal snapshots of q1's image, as qemu-img sees them (force share: its QEMU holds it)."""
    info = json.loads(lab.sh(HOST, 'qemu-img info -U --output=json %s' % IMAGE).stdout)
    return [s['name'] for s in info.get('snapshots', [])]


@pytest.fixture(scope='module')
def qcow2_guest(lab, tmp_path_factory):
    lab.install_qemu(HOST)
    inventory = tmp_path_factory.mktemp('qcow2') / 'inventory.yml'  # the lab's, plus q1
    try:
        labctl.start_extra_guests(lab, [GUEST])
        labctl.write_inventory(dict(lab.state, inventory=str(inventory)))
        # served by qdisk: a device model (QEMU) runs for q1 and holds its image
        domid = lab.sh(HOST, 'xl domid %s' % VM).stdout.strip()
        assert lab.sh(HOST, 'test -S /run/xen/qmp-libxl-%s && echo yes' % domid, check=False).stdout.strip() == 'yes'
        res = run_task(str(inventory), VM, 'guest_agent', {}, timeout=1800)  # the drill checks that it publishes
        assert res.rc == 0, res.output
        lab.sh(HOST, 'rm -rf %s' % STORE)
        yield
    finally:
        labctl.stop_extra_guests(lab, [GUEST])
        lab.sh(HOST, 'rm -rf %s; rm -f /srv/fleetckpt/lab/disks/%s.*' % (STORE, VM), check=False, timeout=300)


def test_ci_snapshot_of_a_qcow2_disk_reverts_disk_memory_and_processes(lab, qcow2_guest):
    pristine = ci_job.write_files(lab, VM, FILES, 'pristine')
    marker = secrets.token_hex(8)
    ci_job.start_job_state(lab, VM, marker)
    assert snapshots(lab) == []

    # check mode plans the snapshot and changes nothing
    res = ci(lab, 'snapshot', check=True)
    assert res.rc == 0, res.output
    assert lab.sh(HOST, 'ls %s/%s 2>/dev/null | wc -l' % (STORE, VM)).stdout.strip() == '0'
    assert snapshots(lab) == []

    res = ci(lab, 'snapshot')
    assert res.rc == 0, res.output
    [row] = res.fact('ci_snapshot_summary', HOST)
    print(row['line'])
    info = run_task(lab.inventory_path, HOST, 'checkpoint_info', {'store': STORE, 'vm': [VM]})
    [entry] = info[HOST]['checkpoints']
    assert entry['id'] == row['id'] and entry['valid'] and entry['restorable'], entry
    assert [(d['vdev'], d['strategy']) for d in entry['disks']] == [('xvda', 'qcow2')], entry['disks']
    assert snapshots(lab) == ['fleetckpt-%s' % entry['id']]
    assert lab.domain_row(HOST, VM) is not None  # it runs on

    # a restore drill: a copy of q1 comes up beside it on a clone of the snapshot (its own qdisk QEMU), without
    # network, is checked and destroyed with its working disk; the snapshot stays
    disks = 'ls /srv/fleetckpt/lab/disks'
    before_drill = lab.sh(HOST, disks).stdout
    ci_job.drill(lab, HOST, VM, STORE, entry['id'])
    assert lab.sh(HOST, disks).stdout == before_drill
    assert snapshots(lab) == ['fleetckpt-%s' % entry['id']]

    # the "test job", then the revert: the image back to the snapshot, the memory restored
    ci_job.job_then_revert(lab, HOST, VM, STORE, FILES, pristine, marker, entry['id'])

    # the snapshot is kept by the revert (a CI snapshot serves many jobs)
    assert snapshots(lab) == ['fleetckpt-%s' % entry['id']]

    # on the other host: xen2 is lost with q1 dirtied again (destroyed, its disk as the job left it); xen1, which
    # sees the same store, restores the checkpoint: the shared image goes back to the snapshot, the memory comes back
    lab.install_qemu(OTHER)
    ci_job.write_files(lab, VM, FILES, 'lost')
    ci_job.dirty_job_state(lab, VM)
    lab.sh(HOST, 'xl destroy %s' % VM, timeout=120)
    with host_memory_lock(OTHER):
        res = run_task(lab.inventory_path, OTHER, 'restore', {'store': STORE, 'vm': VM, 'checkpoint_id': entry['id']})
    assert res.rc == 0, res.output
    restored = res[OTHER]['restored']
    print('\nrestored on %s: %s' % (OTHER, restored['timings']))
    assert restored['disks']['actions'][0]['method'] == 'qemu-img snapshot -a', restored['disks']
    lab.drop(VM)
    lab.wait_ssh(VM, 300)
    after = ci_job.probe(lab, VM, FILES)
    assert after['files'] == pristine and after['shm'] == marker, after
    assert after['pids'] == {'before': True, 'after': None}, after['pids']
    assert lab.locate_guest(VM) == OTHER

    # discard where q1 now runs: its device model there deletes the snapshot from the image it holds
    res = ci_job.ci(lab, OTHER, VM, STORE, 'discard')
    assert res.rc == 0, res.output
    assert [r['status'] for r in res.fact('ci_snapshot_summary', OTHER)] == ['discarded']
    assert snapshots(lab) == []
    info = run_task(lab.inventory_path, OTHER, 'checkpoint_info', {'store': STORE, 'vm': [VM]})
    assert info[OTHER]['checkpoints'] == [], info[OTHER]
    res = ci_job.ci(lab, OTHER, VM, STORE, 'revert')
    assert res.rc != 0 and 'no valid checkpoint of %s' % VM in res.output, res.output
    assert lab.locate_guest(VM) == OTHER
