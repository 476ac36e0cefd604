# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""bench/report.py: cells, ratios, targets, markdown, the docs section and the plots, from made-up runs."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'bench'))

import report  # noqa: E402  pylint: disable=wrong-import-position

MB = 1000000


def run(mode, comp, size_mb, ckpt, rep=0, workload='idle', ram=1024, state='aged', **kw):
    r = {'workload': workload, 'ram_mb': ram, 'state': state, 'mode': mode, 'compression': comp, 'vm': 'b1',
         'host': 'xen1', 'rep': rep, 'size_bytes': int(size_mb * MB), 'ckpt_s': ckpt, 'pause_s': ckpt * 0.8,
         'restore_s': ckpt * 0.7, 'saved_mib': ram if mode == 'native' else 150}
    if mode == 'vmme':
        r.update(overhead_query_s=0.2, overhead_balloon_s=1.0, overhead_deflate_s=0.5)
    r.update(kw)
    return r


def idle_1024(reps=3):
    runs = []
    for rep in range(reps):
        runs += [run('native', 'none', 1075 + rep, 10.0 + rep, rep), run('native', 'zstd', 276, 50.0, rep),
                 run('vmme', 'none', 140 - rep, 5.0, rep), run('vmme', 'zstd', 22, 8.0, rep)]
    return runs


def test_cells_take_the_median_and_keep_the_spread():
    cells = report.build_cells(idle_1024())
    assert [c['label'] for c in cells] == ['native', 'native+zstd', 'vmme', 'vmme+zstd']
    native = cells[0]
    assert native['reps'] == 3
    assert native['size_bytes'] == 1076 * MB
    assert native['ckpt_s'] == 11.0
    assert native['spread']['ckpt_s']['min'] == 10.0 and native['spread']['ckpt_s']['max'] == 12.0
    assert native['overhead_query_s'] is None
    assert cells[2]['overhead_balloon_s'] == 1.0


def test_ratios_are_for_the_largest_idle_aged_guest():
    runs = idle_1024() + [run('native', 'none', 500, 5.0, ram=512), run('vmme', 'none', 400, 4.0, ram=512)]
    r = report.ratios(report.build_cells(runs))
    assert r['basis'] == {'workload': 'idle', 'state': 'aged', 'ram_mb': 1024}
    assert r['size_ratio_vmme_over_native'] == round(139 / 1076.0, 4)
    assert r['time_ratio_vmme_over_native'] == round(5.0 / 11.0, 4)
    assert r['size_ratio_vmme_zstd_over_native_zstd'] == round(22 / 276.0, 4)


def test_targets_met_missed_and_not_measured():
    results = report.assemble({'started': 'now'}, idle_1024(), {'target_search': {
        'vm': 'b1', 'policy_over_smallest': 1.4}})
    t = {x['name']: x for x in results['targets']}
    assert t['vmme size / native size']['met'] is True            # 139/1076 < 1/6
    assert t['vmme+zstd size / native size']['met'] is True       # 22/1076 < 1/40
    assert t['vmme+zstd size / native+zstd size']['met'] is True  # 22/276 < 1/9
    assert t['policy target over smallest healthy target']['met'] is False   # 1.4: more than 25 % above
    assert t['fresh guest: vmme+zstd size / native+zstd size']['met'] is None
    assert 'fleet wall time / slowest host alone' not in t  # the fleet study is a run of its own
    over = t['memory-exclusion overhead / native save time (worst cell)']
    assert over['value'] == round(1.7 / 11.0, 4) and over['met'] is False


def test_the_size_targets_are_not_judged_on_a_smaller_guest():
    runs = [run(m, c, size, 5.0, ram=256) for (m, c), size in zip(report.MODES, (269, 69, 135, 33))]
    results = report.assemble({'started': 'now'}, runs, {})
    assert results['ratios']['basis']['ram_mb'] == 256 and results['ratios']['size_ratio_vmme_over_native'] == 0.5019
    t = {x['name']: x for x in results['targets']}
    for name in ('vmme size / native size', 'vmme+zstd size / native size', 'vmme+zstd size / native+zstd size'):
        assert t[name]['met'] is None and t[name]['value'] is None and 'needs the idle aged 1024 MB' in t[name]['note']


