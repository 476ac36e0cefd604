# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Fault injection on the real Xen lab: every failure leaves the VM running at its original memory, the store
consistent (no valid-looking partial checkpoint, earlier checkpoints untouched) and says clearly what failed.

The faults are real: a guest process that lies over XenStore, a memory hog that keeps the balloon from
shrinking, `kill -9` of `xl save` and of the module mid-save, a full and a read-only filesystem, a lock
held from the other host over NFS, corrupted images, a host without free memory. The table in
tests/README.md maps each test to the guarantee it proves. The tests use g1 and g2 on xen1 only, while the other
files run on xen2 at the same time (conftest.py); filling xen1's memory happens under its memory lock.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

from lablib import host_memory_lock  # noqa: E402
from playbook import ansible_env, playbook_cmd, run_task  # noqa: E402

STORE = '/srv/fleetckpt/faults'
AGENT_DIR = '/usr/local/lib/fleetckpt'
MIB = 1024

# A guest process that answers dom0's agent requests with whatever it is told to: the agent's own wire
# code, fed invented values. The real agent is stopped while it runs.
LIAR = r'''
import sys, time
sys.path.insert(0, %(agent_dir)r)
import fleetckpt_agent as a
real, vmstat = a.read_proc('/')
c = a.XenBusClient()
c.connect()
last, seq, done = None, 1, set()
while True:
    try:
        mode = open('/tmp/liar.mode').read().strip()
    except OSError:
        mode = 'idle'
    if mode == 'missing' and mode not in done:
        c.rm('data/fleetckpt')
    if mode == 'flood' and mode not in done:
        for i in range(600):
            try:
                c.write('data/fleetckpt/junk%%d' %% i, 'x' * 200)
            except a.XenStoreError:
                break
    done.add(mode)
    sample = a.build_sample(real, vmstat, seq, time.time())
    if mode == 'negative':
        sample['committed_as_kb'] = '-5'
    elif mode == 'text':
        sample['committed_as_kb'] = 'lots'
    elif mode == 'oversized':
        sample['committed_as_kb'] = '1' * 3000
    elif mode == 'huge':
        for key in ('committed_as_kb', 'mem_total_kb', 'mapped_kb'):
            sample[key] = '9' * 15  # 10^15 kB: parses, far above static-max
    elif mode == 'tiny':
        for key in ('committed_as_kb', 'sunreclaim_kb', 'page_tables_kb', 'kernel_stack_kb', 'mapped_kb'):
            sample[key] = '1'
    try:
        req = c.read('data/fleetckpt/request')
    except a.XenStoreError:
        req = None
    if mode not in ('missing', 'idle') and req and req != last and a.is_valid_nonce(req):
        a.write_sample(c, sample, reply=req.decode())
        last, seq = req, seq + 1
    time.sleep(0.1)
''' % {'agent_dir': AGENT_DIR}


def play(lab, hosts, module, args=None, check=False, **kw):
    return run_task(lab.inventory_path, hosts, module, args, check=check, **kw)


def store_tree(lab, root=STORE):
    return lab.sh('xen1', 'cd %s 2>/dev/null && find . -not -name .lock | sort' % root, check=False).stdout


def host_state(lab, host):
    """What a failed restore's message lacks, on one line: the host's domains, free memory and Xen's last words."""
    out = lab.sh(host, "xl list; xl info | grep -E '^(free_memory|outstanding_claims)'; xl dmesg | tail -n 15; "
                       "tail -n 15 /var/log/xen/xen-hotplug.log 2>/dev/null", check=False, timeout=120).stdout
    return ' | '.join(line.strip() for line in out.splitlines() if line.strip())


def boot_id(lab, guest):
    return lab.sh(guest, 'cat /proc/sys/kernel/random/boot_id').stdout.strip()


def assert_vm_intact(lab, vm, mem_mib, boot, host='xen1'):
    """The VM runs (not paused, not suspended) at its original memory, answers SSH, and was not rebooted."""
    row = lab.domain_row(host, vm)
    assert row is not None, '%s no longer exists on %s' % (vm, host)
    assert row[0] == mem_mib, '%s is at %s MiB, not its original %s MiB' % (vm, row[0], mem_mib)
    assert 'p' not in row[1] and 's' not in row[1], '%s is left in state %s' % (vm, row[1])
    assert boot_id(lab, vm) == boot, '%s was rebooted' % vm


