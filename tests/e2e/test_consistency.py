# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Consistent checkpoints (#8) on the lab: memory and disk captured together.

g3 (home xen2) writes a checksummed log (one fsync'ed line every 0.1 s, a file every 10 lines) before, during and
after a checkpoint whose disk is copied while the VM stands paused. The disk moves on; g3 is then destroyed and the
checkpoint restored on xen1 (revert: the disk gets the checkpoint's content back). The writer process must still
run there, and the log read back from the DISK (page cache dropped) must be the first life's log exactly up to a
point inside the checkpoint's window, then only the second life's lines: no gap, no duplicate, every checksum
good. The copy's filesystem passes e2fsck. A memory-only checkpoint of the running VM is refused once its disk
has changed, and a second copy of the restored VM is refused. g3 goes home by a cold move (memory-only: the save
stops it), its processes and in-memory files intact. Runs in xen2's suite (conftest.py), moving g3 onto xen1 under
xen1's memory lock.
"""
from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

from lablib import host_memory_lock  # noqa: E402
from playbook import run_task  # noqa: E402

STORE = '/srv/fleetckpt/consistency'
VM, HOME, OTHER = 'g3', 'xen2', 'xen1'
DIR = '/root/fleetckpt-consistency'
WRITER = r'''
import hashlib, os, sys, time
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
log = open(os.path.join(d, 'log'), 'a')
seq = 0
while True:
    seq += 1
    line = '%d %.3f %s' % (seq, time.time(), os.urandom(24).hex())
    log.write('%s %s\n' % (line, hashlib.sha256(line.encode()).hexdigest()[:16]))
    log.flush()
    os.fsync(log.fileno())
    if seq % 10 == 0:
        body = (line + '\n') * 200
        with open(os.path.join(d, 'f%d' % seq), 'w') as f:
            f.write(body + hashlib.sha256(body.encode()).hexdigest() + '\n')
            f.flush()
            os.fsync(f.fileno())
    time.sleep(0.1)
'''
# Read back from the disk (page cache dropped): the log's lines, and the files whose checksum fails or are missing.
READER = r'''
import hashlib, json, os, sys
d = sys.argv[1]
os.system('sync; echo 3 > /proc/sys/vm/drop_caches')
lines = open(os.path.join(d, 'log')).read().split('\n')
torn = lines.pop()  # text after the last newline: a line being written
bad = [l for l in lines if hashlib.sha256(l.rsplit(' ', 1)[0].encode()).hexdigest()[:16] != l.rsplit(' ', 1)[-1]]
seqs = [int(l.split()[0]) for l in lines]
files = {}
for name in os.listdir(d):
    if name.startswith('f'):
        text = open(os.path.join(d, name)).read()
        head, _, tail = text[:-1].rpartition('\n')
        files[name] = hashlib.sha256((head + '\n').encode()).hexdigest() == tail
print(json.dumps({'lines': lines, 'bad': bad, 'seqs': seqs, 'torn': torn, 'files': files}))
'''


def play(lab, hosts, module, args=None, **kw):
    return run_task(lab.inventory_path, hosts, module, args, **kw)


def read_back(lab, via):
    out = lab.sh(VM, 'python3 - %s' % DIR, stdin=READER, via=via, timeout=300).stdout
    return json.loads(out)


def writer_pid(lab, via):
    out = lab.sh(VM, 'cat %s.pid; kill -0 $(cat %s.pid) && echo alive' % (DIR, DIR), via=via, check=False).stdout.split()
    return out[0] if out[-1:] == ['alive'] else None


def last_seq(lab, via):
    out = lab.sh(VM, 'tail -n 1 %s/log 2>/dev/null || true' % DIR, via=via).stdout.split()
    return int(out[0]) if out else 0  # python starts slowly under TCG: no log yet


def meminfo_kb(lab, key, via=None):
    return int(lab.sh(VM, 'grep "^%s:" /proc/meminfo' % key, via=via).stdout.split()[1])


def wait_seq(lab, via, beyond):
    for _attempt in range(120):
        if last_seq(lab, via) > beyond:
            return
        lab.sh(VM, 'sleep 1', via=via)
    raise AssertionError('the writer in %s made no progress past line %d' % (VM, beyond))


@pytest.fixture(scope='module')
def store(lab):
    lab.sh(HOME, 'rm -rf %s && mkdir -p %s' % (STORE, STORE))
    yield STORE
    # whatever happened: the writer stops (left running, it would load g3 and dirty its disk under the next tests)
    where = lab.locate_guest(VM)
    if where is not None:
        lab.drop(VM)
        lab.sh(VM, 'test -s %s.pid && kill $(cat %s.pid); rm -rf %s %s.pid /root/writer.py /dev/shm/fleetckpt-marker'
               % (DIR, DIR, DIR, DIR), check=False, via=where)
    lab.sh(HOME, 'rm -rf %s' % STORE, check=False)


def test_checkpoint_with_disk_copy_restores_consistently_on_the_other_host(lab, store):
    assert lab.domain_row(HOME, VM) is not None, '%s must run on %s' % (VM, HOME)
    res = play(lab, VM, 'guest_agent', {})  # the restore waits for it to publish (installed already in a full run)
    assert res.rc == 0, res.output
    lab.sh(VM, 'rm -rf %s; cat > /root/writer.py; setsid python3 /root/writer.py %s > /dev/null 2>&1 < /dev/null & '
               'echo $! > %s.pid' % (DIR, DIR, DIR), stdin=WRITER)
    pid = writer_pid(lab, None)
    assert pid, 'the writer did not start'
    token = secrets.token_hex(8)
    lab.sh(VM, 'echo %s > /dev/shm/fleetckpt-marker' % token)  # in memory only: comes back with the memory
    wait_seq(lab, None, 20)

    # a memory-only checkpoint of the running VM: allowed only when forced, recorded as such
    res = play(lab, HOME, 'checkpoint', {'store': store, 'name': [VM], 'init_store': True, 'disks': 'none'})
    assert res.rc != 0 and 'memory-only' in res[HOME]['msg'], res.output
    res = play(lab, HOME, 'checkpoint', {'store': store, 'name': [VM], 'disks': 'none', 'force_memory_only': True})
    assert res.rc == 0, res.output
    memory_only = res[HOME]['checkpoints'][0]
    assert [d['memory_only'] for d in memory_only['disks']] == [True]

    # the consistent one: auto picks a copy of the raw file (no reflink on the NFS store), taken while paused
    before = last_seq(lab, None)
    # inline digest: on the lab's NFS 4.1 a deferred sha256 reads the whole copy again (~2 min), inline it costs
    # ~15 s of pause (the default, deferred, is covered by the unit tests)
    res = play(lab, HOME, 'checkpoint', {'store': store, 'name': [VM], 'disk_digest': 'inline'})
    assert res.rc == 0, res.output
    after = last_seq(lab, None)
    [c] = res[HOME]['checkpoints']
    [disk] = c['disks']
    t = c['timings']
    print('\ncheckpoint of %s with its disk: image %.1f MB, disk copy %.1f MB (%s), paused %.1f s (save %.1f s + '
          'disks %.1f s), total %.1f s' % (
              VM, c['size_bytes'] / 1e6, disk['allocated_bytes'] / 1e6, disk['reason'], t['save_s'] + t['pause_s'],
              t['save_s'], t['pause_s'], t['total_s']))
    assert disk['strategy'] == 'copy' and disk['memory_only'] is False, disk
    assert c['still_running'] is True and writer_pid(lab, None) == pid
    state = lab.domain_row(HOME, VM)[1]
    assert 'p' not in state, 'left paused: %s' % state

    info = play(lab, HOME, 'checkpoint_info', {'store': store, 'vm': [VM]})  # checksums: unit tests (slow on NFS)
    assert info.rc == 0, info.output
    by_id = {e['id']: e for e in info[HOME]['checkpoints']}
    assert by_id[c['id']]['valid'] and by_id[c['id']]['restorable'], by_id[c['id']]
    assert by_id[c['id']]['disk_bytes'] == disk['allocated_bytes'] > 100e6

    # the disk moves on; the memory-only checkpoint can no longer be restored
    wait_seq(lab, None, after + 30)
    info = play(lab, HOME, 'checkpoint_info', {'store': store, 'vm': [VM]})
    mo = {e['id']: e for e in info[HOME]['checkpoints']}[memory_only['id']]
    assert mo['valid'] and mo['restorable'] is False and mo['disks'][0]['changed_since'], mo

    first_life = read_back(lab, None)['lines']
    lab.sh(HOME, 'xl destroy %s' % VM, timeout=300)  # the VM is lost (host failure, or a CI job's revert)
    # its SSH connections die with it; the restored guest's memory holds the TCP state of the checkpoint moment,
    # so a cached connection would look alive and fail on first use
    lab.drop(VM)
    try:
        with host_memory_lock(OTHER):
            res = play(lab, OTHER, 'restore', {'store': store, 'vm': VM, 'checkpoint_id': memory_only['id']})
            assert res.rc != 0 and 'changed since' in res[OTHER]['msg'], res.output
            assert lab.domain_row(OTHER, VM) is None, 'a refused restore created a domain'

            res = play(lab, OTHER, 'restore', {'store': store, 'vm': VM, 'checkpoint_id': c['id']})
            assert res.rc == 0, res.output
            restored = res[OTHER]['restored']
            print('restore on %s: disks %s, %s' % (
                OTHER, json.dumps(restored['disks']['actions']), json.dumps(restored['timings'])))
            assert restored['disks']['mode'] == 'revert' and restored['agent'] == 'ok', restored
            assert writer_pid(lab, OTHER) == pid, 'the writer process did not survive the checkpoint/restore'
            wait_seq(lab, OTHER, 10)
            second_life = read_back(lab, OTHER)
            assert second_life['bad'] == [] and all(second_life['files'].values()), second_life
            seqs = second_life['seqs']
            assert seqs == list(range(1, len(seqs) + 1)), 'gap or duplicate in the log read back from disk'
            lines = second_life['lines']
            common = 0
            while common < min(len(lines), len(first_life)) and lines[common] == first_life[common]:
                common += 1
            # the disk holds the first life's log exactly up to the checkpoint moment, then only new lines
            assert before <= common <= after, (before, common, after)
            assert not set(lines[common:]) & set(first_life), 'lines written after the checkpoint came back'
            assert max(int(name[1:]) for name in second_life['files']) > common, 'no file written since the restore'

            # the copy is a clean filesystem once its journal is replayed, as after a power cut. Checked on the
            # checkpoint's own copy, which the replay changes: this checkpoint is not restored again
            copy = '%s/disk-xvda.img' % c['path']
            out = lab.sh(OTHER, 'e2fsck -E journal_only -y %s >/dev/null 2>&1; e2fsck -fn %s; echo rc=$?' % (copy, copy),
                         timeout=900).stdout
            assert out.strip().endswith('rc=0'), out
            # a second copy of the running VM is refused
            res = play(lab, OTHER, 'restore', {'store': store, 'vm': VM})
            assert res.rc != 0 and 'already runs on this host' in res[OTHER]['msg'], res.output

    finally:
        # home again by a cold move: the save stops it, so only its disk's identity is recorded
        if lab.domain_row(OTHER, VM) is not None:
            res = play(lab, OTHER, 'checkpoint', {'store': store, 'name': [VM], 'keep_running': False})
            assert res.rc == 0 and res[OTHER]['checkpoints'][0]['disks'][0]['strategy'] == 'none', res.output
        if lab.domain_row(HOME, VM) is None and lab.domain_row(OTHER, VM) is None:
            res = play(lab, HOME, 'restore', {'store': store, 'vm': VM})
            assert res.rc == 0, res.output
    lab.drop(VM)
    assert lab.domain_row(HOME, VM) is not None and lab.domain_row(OTHER, VM) is None
    # processes and memory-only files came through both moves
    assert writer_pid(lab, None) == pid and lab.sh(VM, 'cat /dev/shm/fleetckpt-marker').stdout.strip() == token
    assert meminfo_kb(lab, 'MemTotal') > 180 * 1024  # its memory given back (the fixture stops the writer)