def test_a_missing_mode_leaves_its_ratio_out():
    runs = [r for r in idle_1024() if r['compression'] == 'none']
    r = report.ratios(report.build_cells(runs))
    assert 'size_ratio_vmme_over_native' in r
    assert 'size_ratio_vmme_zstd_over_native_zstd' not in r


def test_results_json_keys_a_script_can_check():
    results = report.assemble({'started': 'now'}, idle_1024(), {})
    data = json.loads(json.dumps(results))
    for cell in data['cells']:
        for key in ('workload', 'ram_mb', 'mode', 'compression', 'state', 'size_bytes', 'ckpt_s', 'restore_s',
                    'overhead_query_s', 'overhead_balloon_s'):
            assert key in cell
    assert data['ratios']['size_ratio_vmme_over_native'] < 1
    assert data['ratios']['time_ratio_vmme_over_native'] < 1


def test_markdown_and_docs_section():
    results = report.assemble({'started': 'now', 'machine': {'description': 'test box'},
                               'lab': {'xen_version': '4.20.0', 'dist': 'trixie', 'accel': 'tcg'}},
                              idle_1024(), {'walk': [{'vm': 'b1', 'ram_mb': 1024, 'memory_mib': 1024, 'null_s': 7.5,
                                                      'stream_bytes': 1075 * MB, 'store_save_s': 9.9}]})
    md = report.markdown(results)
    assert 'emulation' in md and 'test box' in md
    assert '| idle | aged | 1024 | vmme | 3 | 139.0 (138.0–140.0) |' in md
    assert '1024 MB: 1025 MB in 28.2 s' in md
    doc = 'intro\n%s\nold\n%s\nafter\n' % (report.DOC_BEGIN, report.DOC_END)
    new = report.update_doc(doc, md)
    assert new.startswith('intro\n') and new.endswith('after\n') and 'old' not in new and md.strip() in new
    with pytest.raises(ValueError):
        report.update_doc('no markers', md)


def test_plots_are_written(tmp_path):
    pytest.importorskip('matplotlib')
    results = report.assemble({'started': 'now'}, idle_1024(), {'fleet': {'runs': [
        {'mode': 'vmme', 'hosts': ['xen1'], 'per_host': 1, 'wall_s': 30.0, 'bytes': 1, 'mbps': 1.0},
        {'mode': 'vmme', 'hosts': ['xen1'], 'per_host': 2, 'wall_s': 40.0, 'bytes': 1, 'mbps': 1.0}]}})
    names = report.plots(results, tmp_path)
    assert set(names) == {'size.png', 'ckpt_time.png', 'restore_time.png', 'pause.png', 'overhead.png', 'fleet.png'}
    for n in names:
        assert (tmp_path / n).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def disk_run(label, still, pause, disks, finalize=None):
    return {'run': label, 'vm': 'g1', 'image_bytes': 140e6, 'still_s': still, 'save_s': still - (pause or 0),
            'pause_s': pause, 'finalize_s': finalize, 'total_s': still + 10,
            'disks': [{'vdev': v, 'on': on, 'strategy': st, 'seconds': sec, 'bytes': b} for v, on, st, sec, b in disks]}


def test_disk_study_table_shows_pause_size_and_refusals():
    results = report.assemble({'started': 'now'}, idle_1024(), {'disks': [
        disk_run('memory only', 12.0, None, [('xvda', 'NFS file (store)', 'none', 0.0, 0)]),
        disk_run('clones', 14.5, 2.5, [('xvda', 'NFS file (store)', 'none', 0.0, 0),
                                       ('xvdb', 'XFS file, local', 'reflink', 0.05, 0),
                                       ('xvdc', 'thin LV, local', 'lvm', 1.2, 65536)]),
        disk_run('copies', 70.5, 58.5, [('xvda', 'NFS file (store)', 'copy', 50.0, 300e6)], finalize=16.0),
        {'run': 'reflink on NFS', 'vm': 'g1', 'strategies': {'xvda': 'reflink', 'xvdb': 'none'},
         'refused': 'disk xvda: strategy reflink cannot work here: | no FICLONE'}]})
    md = report.markdown(results)
    assert '### Disk capture (consistent checkpoints)' in md
    assert '| copies | 70.5 (12.0 + 58.5) | 140.0 | xvda | NFS file (store) | copy | 50.00 | 300.0 | 16.0 |' in md
    assert '| memory only | 12.0 (12.0 + –) | 140.0 | xvda | NFS file (store) | none (memory only) |' in md
    assert '|  |  |  | xvdb | XFS file, local | reflink | 0.05 | 0.0 |  |' in md
    assert 'xvda: reflink | | | | | not possible here: disk xvda: strategy reflink cannot work here: / no FICLONE |' in md