def assert_no_partials(lab, vm, root=STORE):
    # a VM's directory holds its lock, its placement record and complete checkpoints (named by their UTC id), nothing else
    left = lab.sh('xen1', 'ls -A %s/%s 2>/dev/null | grep -v -e "^\\.lock$" -e "^placement\\.json$" -e "^[0-9]" || true'
                  % (root, vm)).stdout.split()
    assert left == [], 'leftovers in the store: %s' % left


def valid_ids(lab, vm, root=STORE, verify=False):
    res = play(lab, 'xen1', 'checkpoint_info', {'store': root, 'vm': [vm], 'verify_checksum': verify})
    assert res.rc == 0, res.output
    return sorted(c['id'] for c in res['xen1']['checkpoints'] if c['valid'])


def ckpt(lab, vm, check=False, store=STORE, **args):
    base = {'store': store, 'name': [vm], 'stall_timeout': 15, 'balloon_timeout': 120}
    if args.get('keep_running', True):
        # these faults are about the memory: a running VM's disk is not captured (test_consistency.py does that)
        base.update(disks='none', force_memory_only=True)
    base.update(args)
    return play(lab, 'xen1', 'checkpoint', base, check=check)


def start_liar(lab, guest, mode):
    """The real agent stops; one liar process per guest serves every mode (python starts slowly under TCG)."""
    lab.sh(guest, 'systemctl stop fleetckpt-agent; echo %s > /tmp/liar.mode' % shlex.quote(mode))
    if lab.sh(guest, 'test -s /tmp/liar.pid && kill -0 $(cat /tmp/liar.pid)', check=False).rc != 0:
        lab.sh(guest, 'cat > /tmp/liar.py', stdin=LIAR)
        lab.sh(guest, 'nohup python3 /tmp/liar.py > /tmp/liar.log 2>&1 & echo $! > /tmp/liar.pid')
    time.sleep(1)


def agent_seq(lab, guest):
    return lab.sh('xen1', 'xenstore-read /local/domain/$(xl domid %s)/data/fleetckpt/seq 2>/dev/null' % guest,
                  check=False).stdout.strip()


def wait_agent_publishing(lab, guest, timeout=180):
    """Until the real agent publishes new samples again (it starts slowly under emulation)."""
    first = agent_seq(lab, guest)
    deadline = time.monotonic() + timeout
    while True:
        seq = agent_seq(lab, guest)
        if seq and seq != first:
            return
        assert time.monotonic() < deadline, 'the agent of %s did not publish within %ss' % (guest, timeout)
        time.sleep(1)


def stop_liar(lab, guest, for_good=False):
    """Back to the real agent (the liar idles, or exits with ``for_good``)."""
    lab.sh(guest, 'echo idle > /tmp/liar.mode; systemctl start fleetckpt-agent', check=False)
    if for_good:
        lab.sh(guest, 'test -s /tmp/liar.pid && kill $(cat /tmp/liar.pid); rm -f /tmp/liar.pid /tmp/liar.mode', check=False)


@pytest.fixture(scope='module')
def faults(lab):
    """Agent on g1/g2, a fresh store, the VMs' memory and boot ids recorded, and one good checkpoint of g1."""
    res = play(lab, 'g1,g2', 'guest_agent', {})
    assert res.rc == 0, res.output
    lab.sh('xen1', 'rm -rf %s' % STORE)
    res = ckpt(lab, 'g1', init_store=True)
    assert res.rc == 0, res.output
    state = {'mem': {vm: lab.domain_row('xen1', vm)[0] for vm in ('g1', 'g2')},
             'boot': {vm: boot_id(lab, vm) for vm in ('g1', 'g2')},
             'good': res['xen1']['checkpoints'][0]['id']}
    yield state
    for vm in ('g1', 'g2'):
        stop_liar(lab, vm, for_good=True)


@pytest.mark.parametrize('mode,why', [
    ('negative', 'malformed'), ('text', 'malformed'), ('oversized', 'malformed'), ('missing', 'missing'),
])
def test_lying_or_missing_agent_falls_back_or_fails_cleanly(lab, faults, mode, why):
    start_liar(lab, 'g2', mode)
    try:
        res = ckpt(lab, 'g2', check=True)
        assert res.rc == 0, res.output
        plan = res['xen1']['checkpoints'][0]
        assert plan['mode'] == 'native' and why in plan['fallback_reason'], plan
        before = store_tree(lab)
        res = ckpt(lab, 'g2', fallback='fail')
        assert res.rc != 0
        assert 'memory exclusion not possible' in res['xen1']['msg'] and why in res['xen1']['msg'], res['xen1']['msg']
        assert store_tree(lab) == before
        assert_vm_intact(lab, 'g2', faults['mem']['g2'], faults['boot']['g2'])
    finally:
        stop_liar(lab, 'g2')


