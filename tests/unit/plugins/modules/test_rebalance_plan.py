# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import pytest

from ansible_collections.fleetckpt.xen.plugins.modules import rebalance_plan

from module_runner import run_module

MIB = 1024
HOSTS = [{'name': 'xen1', 'free_kb': 2000 * MIB}, {'name': 'xen2', 'free_kb': 300 * MIB}]
VMS = [{'name': 'g3', 'host': 'xen2', 'current_kb': 256 * MIB, 'target_kb': 140 * MIB},
       {'name': 'g4', 'host': 'xen2', 'current_kb': 512 * MIB, 'target_kb': 130 * MIB}]


def plan(capsys, **args):
    base = dict(hosts=HOSTS, vms=VMS)
    base.update(args)
    return run_module(rebalance_plan, base, capsys=capsys)


def test_evacuation_moves_every_vm_largest_first_and_changes_nothing(capsys):
    res = plan(capsys, evacuate=['xen2'], headroom_mib=128)
    assert res['_rc'] == 0 and res['changed'] is False
    assert [(m['vm'], m['from'], m['to']) for m in res['moves']] == [('g4', 'xen2', 'xen1'), ('g3', 'xen2', 'xen1')]
    assert res['balloons'] == [] and res['unplaced'] == []
    assert res['free_after_kb']['xen1'] == (2000 - 768) * MIB
    assert res['summary'][0] == 'move g4 xen2 -> xen1 (512 MiB): host xen2 is evacuated'


def test_reclaim_balloons_in_place_or_not_at_all(capsys):
    res = plan(capsys, headroom_mib=128)
    assert [(b['vm'], b['to_kb']) for b in res['balloons']] == [('g3', 140 * MIB), ('g4', 130 * MIB)]
    assert res['moves'] == []
    res = plan(capsys, headroom_mib=400, reclaim=False)
    # xen2 has 300 MiB free, below 400: without ballooning, its largest VM moves
    assert res['balloons'] == [] and [m['vm'] for m in res['moves']] == ['g4']


def test_a_vm_that_fits_nowhere_stays_and_is_reported(capsys):
    res = plan(capsys, hosts=[{'name': 'xen1', 'free_kb': 400 * MIB}, {'name': 'xen2', 'free_kb': 0}], evacuate=['xen2'],
               headroom_mib=64)
    assert [m['vm'] for m in res['moves']] == ['g3']
    assert [u['vm'] for u in res['unplaced']] == ['g4'] and 'no other host' in res['unplaced'][0]['reason']
    assert any(line.startswith('CANNOT move g4') for line in res['summary'])


@pytest.mark.parametrize('args,msg', [
    ({'evacuate': ['xen9']}, 'unknown host'),
    ({'headroom_mib': -1}, 'headroom_mib'),
    ({'vms': [{'name': 'g3', 'host': 'xen7', 'current_kb': 1, 'target_kb': None}]}, 'unknown host'),
    ({'vms': [{'name': 'g3', 'host': 'xen1', 'current_kb': -5, 'target_kb': None}]}, 'non-negative'),
    ({'hosts': [{'name': 'xen1', 'free_kb': 1}, {'name': 'xen1', 'free_kb': 2}], 'vms': []}, 'unique'),
])
def test_bad_input_fails_clearly(capsys, args, msg):
    res = plan(capsys, **args)
    assert res['_rc'] == 1 and msg in res['msg'], res['msg']