def test_disks_only_run_has_no_empty_tables_or_plots(tmp_path):
    pytest.importorskip('matplotlib')
    results = report.assemble({'started': 'now'}, [], {'disks': [
        disk_run('copies', 80.0, 60.0, [('xvda', 'NFS file (store)', 'copy', 55.0, 3e8)], finalize=100.0)]})
    md = report.markdown(results)
    assert '| copies | 80.0 (20.0 + 60.0) |' in md and '| workload |' not in md and '### Targets' not in md
    assert report.plots(results, tmp_path) == []


def test_the_fleet_study_is_a_run_and_a_docs_section_of_its_own(tmp_path):
    fleet = {'runs': [{'mode': 'vmme', 'hosts': ['xen1', 'xen2'], 'per_host': 2, 'wall_s': 58.8, 'bytes': 540e6,
                       'mbps': 19.3}], 'raw_mbps': {'2': 32.7}, 'wall_over_slowest_host': 1.3, 'throughput_over_raw': 0.9}
    results = report.assemble({'started': 'now', 'fleet_only': True}, [], {'fleet': fleet})
    t = {x['name']: x['met'] for x in results['targets']}
    assert t == {'fleet wall time / slowest host alone': False, 'store throughput / raw sequential write': True}
    md = report.markdown(results)
    assert '| vmme | xen1,xen2 | 2 | 58.8 | 540.0 | 19.3 |' in md and '| workload |' not in md
    doc = 'a\n%s\nlatest\n%s\n%s\nold fleet\n%s\n' % (report.DOC_BEGIN, report.DOC_END,
                                                      report.FLEET_BEGIN, report.FLEET_END)
    new = report.update_doc(doc, md, report.FLEET_BEGIN, report.FLEET_END)
    assert 'latest' in new and 'old fleet' not in new and '58.8' in new
    if importlib.util.find_spec('matplotlib'):
        assert report.plots(results, tmp_path) == ['fleet.png']
    # the full run, without it, says where its targets are measured
    full = report.markdown(report.assemble({'started': 'now'}, idle_1024(), {}))
    assert 'fleet' not in ''.join(x['name'] for x in report.assemble({'started': 'now'}, idle_1024(), {})['targets'])
    assert '`make bench FLEET=1`' in full


def test_the_fleet_wall_target_reads_the_most_vms_per_host_measured_on_each_host_alone_and_on_both():
    def r(hosts, n, wall, mode='vmme', mbps=None):
        return {'mode': mode, 'hosts': hosts, 'per_host': n, 'wall_s': wall, 'bytes': 1, 'mbps': mbps}
    runs = [r(['xen1'], 1, 30.0), r(['xen1', 'xen2'], 1, 33.0),
            r(['xen1'], 2, 50.0), r(['xen2'], 2, 60.0), r(['xen1', 'xen2'], 2, 66.0),
            r(['xen1'], 4, 90.0), r(['xen2'], 4, 100.0), r(['xen1', 'xen2'], 4, 130.0),
            r(['xen1', 'xen2'], 2, 70.0, mode='native', mbps=40.0)]
    bench_run = bench_run_module()
    out = bench_run.fleet_summary(runs, {'1': 60.0, '2': 50.0})
    assert out['wall_over_slowest_host_by_vms'] == {'2': 1.1, '4': 1.3}  # 1 VM: xen1 alone only, no slowest host
    assert out['wall_over_slowest_host'] == 1.3 and out['throughput_over_raw'] == 0.8
    results = report.assemble({'started': 'now', 'fleet_only': True}, [], {'fleet': dict(out, runs=runs)})
    t = {x['name']: x for x in results['targets']}
    assert t['fleet wall time / slowest host alone']['note'] == '4 VMs per host'
    assert t['fleet wall time / slowest host alone']['met'] is False
    out = bench_run.fleet_summary(runs[:5], {})  # no 4-VM runs, no native run
    assert out['wall_over_slowest_host'] == 1.1 and out['throughput_over_raw'] is None