def test_stale_agent_falls_back(lab, faults):
    wait_agent_publishing(lab, 'g2')
    lab.sh('g2', 'systemctl stop fleetckpt-agent')
    try:
        time.sleep(6)
        res = ckpt(lab, 'g2', check=True, agent_max_age=5)
        plan = res['xen1']['checkpoints'][0]
        assert plan['mode'] == 'native' and 'stale' in plan['fallback_reason'], plan
    finally:
        lab.sh('g2', 'systemctl start fleetckpt-agent')


def test_huge_values_are_clamped_and_flooding_is_harmless(lab, faults):
    start_liar(lab, 'g2', 'huge')
    try:
        res = ckpt(lab, 'g2', check=True)
        plan = res['xen1']['checkpoints'][0]
        assert plan['mode'] == 'vmme' and plan['saved_kb'] == faults['mem']['g2'] * MIB, plan  # no reclaim
    finally:
        stop_liar(lab, 'g2')
    start_liar(lab, 'g2', 'flood')
    try:
        res = ckpt(lab, 'g2', check=True)
        assert res.rc == 0 and res['xen1']['checkpoints'][0]['mode'] == 'vmme', res.output
    finally:
        stop_liar(lab, 'g2')
        lab.sh('g2', 'python3 -c "import sys; sys.path.insert(0, %r); import fleetckpt_agent as a; c = a.XenBusClient(); '
                     'c.connect(); [c.rm(\'data/fleetckpt/\' + k) for k in c.directory(\'data/fleetckpt\') '
                     'if k.startswith(b\'junk\'.decode()) or k.startswith(\'junk\')]"' % AGENT_DIR, check=False)


def test_lie_too_low_never_balloons_below_the_floor(lab, faults):
    start_liar(lab, 'g2', 'tiny')
    try:
        res = ckpt(lab, 'g2', floor_mib=192)
        assert res.rc == 0, res.output
        done = res['xen1']['checkpoints'][0]
        assert done['mode'] == 'vmme' and done['saved_kb'] == 192 * MIB, done
        assert_vm_intact(lab, 'g2', faults['mem']['g2'], faults['boot']['g2'])
    finally:
        stop_liar(lab, 'g2')


def test_stuck_balloon_gives_memory_back_and_saves_nothing(lab, faults):
    """The agent claims almost nothing is used while a process holds 300 MB: the balloon cannot get there."""
    lab.sh('g2', 'nohup python3 -c "import time; b = bytearray(300 << 20); '
                 '[b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; open(\'/tmp/hog.ready\', \'w\').close(); '
                 'time.sleep(3600)" > /dev/null 2>&1 & echo $! > /tmp/hog.pid')
    start_liar(lab, 'g2', 'tiny')
    try:
        deadline = time.monotonic() + 120
        while lab.sh('g2', 'test -e /tmp/hog.ready', check=False).rc != 0:
            assert time.monotonic() < deadline, 'the memory hog did not start'
            time.sleep(2)
        before = store_tree(lab)
        res = ckpt(lab, 'g2', floor_mib=128, stall_timeout=15)
        assert res.rc != 0, res.output
        msg = res['xen1']['msg']
        assert 'stalled' in msg or 'OOM' in msg or 'timed out' in msg, msg
        assert 'memory given back' in msg or 'nothing saved' in msg or 'stalled' in msg, msg
        assert store_tree(lab) == before
        assert_no_partials(lab, 'g2')
        assert_vm_intact(lab, 'g2', faults['mem']['g2'], faults['boot']['g2'])
    finally:
        stop_liar(lab, 'g2')
        lab.sh('g2', 'kill $(cat /tmp/hog.pid) 2>/dev/null; rm -f /tmp/hog.pid /tmp/hog.ready', check=False)


