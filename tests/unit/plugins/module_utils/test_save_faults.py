# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Faults around a save: full store, timeout, interruption, a killed xl, a run that died mid-way."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
import time

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _checkpoint, _imagestream
from ansible_collections.fleetckpt.xen.plugins.module_utils._balloon import Balloon
from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import Checkpointer, checkpoint_many
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError, StoreError, XlError
from ansible_collections.fleetckpt.xen.plugins.module_utils._module import stop_on_signals
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import CheckpointStore
from ansible_collections.fleetckpt.xen.plugins.module_utils._xl import Xl, parse_xl_list

HAS_ZSTD = shutil.which('zstd') is not None

# Like xl: writes the stream; on EPIPE it reports the failure and exits 1 (xl then resumes the domain
# itself); it records how it ended in <fifo>.how so the test can tell "failed by itself" from "killed".
FAKE_XL = r'''
import os, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
how = sys.argv[4]
try:
    with open(sys.argv[1], 'wb') as out:
        for i in range(int(sys.argv[2])):
            out.write(os.urandom(1 << 20))
            out.flush()
            if sys.argv[3] == 'slow':
                time.sleep(0.2)
except BrokenPipeError:
    open(how, 'w').write('failed, resuming domain')
    sys.exit(1)
open(how, 'w').write('done')
'''


def fake_xl(tmp_path, mib, behaviour='ok'):
    return lambda fifo: [sys.executable, '-c', FAKE_XL, fifo, str(mib), behaviour, str(tmp_path / 'xl.how')]


