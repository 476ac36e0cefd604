# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Unit tests of the guest agent against the in-process fake xenstored (no Xen needed)."""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _agent
from ansible_collections.fleetckpt.xen.tests.unit.fake_xenstored import FakeXenstored

DOMID = 7
HOME = '/local/domain/%d' % DOMID
KEYS = HOME + '/data/fleetckpt'

MEMINFO = """\
MemTotal:        2014244 kB
MemFree:          822044 kB
MemAvailable:    1502816 kB
Buffers:           45352 kB
Cached:           712404 kB
SwapCached:            0 kB
Mapped:           121212 kB
Shmem:             10220 kB
KReclaimable:      60612 kB
Slab:             110320 kB
SReclaimable:      60612 kB
SUnreclaim:        49708 kB
KernelStack:        3424 kB
PageTables:         6640 kB
CommitLimit:     1007120 kB
Committed_AS:     723456 kB
VmallocTotal:   34359738367 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

VMSTAT = """\
nr_free_pages 205511
pgfault 4410231
oom_kill 3
"""


def wait_for(predicate, timeout=2.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError('condition not met within %.1fs' % timeout)


def make_root(tmp_path, meminfo=MEMINFO, vmstat=VMSTAT):
    root = tmp_path / 'root'
    (root / 'proc').mkdir(parents=True, exist_ok=True)
    (root / 'proc' / 'meminfo').write_text(meminfo)
    if vmstat is not None:
        (root / 'proc' / 'vmstat').write_text(vmstat)
    return str(root)


@pytest.fixture
def xsd(tmp_path):
    with FakeXenstored(tmp_path) as server:
        yield server


@pytest.fixture
def root(tmp_path):
    return make_root(tmp_path)


def make_agent(xsd, root, domid=DOMID, **kwargs):
    path = xsd.socket_path(domid)
    kwargs.setdefault('poll_interval', 0.01)
    kwargs.setdefault('interval', 60)
    kwargs.setdefault('log', [].append)
    return _agent.Agent(lambda: _agent.XenBusClient(unix_socket_path=path, timeout=2), root=root, **kwargs)


@contextlib.contextmanager
def running(agent):
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        agent.stop()
        thread.join(3)
        assert not thread.is_alive()


# --- parsing -----------------------------------------------------------------------------------------

def test_parse_meminfo_realistic():
    info = _agent.parse_meminfo(MEMINFO)
    assert info['Committed_AS'] == 723456
    assert info['MemTotal'] == 2014244
    assert info['VmallocTotal'] == 34359738367
    assert info['HugePages_Total'] == 0


def test_parse_meminfo_skips_malformed_lines():
    text = ('MemTotal: abc kB\nGarbage line\nMapped:  12 MB\nCommitted_AS: -5 kB\nPageTables:\n'
            'KernelStack: 12 kB trailing\n\x00\xff: 1 kB\nSUnreclaim:\t7 kB\nMemFree: 1 kB\n')
    assert _agent.parse_meminfo(text) == {'SUnreclaim': 7, 'MemFree': 1}


def test_parse_meminfo_huge_values():
    ok = 'MemTotal: 18446744073709551615 kB\n'
    assert _agent.parse_meminfo(ok) == {'MemTotal': 2 ** 64 - 1}
    too_big = 'MemTotal: 18446744073709551616 kB\nMapped: 1234567890123456789012345 kB\n'
    assert _agent.parse_meminfo(too_big) == {}


def test_parse_meminfo_rejects_duplicates():
    with pytest.raises(_agent.SampleError):
        _agent.parse_meminfo('MemTotal: 1 kB\nMemTotal: 2 kB\n')


def test_parse_vmstat():
    assert _agent.parse_vmstat(VMSTAT)['oom_kill'] == 3
    assert _agent.parse_vmstat('oom_kill x\noom_kill  4\nOOM_KILL 5\n pgfault 1\nnr 99999999999999999999999\n') == {}
    with pytest.raises(_agent.SampleError):
        _agent.parse_vmstat('oom_kill 1\noom_kill 2\n')


def test_build_sample():
    sample = _agent.build_sample(_agent.parse_meminfo(MEMINFO), _agent.parse_vmstat(VMSTAT), 12, 1700000000.9)
    assert list(sample) == list(_agent.SAMPLE_KEYS)
    assert list(sample)[-1] == 'seq'
    assert sample == {
        'committed_as_kb': '723456', 'mem_total_kb': '2014244', 'mem_available_kb': '1502816',
        'sunreclaim_kb': '49708', 'page_tables_kb': '6640', 'kernel_stack_kb': '3424', 'mapped_kb': '121212',
        'oom_kill': '3', 'ts': '1700000000', 'version': _agent.AGENT_VERSION, 'seq': '12',
    }
    assert all(isinstance(v, str) for v in sample.values())


def test_build_sample_oom_kill_absent_is_zero_and_huge_values_stay_exact():
    meminfo = _agent.parse_meminfo(MEMINFO.replace('2014244', '18446744073709551615'))
    sample = _agent.build_sample(meminfo, {}, 1, 0)
    assert sample['oom_kill'] == '0'
    assert sample['mem_total_kb'] == '18446744073709551615'


@pytest.mark.parametrize('field', [f for f, dummy in _agent.MEMINFO_FIELDS])
def test_build_sample_missing_field(field):
    text = '\n'.join(line for line in MEMINFO.splitlines() if not line.startswith(field + ':'))
    with pytest.raises(_agent.SampleError) as info:
        _agent.build_sample(_agent.parse_meminfo(text), {}, 1, 0)
    assert field in str(info.value)


@pytest.mark.parametrize('value,valid', [
    ('0123456789abcdef', True), ('f' * 64, True), ('0' * 15, False), ('a' * 65, False),
    ('0123456789ABCDEF', False), ('0123456789abcdeg', False), ('0123456789abcdef\n', False),
    ('$(id)0123456789ab', False), ('', False),
])
def test_is_valid_nonce(value, valid):
    assert _agent.is_valid_nonce(value) is valid
    assert _agent.is_valid_nonce(value.encode()) is valid


# --- the XenStore client -----------------------------------------------------------------------------

def test_client_basic_ops_relative_paths(xsd):
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        c.write('data/fleetckpt/x', '1')
        assert c.read('data/fleetckpt/x') == b'1'
        assert xsd.read(KEYS + '/x') == '1'
        c.mkdir('data/fleetckpt/dir')
        assert sorted(c.directory('data/fleetckpt')) == ['dir', 'x']
        c.rm('data/fleetckpt/x')
        with pytest.raises(_agent.NotFound) as info:
            c.read('data/fleetckpt/x')
        err = info.value
        assert isinstance(err, _agent.XenStoreError)
        assert (err.errno_name, err.op, err.path) == ('ENOENT', 'READ', 'data/fleetckpt/x')
        c.write('/abs/value', b'\x01bin')
        assert xsd.store['/abs/value'] == b'\x01bin'


def test_client_error_names_and_transactions(xsd):
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        xsd.fail_next('WRITE', 'EACCES')
        with pytest.raises(_agent.XenStoreError) as info:
            c.write('k', 'v')
        assert info.value.errno_name == 'EACCES' and not isinstance(info.value, _agent.NotFound)
        tx = c.transaction_start()
        c.write('k', 'in-tx', tx_id=tx)
        assert not xsd.exists(HOME + '/k')
        c.transaction_end(tx)
        assert xsd.read(HOME + '/k') == 'in-tx'
        tx = c.transaction_start()
        c.write('k', 'dropped', tx_id=tx)
        c.transaction_end(tx, commit=False)
        assert xsd.read(HOME + '/k') == 'in-tx'


def test_client_skips_unsolicited_watch_events(xsd):
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        c.write('k', 'v')
        wait_for(lambda: xsd.connections == 1)
        xsd.broadcast_event('/some/path', 'tok')
        xsd.broadcast_event('/other', 'tok')
        assert c.read('k') == b'v'
        assert c.skipped_events == 2


@pytest.mark.parametrize('path', ['a\0b', 'a//b', 'a/', 'a b', 'a/../b', 'x;rm', ''])
def test_client_rejects_bad_paths(xsd, path):
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        with pytest.raises(ValueError):
            c.read(path)


def test_client_oversized_payload_is_refused_locally(xsd):
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        with pytest.raises(_agent.XenStoreError) as info:
            c.write('k', 'x' * 5000)
        assert info.value.errno_name == 'E2BIG'


def test_client_over_fd_transport(xsd):
    """The /dev/xen/xenbus code path (os.read/os.write on a file descriptor), via a socketpair."""
    ours, theirs = socket.socketpair()
    xsd.attach(theirs, DOMID)
    c = _agent.XenBusClient.from_fd(os.dup(ours.fileno()), timeout=2)
    ours.close()
    try:
        c.write('data/fleetckpt/seq', '9')
        xsd.broadcast_event('/x', 't')
        assert c.read('data/fleetckpt/seq') == b'9'
        tx = c.transaction_start()
        c.write('data/fleetckpt/ts', '1', tx_id=tx)
        c.transaction_end(tx)
        assert xsd.read(KEYS + '/ts') == '1'
    finally:
        c.close()
    with pytest.raises(_agent.XenStoreConnectionError):
        c.read('data/fleetckpt/seq')                     # an fd client never reopens some other device


def test_client_connection_errors(xsd, tmp_path):
    c = _agent.XenBusClient(unix_socket_path=str(tmp_path / 'missing.sock'))
    with pytest.raises(_agent.XenStoreConnectionError):
        c.read('k')
    c = _agent.XenBusClient(xenbus_path=str(tmp_path / 'no-xenbus'))
    with pytest.raises(_agent.XenStoreConnectionError) as info:
        c.connect()
    assert info.value.errno_name == 'ENOENT'
    c = _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID), timeout=2)
    c.write('k', '1')
    xsd.drop_connections()
    with pytest.raises(_agent.XenStoreConnectionError):
        c.read('k')
    assert not c.connected
    assert c.read('k') == b'1'            # reconnects on the next call
    c.close()


# --- publishing ----------------------------------------------------------------------------------------

def test_write_sample_one_transaction_seq_last(xsd):
    sample = _agent.build_sample(_agent.parse_meminfo(MEMINFO), {}, 5, 100)
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        assert _agent.write_sample(c, sample, reply='ab' * 8) == 1
    writes = xsd.ops('WRITE', DOMID)
    assert len(writes) == len(sample) + 1
    assert len(set(tx for dummy, dummy2, tx, dummy3 in writes)) == 1 and writes[0][2] != 0
    assert [w[3] for w in writes][-2:] == ['data/fleetckpt/seq', 'data/fleetckpt/reply']
    for key, value in sample.items():
        assert xsd.read(KEYS + '/' + key) == value
    assert xsd.read(KEYS + '/reply') == 'ab' * 8


def test_write_sample_retries_eagain_on_commit(xsd):
    sample = _agent.build_sample(_agent.parse_meminfo(MEMINFO), {}, 1, 100)
    sleeps = []
    xsd.fail_next('TRANSACTION_END', 'EAGAIN', count=2)
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        assert _agent.write_sample(c, sample, sleep=sleeps.append) == 3
    assert len(sleeps) == 2 and max(sleeps) < 0.1
    assert xsd.read(KEYS + '/seq') == '1'
    assert len(xsd.ops('TRANSACTION_START', DOMID)) == 3


def test_write_sample_retries_eagain_inside_transaction(xsd):
    sample = _agent.build_sample(_agent.parse_meminfo(MEMINFO), {}, 1, 100)
    xsd.fail_next('WRITE', 'EAGAIN', count=1)
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        assert _agent.write_sample(c, sample, sleep=lambda s: None) == 2
    # The first transaction was aborted ("F") after the failed WRITE, the second committed.
    assert len(xsd.ops('TRANSACTION_END', DOMID)) == 2
    assert xsd.read(KEYS + '/seq') == '1'


def test_write_sample_gives_up_after_attempts(xsd):
    sample = _agent.build_sample(_agent.parse_meminfo(MEMINFO), {}, 1, 100)
    xsd.fail_next('TRANSACTION_END', 'EAGAIN', count=10)
    with _agent.XenBusClient(unix_socket_path=xsd.socket_path(DOMID)) as c:
        with pytest.raises(_agent.XenStoreError) as info:
            _agent.write_sample(c, sample, attempts=3, sleep=lambda s: None)
    assert info.value.errno_name == 'EAGAIN'
    assert len(xsd.ops('TRANSACTION_START', DOMID)) == 3
    assert not xsd.exists(KEYS + '/seq')


# --- the agent loop ------------------------------------------------------------------------------------

def test_agent_publishes_at_start(xsd, root):
    with running(make_agent(xsd, root)):
        wait_for(lambda: xsd.get(KEYS + '/seq') == '1')
    assert xsd.read(KEYS + '/committed_as_kb') == '723456'
    assert xsd.read(KEYS + '/oom_kill') == '3'
    assert xsd.read(KEYS + '/version') == _agent.AGENT_VERSION
    assert abs(int(xsd.read(KEYS + '/ts')) - time.time()) < 5


def test_agent_periodic_publishing(xsd, root):
    with running(make_agent(xsd, root, interval=0.05)):
        wait_for(lambda: int(xsd.get(KEYS + '/seq', '0')) >= 3)


def test_request_gets_reply_with_fresh_seq(xsd, root, tmp_path):
    agent = make_agent(xsd, root)
    with running(agent):
        wait_for(lambda: xsd.get(KEYS + '/seq') == '1')
        # The sample must be fresh: change what /proc says before asking.
        make_root(tmp_path, MEMINFO.replace('723456', '800000'))
        nonce = '0123456789abcdef0123456789abcdef'
        started = time.monotonic()
        xsd.write(KEYS + '/request', nonce)
        wait_for(lambda: xsd.get(KEYS + '/reply') == nonce)
        assert time.monotonic() - started < 1.0
        assert xsd.read(KEYS + '/seq') == '2'
        assert xsd.read(KEYS + '/committed_as_kb') == '800000'
        # The same nonce is answered only once.
        time.sleep(0.05)
        assert xsd.read(KEYS + '/seq') == '2'
        xsd.write(KEYS + '/request', 'f' * 64)
        wait_for(lambda: xsd.get(KEYS + '/reply') == 'f' * 64)
        assert xsd.read(KEYS + '/seq') == '3'
    assert agent.stats['replies'] == 2


def test_request_from_pyxs_dom0_client(xsd, root):
    pyxs = pytest.importorskip('pyxs')
    with running(make_agent(xsd, root)):
        wait_for(lambda: xsd.get(KEYS + '/seq'))
        with pyxs.Client(unix_socket_path=xsd.socket_path(0)) as dom0:
            dom0.write((KEYS + '/request').encode(), b'deadbeefdeadbeef')
            wait_for(lambda: dom0.read((KEYS + '/reply').encode(), b'-') == b'deadbeefdeadbeef')
            assert dom0.read((KEYS + '/seq').encode()) == b'2'


HOSTILE = [
    '$(touch {canary})', '`touch {canary}`', '; touch {canary}', '0123456789abcdef; touch {canary}',
    '0123456789abcdef && touch {canary}', 'a' * 65, '0123456789abcde', '0123456789ABCDEF', 'zzzzzzzzzzzzzzzz',
    '0123456789abcdef\n', ' 0123456789abcdef', '0123456789abcdef\x00ff', 'x' * 4000,
]


def test_invalid_requests_are_ignored_and_never_executed(xsd, root, tmp_path, monkeypatch):
    canary = tmp_path / 'canary'

    def forbidden(*args, **kwargs):
        raise AssertionError('the agent tried to execute something')

    for name in ('system', 'popen', 'execv', 'execve', 'execvp', 'spawnv', 'posix_spawn'):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, forbidden)
    monkeypatch.setattr(subprocess, 'Popen', forbidden)
    logs = []
    agent = make_agent(xsd, root, log=logs.append)
    with running(agent):
        wait_for(lambda: xsd.get(KEYS + '/seq') == '1')
        for template in HOSTILE:
            value = template.format(canary=canary)
            before = agent.stats['invalid_requests']
            xsd.write(KEYS + '/request', value)
            wait_for(lambda: agent.stats['invalid_requests'] > before)
        time.sleep(0.05)
        assert xsd.read(KEYS + '/seq') == '1'
        assert not xsd.exists(KEYS + '/reply')
        # A valid nonce still works afterwards.
        xsd.write(KEYS + '/request', '00112233445566778899aabbccddeeff')
        wait_for(lambda: xsd.get(KEYS + '/reply') == '00112233445566778899aabbccddeeff')
    assert not canary.exists()
    assert agent.stats['invalid_requests'] == len(HOSTILE)
    invalid_logs = [line for line in logs if 'malformed request' in line]
    assert len(invalid_logs) == 1                      # rate limited
    assert 'touch' not in ''.join(logs) and str(canary) not in ''.join(logs)


def test_same_invalid_request_is_counted_once(xsd, root):
    agent = make_agent(xsd, root)
    with running(agent):
        xsd.write(KEYS + '/request', 'not-a-nonce')
        wait_for(lambda: agent.stats['invalid_requests'] == 1)
        time.sleep(0.05)
    assert agent.stats['invalid_requests'] == 1


def test_restore_detection_republishes_at_once(xsd, root):
    agent = make_agent(xsd, root)
    with running(agent):
        xsd.write(KEYS + '/request', 'ab' * 8)
        wait_for(lambda: xsd.get(KEYS + '/reply') == 'ab' * 8)
        seq = int(xsd.read(KEYS + '/seq'))
        started = time.monotonic()
        xsd.rm(KEYS)                                     # what a restored domain looks like
        wait_for(lambda: xsd.get(KEYS + '/seq'))
        assert time.monotonic() - started < 0.5
        assert int(xsd.read(KEYS + '/seq')) == seq + 1
        assert xsd.read(KEYS + '/committed_as_kb') == '723456'
    assert agent.stats['restores'] == 1


def test_restore_detection_without_prior_request(xsd, root):
    agent = make_agent(xsd, root, restore_check_interval=0.02)
    with running(agent):
        wait_for(lambda: xsd.get(KEYS + '/seq') == '1')
        xsd.rm(KEYS + '/seq')
        wait_for(lambda: xsd.get(KEYS + '/seq') == '2')


def test_restore_to_new_domid(xsd, root):
    """xl restore: same guest connection, new domid, empty home; relative paths follow."""
    agent = make_agent(xsd, root, restore_check_interval=0.02)
    with running(agent):
        xsd.write(KEYS + '/request', 'cd' * 8)
        wait_for(lambda: xsd.get(KEYS + '/reply') == 'cd' * 8)
        xsd.rebind_domain(DOMID, 42)
        wait_for(lambda: xsd.get('/local/domain/42/data/fleetckpt/seq'))
        # dom0 may reuse nothing: a new nonce to the new domid is answered.
        xsd.write('/local/domain/42/data/fleetckpt/request', 'ef' * 8)
        wait_for(lambda: xsd.get('/local/domain/42/data/fleetckpt/reply') == 'ef' * 8)
    assert not xsd.exists(HOME)


def test_vanished_request_triggers_immediate_restore_check(xsd, root):
    """Deterministic: a restore wipes ``request`` too; the very next tick checks ``seq`` and republishes."""
    clock = [1000.0]
    agent = make_agent(xsd, root, monotonic=lambda: clock[0], restore_check_interval=3600)
    agent.tick()                                         # publishes seq 1
    xsd.write(KEYS + '/request', 'ab' * 8)
    clock[0] += 0.2
    agent.tick()                                         # answers: seq 2
    assert xsd.read(KEYS + '/reply') == 'ab' * 8
    xsd.rm(KEYS)
    clock[0] += 0.2
    agent.tick()
    assert xsd.read(KEYS + '/seq') == '3'
    assert agent.stats['restores'] == 1
    agent.close()


def test_one_read_per_tick(xsd, root):
    clock = [1000.0]
    agent = make_agent(xsd, root, monotonic=lambda: clock[0], restore_check_interval=1.0, poll_interval=0.2)
    agent.tick()                                         # first tick: publishes
    del xsd.op_log[:]
    for dummy in range(4):                               # 4 ticks within the restore-check period
        clock[0] += 0.2
        agent.tick()
    assert [e[1] for e in xsd.op_log] == ['READ'] * 4
    assert all(e[3] == 'data/fleetckpt/request' for e in xsd.op_log)
    clock[0] += 0.2
    agent.tick()                                         # restore check due: READ request + READ seq
    assert [e[3] for e in xsd.op_log[4:]] == ['data/fleetckpt/request', 'data/fleetckpt/seq']
    agent.close()


def test_error_backoff_grows_caps_and_resets(xsd, root, tmp_path):
    target = {'path': str(tmp_path / 'nothing-here.sock')}
    logs = []
    agent = _agent.Agent(lambda: _agent.XenBusClient(unix_socket_path=target['path'], timeout=1), root=root,
                         poll_interval=0.01, log=logs.append)
    delays = [agent.step() for dummy in range(8)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert max(delays) <= _agent.BACKOFF_MAX
    assert len(logs) == 1 and 'CONNECT' in logs[0]     # identical errors are rate limited
    target['path'] = xsd.socket_path(DOMID)
    assert agent.step() == 0.01
    assert agent.backoff == 0.0
    assert xsd.read(KEYS + '/seq') == '1'
    agent.close()


def test_loop_survives_xenstore_errors(xsd, root):
    waits = []
    agent = make_agent(xsd, root)
    agent._waiter = lambda delay: (waits.append(delay), agent._stop.wait(min(delay, 0.01)))
    with running(agent):
        wait_for(lambda: xsd.get(KEYS + '/seq') == '1')
        xsd.fail_next('READ', 'EIO', count=3, domid=DOMID)
        wait_for(lambda: agent.stats['errors'] >= 3)
        xsd.drop_connections(DOMID)
        xsd.write(KEYS + '/request', '12' * 8)
        wait_for(lambda: xsd.get(KEYS + '/reply') == '12' * 8)
    assert 0.2 in waits and 0.4 in waits


def test_sampling_errors_back_off(xsd, tmp_path):
    root = make_root(tmp_path, MEMINFO.replace('Committed_AS', 'Committed_XX'))
    logs = []
    agent = make_agent(xsd, root, log=logs.append)
    assert agent.step() == _agent.BACKOFF_MIN
    assert not xsd.exists(KEYS + '/seq')
    assert 'Committed_AS' in logs[0]
    agent.close()


def test_run_returns_zero_on_stop(xsd, root):
    agent = make_agent(xsd, root)
    threading.Timer(0.05, agent.stop).start()
    assert agent.run() == 0


# --- command line / installation -------------------------------------------------------------------------

def test_main_once_end_to_end(xsd, root):
    assert _agent.main(['--once', '--unix-socket', xsd.socket_path(DOMID), '--root', root]) == 0
    assert xsd.read(KEYS + '/seq') == '1'
    assert xsd.read(KEYS + '/mem_total_kb') == '2014244'
    assert xsd.read(KEYS + '/mapped_kb') == '121212'
    assert not xsd.exists(KEYS + '/reply')


def test_main_once_failures(xsd, tmp_path, root, capsys):
    assert _agent.main(['--once', '--unix-socket', str(tmp_path / 'none.sock'), '--root', root]) == 1
    assert _agent.main(['--once', '--unix-socket', xsd.socket_path(DOMID), '--root', str(tmp_path / 'void')]) == 1
    out = capsys.readouterr()
    assert out.out == '' and 'publish failed' in out.err


def test_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        _agent.main(['--interval', '0'])
    with pytest.raises(SystemExit):
        _agent.main(['--xenbus', '/a', '--unix-socket', '/b'])


@pytest.fixture
def installed_script(tmp_path):
    """The agent exactly as guest_agent installs it: inspect.getsource() written to a standalone file."""
    script = tmp_path / 'fleetckpt_agent.py'
    script.write_text(inspect.getsource(_agent))
    return str(script)


def test_standalone_script_once(xsd, root, installed_script):
    proc = subprocess.run([sys.executable, '-I', installed_script, '--once', '--unix-socket',
                           xsd.socket_path(DOMID), '--root', root], capture_output=True, timeout=10, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b''
    assert xsd.read(KEYS + '/seq') == '1'


def test_standalone_script_exits_cleanly_on_sigterm(xsd, root, installed_script):
    proc = subprocess.Popen([sys.executable, '-I', installed_script, '--unix-socket', xsd.socket_path(DOMID),
                             '--root', root, '--poll-interval', '0.05'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: xsd.get(KEYS + '/seq') == '1', timeout=5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == b''


def test_import_has_no_side_effects(installed_script):
    code = ('import importlib.util, threading, sys\n'
            'spec = importlib.util.spec_from_file_location("agent_under_test", sys.argv[1])\n'
            'mod = importlib.util.module_from_spec(spec)\n'
            'spec.loader.exec_module(mod)\n'
            'assert threading.active_count() == 1\n')
    proc = subprocess.run([sys.executable, '-I', '-c', code, installed_script], capture_output=True, timeout=10,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b'' and proc.stderr == b''


def test_source_uses_only_the_standard_library():
    source = inspect.getsource(_agent)
    assert 'ansible' not in ''.join(line for line in source.splitlines() if line.startswith(('import', 'from')))
    for forbidden in ('subprocess', 'os.system', 'eval(', 'exec(', 'shell=True', 'pickle'):
        assert forbidden not in source


def test_systemd_unit_hardening():
    unit = _agent.SYSTEMD_UNIT
    lines = set(unit.splitlines())
    for expected in (
        'ExecStart=/usr/bin/python3 /usr/local/lib/fleetckpt/fleetckpt_agent.py',
        'Restart=always', 'RestartSec=2', 'NoNewPrivileges=yes', 'CapabilityBoundingSet=', 'PrivateNetwork=yes',
        'ProtectSystem=strict', 'ProtectHome=yes', 'PrivateTmp=yes', 'ProtectKernelTunables=yes',
        'DevicePolicy=closed', 'DeviceAllow=/dev/xen/xenbus rw', 'MemoryMax=32M', 'RestrictAddressFamilies=AF_UNIX',
        'SystemCallArchitectures=native', 'WantedBy=multi-user.target', '[Unit]', '[Service]', '[Install]',
    ):
        assert expected in lines, expected
    assert 'PrivateDevices=yes' not in unit           # would hide /dev/xen/xenbus
    assert 'ProcSubset=pid' not in unit               # would hide /proc/meminfo
    assert 'ExecStartPre' not in unit and 'mount' not in unit
    assert unit.endswith('\n')


def test_install_constants():
    assert _agent.INSTALL_PATH == '/usr/local/lib/fleetckpt/fleetckpt_agent.py'
    assert _agent.UNIT_PATH == '/etc/systemd/system/fleetckpt-agent.service'
    assert os.path.basename(_agent.UNIT_PATH) == _agent.SERVICE_NAME
    assert _agent.AGENT_VERSION == '1'