def _wait_save_running(lab, vm, root=STORE, timeout=300):
    """PID of the `xl save` of vm in dom0 once its image has real bytes in the store's partial dir."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = lab.sh('xen1', 'pgrep -f "bin/xl save -c %s " ; du -b %s/%s/.*.partial/image.xl* 2>/dev/null | cut -f1'
                     % (vm, root, vm), check=False).stdout.split()
        if len(out) >= 2 and int(out[-1]) > 8 << 20:
            return int(out[0])
        time.sleep(0.5)
    raise AssertionError('no xl save of %s seen within %ss' % (vm, timeout))


def _in_background(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.update(res=fn()), daemon=True)
    thread.start()
    return thread, box


def test_xl_save_killed_mid_write(lab, faults):
    thread, box = _in_background(lambda: ckpt(lab, 'g1'))
    pid = _wait_save_running(lab, 'g1')
    lab.sh('xen1', 'kill -9 %d' % pid)
    thread.join(600)
    res = box['res']
    assert res.rc != 0, res.output
    msg = res['xen1']['msg']
    assert 'rc=-9' in msg and 'resumed' in msg, msg
    assert_no_partials(lab, 'g1')
    assert faults['good'] in valid_ids(lab, 'g1', verify=True)
    assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])


def test_controller_killed_mid_play_then_rerun_converges(lab, faults):
    """ansible-playbook dies mid-save (its process group killed): the module on dom0 finishes on its own."""
    inv = lab.inventory_path
    play_file = Path('/tmp/fleetckpt-fault-play.yml')
    play_file.write_text(json.dumps([{'hosts': 'xen1', 'gather_facts': False, 'tasks': [
        {'fleetckpt.xen.checkpoint': {'store': STORE, 'name': ['g1'], 'disks': 'none', 'force_memory_only': True}}]}]))
    proc = subprocess.Popen(playbook_cmd(inv, play_file, 1), env=ansible_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_save_running(lab, 'g1')
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group we started
        proc.wait()
    deadline = time.monotonic() + 300
    while lab.sh('xen1', 'pgrep -f "bin/xl save -c g1 "', check=False).rc == 0:
        assert time.monotonic() < deadline, 'the orphaned save never ended'
        time.sleep(2)
    res = ckpt(lab, 'g1', lock_timeout=120)
    assert res.rc == 0, res.output
    assert_no_partials(lab, 'g1')
    assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])


def test_module_killed_after_balloon_next_run_gives_memory_back(lab, faults):
    """kill -9 of the module right after the balloon (no finally runs): the next run finds the intent
    the dead run left in the store and gives the VM its memory back before anything else."""
    thread, box = _in_background(lambda: ckpt(lab, 'g1'))
    _wait_save_running(lab, 'g1')
    holder = lab.sh('xen1', 'cat %s/g1/.lock' % STORE).stdout
    pid = int(holder.split('pid=')[1].split()[0])
    lab.sh('xen1', 'kill -9 %d' % pid)
    thread.join(600)
    assert box['res'].rc != 0
    deadline = time.monotonic() + 120
    while lab.sh('xen1', 'pgrep -f "bin/xl save -c g1 "', check=False).rc == 0:
        assert time.monotonic() < deadline
        time.sleep(1)
    row = lab.domain_row('xen1', 'g1')
    assert row[0] < faults['mem']['g1'], 'expected the dead run to leave g1 ballooned down: %s' % (row,)
    res = ckpt(lab, 'g1')
    assert res.rc == 0, res.output
    done = res['xen1']['checkpoints'][0]
    assert done['recovered']['interrupted_runs'] >= 1 and done['original_kb'] == faults['mem']['g1'] * MIB, done
    assert_no_partials(lab, 'g1')
    assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])


@pytest.fixture
def small_store(lab):
    """A tiny filesystem of its own, mounted in xen1's dom0, as a store."""
    mnt = '/mnt/fleetckpt-small'
    lab.sh('xen1', 'umount %s 2>/dev/null; mkdir -p %s && truncate -s 48M /root/small.img && mkfs.ext4 -q -F /root/small.img '
                   '&& mount -o loop /root/small.img %s' % (mnt, mnt, mnt))
    yield mnt
    lab.sh('xen1', 'umount %s; rm -f /root/small.img' % mnt, check=False)


