# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The CI-snapshot and restore-drill playbooks on a VM whose disk is on the shared NFS store (#5, #8).

`playbooks/ci_snapshot.yml` snapshots g1 (memory ballooned down, its root disk copied into the store while it stands
paused), `playbooks/restore_drill.yml` proves the snapshot restores (a copy of g1 comes up beside it without network,
is checked and destroyed), then a "test job" dirties g1's disk, processes and memory, and the revert puts all of it
back. Discard removes the snapshot; a revert without one is refused. Runs in xen1's suite (conftest.py), before
test_faults.py; the same flow with reflink and LVM data disks is test_local_disks.py (not collected, see conftest.py).
"""
from __future__ import annotations

import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

import ci_job  # noqa: E402  (tests/e2e is on sys.path: its conftest.py)
from playbook import run_task  # noqa: E402

HOST, VM = 'xen1', 'g1'
STORE = '/srv/fleetckpt/ci-snapshots-nfs'
FILES = ['/root/ci-file']


@pytest.fixture(scope='module')
def store(lab):
    assert lab.domain_row(HOST, VM) is not None, '%s must run on %s' % (VM, HOST)
    res = run_task(lab.inventory_path, VM, 'guest_agent', {})  # the drill checks that the copy's agent publishes
    assert res.rc == 0, res.output
    lab.sh(HOST, 'rm -rf %s' % STORE)
    yield STORE
    where = lab.locate_guest(VM)
    if where is None:  # a failed revert: g1 comes back from its lab config
        lab.sh(HOST, 'xl create /srv/fleetckpt/lab/guests/%s.cfg' % VM, check=False, timeout=180)
        lab.wait_ssh(VM, 900)
    else:
        ci_job.clean_job_state(lab, VM, FILES, via=where)
    lab.sh(HOST, 'xl destroy %s-drill 2>/dev/null; rm -rf %s' % (VM, STORE), check=False, timeout=300)


def test_ci_snapshot_drill_and_revert_of_a_vm_on_the_nfs_store(lab, store):
    pristine = ci_job.write_files(lab, VM, FILES, 'pristine')
    marker = secrets.token_hex(8)
    ci_job.start_job_state(lab, VM, marker)

    res = ci_job.ci(lab, HOST, VM, store, 'snapshot', check=True)
    assert res.rc == 0, res.output
    assert lab.sh(HOST, 'ls %s/%s 2>/dev/null | wc -l' % (store, VM)).stdout.strip() == '0', 'check mode wrote'

    res = ci_job.ci(lab, HOST, VM, store, 'snapshot')
    assert res.rc == 0, res.output
    [row] = res.fact('ci_snapshot_summary', HOST)
    print(row['line'])
    info = run_task(lab.inventory_path, HOST, 'checkpoint_info', {'store': store, 'vm': [VM]})
    [entry] = info[HOST]['checkpoints']
    assert entry['id'] == row['id'] and entry['valid'] and entry['restorable'], entry
    assert [(d['vdev'], d['strategy']) for d in entry['disks']] == [('xvda', 'copy')], entry['disks']

    # the drill: a copy of g1 from the snapshot, beside g1, on a working copy of its disk, without network
    ci_job.drill(lab, HOST, VM, store, entry['id'])

    # the test job, then the revert
    ci_job.job_then_revert(lab, HOST, VM, store, FILES, pristine, marker, entry['id'])

    res = ci_job.ci(lab, HOST, VM, store, 'discard')
    assert res.rc == 0 and [r['status'] for r in res.fact('ci_snapshot_summary', HOST)] == ['discarded'], res.output
    info = run_task(lab.inventory_path, HOST, 'checkpoint_info', {'store': store, 'vm': [VM]})
    assert info[HOST]['checkpoints'] == [], info[HOST]
    res = ci_job.ci(lab, HOST, VM, store, 'revert')
    assert res.rc != 0 and 'no valid checkpoint of g1' in res.output, res.output
    assert lab.domain_row(HOST, VM) is not None
