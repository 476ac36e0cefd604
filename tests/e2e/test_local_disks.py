# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The reflink and LVM disk strategies on storage local to one dom0, through the CI-snapshot playbook (#8, #5).

xen1's dom0 gets an XFS filesystem with reflink and an LVM volume group with a thin pool, each on a loop file.
g1 (root disk on the NFS store) gets two data disks attached: xvdb, a raw file on the XFS, and xvdc, a thin LV.
`playbooks/ci_snapshot.yml` then snapshots g1 (root disk copied, xvdb cloned by reflink, xvdc by a thin snapshot,
all while g1 stands paused). The "test job" dirties memory, processes and all three disks, and the revert puts
everything back: files read from disk with the page cache dropped, processes, in-memory files. The snapshot stays
whole through a drill and the revert (a CI snapshot serves many jobs), then it is discarded with its clone and LV. Before the reverts, a
restore drill brings a copy of g1 up from the snapshot on working disks, checks it and removes it. Runs in xen1's suite
after test_faults.py (conftest.py); g1 ends as it started, with its data disks detached.
"""
from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

import ci_job  # noqa: E402  (tests/e2e is on sys.path: its conftest.py)
from lablib import LOCAL_VG, LOCAL_XFS  # noqa: E402
from playbook import run_task  # noqa: E402

HOST, VM = 'xen1', 'g1'
STORE = '/srv/fleetckpt/ci-snapshots'
MOUNTS = {'xvdb': '/mnt/ci-b', 'xvdc': '/mnt/ci-c'}
FILES = ['/root/ci-file', '/mnt/ci-b/file', '/mnt/ci-c/file']


def ci(lab, action):
    return ci_job.ci(lab, HOST, VM, STORE, action)


def write_files(lab, tag):
    return ci_job.write_files(lab, VM, FILES, tag)


def summary(res):
    return res.fact('ci_snapshot_summary', HOST)


@pytest.fixture(scope='module')
def local_disks(lab):
    assert lab.domain_row(HOST, VM) is not None, '%s must run on %s' % (VM, HOST)
    res = run_task(lab.inventory_path, VM, 'guest_agent', {})  # the drill checks it publishes (test_faults installs it)
    assert res.rc == 0, res.output
    made = lab.local_storage(HOST, files={'g1-data.img': '256M'}, thin={'g1-thin': '256M'})
    disks = {'xvdb': made['g1-data.img'], 'xvdc': made['g1-thin']}
    for vdev, target in disks.items():  # formatted in dom0: the lab's minimal guests have no mkfs
        lab.sh(HOST, 'mkfs.ext4 -q -F %s && xl block-attach %s format=raw,vdev=%s,access=rw,target=%s'
               % (target, VM, vdev, target), timeout=300)
    lab.sh(VM, 'for i in $(seq 120); do test -b /dev/xvdb && test -b /dev/xvdc && break; sleep 1; done; '
               + ' && '.join('mkdir -p %s && mount /dev/%s %s' % (mnt, vdev, mnt) for vdev, mnt in MOUNTS.items()),
               timeout=600)
    lab.sh(HOST, 'rm -rf %s' % STORE)
    yield made
    where = lab.locate_guest(VM)
    if where is None:  # a failed revert: g1 comes back from its lab config (root disk only)
        lab.sh(HOST, 'xl create /srv/fleetckpt/lab/guests/%s.cfg' % VM, check=False, timeout=180)
        lab.wait_ssh(VM, 900)
    else:
        lab.sh(VM, 'umount %s' % ' '.join(MOUNTS.values()), check=False)
        ci_job.clean_job_state(lab, VM, FILES[:1])
        for vdev in disks:
            lab.sh(HOST, 'xl block-detach %s %s' % (VM, vdev), check=False, timeout=300)
    lab.local_storage_remove(HOST)
    lab.sh(HOST, 'rm -rf %s' % STORE, check=False, timeout=300)


def test_ci_snapshot_reverts_memory_processes_and_every_disk(lab, local_disks):
    pristine = write_files(lab, 'pristine')
    marker = secrets.token_hex(8)
    ci_job.start_job_state(lab, VM, marker)

    # check mode plans the snapshot and changes nothing
    res = ci_job.ci(lab, HOST, VM, STORE, 'snapshot', check=True)
    assert res.rc == 0, res.output
    assert lab.sh(HOST, 'ls %s/%s 2>/dev/null | wc -l' % (STORE, VM)).stdout.strip() == '0'

    res = ci(lab, 'snapshot')
    assert res.rc == 0, res.output
    [row] = summary(res)
    print(row['line'])
    info = run_task(lab.inventory_path, HOST, 'checkpoint_info', {'store': STORE, 'vm': [VM]})
    [entry] = info[HOST]['checkpoints']
    assert entry['id'] == row['id'] and entry['valid'] and entry['restorable'], entry
    strategies = {d['vdev']: d['strategy'] for d in entry['disks']}
    assert strategies == {'xvda': 'copy', 'xvdb': 'reflink', 'xvdc': 'lvm'}, entry['disks']
    snapshot_lv = [d for d in entry['disks'] if d['vdev'] == 'xvdc'][0]
    assert lab.sh(HOST, 'lvs --noheadings -o lv_name %s' % LOCAL_VG).stdout.count('g1-thin') >= 1
    disk_dir = '/srv/fleetckpt/lab/disks'
    before_drill = lab.sh(HOST, 'ls %s %s; lvs --noheadings -o lv_name %s' % (disk_dir, LOCAL_XFS, LOCAL_VG)).stdout

    # a restore drill of the snapshot: a copy of g1 comes up beside it on working disks (a copy of xvda, a reflink
    # clone of xvdb, a thin snapshot of xvdc's), without network, is checked and destroyed with its disks
    ci_job.drill(lab, HOST, VM, STORE, entry['id'])
    assert lab.sh(HOST, 'ls %s %s; lvs --noheadings -o lv_name %s' % (disk_dir, LOCAL_XFS, LOCAL_VG)).stdout == before_drill

    # the "test job" (one revert, for CI time: the drill above already used the snapshot once, and discard finds it
    # whole): new content on every disk, a process gone and one new, memory changed
    ci_job.job_then_revert(lab, HOST, VM, STORE, FILES, pristine, marker, entry['id'])

    # the snapshot is still valid after the drill and the revert (thin snapshot and reflink clone kept); discard
    # removes them
    res = ci(lab, 'discard')
    assert res.rc == 0, res.output
    assert [r['status'] for r in summary(res)] == ['discarded']
    info = run_task(lab.inventory_path, HOST, 'checkpoint_info', {'store': STORE, 'vm': [VM]})
    assert info[HOST]['checkpoints'] == [], info[HOST]
    leftovers = lab.sh(HOST, 'find %s -type f; lvs --noheadings -o lv_name %s' % (LOCAL_XFS, LOCAL_VG)).stdout.split()
    assert sorted(leftovers) == sorted([local_disks['g1-data.img'], 'pool', 'g1-thin']), (leftovers, snapshot_lv)

    # nothing of the VM is left to revert to: the revert refuses and g1 keeps running
    res = ci(lab, 'revert')
    assert res.rc != 0 and 'no valid checkpoint of g1' in res.output, res.output
    assert lab.domain_row(HOST, VM) is not None