def test_store_full_read_only_and_unmounted(lab, faults, small_store):
    res = ckpt(lab, 'g1', store=small_store, init_store=True, mode='native')
    assert res.rc != 0, res.output
    assert 'store is full' in res['xen1']['msg'], res['xen1']['msg']
    assert_no_partials(lab, 'g1', root=small_store)
    assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])
    # the same through zstd (a store write failing behind a compressor must not wedge the pipeline)
    lab.sh('xen1', 'dd if=/dev/urandom of=%s/filler bs=1M count=40 2>/dev/null; sync' % small_store, check=False)
    res = ckpt(lab, 'g1', store=small_store, compression='zstd', mode='native', save_timeout=600)
    assert res.rc != 0 and 'store is full' in res['xen1']['msg'], res.output
    assert_no_partials(lab, 'g1', root=small_store)
    assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])
    lab.sh('xen1', 'rm -f %s/filler && mount -o remount,ro %s' % (small_store, small_store))
    res = ckpt(lab, 'g1', store=small_store)
    assert res.rc != 0 and 'not writable' in res['xen1']['msg'].lower() or 'read-only' in res['xen1']['msg'].lower(), res.output
    lab.sh('xen1', 'umount %s' % small_store)
    res = ckpt(lab, 'g1', store=small_store)
    assert res.rc != 0 and 'mounted' in res['xen1']['msg'], res.output
    assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])


def test_corrupted_checkpoints_are_invalid_and_restore_refuses(lab, faults):
    good = faults['good']
    base = '%s/g1' % STORE
    bad = {}
    for kind, damage in (('truncated', 'truncate -s -4096 {d}/image.xl'),
                         ('flipped', 'printf X | dd of={d}/image.xl bs=1 seek=300000 conv=notrunc 2>/dev/null'),
                         ('manifest', 'truncate -s 50 {d}/manifest.json')):
        ckpt_id = '20000101T000000.000Z-%s' % secrets.token_hex(4)
        d = '%s/%s' % (base, ckpt_id)
        lab.sh('xen1', 'cp -a %s/%s %s && %s' % (base, good, d, damage.format(d=d)))
        if kind != 'manifest':
            lab.sh('xen1', "sed -i 's/%s/%s/' %s/manifest.json" % (good, ckpt_id, d))
        bad[kind] = ckpt_id
    try:
        res = play(lab, 'xen1', 'checkpoint_info', {'store': STORE, 'vm': ['g1'], 'verify_checksum': True})
        by_id = {c['id']: c for c in res['xen1']['checkpoints']}
        for kind, ckpt_id in bad.items():
            assert by_id[ckpt_id]['valid'] is False and by_id[ckpt_id]['problems'], (kind, by_id[ckpt_id])
        assert by_id[good]['valid'] is True
        # only this suite's domains: xen2's suite moves g3/g4 onto and off xen1 meanwhile (a count of every domain
        # failed in CI when one of them left)
        domains = own_domains(lab)
        for kind, ckpt_id in bad.items():
            # as a copy: under its own name the running g1 is refused first, before any checksum is read
            res = play(lab, 'xen1', 'restore', {'vm': 'g1', 'store': STORE, 'checkpoint_id': ckpt_id,
                                                'restore_as': 'g1-bad', 'network': False})
            assert res.rc != 0 and 'not valid' in res['xen1']['msg'], (kind, res['xen1'].get('msg'))
        assert own_domains(lab) == domains
        assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])
    finally:
        lab.sh('xen1', 'rm -rf %s' % ' '.join('%s/%s' % (base, i) for i in bad.values()))


def own_domains(lab):
    """The domains on xen1 apart from xen2's suite's guests (g3, g4), with their domid."""
    out = lab.sh('xen1', 'xl list | tail -n +2').stdout
    return sorted((f[0], f[1]) for f in (line.split() for line in out.splitlines()) if f and f[0] not in ('g3', 'g4'))


def test_same_name_running_restore_refused(lab, faults):
    res = play(lab, 'xen1', 'restore', {'vm': 'g1', 'store': STORE, 'checkpoint_id': faults['good']})
    assert res.rc != 0 and 'already runs' in res['xen1']['msg'], res['xen1'].get('msg')
    assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])


RELEASE = '/tmp/fleetckpt-release-lock'