def test_a_run_of_some_cells_says_which():
    results = report.assemble({'started': 'now', 'cells_selected': ['idle:aged:1024:1']}, idle_1024(1), {})
    assert 'Run now on ? (only the cells idle:aged:1024:1)' in report.markdown(results)


def bench_run_module():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'lab'))
    import run as bench_run  # noqa: E402  pylint: disable=import-outside-toplevel
    return bench_run


def test_cells_of_the_full_run_are_picked_by_name():
    bench_run = bench_run_module()
    picked = bench_run.select(bench_run.plan(False), ['idle:aged:1024:1', 'anon:aged:512'])
    assert [(h, c.vm, c.reps, c.walk) for h, cs in sorted(picked.items()) for c in cs] == [
        ('xen1', 'b1', 1, 1), ('xen2', 'g4', 3, 0)]
    for bad in ('idle', 'idle:aged:999', 'idle:aged:1024:x', 'idle::1024'):
        with pytest.raises(bench_run.BenchError):
            bench_run.select(bench_run.plan(False), [bad])


def test_the_required_cells_come_first_their_repetitions_interleaved():
    bench_run = bench_run_module()
    steps = bench_run.schedule(bench_run.plan(False)['xen2'])
    assert [(c.vm, c.workload, rep) for c, rep in steps] == [
        ('g4', 'anon', 0), ('b2', 'pagecache', 0), ('g4', 'anon', 1), ('b2', 'pagecache', 1),
        ('g4', 'anon', 2), ('b2', 'pagecache', 2),
        ('g4', 'build', 0), ('g3', 'anon', 0), ('g3', 'pagecache', 0)]
    xen1 = [(c.vm, c.state, c.ram_mb, rep) for c, rep in bench_run.schedule(bench_run.plan(False)['xen1'])]
    # xen1: the 1024 MB guest alone, then the fresh cell the fresh-guest target needs
    assert xen1[:4] == [('b1', 'aged', 1024, 0), ('b1', 'aged', 1024, 1), ('b1', 'aged', 1024, 2),
                        ('b1', 'fresh', 1024, 0)]
    # a part of the full run keeps each cell's priority
    picked = bench_run.select(bench_run.plan(False), ['pagecache:aged:512:1'])
    assert [(h, c.vm, c.priority, c.reps) for h in sorted(picked) for c in picked[h]] == [('xen2', 'b2', 0, 1)]


def test_twin_guests_share_a_cell_and_the_table_names_them():
    run = {'workload': 'pagecache', 'ram_mb': 512, 'state': 'aged', 'mode': 'native', 'compression': 'none',
           'size_bytes': 537935860, 'ckpt_s': 40.0, 'restore_s': 20.0, 'pause_s': 39.0, 'saved_mib': 512}
    runs = [dict(run, vm='b2', host='xen2', rep=0), dict(run, vm='b2', host='xen2', rep=1, ckpt_s=44.0),
            dict(run, vm='b3', host='xen1', rep=2, ckpt_s=42.0)]
    cells = report.build_cells(runs)
    assert len(cells) == 1 and cells[0]['reps'] == 3 and cells[0]['ckpt_s'] == 42.0
    assert cells[0]['guests'] == ['b2@xen2', 'b3@xen1']
    assert '| 3 (b2@xen2, b3@xen1) |' in report.markdown(report.assemble({'started': 'now'}, runs, {}))


class FakeLab:
    def locate_guest(self, vm):
        return None

    def drop(self, name=None):
        pass


