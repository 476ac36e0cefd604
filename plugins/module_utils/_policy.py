# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Memory policy: how far a VM may be ballooned down before it is saved.

target = Committed_AS + unreclaimable kernel memory (SUnreclaim + PageTables + KernelStack)
         + mapped file pages + the kernel's own memory + reserve,
         reserve = max(reserve_mib, reserve_pct % of static-max),
rounded up to a whole MiB, never below ``floor_mib``, never above the VM's current memory or static-max.

The kernel's own memory is the domain's current memory minus the guest's MemTotal: what the guest kernel took at
boot (its image, the page structures of all of static-max) is part of the domain's memory, the balloon target's
unit, but never of MemTotal, whose unit the other terms share. Without it, the benchmark's 512 MB guest holding
its anonymous memory was ballooned to 355 MiB, of which 51 MiB were the kernel's own: it kept 1.5 MiB of page
cache, its agent answered slowly, and at the restore's resume its OOM killer killed the workload. A guest that
reports a MemTotal too low only raises its own target.

Committed_AS alone is too low: on the lab an aged 1 GiB PV guest with Committed_AS 35 MB, ballooned to
Committed_AS + 64 MiB (99 MiB), never settled (stuck at 119 MiB), thrashed and fired its OOM killer; at
131 MiB it was healthy with 12 MB available, at 163 MiB comfortably so. Hence the extra terms and the
128 MiB default floor.
"""

from __future__ import annotations

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput

KIB_PER_MIB = 1024
DEFAULTS = {
    'reserve_mib': 32,
    'reserve_pct': 3,
    'floor_mib': 128,
}
_KERNEL_KEYS = ('sunreclaim_kb', 'page_tables_kb', 'kernel_stack_kb')


def check_params(params):
    """Validate policy parameters; returns a complete dict with defaults filled in."""
    merged = dict(DEFAULTS)
    for key, value in (params or {}).items():
        if key not in DEFAULTS:
            raise InvalidInput('unknown memory policy parameter %r' % key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput('memory policy parameter %s must be a number, got %r' % (key, value))
        merged[key] = value
    if merged['reserve_mib'] < 0 or merged['floor_mib'] < 0:
        raise InvalidInput('reserve_mib and floor_mib must not be negative')
    if not 0 <= merged['reserve_pct'] <= 100:
        raise InvalidInput('reserve_pct must be between 0 and 100, got %r' % merged['reserve_pct'])
    if merged['floor_mib'] < 32:
        raise InvalidInput('floor_mib below 32 MiB is never safe for a Linux guest (got %r)' % merged['floor_mib'])
    return merged


def unsafe_reason(dom):
    """Why ballooning this domain is unsafe, or None. ``dom`` is the merged xl facts of one domain."""
    if dom.get('domid') == 0:
        return 'domain 0 is never ballooned by fleetckpt'
    if dom.get('pci_passthrough'):
        return 'PCI passthrough: the device may DMA into ballooned-out pages'
    if dom.get('vnuma'):
        return 'vNUMA layout: ballooning would unbalance the guest NUMA nodes'
    dtype = dom.get('type')
    if dtype == 'hvm':
        static_max = dom.get('static_max_kb')
        target = dom.get('target_kb')
        if not (isinstance(static_max, int) and isinstance(target, int) and target < static_max):
            return 'HVM guest without populate-on-demand (memory == maxmem): cannot balloon safely'
    elif dtype not in ('pv', 'pvh'):
        return 'unknown domain type %r' % dtype
    flags = dom.get('flags') or []
    for bad in ('paused', 'shutdown', 'crashed', 'dying'):
        if bad in flags:
            return 'domain is %s' % bad
    return None


def _ceil_mib(kib):
    return -(-int(kib) // KIB_PER_MIB) * KIB_PER_MIB


def compute_target(dom, report, params=None):
    """Compute the balloon target of one VM.

    Returns a dict: ``status`` (``ok``, ``refused`` or ``no_agent``), ``reason``, ``target_kb`` (None unless
    ok), ``reclaimable_kb``, ``components`` (each term in KiB) and ``limited_by`` (what bounded the target).
    """
    params = check_params(params)
    current = dom.get('current_kb')
    static_max = dom.get('static_max_kb') or current
    result = {'status': 'ok', 'reason': None, 'target_kb': None, 'reclaimable_kb': 0, 'components': {},
              'limited_by': None}
    reason = unsafe_reason(dom)
    if reason:
        result.update(status='refused', reason=reason)
        return result
    if not isinstance(current, int) or current <= 0:
        result.update(status='refused', reason='current memory of the domain is unknown')
        return result
    if report is None or report.get('status') != 'ok':
        status = report.get('status') if report else 'missing'
        problems = '; '.join((report or {}).get('problems') or [])
        result.update(status='no_agent', reason='agent data %s%s' % (status, (': ' + problems) if problems else ''))
        return result
    values = report['values']
    kernel = sum(values.get(k, 0) for k in _KERNEL_KEYS)
    reserve = max(int(params['reserve_mib'] * KIB_PER_MIB), int(static_max * params['reserve_pct'] / 100.0))
    components = {
        'committed_as_kb': values['committed_as_kb'],
        'kernel_unreclaimable_kb': kernel,
        'mapped_kb': values.get('mapped_kb', 0),
        'kernel_own_kb': max(0, current - values['mem_total_kb']),
        'reserve_kb': reserve,
    }
    raw = sum(components.values())
    target = _ceil_mib(raw)
    floor = int(params['floor_mib'] * KIB_PER_MIB)
    limited_by = 'formula'
    if target < floor:
        target, limited_by = floor, 'floor'
    ceiling = min(current, static_max)
    if target >= ceiling:
        target, limited_by = ceiling, 'current' if current <= static_max else 'static_max'
    components['formula_kb'] = raw
    result.update(target_kb=target, reclaimable_kb=max(0, current - target), components=components,
                  limited_by=limited_by)
    return result
