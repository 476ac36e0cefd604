# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Restore drills: options, verdict, cleanup whatever happens, and the strictly parsed record."""
from __future__ import annotations

import json
import os

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _drill as dr
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, XlError
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import CheckpointStore

CKPT = '20261129T120000.000Z-0123abcd'


class FakeXl:
    def __init__(self, fail_destroy=False):
        self.domains = {'g3': {'domid': 3, 'flags': ['blocked'], 'state': '-b----'}}
        self.fail_destroy = fail_destroy
        self.destroyed = []

    def list_plain(self):
        return dict(self.domains)

    def destroy(self, name):
        if self.fail_destroy:
            raise XlError(['xl', 'destroy', name], 1, stderr='boom')
        self.destroyed.append(name)
        del self.domains[name]


def restorer(flags=('blocked',), memory=True, agent='ok', fail=None):
    def restore(xl, entry, options):
        if fail:
            raise XlError(['xl', 'restore'], 1, stderr=fail)
        xl.domains[options['restore_as']] = {'domid': 9, 'flags': list(flags), 'state': '-b----'}
        return {'vm': options['restore_as'], 'memory_restored': memory, 'agent': agent}
    return restore


def options(tmp_path, **extra):
    work = tmp_path / 'g3-drill.xvda.S.img'
    work.write_bytes(b'x')
    opts = dr.drill_options({'restore_as': 'g3-drill', 'wait_agent_s': 30, 'disk_mode': None, 'network': True,
                             'disk_plan': {'actions': [{'op': 'clone_or_copy', 'dst': str(work)}]}})
    opts.update(extra)
    return opts, work


def test_drill_options_and_name():
    assert dr.drill_name('g3') == 'g3-drill' and dr.drill_name('g3', 'g3-check') == 'g3-check'
    opts = dr.drill_options({'network': True, 'paused': False, 'disk_mode': None})
    assert opts['network'] is False and opts['disk_mode'] == 'clone' and opts['paused'] is False
    with pytest.raises(InvalidInput, match='cannot be paused'):
        dr.drill_options({'paused': True})
    with pytest.raises(InvalidInput, match='disk_mode clone'):
        dr.drill_options({'disk_mode': 'consume'})


def test_a_good_drill_checks_everything_and_leaves_nothing(tmp_path):
    xl = FakeXl()
    opts, work = options(tmp_path)
    record = dr.run_drill(xl, {'id': CKPT}, opts, restorer(), 'xen1')
    assert record['ok'] is True and record['problems'] == [] and record['name'] == 'g3-drill'
    assert record['checks'] == {'restored': True, 'running': True, 'memory_restored': True, 'agent': True}
    assert xl.destroyed == ['g3-drill'] and 'g3' in xl.domains and not work.exists()
    assert dr.parse_drill(json.loads(json.dumps(record)), CKPT) == record


@pytest.mark.parametrize('restore,problem', [
    (restorer(fail='xc: out of memory'), 'the restore failed'),
    (restorer(flags=('crashed',)), 'not running'),
    (restorer(memory=False), 'memory was not given back'),
    (restorer(agent=None), 'did not publish'),
])
def test_a_failed_drill_says_why_and_still_cleans_up(tmp_path, restore, problem):
    xl = FakeXl()
    opts, work = options(tmp_path)
    record = dr.run_drill(xl, {'id': CKPT}, opts, restore, 'xen1')
    assert record['ok'] is False and any(problem in p for p in record['problems']), record
    assert 'g3-drill' not in xl.domains and not work.exists() and 'g3' in xl.domains
    assert dr.parse_drill(record, CKPT) == record


def test_without_an_agent_wait_the_agent_check_is_skipped(tmp_path):
    opts, _work = options(tmp_path, wait_agent_s=0)
    record = dr.run_drill(FakeXl(), {'id': CKPT}, opts, restorer(agent=None), 'xen1')
    assert record['ok'] is True and record['checks']['agent'] == 'skipped'


def test_a_copy_that_cannot_be_destroyed_keeps_its_disks_and_fails_the_drill(tmp_path):
    xl = FakeXl(fail_destroy=True)
    opts, work = options(tmp_path)
    record = dr.run_drill(xl, {'id': CKPT}, opts, restorer(), 'xen1')
    assert record['ok'] is False and work.exists()
    assert any('could not destroy' in p for p in record['problems']) and any('left in place' in p for p in record['problems'])


@pytest.mark.parametrize('change', [
    {'ok': 'yes'}, {'checkpoint': 'other'}, {'extra': 1}, {'checks': {'restored': True}}, {'problems': 'x'},
    {'problems': ['x' * 600]}, {'seconds': -1}, {'seconds': True}, {'host': ''}, {'ok': True, 'problems': ['bad']},
    {'checks': {'restored': True, 'running': 'maybe', 'memory_restored': True, 'agent': True}},
])
def test_drill_records_are_parsed_strictly(change):
    good = {'checkpoint': CKPT, 'host': 'xen1', 'at': '2026-11-29T12:00:00Z', 'name': 'g3-drill', 'ok': False,
            'checks': dict.fromkeys(dr.CHECKS, True), 'problems': ['x'], 'seconds': 1.5}
    assert dr.parse_drill(dict(good), CKPT) == good
    bad = dict(good)
    bad.update(change)
    if 'extra' in change:
        bad['extra'] = 1
    assert dr.parse_drill(bad, CKPT) is None


def test_record_and_read_back_beside_the_manifest(tmp_path):
    store = CheckpointStore(str(tmp_path / 'store'), require_marker=False)
    os.makedirs(store.checkpoint_dir('g3', CKPT))
    assert dr.last_drill(store, 'g3', CKPT) is None
    opts, _work = options(tmp_path)
    record = dr.run_drill(FakeXl(), {'id': CKPT}, opts, restorer(), 'xen1')
    dr.record_drill(store, 'g3', record)
    assert dr.last_drill(store, 'g3', CKPT) == record
    with open(os.path.join(store.checkpoint_dir('g3', CKPT), dr.DRILL), 'w') as handle:
        handle.write('{"ok": true}')  # anyone mounting the store can write it: never trusted blindly
    assert dr.last_drill(store, 'g3', CKPT) is None
    with pytest.raises(InvalidInput):
        dr.record_drill(store, 'g3', dict(record, ok='yes'))
