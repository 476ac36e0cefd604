# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Run modules' main() against a fake xl executable and a fake xenstored with a stand-in guest agent."""
from __future__ import annotations

import pytest

from fake_xenstored import FakeXenstored
from module_runner import Agents


@pytest.fixture
def xen(fake_xl, tmp_path):
    fake = FakeXenstored(tmp_path)
    fake.start()
    agents = Agents(fake)
    agents.thread.start()
    env = type('Xen', (), {})()
    env.xl = fake_xl
    env.xs = fake
    env.agents = agents
    env.store = str(tmp_path / 'store')
    env.args = {'xl_path': fake_xl.path, 'xenstore_socket': fake.socket_path(0)}
    yield env
    agents.stop.set()
    agents.thread.join()
    fake.stop()
