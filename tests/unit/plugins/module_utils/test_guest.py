# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import os
import stat
import threading

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _agent, _guest
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
from fake_xenstored import FakeXenstored

MEMINFO = """MemTotal:         474000 kB
MemFree:          300000 kB
MemAvailable:     400000 kB
Mapped:            30000 kB
SUnreclaim:        20000 kB
KernelStack:        1500 kB
PageTables:         2000 kB
Committed_AS:      61234 kB
"""


def test_agent_source_is_the_shipped_file():
    with open(_agent.__file__.replace('.pyc', '.py'), 'rb') as handle:
        assert _guest.agent_source() == handle.read()


def test_plan_apply_update_remove(tmp_path):
    root = str(tmp_path)
    assert _guest.plan('present', root) == {_agent.INSTALL_PATH: 'create', _agent.UNIT_PATH: 'create'}
    assert _guest.plan('absent', root) == {}
    _guest.apply(_guest.plan('present', root), root)
    assert _guest.plan('present', root) == {}
    installed = os.path.join(root, _agent.INSTALL_PATH.lstrip('/'))
    assert stat.S_IMODE(os.stat(installed).st_mode) == 0o644
    with open(installed, 'ab') as handle:
        handle.write(b'# tampered\n')
    assert _guest.plan('present', root) == {_agent.INSTALL_PATH: 'update'}
    _guest.apply(_guest.plan('absent', root), root)
    assert not os.path.exists(installed) and _guest.plan('absent', root) == {}


def test_unit_runs_the_installed_file():
    assert 'ExecStart=/usr/bin/python3 %s' % _agent.INSTALL_PATH in _agent.SYSTEMD_UNIT


@pytest.fixture
def guest(tmp_path):
    fake = FakeXenstored(tmp_path)
    fake.start()
    proc = tmp_path / 'proc'
    proc.mkdir()
    (proc / 'meminfo').write_text(MEMINFO)
    (proc / 'vmstat').write_text('oom_kill 3\n')
    sock = fake.socket_path(7)
    yield fake, sock, str(tmp_path)
    fake.stop()


def test_verify_round_trip_with_the_real_agent(guest):
    fake, sock, root = guest
    agent = _agent.Agent(lambda: _agent.XenBusClient(unix_socket_path=sock), root=root, interval=60, poll_interval=0.05)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        published = _guest.verify(timeout=5, unix_socket_path=sock, poll=0.05)
    finally:
        agent.stop()
        thread.join(5)
    assert published['committed_as_kb'] == '61234' and published['oom_kill'] == '3' and published['version'] == '1'
    assert published['reply_s'] < 5
    assert fake.read('/local/domain/7/data/fleetckpt/committed_as_kb') in ('61234', b'61234')


def test_verify_fails_clearly_without_agent(guest, tmp_path):
    _fake, sock, _root = guest
    with pytest.raises(FleetckptError, match='did not answer a fresh-sample request within 1s'):
        _guest.verify(timeout=1, unix_socket_path=sock, poll=0.05)
    with pytest.raises(FleetckptError, match='is this a Xen PV/PVH guest'):
        _guest.verify(timeout=1, xenbus_path=str(tmp_path / 'no-xenbus'))
