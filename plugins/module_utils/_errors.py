# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Typed errors shared by the collection's module_utils. Only a module's main() turns them into fail_json."""

from __future__ import annotations


class FleetckptError(Exception):
    """Base class of every error this collection raises on purpose."""


class InvalidInput(FleetckptError):
    """A parameter or a name is unacceptable; nothing was changed."""


class XlError(FleetckptError):
    """An xl command failed or timed out."""

    def __init__(self, argv, rc, stdout='', stderr='', timed_out=False, timeout=None, killed=False):
        self.argv = list(argv)
        self.killed = killed  # xl died from a signal / had to be killed: it did not clean up after itself
        self.rc = rc
        self.stdout = stdout or ''
        self.stderr = stderr or ''
        self.timed_out = timed_out
        self.timeout = timeout
        cmd = ' '.join(self.argv)
        if timed_out:
            msg = '%s timed out after %ss' % (cmd, timeout)
        else:
            msg = '%s failed (rc=%s)' % (cmd, rc)
        detail = one_line(self.stderr or self.stdout)
        if detail:
            msg += ': ' + detail
        super().__init__(msg)


_PROBLEM_WORDS = ('error', 'fail', 'cannot', 'refus', 'denied', 'not enough', 'over-allocation', 'timed out', 'timeout')


def one_line(output, limit=2000):
    """A command's output on one line for an error message: the lines that name a problem first (xl prints its
    progress before the libxl/libxc error that matters, and a multi-line message is cut to its first line by many
    displays), then the whole output, lines joined by `` | ``, at most ``limit`` characters of each part."""
    lines = [line.strip() for line in (output or '').splitlines() if line.strip()]
    if not lines:
        return ''
    problems = [line for line in lines if any(word in line.lower() for word in _PROBLEM_WORDS)]
    whole = ' | '.join(lines)
    if len(whole) > limit:
        whole = '...' + whole[-limit:]
    if not problems or problems == lines:
        return whole
    first = ' | '.join(problems)
    if len(first) > limit:
        first = first[:limit] + '...'
    return '%s (output: %s)' % (first, whole)


class XenStoreError(FleetckptError):
    """XenStore could not be reached or refused an operation."""


class StoreError(FleetckptError):
    """The checkpoint store is unusable (not mounted, read-only, full, corrupt)."""


class LockBusy(StoreError):
    """Another run holds the per-VM lock."""


class BalloonError(FleetckptError):
    """A balloon operation did not reach its target, stalled, or hurt the guest."""


class PolicyRefused(FleetckptError):
    """Memory exclusion is not safe or not possible for this VM."""