def test_lock_held_from_the_other_host_then_released(lab, faults):
    """A run on xen2 holds g1's lock over NFS: xen1's run fails cleanly without touching g1, then waits."""
    # the holder keeps the lock until RELEASE appears (a fixed hold raced the first run on a slow lab)
    holder = ("rm -f %s; python3 -c \"import fcntl, os, time; fd = os.open('%s/g1/.lock', os.O_RDWR); "
              "fcntl.lockf(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'host=xen2 pid=%%d' %% os.getpid()); "
              "os.fsync(fd); "
              "[time.sleep(0.5) for _ in iter(lambda: os.path.exists('%s'), True)]\" > /dev/null 2>&1 & echo $!"
              % (RELEASE, STORE, RELEASE))
    pid = int(lab.sh('xen2', holder).stdout.strip())
    try:
        deadline = time.monotonic() + 120  # until the holder has the lock (its pid in the lock file)
        while 'pid=%d' % pid not in lab.sh('xen1', 'cat %s/g1/.lock' % STORE, check=False).stdout:
            assert time.monotonic() < deadline, 'the lock holder on xen2 never got the lock'
            time.sleep(1)
        res = ckpt(lab, 'g1', lock_timeout=2)
        assert res.rc != 0 and 'another fleetckpt run holds' in res['xen1']['msg'] and 'xen2' in res['xen1']['msg'], \
            res['xen1'].get('msg')
        assert_vm_intact(lab, 'g1', faults['mem']['g1'], faults['boot']['g1'])
        thread, box = _in_background(lambda: ckpt(lab, 'g1', lock_timeout=180))  # waits for the holder to finish
        time.sleep(10)
        lab.sh('xen2', 'touch %s' % RELEASE)
        thread.join(900)
        assert box['res'].rc == 0, box['res'].output
    finally:
        lab.sh('xen2', 'touch %s; sleep 2; kill %d 2>/dev/null; rm -f %s' % (RELEASE, pid, RELEASE), check=False)


@pytest.mark.parametrize('module,args,expect', [
    ('checkpoint', {'store': STORE, 'name': ['g1'], 'state': 'absent', 'checkpoint_id': '../../etc'}, 'checkpoint id'),
    ('checkpoint', {'store': STORE, 'name': ['../x'], 'state': 'absent', 'checkpoint_id': '20260101T000000.000Z-00000000'},
     'name'),
    ('checkpoint', {'store': 'relative/store', 'name': ['g1']}, 'absolute'),
    ('checkpoint', {'store': STORE, 'name': ['g1'], 'parallel': 0}, 'out of range'),
    ('checkpoint', {'store': STORE, 'name': ['g1'], 'zstd_level': 99}, 'out of range'),
    ('checkpoint', {'store': STORE, 'name': ['g1'], 'reserve_pct': 400}, 'reserve_pct'),
    ('restore', {'vm': '/etc/passwd', 'store': STORE}, 'name'),
    ('restore', {'vm': 'g' * 300, 'store': STORE}, 'name'),
    # ansible-core itself refuses a NUL in any argument before the module runs (syslog of the invocation)
    ('restore', {'vm': 'g1\u0000x', 'store': STORE}, 'null character'),
    ('checkpoint_info', {'store': STORE, 'vm': ['..']}, 'name'),
])
def test_bad_names_and_values_are_rejected_and_nothing_is_written(lab, faults, module, args, expect):
    before = store_tree(lab)
    res = play(lab, 'xen1', module, args)
    assert res.rc != 0, res.output
    assert expect in res['xen1']['msg'].lower(), res['xen1']['msg']
    assert store_tree(lab) == before


HOG_CFG = '''name = "fleetckpt-hog"
type = "pv"
kernel = "/var/lib/fleetckpt-lab/vmlinuz"
memory = %d
vcpus = 1
'''


