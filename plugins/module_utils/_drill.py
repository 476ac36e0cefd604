# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Restore drills: prove a checkpoint restores, without touching the VM it was taken of.

A drill restores the checkpoint as a copy under another name (new uuid), on working copies of its disks, without
network. It checks that the copy runs, got its memory back, and that its guest agent publishes. Then it destroys
the copy and removes its working disks, whatever happened, and records the verdict beside the checkpoint's
manifest (``drill.json``). ``checkpoint_info`` reports it as ``last_drill``.

The manifest itself is written once, when the checkpoint completes, and never rewritten: it is what makes the
checkpoint valid. The drill record is a separate file, parsed strictly like every file of the store (any host that
mounts the store can write it).
"""
from __future__ import annotations

import json
import os
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils import _disks
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError, InvalidInput
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import _store_error, utc_iso, write_json_atomic
from ansible_collections.fleetckpt.xen.plugins.module_utils._xl import destroy_confirmed

DRILL = 'drill.json'
DRILL_SUFFIX = '-drill'
CHECKS = ('restored', 'running', 'memory_restored', 'agent')
_FIELDS = {'checkpoint', 'host', 'at', 'ok', 'name', 'checks', 'problems', 'seconds'}
MAX_PROBLEMS = 10
MAX_TEXT = 500


def drill_name(vm, restore_as=None):
    """The name the copy runs under: ``restore_as``, else ``<vm>-drill``."""
    return restore_as or vm + DRILL_SUFFIX


def drill_options(options):
    """A restore's options turned into a drill's: no network (the copy would answer on the original's address),
    not paused (the agent must publish), working disks (``clone``; ``consume`` would use the snapshots up)."""
    if options.get('paused'):
        raise InvalidInput('a drill checks that the copy runs and its agent publishes: it cannot be paused')
    if options.get('disk_mode') not in (None, 'clone'):
        raise InvalidInput('a drill restores on working copies of the disks (disk_mode clone), not %r'
                           % options['disk_mode'])
    return dict(options, network=False, paused=False, disk_mode='clone')


def verdict(result, dom, wait_agent):
    """{check: True | False | 'skipped'} for a drill's restore ``result`` and the copy's ``xl list`` row
    (``dom``, None when it is gone), and the problems found."""
    checks = {'restored': result is not None, 'running': False, 'memory_restored': False, 'agent': 'skipped'}
    problems = []
    if result is None:
        return checks, problems
    flags = (dom or {}).get('flags') or []
    checks['running'] = dom is not None and not set(flags) & {'paused', 'crashed', 'dying'} and not any(
        f.startswith('shutdown') or f == 'suspended' for f in flags)
    if not checks['running']:
        problems.append('the copy is not running (%s)' % ((dom or {}).get('state') or 'gone'))
    checks['memory_restored'] = result.get('memory_restored') is True
    if not checks['memory_restored']:
        problems.append('its memory was not given back (%s)' % (result.get('memory_error') or result.get('memory_restored')))
    if wait_agent:
        checks['agent'] = result.get('agent') == 'ok'
        if not checks['agent']:
            problems.append('its guest agent did not publish within %ss (%s)' % (wait_agent, result.get('agent')))
    return checks, problems


def run_drill(xl, entry, options, restore, host, clock=time.monotonic, disk_env=None, now=None):
    """Restore ``entry`` as a drill copy (``options`` from :func:`drill_options`, with ``restore_as`` and
    ``disk_plan`` set), check it, destroy it and remove its working disks. ``restore(xl, entry, options)`` does the
    restore (``_checkpoint.restore_checkpoint`` bound to its XenStore). Returns the record to store; never
    leaves the copy or its disks behind, even when the restore fails."""
    name = options['restore_as']
    t0 = clock()
    result = None
    problems = []
    dom = None
    try:
        try:
            result = restore(xl, entry, options)
        except FleetckptError as exc:
            problems.append('the restore failed: %s' % exc)
        if result is not None:
            dom = xl.list_plain().get(name)
    finally:
        problems.extend(_clean_up(xl, name, options.get('disk_plan'), disk_env))
    checks, found = verdict(result, dom, options.get('wait_agent_s'))
    problems = found + problems
    return {'checkpoint': entry['id'], 'host': host, 'at': utc_iso(now), 'name': name,
            'ok': not problems and all(v in (True, 'skipped') for v in checks.values()),
            'checks': checks, 'problems': [p[:MAX_TEXT] for p in problems[:MAX_PROBLEMS]],
            'seconds': round(clock() - t0, 3)}


def _clean_up(xl, name, disk_plan, disk_env):
    problems = []
    try:
        destroy_confirmed(xl, name)
    except FleetckptError as exc:
        problems.append('could not destroy the copy %s: %s; its working disks are left in place' % (name, exc))
        return problems
    if disk_plan:
        problems.extend('working disk not removed: %s' % e for e in _disks.remove_working_disks(disk_plan['actions'], disk_env))
    return problems


def parse_drill(data, ckpt_id):
    """A drill record of checkpoint ``ckpt_id`` with exactly the expected fields and types, or None."""
    if not isinstance(data, dict) or set(data) != _FIELDS or data['checkpoint'] != ckpt_id:
        return None
    if not isinstance(data['ok'], bool) or not isinstance(data['host'], str) or not 0 < len(data['host']) <= 255:
        return None
    if not isinstance(data['at'], str) or len(data['at']) > 64 or not isinstance(data['name'], str) or len(data['name']) > 64:
        return None
    checks = data['checks']
    if not isinstance(checks, dict) or set(checks) != set(CHECKS) or not all(
            v is True or v is False or v == 'skipped' for v in checks.values()):
        return None
    problems = data['problems']
    if not isinstance(problems, list) or len(problems) > MAX_PROBLEMS or not all(
            isinstance(p, str) and len(p) <= MAX_TEXT for p in problems):
        return None
    if isinstance(data['seconds'], bool) or not isinstance(data['seconds'], (int, float)) or not 0 <= data['seconds'] < 1e6:
        return None
    if data['ok'] and (problems or not all(v in (True, 'skipped') for v in checks.values())):
        return None
    return dict(data)


def record_drill(store, vm, record):
    """Write the drill record beside the checkpoint's manifest (atomically). Raises StoreError."""
    if parse_drill(record, record.get('checkpoint')) is None:
        raise InvalidInput('invalid drill record %r' % (record,))
    path = os.path.join(store.checkpoint_dir(vm, record['checkpoint']), DRILL)
    try:
        write_json_atomic(path, record)
    except OSError as exc:
        raise _store_error('writing', path, exc)
    return record


def last_drill(store, vm, ckpt_id):
    """The checkpoint's drill record, or None when there is none or it is not a valid one."""
    try:
        with open(os.path.join(store.checkpoint_dir(vm, ckpt_id), DRILL)) as handle:
            return parse_drill(json.loads(handle.read(16384)), ckpt_id)
    except (OSError, ValueError):
        return None
