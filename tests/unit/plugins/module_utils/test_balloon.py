# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._balloon import Balloon, guest_health
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import BalloonError

from sim_clock import Clock  # tests/unit is on sys.path (its conftest.py)

MIB = 1024


class SimXl:
    """Simulated domain whose memory moves ``rate`` MiB per poll toward the target, stopping at ``stuck_at``."""

    def __init__(self, mem_mib, rate=100, stuck_at=None):
        self.mem = mem_mib
        self.target = mem_mib
        self.rate = rate
        self.stuck_at = stuck_at
        self.sets = []

    def mem_set(self, name, kib):
        self.sets.append(kib // MIB if kib % MIB == 0 else kib / MIB)
        self.target = kib / MIB

    def list_plain(self):
        floor = self.target if self.stuck_at is None else max(self.target, self.stuck_at)
        if self.mem > floor:
            self.mem = max(floor, self.mem - self.rate)
        elif self.mem < self.target:
            self.mem = min(self.target, self.mem + self.rate)
        return {'g': {'mem_mib': int(self.mem)}}


def balloon(xl, clock):
    return Balloon(xl, poll=1.0, clock=clock, sleep=clock.sleep)


def test_reaches_target_going_down_and_up():
    clock = Clock()
    xl = SimXl(1024)
    b = balloon(xl, clock)
    res = b.set_and_wait('g', 300 * MIB)
    assert res['reached'] and res['current_kb'] == 300 * MIB and not res['adjusted'] and res['start_kb'] == 1024 * MIB
    res = b.set_and_wait('g', 1024 * MIB)
    assert res['reached'] and res['current_kb'] == 1024 * MIB


def test_settling_just_above_target_raises_target_to_what_was_reached():
    clock = Clock()
    xl = SimXl(1024, stuck_at=132)  # measured on Xen 4.17: 132 MiB shown for a 128 MiB target
    res = balloon(xl, clock).set_and_wait('g', 128 * MIB, stall_s=5, settle_slack_kb=8 * MIB)
    assert res['reached'] and res['adjusted'] and res['target_kb'] == 133 * MIB
    assert xl.sets == [128, 133]  # the saved target is >= what the domain holds: restorable


def test_a_balloon_stopped_within_the_slack_settles_without_waiting_out_the_stall_time():
    clock = Clock()
    xl = SimXl(1024, stuck_at=132)
    res = balloon(xl, clock).set_and_wait('g', 128 * MIB, stall_s=30, settle_slack_kb=8 * MIB)
    assert res['reached'] and res['adjusted'] and res['target_kb'] == 133 * MIB
    assert clock.t <= 15  # 9 s to get there, then SETTLE_S (5 s), not the 30 s stall time


def test_a_balloon_still_moving_within_the_slack_is_waited_for():
    clock = Clock()
    xl = SimXl(1024, rate=1)  # 1 MiB a poll (1 s): never 5 s without progress
    xl.mem = 140
    res = balloon(xl, clock).set_and_wait('g', 128 * MIB, stall_s=30, settle_slack_kb=32 * MIB)
    assert res['reached'] and not res['adjusted'] and res['current_kb'] == 128 * MIB


def test_stall_far_above_target_is_an_error():
    clock = Clock()
    xl = SimXl(1024, stuck_at=500)
    with pytest.raises(BalloonError, match='stalled .* at 500 MiB, target 128 MiB'):
        balloon(xl, clock).set_and_wait('g', 128 * MIB, stall_s=5, settle_slack_kb=8 * MIB)
    assert clock.t < 20


def test_slow_progress_is_not_a_stall_but_times_out():
    clock = Clock()
    xl = SimXl(1024, rate=2)
    with pytest.raises(BalloonError, match='timed out'):
        balloon(xl, clock).set_and_wait('g', 128 * MIB, timeout=30, stall_s=5)


def test_restore_memory_reports_instead_of_raising():
    clock = Clock()
    xl = SimXl(128, rate=0)
    res = balloon(xl, clock).restore_memory('g', 1024 * MIB, timeout=10, stall_s=3)
    assert res['reached'] is False and 'stalled' in res['error'] and xl.sets == [1024]


def test_vanished_domain():
    class Gone(SimXl):
        def list_plain(self):
            return {}
    with pytest.raises(BalloonError, match='disappeared'):
        balloon(Gone(512), Clock()).set_and_wait('g', 128 * MIB)


class FakeXs:
    def __init__(self, *reports):
        self.reports = list(reports)

    def query_agent(self, domid, static_max_kb, timeout, max_age_s):
        return self.reports.pop(0)


def rep(status='ok', answered=True, oom=0):
    return {'status': status, 'answered': answered, 'values': {'oom_kill': oom}}


def test_guest_health():
    dom = {'domid': 3, 'static_max_kb': 1}
    assert guest_health(FakeXs(rep()), dom, rep()) is None
    assert 'stopped answering' in guest_health(FakeXs(rep(answered=False)), dom, rep())
    assert 'stopped answering' in guest_health(FakeXs(rep(status='malformed')), dom, rep())
    assert 'OOM killer fired 2' in guest_health(FakeXs(rep(oom=5)), dom, rep(oom=3))
