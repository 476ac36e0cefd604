# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput
from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import check_params, compute_target, unsafe_reason

MIB = 1024


def dom(current_mib=1024, max_mib=1024, **extra):
    d = {'name': 'g', 'domid': 5, 'type': 'pv', 'current_kb': current_mib * MIB, 'static_max_kb': max_mib * MIB,
         'target_kb': current_mib * MIB, 'flags': ['blocked']}
    d.update(extra)
    return d


def report(committed_mib=35, **values):
    v = {'committed_as_kb': committed_mib * MIB, 'mem_total_kb': 1024 * MIB, 'sunreclaim_kb': 0, 'page_tables_kb': 0,
         'kernel_stack_kb': 0, 'mapped_kb': 0, 'oom_kill': 0, 'seq': 1, 'ts': 1}
    v.update(values)
    return {'status': 'ok', 'values': v, 'problems': []}


def test_formula_adds_kernel_mapped_and_reserve():
    r = report(100, sunreclaim_kb=20 * MIB, page_tables_kb=3 * MIB, kernel_stack_kb=1 * MIB, mapped_kb=30 * MIB)
    d = compute_target(dom(), r)
    # 100 + 24 + 30 + max(32, 3% of 1024 = 30.7) = 186 MiB
    assert d['status'] == 'ok' and d['target_kb'] == 186 * MIB and d['limited_by'] == 'formula'
    assert d['reclaimable_kb'] == (1024 - 186) * MIB
    assert d['components']['reserve_kb'] == 32 * MIB


def test_the_kernels_own_memory_is_added():
    # the benchmark's anonymous-memory guest (512 MB, 51 MiB of it the kernel's own, MemTotal 461 MiB): without the
    # term it was ballooned to 355 MiB and its OOM killer fired at the restore's resume
    r = report(276, mem_total_kb=461 * MIB, sunreclaim_kb=10 * MIB, page_tables_kb=2 * MIB, mapped_kb=3 * MIB)
    d = compute_target(dom(512, 512), r)
    assert d['components']['kernel_own_kb'] == 51 * MIB
    assert d['target_kb'] == (276 + 12 + 3 + 51 + 32) * MIB and d['limited_by'] == 'formula'
    # already ballooned down: MemTotal shrank with it, the kernel's share is the same
    d = compute_target(dom(360, 512, target_kb=360 * MIB), dict(r, values=dict(r['values'], mem_total_kb=309 * MIB)))
    assert d['components']['kernel_own_kb'] == 51 * MIB and d['target_kb'] == 360 * MIB and d['limited_by'] == 'current'


def test_a_memtotal_above_the_domains_memory_adds_nothing():
    d = compute_target(dom(300, 1024, target_kb=300 * MIB), report(100, mem_total_kb=1024 * MIB))
    assert d['components']['kernel_own_kb'] == 0 and d['target_kb'] == (100 + 32) * MIB


def test_a_memtotal_reported_too_low_only_raises_the_target():
    d = compute_target(dom(), report(35, mem_total_kb=1))
    assert d['target_kb'] == 1024 * MIB and d['reclaimable_kb'] == 0 and d['limited_by'] == 'current'


def test_percent_reserve_wins_on_big_vms():
    d = compute_target(dom(8192, 8192), report(1000))
    assert d['components']['reserve_kb'] == int(8192 * MIB * 0.03)
    # the fixed reserve decides up to about 1 GiB of static-max, the percentage above it
    assert compute_target(dom(1024, 1024), report(300))['components']['reserve_kb'] == 32 * MIB
    assert compute_target(dom(2048, 2048), report(300))['components']['reserve_kb'] == int(2048 * MIB * 0.03)


def test_the_measured_thrashing_case_is_floored():
    # lab: Committed_AS 35 MB + 64 MiB = 99 MiB thrashed (before the kernel's own memory was counted); the floor
    # keeps us at >= 128 MiB
    d = compute_target(dom(), report(35))
    assert d['target_kb'] == 128 * MIB and d['limited_by'] == 'floor'


def test_rounds_up_to_whole_mib():
    d = compute_target(dom(), report(0, committed_as_kb=200 * MIB + 1), {'reserve_mib': 0, 'reserve_pct': 0})
    assert d['target_kb'] == 201 * MIB


def test_never_above_current_or_static_max():
    assert compute_target(dom(300, 1024), report(900))['target_kb'] == 300 * MIB
    assert compute_target(dom(300, 1024), report(900))['reclaimable_kb'] == 0
    # floor above the current memory: the VM is left where it is
    assert compute_target(dom(100, 1024), report(1))['target_kb'] == 100 * MIB


@pytest.mark.parametrize('extra,reason', [
    ({'pci_passthrough': True}, 'PCI passthrough'),
    ({'vnuma': True}, 'vNUMA'),
    ({'type': 'hvm'}, 'populate-on-demand'),
    ({'domid': 0}, 'domain 0'),
    ({'flags': ['paused']}, 'paused'),
    ({'type': 'weird'}, 'unknown domain type'),
])
def test_refusals(extra, reason):
    d = compute_target(dom(**extra), report())
    assert d['status'] == 'refused' and reason in d['reason'] and d['target_kb'] is None


def test_hvm_with_pod_and_pvh_allowed():
    assert unsafe_reason(dom(type='hvm', target_kb=512 * MIB)) is None
    assert unsafe_reason(dom(type='pvh')) is None


@pytest.mark.parametrize('status', ['missing', 'stale', 'malformed', 'incomplete'])
def test_bad_agent_means_no_agent(status):
    d = compute_target(dom(), {'status': status, 'problems': ['x'], 'values': {}})
    assert d['status'] == 'no_agent' and status in d['reason']
    assert compute_target(dom(), None)['status'] == 'no_agent'


@pytest.mark.parametrize('params,msg', [
    ({'floor_mib': 16}, 'floor_mib below 32'),
    ({'reserve_pct': 150}, 'between 0 and 100'),
    ({'reserve_mib': -1}, 'must not be negative'),
    ({'reserve_mib': 'lots'}, 'must be a number'),
    ({'reserve_mib': True}, 'must be a number'),
    ({'bogus': 1}, 'unknown memory policy parameter'),
])
def test_bad_params(params, msg):
    with pytest.raises(InvalidInput, match=msg):
        check_params(params)


def test_defaults():
    assert check_params(None) == {'reserve_mib': 32, 'reserve_pct': 3, 'floor_mib': 128}
    assert check_params({'floor_mib': None})['floor_mib'] == 128