def test_the_time_budget_cuts_whole_repetitions_and_says_which(monkeypatch):
    bench_run = bench_run_module()
    clock = [1000.0]  # each measurement takes 100 s of this clock
    monkeypatch.setattr(bench_run, 'time', types.SimpleNamespace(monotonic=lambda: clock[0]))
    bench = bench_run.Bench(FakeLab(), 'inventory', deadline=1000.0 + 500)
    measured = []

    def cycle(host, cell, mode, compression, rep):
        measured.append((cell.vm, rep, mode, compression))
        clock[0] += 100
        return dict(run(mode, compression, 100, 10.0, rep, vm=cell.vm, workload=cell.workload, ram=cell.ram_mb, host=host),
                    wall_s=100.0, prepare_s=5.0, prepared='aged')
    monkeypatch.setattr(bench, 'cycle', cycle)
    monkeypatch.setattr(bench, 'setup_cell', lambda cell: None)
    cells = [bench_run.Cell('g4', 512, 'anon', 'aged', 3, priority=0), bench_run.Cell('b2', 512, 'pagecache', 'aged', 3, priority=0)]
    bench.host_track('xen2', cells)
    # one repetition of each (4 cycles of 100 s each would end past the deadline after the first)
    assert [m[:2] for m in measured] == [('g4', 0)] * 4
    assert bench.cut == [
        {'host': 'xen2', 'what': 'b2 aged pagecache 512 MB', 'vm': 'b2', 'workload': 'pagecache', 'state': 'aged',
         'ram_mb': 512, 'reps_planned': 3, 'reps_done': 0},
        {'host': 'xen2', 'what': 'g4 aged anon 512 MB', 'vm': 'g4', 'workload': 'anon', 'state': 'aged', 'ram_mb': 512,
         'reps_planned': 3, 'reps_done': 1}]
    # the next group of cells (a later priority) knows what this host's measurements take: it is cut too
    bench.host_track('xen2', [bench_run.Cell('g3', 256, 'anon', 'aged', 1)])
    assert len(measured) == 4 and bench.cut[-1]['what'] == 'g3 aged anon 256 MB'
    bench.cut.pop()
    results = report.assemble({'started': 'now', 'budget_min': 60, 'duration_s': 3540}, bench.runs, {'cut': bench.cut})
    md = report.markdown(results)
    assert ('**Cut by the time budget** (not measured, or fewer repetitions than planned): b2 aged pagecache 512 MB on xen2: '
            '0 of 3 repetitions; g4 aged anon 512 MB on xen2: 1 of 3 repetitions.') in md
    assert 'took 100–100 s of wall time, median 100 s (4 measurements: 4 aged first). The run took 59.0 min of a 60-min budget.' in md
    assert 'sha256' not in md  # no restore_verify_s in these runs
    bench.runs[0]['restore_verify_s'] = 12.5
    md = report.markdown(report.assemble({'started': 'now'}, bench.runs, {}))
    assert "checked the image's sha256 (reading all of it): 12.5–12.5 s, median 12.5 s" in md


