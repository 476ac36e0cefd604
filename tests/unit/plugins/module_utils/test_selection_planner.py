# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput
from ansible_collections.fleetckpt.xen.plugins.module_utils._planner import plan_rebalance, summarize_plan
from ansible_collections.fleetckpt.xen.plugins.module_utils._selection import select_vms

FACTS = [
    {'name': 'Domain-0', 'domid': 0, 'mem_mib': 1024},
    {'name': 'web-1', 'domid': 3, 'mem_mib': 512},
    {'name': 'web-2', 'domid': 4, 'mem_mib': 256},
    {'name': 'db', 'domid': 5, 'mem_mib': 1024},
]


def names(sel):
    return [f['name'] for f in sel]


def test_select_all_domus_by_default():
    assert names(select_vms(FACTS)) == ['db', 'web-1', 'web-2']
    assert 'Domain-0' in names(select_vms(FACTS, include_dom0=True))


def test_select_union_of_names_globs_and_query():
    assert names(select_vms(FACTS, names=['db'])) == ['db']
    assert names(select_vms(FACTS, patterns=['web-*'])) == ['web-1', 'web-2']
    assert names(select_vms(FACTS, query='[?mem_mib > `300`]')) == ['db', 'web-1']
    assert names(select_vms(FACTS, query='[?mem_mib < `300`].name')) == ['web-2']
    assert names(select_vms(FACTS, names=['db'], patterns=['web-2'])) == ['db', 'web-2']
    # dom0 never sneaks in through a query
    assert names(select_vms(FACTS, query='[?mem_mib >= `1024`]')) == ['db']


def test_select_exclude_removes_whatever_selected_them():
    assert names(select_vms(FACTS, exclude=['db'])) == ['web-1', 'web-2']
    assert names(select_vms(FACTS, patterns=['web-*'], exclude=['*-2'])) == ['web-1']
    assert names(select_vms(FACTS, names=['db', 'web-1'], exclude=['db'])) == ['web-1']
    assert names(select_vms(FACTS, query='[?mem_mib > `300`]', exclude=['web-*'])) == ['db']
    assert names(select_vms(FACTS, exclude=['nothing-like-this'])) == ['db', 'web-1', 'web-2']  # not an error
    assert names(select_vms(FACTS, exclude=['*'])) == []
    # dom0 stays out even when the exclusions would leave nothing else
    assert names(select_vms(FACTS, exclude=['db', 'web-*'])) == []


@pytest.mark.parametrize('bad', ['', None, 5])
def test_select_exclude_rejects_empty_or_non_string(bad):
    with pytest.raises(InvalidInput, match='exclude'):
        select_vms(FACTS, exclude=[bad])


def test_select_errors():
    with pytest.raises(InvalidInput, match='no such VM: nope'):
        select_vms(FACTS, names=['nope'])
    with pytest.raises(InvalidInput, match='invalid JMESPath'):
        select_vms(FACTS, query='[?mem_mib >')
    with pytest.raises(InvalidInput, match='must return a list'):
        select_vms(FACTS, query='length(@)')
    with pytest.raises(InvalidInput, match='not a VM or a name'):
        select_vms(FACTS, query='[].mem_mib')
    assert select_vms(FACTS, query='[?name == `"zzz"`]') == []


MIB = 1024


def host(name, free_mib, evacuate=False):
    return {'name': name, 'free_kb': free_mib * MIB, 'evacuate': evacuate}


def vm(name, on, cur, target=None):
    return {'name': name, 'host': on, 'current_kb': cur * MIB, 'target_kb': None if target is None else target * MIB}


def test_planner_balloons_reclaim():
    plan = plan_rebalance([host('a', 100)], [vm('x', 'a', 1024, 200), vm('y', 'a', 512, 600)])
    assert plan['balloons'] == [{'vm': 'x', 'host': 'a', 'from_kb': 1024 * MIB, 'to_kb': 200 * MIB, 'reclaim_kb': 824 * MIB}]
    assert plan['moves'] == [] and plan['free_after_kb'] == {'a': 924 * MIB}


def test_planner_evacuates_largest_first_to_roomiest_host():
    plan = plan_rebalance([host('a', 0, evacuate=True), host('b', 1500), host('c', 1200)],
                          [vm('small', 'a', 256, 128), vm('big', 'a', 1024, 300)], headroom_kb=64 * MIB)
    assert [(m['vm'], m['to']) for m in plan['moves']] == [('big', 'b'), ('small', 'c')]
    assert plan['balloons'] == []  # evacuated VMs are restored with their memory given back
    assert plan['free_after_kb']['b'] == (1500 - 1024) * MIB and plan['free_after_kb']['c'] == (1200 - 256) * MIB
    assert all(v >= 64 * MIB for h, v in plan['free_after_kb'].items() if h != 'a')


def test_planner_overcommitted_host_moves_until_headroom_and_reports_unplaced():
    plan = plan_rebalance([host('a', 10), host('b', 300)],
                          [vm('v1', 'a', 1024), vm('v2', 'a', 200)], headroom_kb=100 * MIB)
    # v1 fits nowhere (b has 300 < 1024 + 100); v2 moves to b (200 + 100 <= 300)
    assert [m['vm'] for m in plan['moves']] == ['v2']
    assert plan['unplaced'][0]['vm'] == 'v1' and 'no other host' in plan['unplaced'][0]['reason']
    assert plan['free_after_kb'] == {'a': 210 * MIB, 'b': 100 * MIB}


def test_planner_moved_ballooned_vm_frees_its_current_memory():
    plan = plan_rebalance([host('a', 0), host('b', 4096)], [vm('v', 'a', 1024, 200)], headroom_kb=900 * MIB)
    # ballooning alone frees 824 < 900, so v moves: a gets back all 1024, b loses 1024
    assert plan['moves'][0]['vm'] == 'v' and plan['balloons'] == []
    assert plan['free_after_kb'] == {'a': 1024 * MIB, 'b': 3072 * MIB}


def test_planner_is_deterministic():
    hosts = [host('b', 2000), host('a', 2000), host('x', 0, evacuate=True)]
    vms = [vm('v2', 'x', 512), vm('v1', 'x', 512)]
    first = plan_rebalance(hosts, vms)
    assert first == plan_rebalance(list(reversed(hosts)), list(reversed(vms)))
    assert [(m['vm'], m['to']) for m in first['moves']] == [('v1', 'a'), ('v2', 'b')]


@pytest.mark.parametrize('hosts,vms,msg', [
    ([host('a', 1), host('a', 2)], [], 'unique'),
    ([host('a', 1)], [vm('v', 'zz', 1)], 'unknown host'),
    ([{'name': 'a', 'free_kb': -5}], [], 'non-negative'),
    ([host('a', 1)], [vm('v', 'a', 1), vm('v', 'a', 1)], 'unique'),
])
def test_planner_bad_input(hosts, vms, msg):
    with pytest.raises(InvalidInput, match=msg):
        plan_rebalance(hosts, vms)


def test_summarize_plan_lines():
    plan = plan_rebalance([host('a', 0, evacuate=True), host('b', 1500)],
                          [vm('big', 'a', 1024, 300), vm('huge', 'a', 4096, None), vm('web', 'b', 256, 128)],
                          headroom_kb=64 * MIB)
    lines = summarize_plan(plan)
    assert lines[0] == 'move big a -> b (1024 MiB): host a is evacuated'
    assert 'balloon web on b 256 -> 128 MiB' in lines
    assert any(line.startswith('CANNOT move huge from a (4096 MiB)') for line in lines)
    assert summarize_plan(plan_rebalance([host('a', 100)], [])) == ['nothing to do']