class _FullAfter:
    """A file object that fails with ENOSPC after ``limit`` bytes, like a full filesystem."""

    def __init__(self, real, limit):
        self.real = real
        self.limit = limit
        self.written = 0

    def write(self, data):
        if self.written + len(data) > self.limit:
            raise OSError(errno.ENOSPC, 'No space left on device')
        self.written += len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def full_store(monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(_imagestream.os, 'fdopen', lambda fd, *a, **kw: _FullAfter(real_fdopen(fd, *a, **kw), 3 << 20))


@pytest.mark.parametrize('compress', [None, pytest.param('zstd', marks=pytest.mark.skipif(not HAS_ZSTD, reason='zstd'))])
def test_full_store_makes_xl_fail_by_itself_quickly(tmp_path, full_store, compress):
    """The store write fails; xl (even behind zstd) must see its stream break at once and give up by
    itself, so it resumes the domain; the error names the full store, not xl's broken pipe."""
    dest = str(tmp_path / 'image.xl')
    start = time.monotonic()
    with pytest.raises(StoreError, match='store is full'):
        _imagestream.save_stream(fake_xl(tmp_path, 64), dest, compress=compress, timeout=120)
    assert time.monotonic() - start < 60, 'the save waited for its timeout instead of failing at once'
    assert open(str(tmp_path / 'xl.how')).read() == 'failed, resuming domain'
    assert not os.path.exists(dest)


def test_timeout_lets_xl_fail_and_resume_instead_of_killing_it(tmp_path):
    dest = str(tmp_path / 'image.xl')
    with pytest.raises(XlError, match='timed out') as info:
        _imagestream.save_stream(fake_xl(tmp_path, 1000, 'slow'), dest, timeout=1, abort_grace=30)
    assert info.value.killed is False
    assert open(str(tmp_path / 'xl.how')).read() == 'failed, resuming domain'
    assert not os.path.exists(dest)


def test_timeout_kills_a_hung_xl_and_says_so(tmp_path):
    with pytest.raises(XlError, match='timed out') as info:
        _imagestream.save_stream(lambda fifo: ['sleep', '60'], str(tmp_path / 'i'), timeout=0.5, abort_grace=0.5)
    assert info.value.killed is True


def test_killed_xl_is_reported_as_killed(tmp_path):
    with pytest.raises(XlError, match='rc=-9') as info:
        _imagestream.save_stream(lambda fifo: ['sh', '-c', 'kill -9 $$'], str(tmp_path / 'i'), timeout=10)
    assert info.value.killed is True


def test_interrupt_during_save_lets_xl_resume_first(tmp_path):
    """A signal handler raising in the main thread (SIGINT here) aborts the save the graceful way."""
    dest = str(tmp_path / 'image.xl')
    # a process started in the background by a non-interactive shell inherits SIGINT ignored, and Python then
    # keeps it ignored: install the handler this test relies on
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            _imagestream.save_stream(fake_xl(tmp_path, 1000, 'slow'), dest, timeout=60, abort_grace=30)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert open(str(tmp_path / 'xl.how')).read() == 'failed, resuming domain'
    assert not os.path.exists(dest)


# --- xl state and resume ------------------------------------------------------------------------------
SUSPENDED = """Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     1     r-----      35.4
g1                                           1   256     1     ---ss-     169.0
g2                                           2   512     1     ---sc-      10.0
g3                                           3   512     1     ---sw-      10.0
"""


def test_parse_xl_list_shutdown_reasons():
    doms = parse_xl_list(SUSPENDED)
    assert doms['g1']['flags'] == ['shutdown', 'suspended']
    assert doms['g2']['flags'] == ['shutdown', 'crashed', 'shutdown_crash']
    assert doms['g3']['flags'] == ['shutdown', 'shutdown_watchdog']


class _Runner:
    def __init__(self, lists, resume_rc=0):
        self.lists = list(lists)
        self.calls = []
        self.resume_rc = resume_rc

    def run(self, argv, timeout):
        self.calls.append(argv)
        if argv[1:2] == ['list']:
            return 0, self.lists.pop(0), ''
        if argv[1] == '-c':
            return self.resume_rc, '', '' if self.resume_rc == 0 else 'libxl_domain_resume(1) failed: -3'
        raise AssertionError(argv)


def test_recover_suspended_resumes_only_a_suspended_domain():
    running = SUSPENDED.replace('---ss-', '-b----')
    runner = _Runner([SUSPENDED, running])
    assert Xl(runner=runner).recover_suspended('g1') == 'resumed'
    assert runner.calls[1][-1] == '1' and 'libxl_domain_resume' in runner.calls[1][2]
    assert Xl(runner=_Runner([running])).recover_suspended('g1') is None
    assert Xl(runner=_Runner([running])).recover_suspended('nope') == 'gone'
    with pytest.raises(XlError, match='failed'):
        Xl(runner=_Runner([SUSPENDED], resume_rc=1)).recover_suspended('g1')
    with pytest.raises(XlError, match='still shut down'):
        Xl(runner=_Runner([SUSPENDED, SUSPENDED])).recover_suspended('g1')


# --- a run that died: its intent lets the next run converge -------------------------------------------
class _Balloon:
    def __init__(self):
        self.calls = []
        self.now_kb = 131072

    def restore_memory(self, name, kb, timeout=0):
        self.calls.append((name, kb))
        self.now_kb = kb
        return {'reached': True}

    def current_kb(self, name):
        return self.now_kb


def _no_sleep(seconds):
    raise AssertionError('the balloon waited %.1fs for a domain already within its tolerance' % seconds)


class _Xl:
    def __init__(self, outcome=None):
        self.outcome = outcome
        self.mem_sets = []

    def recover_suspended(self, name):
        return self.outcome

    def mem_set(self, name, kb):
        self.mem_sets.append((name, kb))


def test_next_run_gives_back_the_memory_a_dead_run_took(tmp_path):
    store = CheckpointStore(str(tmp_path), require_marker=False)
    dead = store.begin('g1')
    dead.write_intent({'vm': 'g1', 'uuid': 'u-1', 'original_kb': 262144})
    other = store.begin('g1')
    other.write_intent({'vm': 'g1', 'uuid': 'someone-else', 'original_kb': 999999})
    balloon = _Balloon()
    ckpt = Checkpointer(_Xl('resumed'), None, store, {'balloon_timeout_s': 10}, balloon=balloon)
    dom = {'name': 'g1', 'uuid': 'u-1', 'current_kb': 131072, 'static_max_kb': 262144}
    done = ckpt.converge(dom)
    assert done == {'interrupted_runs': 1, 'resumed': True, 'original_kb': 262144, 'memory_restored': True}
    assert balloon.calls == [('g1', 262144)] and dom['current_kb'] == 262144
    store.remove_partials('g1')
    assert ckpt.converge(dom) is None


def test_a_dead_run_that_left_the_vm_just_below_its_memory_sets_the_target_back(tmp_path):
    store = CheckpointStore(str(tmp_path), require_marker=False)
    store.begin('g1').write_intent({'vm': 'g1', 'uuid': 'u-1', 'original_kb': 262144})
    xl = _Xl()
    xl.list_plain = lambda: {'g1': {'mem_mib': 255}}
    ckpt = Checkpointer(xl, None, store, {'balloon_timeout_s': 10}, balloon=Balloon(xl, sleep=_no_sleep))
    dom = {'name': 'g1', 'uuid': 'u-1', 'current_kb': 261120, 'target_kb': 261120, 'static_max_kb': 262144}
    assert ckpt.converge(dom) == {'interrupted_runs': 1, 'original_kb': 262144, 'memory_restored': True}
    # within the balloon's tolerance: one mem-set of the original and no wait (the real Balloon, a fake xl)
    assert xl.mem_sets == [('g1', 262144)] and dom['target_kb'] == 262144


def test_unreadable_intent_is_ignored_not_fatal(tmp_path):
    store = CheckpointStore(str(tmp_path), require_marker=False)
    dead = store.begin('g1')
    with open(os.path.join(dead.partial_dir, 'intent.json'), 'w') as handle:
        handle.write('{not json')
    assert store.interrupted('g1')[0]['unreadable']
    ckpt = Checkpointer(_Xl(), None, store, {'balloon_timeout_s': 10}, balloon=_Balloon())
    assert ckpt.converge({'name': 'g1', 'uuid': 'u', 'current_kb': 1}) is None


# --- cancellation ---------------------------------------------------------------------------------------
def test_cancel_skips_vms_not_started_and_lets_running_ones_finish():
    cancel = threading.Event()
    started = []

    def worker(dom):
        started.append(dom['name'])
        cancel.set()  # the signal arrives while the first VM is in progress
        time.sleep(0.1)
        return {'vm': dom['name'], 'changed': True}

    results = checkpoint_many([{'name': 'a'}, {'name': 'b'}, {'name': 'c'}], worker, 1, cancel=cancel)
    assert started == ['a']
    assert results[0] == {'vm': 'a', 'changed': True}
    assert all(r['failed'] and 'not started' in r['msg'] for r in results[1:])


def test_stop_on_signals_turns_sigterm_into_an_event():
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    try:
        cancel = stop_on_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not cancel.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cancel.is_set() and cancel.reason == 'SIGTERM'
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGHUP, old[1])


