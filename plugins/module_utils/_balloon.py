# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Set a domain's memory target and wait until the balloon gets there, with stall detection.

Why "reached" is strict when going down: Xen restores a domain with at most its saved target + 1 MiB,
so an image saved while the balloon was still above target cannot be restored anywhere (measured on
Xen 4.17: "Over-allocation for d1: 33025 > 33024"). ``xl list`` reports memory rounded down to a MiB,
so ``xl list`` <= target means the domain holds less than target + 1 MiB. When the balloon settles a
little above the target (within ``settle_slack_kb``) the target is raised to what was reached (rounded
up), which keeps the image restorable; further above is a stall and an error.

A balloon within that slack counts as settled once it has not moved for ``SETTLE_S`` (or the stall time, when
shorter), not the whole stall time: a guest's balloon driver that fails to take pages backs off and, after a few
rounds, stops trying, so waiting out the stall time there (30 s by default) only adds to the time the VM runs
squeezed before its save. Measured on the lab: anonymous-memory guests that stopped 2-8 MiB above a 355 MiB target
spent 44-58 s in the balloon, against 3 s for the same guest reaching it.
"""

from __future__ import annotations

import time

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import BalloonError
from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import KIB_PER_MIB

UP_TOLERANCE_KB = 2 * KIB_PER_MIB
SETTLE_S = 5.0  # seconds without progress after which a balloon within its settle slack counts as settled


class Balloon:
    def __init__(self, xl, poll=0.5, clock=time.monotonic, sleep=time.sleep):
        self.xl = xl
        self.poll = poll
        self.clock = clock
        self.sleep = sleep

    def current_kb(self, name):
        row = self.xl.list_plain().get(name)
        if row is None:
            raise BalloonError('domain %s disappeared while its memory was being changed' % name)
        return row['mem_mib'] * KIB_PER_MIB

    def set_and_wait(self, name, target_kb, timeout=120.0, stall_s=20.0, settle_slack_kb=8 * KIB_PER_MIB, wait=True):
        """Set the target and wait. Returns a dict with ``reached``, ``target_kb`` (possibly adjusted),
        ``current_kb``, ``start_kb``, ``elapsed_s``. Raises BalloonError on stall or timeout. Going down, a balloon
        within ``settle_slack_kb`` of the target that has not moved for ``SETTLE_S`` (or ``stall_s``) is settled."""
        start = self.clock()
        start_kb = self.current_kb(name)
        self.xl.mem_set(name, target_kb)
        result = {'start_kb': start_kb, 'requested_kb': target_kb, 'target_kb': target_kb, 'current_kb': start_kb,
                  'reached': False, 'adjusted': False, 'elapsed_s': 0.0}
        if not wait:
            result['elapsed_s'] = round(self.clock() - start, 3)
            return result
        going_down = target_kb < start_kb
        best = start_kb
        last_progress = start
        while True:
            current = self.current_kb(name)
            now = self.clock()
            result['current_kb'] = current
            result['elapsed_s'] = round(now - start, 3)
            if going_down and current <= target_kb:
                result['reached'] = True
                return result
            if not going_down and current >= target_kb - UP_TOLERANCE_KB:
                result['reached'] = True
                return result
            improved = current < best if going_down else current > best
            if improved and abs(current - best) >= KIB_PER_MIB:
                best = current
                last_progress = now
            elif improved:
                best = current
            idle = now - last_progress
            stalled = idle >= stall_s
            timed_out = now - start >= timeout
            settled = going_down and current - target_kb <= settle_slack_kb and idle >= min(stall_s, SETTLE_S)
            if stalled or timed_out or settled:
                if going_down and current - target_kb <= settle_slack_kb:
                    # settled just above the target: make the target honest so the image stays restorable
                    adjusted = current + KIB_PER_MIB
                    self.xl.mem_set(name, adjusted)
                    result.update(target_kb=adjusted, adjusted=True, reached=True)
                    return result
                why = 'stalled (no progress for %.0fs)' % (now - last_progress) if stalled else 'timed out'
                raise BalloonError('balloon of %s %s at %d MiB, target %d MiB (started at %d MiB)'
                                   % (name, why, current // KIB_PER_MIB, target_kb // KIB_PER_MIB, start_kb // KIB_PER_MIB))
            self.sleep(self.poll)

    def restore_memory(self, name, target_kb, timeout=120.0, stall_s=30.0):
        """Give memory back (best effort on the wait, but the target itself must be set)."""
        try:
            return self.set_and_wait(name, target_kb, timeout=timeout, stall_s=stall_s)
        except BalloonError as exc:
            # The target is set; the guest fills up at its own pace. Report, do not hide it.
            return {'target_kb': target_kb, 'reached': False, 'error': str(exc)}


# After a balloon down the agent gets this long to answer, however short the query timeout: a guest squeezed to its
# commit while it writes answers slowly (seconds under emulation, measured on the lab) without being unhealthy.
HEALTH_TIMEOUT_S = 15.0


def guest_health(xs, dom, before, timeout=2.0, max_age_s=60):
    """After ballooning down: None if healthy, else why not. The agent must answer a fresh request within
    ``max(timeout, HEALTH_TIMEOUT_S)`` and the guest's OOM-kill count (from ``before``, the report taken before the
    balloon) must not have grown."""
    report = xs.query_agent(dom['domid'], dom.get('static_max_kb'), timeout=max(timeout, HEALTH_TIMEOUT_S),
                            max_age_s=max_age_s)
    if report['status'] != 'ok' or not report.get('answered'):
        return 'the guest agent stopped answering after the balloon (%s)' % report['status']
    old = ((before or {}).get('values') or {}).get('oom_kill')
    new = report['values'].get('oom_kill')
    if old is not None and new is not None and new > old:
        return 'the guest OOM killer fired %d time(s) during the balloon' % (new - old)
    return None