def test_a_failed_repetition_is_measured_again_once_and_reported(monkeypatch):
    bench_run = bench_run_module()
    bench = bench_run.Bench(FakeLab(), 'inventory')
    measured, fail = [], {('g4', 1, 'vmme', 'zstd'), ('b2', 0, 'native', 'none'), ('b2', 2, 'native', 'none')}

    def cycle(host, cell, mode, compression, rep):
        measured.append((cell.vm, rep, mode, compression))
        if (cell.vm, rep, mode, compression) in fail:
            fail.discard((cell.vm, rep, mode, compression))
            raise bench_run.BenchError('checkpoint %s failed: the guest agent stopped answering' % cell.vm)
        return dict(run(mode, compression, 100, 10.0, rep, vm=cell.vm, workload=cell.workload, ram=cell.ram_mb,
                        host=host), wall_s=100.0, prepare_s=5.0, prepared='aged')
    monkeypatch.setattr(bench, 'cycle', cycle)
    monkeypatch.setattr(bench, 'setup_cell', lambda cell: None)
    monkeypatch.setattr(bench, 'recover', lambda host, vm: None)
    cells = [bench_run.Cell('g4', 512, 'anon', 'aged', 3, priority=0), bench_run.Cell('b2', 512, 'pagecache', 'aged', 3, priority=0),
             bench_run.Cell('g3', 256, 'idle', 'aged', 1, priority=1)]
    bench.host_track('xen2', cells)
    reps = [(vm, rep) for vm, rep, _m, _c in measured]
    # g4's second repetition failed at its second mode: measured again after the priority-0 group, before g3
    assert reps.index(('g3', 0)) > max(i for i, r in enumerate(reps) if r[0] in ('g4', 'b2'))
    # (its modes rotate: native+zstd, vmme, then vmme+zstd failed)
    assert reps.count(('g4', 1)) == 3 + 4
    assert len([r for r in bench.runs if r['vm'] == 'g4']) == 12 + 2  # three whole repetitions, and the 2 modes before
    # b2 failed at its first and third repetitions: the second failure ends the cell before its first is measured again
    assert [r for r in reps if r[0] == 'b2'] == [('b2', 0)] + [('b2', 1)] * 4 + [('b2', 2)] * 3
    assert [(e['what'], e['rep'], e['mode']) for e in bench.errors] == [
        ('b2 aged pagecache 512 MB', 0, 'native'), ('g4 aged anon 512 MB', 1, 'vmme+zstd'),
        ('b2 aged pagecache 512 MB', 2, 'native')]
    assert bench.cut == []
    md = report.markdown(report.assemble({'started': 'now', 'errors': bench.errors}, bench.runs, {}))
    assert ('**Failed measurements** (in results.json `errors`; a failed repetition is measured again once): '
            'b2 aged pagecache 512 MB on xen2, repetition 1 (native): BenchError: checkpoint b2 failed: the guest agent '
            'stopped answering; g4 aged anon 512 MB on xen2, repetition 2 (vmme+zstd):') in md


def test_a_cells_first_repetition_is_estimated_from_a_twin():
    bench_run = bench_run_module()
    bench = bench_run.Bench(FakeLab(), 'inventory')
    for vm, host, workload, ram, wall in (('b1', 'xen1', 'idle', 1024, 200.0), ('b2', 'xen2', 'pagecache', 512, 110.0),
                                          ('b2', 'xen2', 'pagecache', 512, 90.0)):
        bench.runs.append(dict(run('native', 'none', 100, 10.0, 0, vm=vm, workload=workload, ram=ram, host=host),
                               wall_s=wall))
    twin = bench_run.Cell('b3', 512, 'pagecache', 'aged', 1, priority=0)
    # b3 on xen1 has no measurement yet: b2's (same workload, RAM and state, on xen2), not xen1's 1024 MB ones
    assert bench.mean_wall('xen1', twin) == 100.0
    assert bench.mean_wall('xen1', bench_run.Cell('g1', 256, 'idle', 'aged', 1)) == 200.0  # no twin: the host's
    assert bench.mean_wall('xen2', bench_run.Cell('g3', 256, 'anon', 'aged', 1)) == 100.0


def test_without_a_budget_every_repetition_runs(monkeypatch):
    bench_run = bench_run_module()
    bench = bench_run.Bench(FakeLab(), 'inventory')
    monkeypatch.setattr(bench, 'cycle', lambda host, cell, mode, compression, rep: dict(
        run(mode, compression, 100, 10.0, rep), wall_s=1e6, prepare_s=1.0, prepared='kept'))
    monkeypatch.setattr(bench, 'setup_cell', lambda cell: None)
    bench.host_track('xen1', [bench_run.Cell('g1', 256, 'idle', 'aged', 2)])
    assert len(bench.runs) == 8 and bench.cut == []