def test_restore_without_enough_free_memory_is_refused_before_anything_is_created(lab, faults):
    """g2 is suspended to the store; another domain then takes the host's memory: the restore refuses
    with the numbers and creates nothing; once the memory is free again, g2 comes back as it was."""
    lab.sh('g2', 'echo before-suspend > /root/fault-marker && sync')
    res = ckpt(lab, 'g2', keep_running=False)
    assert res.rc == 0, res.output
    assert lab.domain_row('xen1', 'g2') is None
    with host_memory_lock('xen1'):  # no VM of the other suites moves onto xen1 while the hog holds its memory
        try:
            free = int(lab.sh('xen1', "xl info | awk '/^free_memory/{print $3}'").stdout)
            lab.sh('xen1', 'cat > /root/hog.cfg && xl create -p /root/hog.cfg', stdin=HOG_CFG % (free - 200), timeout=300)
            res = play(lab, 'xen1', 'restore', {'vm': 'g2', 'store': STORE})
            assert res.rc != 0, res.output
            msg = res['xen1']['msg']
            assert 'MiB free' in msg and 'needs' in msg, msg
            assert lab.domain_row('xen1', 'g2') is None, 'a refused restore created a domain'
        finally:
            lab.sh('xen1', 'xl destroy fleetckpt-hog; rm -f /root/hog.cfg', check=False, timeout=300)
            res = play(lab, 'xen1', 'restore', {'vm': 'g2', 'store': STORE, 'if_running': 'skip'})
    assert res.rc == 0, res.output
    lab.wait_ssh('g2', 300)
    assert lab.sh('g2', 'cat /root/fault-marker').stdout.strip() == 'before-suspend'
    assert_vm_intact(lab, 'g2', faults['mem']['g2'], faults['boot']['g2'])


def restore_sample(lab, vm):
    """The valid checkpoints of vm, their checksums verified, one per kind: (mode, compression, memory saved).
    The faults above leave many checkpoints of the same kind (the same save path after different refusals);
    each restore takes over a minute under emulation, so one of each kind comes back, the newest."""
    res = play(lab, 'xen1', 'checkpoint_info', {'store': STORE, 'vm': [vm], 'verify_checksum': True})
    assert res.rc == 0, res.output
    valid = [c for c in res['xen1']['checkpoints'] if c['valid']]
    assert all(c['checksum_verified'] for c in valid), valid
    kinds = {}
    for c in sorted(valid, key=lambda c: c['id']):  # ids sort by time: the newest of a kind wins
        kinds[(c['mode'], c['compression'], c['saved_kb'])] = c['id']
    print('\n%s: %d valid checkpoint(s), %d kind(s) restored: %s' % (vm, len(valid), len(kinds), sorted(kinds)))
    return sorted(kinds.values())


def test_every_kind_of_valid_checkpoint_restores_as_a_copy_beside_the_original(lab, faults):
    """Guarantee 10: whatever the faults above did, every checkpoint reported valid has its checksum right, and
    one of each kind restores. It comes back under another name (new uuid) beside its running original, paused,
    on a scratch disk, without network -- the `restore_as` path of item 9 -- and is destroyed again."""
    checked = 0
    for vm in ('g1', 'g2'):
        ids = restore_sample(lab, vm)  # the fixture's checkpoint of g1 at least; more after the tests above
        copy = '%s-verify' % vm
        scratch = '/root/%s.img' % copy
        for ckpt_id in ids:
            lab.sh('xen1', 'truncate -s 4G %s' % scratch)  # paused: the guest never reads it
            try:
                # the lock: no VM of the other suite is restored onto xen1 meanwhile (xen2's DR test restores onto
                # xen1): on one emulated dom0, two restores at once can push xl's block hotplug script past
                # libxl's 40-s timeout, as this restore's did in one CI run
                with host_memory_lock('xen1'):
                    res = play(lab, 'xen1', 'restore', {
                        'vm': vm, 'store': STORE, 'checkpoint_id': ckpt_id, 'restore_as': copy, 'paused': True,
                        'network': False, 'wait_agent': 0, 'disk_map': {'/srv/fleetckpt/lab/disks/%s.img' % vm: scratch}})
                assert res.rc == 0, '%s/%s does not restore: %s -- xen1 then: %s' % (
                    vm, ckpt_id, res['xen1'].get('msg'), host_state(lab, 'xen1'))
                restored = res['xen1']['restored']
                assert restored['vm'] == copy and restored['source_vm'] == vm and restored['network'] is False
                row = lab.domain_row('xen1', copy)
                assert row is not None and 'p' in row[1], row
                cfg = json.loads(lab.sh('xen1', 'xl list -l %s' % copy).stdout)[0]['config']
                assert cfg['disks'][0]['pdev_path'] == scratch and not cfg.get('nics')
                assert cfg['c_info']['uuid'] != json.loads(lab.sh('xen1', 'xl list -l %s' % vm).stdout)[0]['config']['c_info']['uuid']
                checked += 1
            finally:
                lab.sh('xen1', 'xl destroy %s 2>/dev/null; rm -f %s' % (copy, scratch), check=False, timeout=300)
        assert_vm_intact(lab, vm, faults['mem'][vm], faults['boot'][vm])
    assert checked >= 1
