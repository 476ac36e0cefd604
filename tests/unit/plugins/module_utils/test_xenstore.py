# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import threading
import time

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._agent import is_valid_nonce
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import XenStoreError
from ansible_collections.fleetckpt.xen.plugins.module_utils._xenstore import (
    XenStore, agent_path, new_nonce, parse_agent_report)

from fake_xenstored import FakeXenstored  # tests/unit is on sys.path (its conftest.py)

MIB = 1024
NOW = 1_000_000


def raw(**overrides):
    base = {'committed_as_kb': b'51200', 'mem_total_kb': b'480000', 'mem_available_kb': b'400000',
            'sunreclaim_kb': b'20000', 'page_tables_kb': b'2000', 'kernel_stack_kb': b'1500', 'mapped_kb': b'30000',
            'oom_kill': b'0', 'seq': b'7', 'ts': str(NOW - 3).encode(), 'version': b'1', 'reply': None}
    base.update(overrides)
    return base


def test_good_report():
    r = parse_agent_report(raw(), 512 * MIB, now=NOW)
    assert r['status'] == 'ok' and r['problems'] == [] and r['values']['committed_as_kb'] == 51200
    assert r['age_s'] == 3 and r['version'] == '1' and r['fresh'] is False


def test_missing_agent():
    r = parse_agent_report(dict.fromkeys(raw()), 512 * MIB, now=NOW)
    assert r['status'] == 'missing'


@pytest.mark.parametrize('key,value,problem', [
    ('committed_as_kb', b'-5', 'not a decimal integer'),
    ('committed_as_kb', b'12 ', 'not a decimal integer'),
    ('committed_as_kb', b'0x10', 'not a decimal integer'),
    ('committed_as_kb', b'1e9', 'not a decimal integer'),
    ('committed_as_kb', b'\xff\xfe', 'not a decimal integer'),
    ('mapped_kb', b'9' * 5000, 'oversized'),
    ('seq', b'99999999999999999999', 'out of range'),
    ('committed_as_kb', b'', 'not a decimal integer'),
])
def test_lying_values_are_malformed(key, value, problem):
    r = parse_agent_report(raw(**{key: value}), 512 * MIB, now=NOW)
    assert r['status'] == 'malformed' and any(problem in p for p in r['problems'])


def test_huge_memory_values_are_clamped_to_static_max():
    r = parse_agent_report(raw(committed_as_kb=b'999999999999'), 512 * MIB, now=NOW)
    assert r['status'] == 'ok' and r['values']['committed_as_kb'] == 512 * MIB and r['clamped'] == ['committed_as_kb']


def test_incomplete_and_bad_version():
    r = parse_agent_report(raw(committed_as_kb=None), 512 * MIB, now=NOW)
    assert r['status'] == 'incomplete'
    r = parse_agent_report(raw(version=b'1; rm -rf /'), 512 * MIB, now=NOW)
    assert r['status'] == 'malformed' and r['version'] is None


def test_stale_unless_the_agent_answered_our_nonce():
    old = raw(ts=str(NOW - 600).encode())
    assert parse_agent_report(old, 512 * MIB, now=NOW, max_age_s=60)['status'] == 'stale'
    future = raw(ts=str(NOW + 600).encode())
    assert parse_agent_report(future, 512 * MIB, now=NOW, max_age_s=60)['status'] == 'stale'
    nonce = new_nonce()
    answered = raw(ts=str(NOW - 600).encode(), reply=nonce.encode())
    r = parse_agent_report(answered, 512 * MIB, now=NOW, max_age_s=60, nonce=nonce)
    assert r['status'] == 'ok' and r['fresh'] is True


def test_nonce_and_paths():
    # dom0's nonces must pass the agent's own check (the agent ignores anything else)
    assert is_valid_nonce(new_nonce()) and not is_valid_nonce('x; reboot')
    assert agent_path(3, 'seq') == '/local/domain/3/data/fleetckpt/seq'
    for bad in (-1, '3', True, None):
        with pytest.raises(ValueError):
            agent_path(bad)


@pytest.fixture
def xenstored(tmp_path):
    fake = FakeXenstored(tmp_path)
    fake.start()
    yield fake
    fake.stop()


def responder(fake, domid, stop, values=None):
    """A minimal stand-in agent: answers each request with a sample, then the reply."""
    base = '/local/domain/%d/data/fleetckpt/' % domid
    seen = None
    while not stop.is_set():
        req = fake.get(base + 'request')
        if req and req != seen:
            seen = req
            for key, value in (values or raw(ts=str(int(time.time())).encode())).items():
                if value is not None:
                    fake.write(base + key, value)
            fake.write(base + 'reply', req)
        time.sleep(0.01)


def test_query_agent_round_trip(xenstored):
    stop = threading.Event()
    thread = threading.Thread(target=responder, args=(xenstored, 4, stop), daemon=True)
    thread.start()
    try:
        with XenStore(xenstored.socket_path(0)) as xs:
            report = xs.query_agent(4, 512 * MIB, timeout=2.0)
    finally:
        stop.set()
        thread.join()
    assert report['status'] == 'ok' and report['answered'] and report['fresh'] and report['query_s'] < 2.0
    assert report['values']['committed_as_kb'] == 51200


def test_query_agent_without_agent_times_out_cleanly(xenstored):
    with XenStore(xenstored.socket_path(0)) as xs:
        start = time.monotonic()
        report = xs.query_agent(9, 512 * MIB, timeout=0.3)
        assert time.monotonic() - start < 2
        assert report['status'] == 'missing' and report['answered'] is False
        assert xs.read('/local/domain/9/nothing') is None
        xs.write('/local/domain/9/x', 'v')
        assert xs.list('/local/domain/9') == ['x'] or 'x' in xs.list('/local/domain/9')
        xs.delete('/local/domain/9/x')
        assert xs.read('/local/domain/9/x') is None


def test_xenstore_errors_are_typed(xenstored, tmp_path):
    with pytest.raises(XenStoreError, match='does not exist'):
        with XenStore(str(tmp_path / 'no-socket')):
            pass
    with XenStore(xenstored.socket_path(0)) as xs:
        xenstored.fail_next('WRITE', 'EACCES')
        with pytest.raises(XenStoreError, match='xenstore write /local/domain/1/x failed'):
            xs.write('/local/domain/1/x', 'v')