def test_a_guest_is_aged_again_only_after_a_balloon(monkeypatch):
    """A restore of a native checkpoint puts the memory back as it was: the guest is still aged. A vmme measurement
    gives memory back through the balloon, zeroed: the guest must be aged again before the next one."""
    bench_run = bench_run_module()
    bench = bench_run.Bench(FakeLab(), 'inventory')
    asked = []
    monkeypatch.setattr(bench, 'guest', lambda vm, cmd, timeout=900: asked.append(cmd.split()[0]) or {'hold': True})

    def run_tasks(inv, host, tasks, timeout):
        mode = tasks[0][2]['mode']
        ck = {'id': 'x', 'mode': mode, 'size_bytes': 1, 'saved_kb': 1024, 'original_kb': 2048,
              'timings': {'total_s': 1.0, 'save_s': 1.0, 'query_s': 0.1, 'balloon_s': 0.1}}
        return types.SimpleNamespace(results={host: {'ck': {'checkpoints': [ck]}, 'rs': {'restored': {'timings': {
            'restore_s': 1.0}}}}}, output='')
    monkeypatch.setattr(bench_run, 'run_tasks', run_tasks)
    aged = bench_run.Cell('g4', 512, 'anon', 'aged', 1)
    prepared = [bench.cycle('xen2', aged, mode, 'none', 0)['prepared'] for mode in ('native', 'native', 'vmme', 'vmme')]
    assert prepared == ['aged', 'kept', 'kept', 'aged']
    assert asked.count('age') == 2
    # a fresh guest stays fresh after either
    monkeypatch.setattr(bench, 'balloon_to', lambda host, vm, mib, **kw: mib)
    fresh = bench_run.Cell('b1', 1024, 'idle', 'fresh', 1)
    assert [bench.cycle('xen1', fresh, mode, 'none', 0)['prepared'] for mode in ('vmme', 'native', 'vmme')] == [
        'freshened', 'kept', 'kept']


def search_bench(monkeypatch, floor_mib, policy_mib=128):
    """A Bench whose guest's balloon stops at ``floor_mib`` (healthy wherever it reaches its target within 8 MiB)."""
    bench_run = bench_run_module()
    bench = bench_run.Bench(FakeLab(), 'inventory')
    bench.runs.append(dict(run('vmme', 'none', 100, 10.0, 0, vm='b1', workload='idle', ram=1024, host='xen1'),
                           saved_mib=max(policy_mib, floor_mib), target_mib=policy_mib))
    monkeypatch.setattr(bench, 'guest', lambda vm, cmd, timeout=900: {'Committed_AS': 30 * 1024})

    def healthy_at(host, vm, target, ram_mb):
        reached = max(target, floor_mib)
        return {'target_mib': target, 'reached_mib': reached, 'healthy': reached <= target + 8}
    monkeypatch.setattr(bench, 'healthy_at', healthy_at)
    return bench, bench_run.Cell('b1', 1024, 'idle', 'aged', 3)


def test_the_target_search_bisects_below_a_healthy_policy_target(monkeypatch):
    bench, cell = search_bench(monkeypatch, floor_mib=100)
    out = bench.target_search('xen1', cell)
    assert [p['target_mib'] for p in out['probes']] == [128, 96, 80, 88]  # 96: reached 100, within 8 MiB
    assert out['smallest_healthy_mib'] == 96 and out['policy_over_smallest'] == round(128 / 96, 3)


def test_the_target_search_steps_up_when_the_guest_stops_above_the_policy_target(monkeypatch):
    bench, cell = search_bench(monkeypatch, floor_mib=139)
    out = bench.target_search('xen1', cell)
    # 128: stopped at 139; up above it to 152 (healthy), then bisected down: 140, 134
    assert [(p['target_mib'], p['healthy']) for p in out['probes']] == [
        (128, False), (152, True), (140, True), (134, True)]
    assert out['smallest_healthy_mib'] == 134 and out['policy_over_smallest'] == round(128 / 134, 3)
    results = report.assemble({'started': 'now'}, idle_1024(), {'target_search': out})
    t = {x['name']: x for x in results['targets']}['policy target over smallest healthy target']
    assert t['met'] is True and t['goal'] == 'within 25 % (0.75-1.25)'
    bench, cell = search_bench(monkeypatch, floor_mib=139)
    monkeypatch.setattr(bench, 'healthy_at', lambda host, vm, target, ram_mb: {  # e.g. SSH never answers
        'target_mib': target, 'reached_mib': target, 'healthy': False})
    out = bench.target_search('xen1', cell)
    assert [p['target_mib'] for p in out['probes']] == [128, 144, 160, 176, 192]
    assert len(out['probes']) == 5 and out['smallest_healthy_mib'] is None and out['policy_over_smallest'] is None
