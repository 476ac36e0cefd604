# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""What a CI job does to a test VM, and how the tests of the ci_snapshot playbook look at it afterwards
(test_ci_snapshot.py on the NFS root disk, test_local_disks.py with reflink and LVM data disks too)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

from lablib import host_memory_lock  # noqa: E402
from playbook import run_playbook, run_task  # noqa: E402

# In the guest: the files (read from disk, page cache dropped, sha256 each), whether the job's processes live, and
# the in-memory marker.
PROBE = r'''
import hashlib, json, os, sys
os.system('sync; echo 3 > /proc/sys/vm/drop_caches')
out = {'files': {}, 'pids': {}}
for path in sys.argv[1:]:
    try:
        data = open(path, 'rb').read()
        out['files'][path] = hashlib.sha256(data).hexdigest()
    except OSError:
        out['files'][path] = None
for name in ('before', 'after'):
    try:
        pid = int(open('/dev/shm/ci-%s.pid' % name).read())
        out['pids'][name] = os.path.exists('/proc/%d' % pid)
    except (OSError, ValueError):
        out['pids'][name] = None
try:
    out['shm'] = open('/dev/shm/ci-marker').read().strip()
except OSError:
    out['shm'] = None
print(json.dumps(out))
'''


def ci(lab, host, vm, store, action, check=False):
    ev = {'ci_snapshot_action': action, 'ci_snapshot_vms': [vm], 'ci_snapshot_store': store}
    res = run_playbook(lab.inventory_path, 'fleetckpt.xen.ci_snapshot', ev, limit=host, check=check)
    print('\nci_snapshot %s%s: rc=%d in %.1fs' % (action, ' --check' if check else '', res.rc, res.seconds))
    return res


def probe(lab, vm, files):
    return json.loads(lab.sh(vm, 'python3 - %s' % ' '.join(files), stdin=PROBE, timeout=300).stdout)


def write_files(lab, vm, files, tag):
    """A file of random content at each path, fsync'ed; returns their sha256 as the probe reports them."""
    lab.sh(vm, 'for f in %s; do head -c 3M /dev/urandom > $f.tmp && echo %s >> $f.tmp && mv $f.tmp $f; done; sync'
           % (' '.join(files), tag))
    return probe(lab, vm, files)['files']


def start_job_state(lab, vm, marker):
    """The state at the snapshot: an in-memory marker and a process."""
    lab.sh(vm, 'echo %s > /dev/shm/ci-marker; setsid sleep 100000 < /dev/null > /dev/null 2>&1 & echo $! > '
               '/dev/shm/ci-before.pid' % marker)


def dirty_job_state(lab, vm):
    """What a test job leaves: the snapshot's process gone, a new one, the marker changed."""
    lab.sh(vm, 'kill $(cat /dev/shm/ci-before.pid); echo dirty > /dev/shm/ci-marker; setsid sleep 100001 '
               '< /dev/null > /dev/null 2>&1 & echo $! > /dev/shm/ci-after.pid')


def clean_job_state(lab, vm, files, via=None):
    lab.sh(vm, 'kill $(cat /dev/shm/ci-before.pid /dev/shm/ci-after.pid) 2>/dev/null; rm -f /dev/shm/ci-* %s'
           % ' '.join(files), check=False, via=via)


def job_then_revert(lab, host, vm, store, files, pristine, marker, ckpt_id):
    """The "test job" (new content in every file, the snapshot's process gone and a new one, the in-memory marker
    changed), then the revert to snapshot ``ckpt_id``: asserts that the files (read from disk, page cache dropped),
    the processes and the marker are as at the snapshot, and that the memory was given back."""
    dirty = write_files(lab, vm, files, 'dirty')
    assert all(dirty[f] != pristine[f] for f in files), (dirty, pristine)
    dirty_job_state(lab, vm)
    before = lab.domain_row(host, vm)
    with host_memory_lock(host):
        res = ci(lab, host, vm, store, 'revert')
    assert res.rc == 0, res.output
    [row] = res.fact('ci_snapshot_summary', host)
    print(row['line'])
    assert row['status'] == 'reverted' and row['id'] == ckpt_id, row
    lab.drop(vm)  # the restored memory holds the TCP state of the snapshot moment
    lab.wait_ssh(vm, 300)
    after = probe(lab, vm, files)
    assert after['files'] == pristine, 'the disks are not as at the snapshot: %s' % after
    assert after['pids'] == {'before': True, 'after': None}, after['pids']
    assert after['shm'] == marker, after
    assert lab.domain_row(host, vm)[0] == before[0]  # memory given back


def drill(lab, host, vm, store, ckpt_id):
    """The restore_drill playbook on a VM's newest snapshot, under the host's memory lock: a copy comes up beside the
    VM without network, is checked and destroyed. Asserts that it passed and that checkpoint_info reports it."""
    with host_memory_lock(host):
        res = run_playbook(lab.inventory_path, 'fleetckpt.xen.restore_drill',
                           {'restore_store': store, 'restore_drill_vms': [vm]}, limit=host)
    assert res.rc == 0, res.output
    [row] = res.fact('restore_drill_report', host)
    print(row['line'])
    assert row['ok'] and row['checkpoint'] == ckpt_id, row
    info = run_task(lab.inventory_path, host, 'checkpoint_info', {'store': store, 'vm': [vm]})
    last = info[host]['checkpoints'][0]['last_drill']
    assert last['ok'] and last['checks'] == {'restored': True, 'running': True, 'memory_restored': True,
                                             'agent': True}, last
    assert lab.domain_row(host, '%s-drill' % vm) is None
