# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Rebalance planner: a pure, deterministic function from hosts and VMs to balloon targets and moves.

Inputs (KiB everywhere):
  hosts: [{'name', 'free_kb', 'evacuate': bool (optional)}]
  vms:   [{'name', 'host', 'current_kb', 'target_kb' (policy target or None), 'static_max_kb'}]
Rules:
  1. Every VM with a policy target below its current memory is ballooned to it (memory reclaimed).
  2. Each VM on an evacuated host must move; on other hosts, while free memory stays below
     ``headroom_kb`` after ballooning, the largest VMs move first (ties broken by name).
  3. A moved VM needs its original memory (``current_kb``; restore gives the memory back) plus
     headroom on the destination; the destination is the non-evacuated host with the most free
     memory that fits, ties broken by name. A VM that fits nowhere is reported as unplaced.
  4. No host is ever planned below ``headroom_kb`` free.
"""

from __future__ import annotations

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput


def _need(item, key, kind):
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput('%s %r: %s must be a non-negative integer (KiB), got %r' % (kind, item.get('name'), key, value))
    return value


def plan_rebalance(hosts, vms, headroom_kb=0):
    if isinstance(headroom_kb, bool) or not isinstance(headroom_kb, int) or headroom_kb < 0:
        raise InvalidInput('headroom_kb must be a non-negative integer')
    free = {}
    evacuate = set()
    for host in sorted(hosts, key=lambda h: h.get('name') or ''):
        name = host.get('name')
        if not isinstance(name, str) or not name or name in free:
            raise InvalidInput('host names must be unique non-empty strings, got %r' % (name,))
        free[name] = _need(host, 'free_kb', 'host')
        if host.get('evacuate'):
            evacuate.add(name)
    balloons, moves, unplaced, notes = [], [], [], []
    placed = {}
    seen = set()
    for vm in sorted(vms, key=lambda v: v.get('name') or ''):
        name = vm.get('name')
        if not isinstance(name, str) or not name or name in seen:
            raise InvalidInput('VM names must be unique non-empty strings, got %r' % (name,))
        seen.add(name)
        if vm.get('host') not in free:
            raise InvalidInput('VM %r runs on unknown host %r' % (name, vm.get('host')))
        current = _need(vm, 'current_kb', 'VM')
        target = vm.get('target_kb')
        if target is not None:
            target = _need(vm, 'target_kb', 'VM')
        placed[name] = dict(vm, current_kb=current, memory_kb=current)
        if target is not None and target < current and vm['host'] not in evacuate:
            balloons.append({'vm': name, 'host': vm['host'], 'from_kb': current, 'to_kb': target,
                             'reclaim_kb': current - target})
            free[vm['host']] += current - target
            placed[name]['memory_kb'] = target
    for host in sorted(free):
        residents = sorted((v for v in placed.values() if v['host'] == host),
                           key=lambda v: (-v['memory_kb'], v['name']))
        for vm in residents:
            if host not in evacuate and free[host] >= headroom_kb:
                break
            why = 'host %s is evacuated' % host if host in evacuate else \
                'host %s has %d KiB free, below headroom %d KiB' % (host, free[host], headroom_kb)
            need = vm['current_kb'] + headroom_kb
            options = sorted((h for h in free if h != host and h not in evacuate and free[h] >= need),
                             key=lambda h: (-free[h], h))
            if not options:
                unplaced.append({'vm': vm['name'], 'host': host, 'needs_kb': vm['current_kb'],
                                 'reason': why + '; no other host has %d KiB free' % need})
                continue
            dest = options[0]
            free[dest] -= vm['current_kb']
            free[host] += vm['memory_kb']
            moves.append({'vm': vm['name'], 'from': host, 'to': dest, 'memory_kb': vm['current_kb'], 'reason': why})
            # a VM that moves is restored with its memory given back: drop its balloon step
            # (free[host] already holds the balloon's reclaim, so adding memory_kb frees current_kb in all)
            balloons = [b for b in balloons if b['vm'] != vm['name']]
    for host in sorted(free):
        if free[host] < headroom_kb and host not in evacuate:
            notes.append('host %s stays below headroom: %d KiB free' % (host, free[host]))
    return {'balloons': balloons, 'moves': moves, 'unplaced': unplaced,
            'free_after_kb': dict(sorted(free.items())), 'notes': notes}


def summarize_plan(plan, unit_kb=1024):
    """One readable line per step of a plan from ``plan_rebalance`` (moves first, in order), sizes in MiB."""
    lines = []
    for m in plan['moves']:
        lines.append('move %s %s -> %s (%d MiB): %s' % (m['vm'], m['from'], m['to'], m['memory_kb'] // unit_kb, m['reason']))
    for b in plan['balloons']:
        lines.append('balloon %s on %s %d -> %d MiB' % (b['vm'], b['host'], b['from_kb'] // unit_kb, b['to_kb'] // unit_kb))
    for u in plan['unplaced']:
        lines.append('CANNOT move %s from %s (%d MiB): %s' % (u['vm'], u['host'], u['needs_kb'] // unit_kb, u['reason']))
    lines.extend(plan['notes'])
    if not lines:
        lines.append('nothing to do')
    return lines