def test_fleetckpt_error_is_reported_for_unexpected_failures():
    assert issubclass(StoreError, FleetckptError)


def test_failed_save_resumes_the_domain_before_giving_memory_back(tmp_path, monkeypatch):
    """Order matters: a suspended guest cannot inflate its balloon, so resume comes first."""
    calls = []

    class Xl:
        def save_argv(self, name, path, keep_running=True):
            return ['sh', '-c', 'kill -9 $$']

        def recover_suspended(self, name):
            calls.append('resume')
            return 'resumed'

    class Balloon:
        def set_and_wait(self, name, target_kb, **kw):
            calls.append('balloon')
            return {'target_kb': target_kb}

        def restore_memory(self, name, kb, timeout=0):
            calls.append('give back')
            return {'reached': True}

    store = CheckpointStore(str(tmp_path), require_marker=False)
    opts = {'mode': 'vmme', 'keep_running': True, 'lock_timeout_s': 0, 'compression': 'none', 'zstd_level': 3,
            'zstd_threads': 1, 'save_timeout_s': 30, 'balloon_timeout_s': 10, 'stall_s': 5, 'settle_slack_mib': 8,
            'agent_timeout_s': 1, 'agent_max_age_s': 60}
    ckpt = Checkpointer(Xl(), None, store, opts, balloon=Balloon())
    dom = {'name': 'g1', 'uuid': 'u', 'domid': 3, 'current_kb': 262144, 'target_kb': 262144, 'static_max_kb': 262144}
    plan = {'requested_mode': 'vmme', 'mode': 'vmme', 'target_kb': 131072, 'reason': None, 'report': None}
    monkeypatch.setattr(_checkpoint, 'guest_health', lambda *a, **kw: None)
    with pytest.raises(XlError, match='was resumed'):
        ckpt.run(dom, {'host': 'h', 'xen_version': '4.20', 'hw_caps': ''}, plan)
    assert calls == ['balloon', 'resume', 'give back']
    assert store.partials('g1') == [] and store.list('g1') == []
