# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark results: from the raw measurements of one run to results.json, markdown tables, plots and the
latest section of docs/benchmarks.md. Pure functions (plots need matplotlib); tests/unit/test_bench_report.py.
"""
from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path

MODES = (('native', 'none'), ('native', 'zstd'), ('vmme', 'none'), ('vmme', 'zstd'))
METRICS = ('size_bytes', 'ckpt_s', 'restore_s', 'pause_s', 'overhead_query_s', 'overhead_balloon_s',
           'overhead_deflate_s', 'saved_mib')
# Liu, Jin and Liao, Xen 3.2, native save/restore (Table I)
PAPER_NATIVE = {128: (129, 4.38, 4.483), 256: (257, 8.205, 7.132), 512: (513, 15.551, 13.682),
                1024: (1025, 28.209, 23.478)}
DOC_BEGIN = '<!-- bench:latest:begin (written by bench/run.py) -->'
DOC_END = '<!-- bench:latest:end -->'
# the fleet study is a run of its own (bench/run.py --fleet-only), with its own generated section
FLEET_BEGIN = '<!-- bench:fleet:begin (written by bench/run.py --fleet-only) -->'
FLEET_END = '<!-- bench:fleet:end -->'
MB = 1e6


def label(mode, compression):
    return mode if compression == 'none' else '%s+%s' % (mode, compression)


def summary(values):
    """Median and spread of the measurements of one metric (None values are left out)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    med = statistics.median(vals)
    return {'median': med, 'min': min(vals), 'max': max(vals), 'n': len(vals),
            'spread_pct': round(100.0 * (max(vals) - min(vals)) / med, 1) if med else 0.0}


def cell_key(run):
    return (run['workload'], run['ram_mb'], run['state'], run['mode'], run['compression'])


def build_cells(runs):
    """Group the raw runs by (workload, ram_mb, state, mode, compression): each cell gets the median of every
    metric as a top-level key (what scripts read), the spread under ``spread`` and its runs under ``runs``."""
    groups = {}
    for run in runs:
        groups.setdefault(cell_key(run), []).append(run)
    cells = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], MODES.index((k[3], k[4])))):
        workload, ram_mb, state, mode, compression = key
        rs = groups[key]
        cell = {'workload': workload, 'ram_mb': ram_mb, 'state': state, 'mode': mode, 'compression': compression,
                'label': label(mode, compression), 'vm': rs[0]['vm'], 'host': rs[0]['host'], 'reps': len(rs),
                'guests': sorted({'%s@%s' % (r['vm'], r['host']) for r in rs}),  # twin guests may share a cell
                'spread': {}, 'runs': rs}
        for metric in METRICS:
            s = summary([r.get(metric) for r in rs])
            cell[metric] = None if s is None else s['median']
            if s is not None:
                cell['spread'][metric] = s
        cells.append(cell)
    return cells


def find(cells, workload, ram_mb, state, mode, compression):
    for c in cells:
        if (c['workload'], c['ram_mb'], c['state'], c['mode'], c['compression']) == (
                workload, ram_mb, state, mode, compression):
            return c
    return None


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def ratios(cells, workload='idle', state='aged', ram_mb=None):
    """vmme over native, for the idle aged guest of ``ram_mb`` (default: the largest measured)."""
    rams = sorted({c['ram_mb'] for c in cells if c['workload'] == workload and c['state'] == state})
    if not rams:
        return {}
    ram = ram_mb if ram_mb in rams else rams[-1]
    n, nz, v, vz = (find(cells, workload, ram, state, m, c) for m, c in MODES)
    out = {'basis': {'workload': workload, 'state': state, 'ram_mb': ram}}
    if n and v:
        out['size_ratio_vmme_over_native'] = _ratio(v['size_bytes'], n['size_bytes'])
        out['time_ratio_vmme_over_native'] = _ratio(v['ckpt_s'], n['ckpt_s'])
        out['restore_ratio_vmme_over_native'] = _ratio(v['restore_s'], n['restore_s'])
        out['pause_ratio_vmme_over_native'] = _ratio(v['pause_s'], n['pause_s'])
    if n and vz:
        out['size_ratio_vmme_zstd_over_native'] = _ratio(vz['size_bytes'], n['size_bytes'])
    if nz and vz:
        out['size_ratio_vmme_zstd_over_native_zstd'] = _ratio(vz['size_bytes'], nz['size_bytes'])
        out['pause_ratio_vmme_zstd_over_native_zstd'] = _ratio(vz['pause_s'], nz['pause_s'])
    return out


def overheads(cells):
    """Per vmme cell: query + balloon + deflate, against the native save of the same VM in the same run."""
    rows = []
    for c in cells:
        if c['mode'] != 'vmme':
            continue
        native = find(cells, c['workload'], c['ram_mb'], c['state'], 'native', c['compression'])
        parts = [c.get('overhead_query_s'), c.get('overhead_balloon_s'), c.get('overhead_deflate_s')]
        total = None if None in parts else round(sum(parts), 3)
        rows.append({'workload': c['workload'], 'ram_mb': c['ram_mb'], 'state': c['state'], 'label': c['label'],
                     'query_s': parts[0], 'balloon_s': parts[1], 'deflate_s': parts[2], 'total_s': total,
                     'native_ckpt_s': native and native['ckpt_s'],
                     'fraction_of_native': _ratio(total, native and native['ckpt_s'])})
    return rows


def _target(name, goal, value, limit, better='lower', note=''):
    """``better``: 'lower' (value <= limit), 'higher' (value >= limit) or 'near' (within limit of 1, either way)."""
    if value is None:
        met = None
    elif better == 'near':
        met = abs(value - 1.0) <= limit
    else:
        met = value <= limit if better == 'lower' else value >= limit
    return {'name': name, 'goal': goal, 'value': value, 'limit': limit, 'met': met, 'note': note}


def targets(results):
    """The issue's targets that this run measures: the cells' when it has cells, the fleet's when it has the fleet
    study (a run of its own); each with the value measured (None: not measured in this run)."""
    cells = results['cells']
    out = []
    if cells:
        out += _cell_targets(results, cells)
    fleet = results.get('fleet')
    if fleet:
        by_vms = fleet.get('wall_over_slowest_host_by_vms') or {}
        out.append(_target('fleet wall time / slowest host alone', '<= 1.2', fleet.get('wall_over_slowest_host'), 1.2,
                           note='%s VMs per host' % max(by_vms, key=int) if by_vms else ''))
        out.append(_target('store throughput / raw sequential write', '>= 0.8', fleet.get('throughput_over_raw'), 0.8,
                           better='higher'))
    return out


TARGET_RAM_MB = 1024  # the size targets are the idle aged 1024 MB guest's


def _cell_targets(results, cells):
    r = results.get('ratios', {})
    basis = r.get('basis', {})
    note = '%s %s %s MB' % (basis.get('state', ''), basis.get('workload', ''), basis.get('ram_mb', '?'))
    if basis and basis.get('ram_mb') != TARGET_RAM_MB:  # a smaller guest's ratios say nothing of these targets
        r = {}
        note = 'needs the idle aged %d MB guest (this run: its ratios are for %s)' % (TARGET_RAM_MB, note)
    out = [
        _target('vmme size / native size', '<= 1/6', r.get('size_ratio_vmme_over_native'), 1 / 6.0, note=note),
        _target('vmme+zstd size / native size', '<= 1/40', r.get('size_ratio_vmme_zstd_over_native'), 1 / 40.0,
                note=note),
        _target('vmme+zstd size / native+zstd size', '<= 1/9', r.get('size_ratio_vmme_zstd_over_native_zstd'),
                1 / 9.0, note=note),
    ]
    search = results.get('target_search') or {}
    out.append(_target('policy target over smallest healthy target', 'within 25 % (0.75-1.25)',
                       search.get('policy_over_smallest'), 0.25, better='near', note=search.get('vm', '')))
    fresh = [c for c in cells if c['state'] == 'fresh' and c['workload'] == 'idle']
    if fresh:
        ram = max(c['ram_mb'] for c in fresh)
        nz, vz = find(cells, 'idle', ram, 'fresh', 'native', 'zstd'), find(cells, 'idle', ram, 'fresh', 'vmme', 'zstd')
        value = _ratio(vz and vz['size_bytes'], nz and nz['size_bytes'])
        out.append(_target('fresh guest: vmme+zstd size / native+zstd size', '<= 1', value, 1.0,
                           note='fresh idle %d MB' % ram))
    else:
        out.append(_target('fresh guest: vmme+zstd size / native+zstd size', '<= 1', None, 1.0))
    over = [o for o in overheads(cells) if o['fraction_of_native'] is not None and o['label'] == 'vmme']
    worst = max(over, key=lambda o: o['fraction_of_native']) if over else None
    out.append(_target('memory-exclusion overhead / native save time (worst cell)', '<= 0.10',
                       worst and worst['fraction_of_native'], 0.10,
                       note=worst and '%s %s %d MB' % (worst['state'], worst['workload'], worst['ram_mb']) or ''))
    return out


def assemble(meta, runs, extras):
    """results.json: meta, cells, ratios, overheads, the extra studies (walk, target_search, fleet), targets."""
    cells = build_cells(runs)
    results = dict(meta)
    results.update(cells=cells, ratios=ratios(cells), overheads=overheads(cells))
    results.update(extras)
    results['targets'] = targets(results)
    return results


# --- markdown ------------------------------------------------------------------------------------------------------
def _f(v, fmt='%.1f'):
    return '–' if v is None else fmt % v


def _mb(v):
    return _f(None if v is None else v / MB)


def _spread(cell, metric, scale=1.0, fmt='%.1f'):
    s = cell['spread'].get(metric)
    if not s:
        return '–'
    if s['n'] == 1:
        return fmt % (s['median'] / scale)
    return (fmt + ' (' + fmt + '–' + fmt + ')') % (s['median'] / scale, s['min'] / scale, s['max'] / scale)


def _reps(cell):
    """The repetitions, and the twin guests that shared them when there were several (e.g. 3 (b2@xen2, b3@xen1))."""
    guests = cell.get('guests') or []
    return '%d%s' % (cell['reps'], ' (%s)' % ', '.join(guests) if len(guests) > 1 else '')


def _store(results):
    store = (results.get('method') or {}).get('store')
    return store if isinstance(store, str) and store else 'the store'


def _scope(results):
    if results.get('quick'):
        return ' (QUICK)'
    return ' (only the cells %s)' % ', '.join(results['cells_selected']) if results.get('cells_selected') else ''


def markdown(results):
    lines = ['Run %s on %s%s: Xen %s (%s dom0s) under QEMU %s. **These are emulation figures**: every guest '
             'frame the save walks and every byte it copies costs far more CPU than on bare metal; the sizes are '
             'what they would be anywhere, the times are not.' % (
                 results.get('started', '?'), results.get('machine', {}).get('description', '?'),
                 _scope(results),
                 results.get('lab', {}).get('xen_version', '?'),
                 results.get('lab', {}).get('dist', '?'), results.get('lab', {}).get('accel', '?')), '',
             'Median of the repetitions, (min–max) when there were several. ckpt = the checkpoint module\'s whole '
             'run for the VM (query, balloon, save, manifest); restore = `xl restore` plus giving the memory back; '
             'pause = how long the guest is paused by the save. Checkpoints written to %s.' % _store(results), '']
    cells = results['cells']
    if not cells:  # bench/run.py --disks-only or --fleet-only
        return '\n'.join(lines[:1] + _disk_lines(results) + _fleet_lines(results) + _error_lines(results)
                         + _target_lines(results)) + '\n'
    lines += ['| workload | state | RAM MB | mode | reps | size MB | ckpt s | restore s | pause s | saved at MiB |',
              '|---|---|---|---|---|---|---|---|---|---|']
    for c in cells:
        lines.append('| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |' % (
            c['workload'], c['state'], c['ram_mb'], c['label'], _reps(c), _spread(c, 'size_bytes', MB),
            _spread(c, 'ckpt_s'), _spread(c, 'restore_s'), _spread(c, 'pause_s'), _f(c.get('saved_mib'), '%d')))
    lines += _cost_lines(results)
    r = results.get('ratios') or {}
    if r:
        lines += ['', 'Ratios for the %s %s %s MB guest: size vmme/native %s, vmme+zstd/native %s, '
                  'vmme+zstd/native+zstd %s; checkpoint time vmme/native %s, restore %s, pause %s.' % (
                      r['basis']['state'], r['basis']['workload'], r['basis']['ram_mb'],
                      _f(r.get('size_ratio_vmme_over_native'), '%.3f'),
                      _f(r.get('size_ratio_vmme_zstd_over_native'), '%.4f'),
                      _f(r.get('size_ratio_vmme_zstd_over_native_zstd'), '%.3f'),
                      _f(r.get('time_ratio_vmme_over_native'), '%.2f'),
                      _f(r.get('restore_ratio_vmme_over_native'), '%.2f'),
                      _f(r.get('pause_ratio_vmme_over_native'), '%.2f'))]
    paper = [ram for ram in sorted(PAPER_NATIVE) if find(cells, 'idle', ram, 'aged', 'native', 'none')]
    if paper:
        lines += ['', 'The paper (Xen 3.2, bare metal), native save of the same RAM sizes: ' + '; '.join(
            '%d MB: %d MB in %.1f s, restore %.1f s' % ((ram,) + PAPER_NATIVE[ram]) for ram in paper) +
            '; with memory exclusion about 100 MB, at < 0.4 s extra per VM.']
    over = results.get('overheads') or []
    if over:
        lines += ['', '### Memory-exclusion overhead (Figure 5)', '',
                  '| workload | state | RAM MB | mode | query s | balloon s | deflate s | total s | native ckpt s '
                  '| fraction |', '|---|---|---|---|---|---|---|---|---|---|']
        for o in over:
            lines.append('| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s |' % (
                o['workload'], o['state'], o['ram_mb'], o['label'], _f(o['query_s'], '%.2f'),
                _f(o['balloon_s'], '%.2f'), _f(o['deflate_s'], '%.2f'), _f(o['total_s'], '%.2f'),
                _f(o['native_ckpt_s']), _f(o['fraction_of_native'], '%.3f')))
    walk = results.get('walk') or []
    if walk:
        lines += ['', '### Where the save time goes: the frame walk against the bytes stored', '',
                  '`xl save` of the same aged guest into a pipe read by `cat > /dev/null` (walk and stream, no '
                  'storage), at full memory and ballooned to the policy target, against the checkpoint to %s.'
                  % _store(results), '',
                  '| VM | RAM MB | memory MiB | to /dev/null s | stream MB | to store s |', '|---|---|---|---|---|---|']
        for w in walk:
            lines.append('| %s | %d | %d | %s | %s | %s |' % (
                w['vm'], w['ram_mb'], w['memory_mib'], _f(w['null_s'], '%.2f'), _mb(w.get('stream_bytes')),
                _f(w.get('store_save_s'), '%.2f')))
    search = results.get('target_search')
    if search:
        lines += ['', '### Smallest healthy balloon target', '',
                  '%s (%d MB, idle, aged): Committed_AS %s MiB; the policy asks for %s MiB; the smallest target '
                  'the guest reached and stayed healthy at (no OOM kill, agent publishing, SSH answering) was %s '
                  'MiB; policy / smallest = %s.' % (
                      search['vm'], search['ram_mb'], _f(search.get('committed_mib'), '%d'),
                      _f(search.get('policy_mib'), '%d'), _f(search.get('smallest_healthy_mib'), '%d'),
                      _f(search.get('policy_over_smallest'), '%.2f')), '',
                  '| target MiB | reached MiB | healthy | why not |', '|---|---|---|---|']
        for p in search.get('probes', []):
            lines.append('| %d | %s | %s | %s |' % (p['target_mib'], _f(p.get('reached_mib'), '%d'),
                                                    'yes' if p['healthy'] else 'no', p.get('problem') or ''))
    lines += _fleet_lines(results) + _disk_lines(results) + _target_lines(results)
    if not results.get('fleet') and not results.get('quick') and not results.get('cells_selected'):
        lines += ['', 'The fleet-scaling targets are measured by a run of their own, `make bench FLEET=1` (below).']
    for n in results.get('notes', []):
        lines += ['', '- ' + n]
    return '\n'.join(lines) + '\n'


def _fleet_lines(results):
    fleet = results.get('fleet')
    if not fleet or not fleet.get('runs'):
        return []
    lines = ['', '### Fleet scaling', '', '| mode | hosts | VMs per host | wall s | MB written | store MB/s |',
             '|---|---|---|---|---|---|']
    for f in fleet['runs']:
        lines.append('| %s | %s | %d | %.1f | %s | %s |' % (
            f['mode'], ','.join(f['hosts']), f['per_host'], f['wall_s'], _mb(f['bytes']), _f(f.get('mbps'))))
    raw = fleet.get('raw_mbps') or {}
    lines += ['', 'Raw sequential write to the store (`dd`, 1 MiB blocks, fsync): %s.' % '; '.join(
        '%s writer(s) %s MB/s' % (k, _f(v)) for k, v in sorted(raw.items())) if raw else 'Raw write: –']
    if fleet.get('note'):
        lines += ['', fleet['note']]
    return lines


def _target_lines(results):
    if not results.get('targets'):
        return []
    lines = ['', '### Targets', '', '| target | goal | measured | met |', '|---|---|---|---|']
    for t in results['targets']:
        met = 'not measured' if t['met'] is None else ('yes' if t['met'] else '**no**')
        value = _f(t['value'], '%.4g')
        lines.append('| %s | %s | %s%s | %s |' % (t['name'], t['goal'], value,
                                                  ' (%s)' % t['note'] if t.get('note') else '', met))
    return lines


PREPARED = {'aged': 'aged first', 'freshened': 'ballooned down and up first (fresh)',
            'kept': 'left as they were (the restore of a native checkpoint had put the memory back unchanged)'}


def _cost_lines(results):
    """What the measurements cost in wall time, and what the time budget left out."""
    runs = [x for c in results['cells'] for x in c['runs'] if x.get('wall_s') is not None]
    lines = []
    if runs:
        walls = summary(x['wall_s'] for x in runs)
        how = Counter(x.get('prepared', '?') for x in runs)
        lines += ['', 'One measurement (setting the guest\'s state, then one `ansible-playbook` run of the checkpoint '
                  'and the restore) took %s–%s s of wall time, median %s s (%d measurements: %s). The run took %s '
                  'min%s.' % (
                      _f(walls['min'], '%.0f'), _f(walls['max'], '%.0f'), _f(walls['median'], '%.0f'), len(runs),
                      ', '.join('%d %s' % (n, PREPARED.get(k, k)) for k, n in sorted(how.items())),
                      _f((results.get('duration_s') or 0) / 60.0, '%.1f'),
                      ' of a %s-min budget' % _f(results['budget_min'], '%g') if results.get('budget_min') else '')]
        verify = summary(x.get('restore_verify_s') for x in runs)
        if verify:
            lines.append('Before each restore, the restore module checked the image\'s sha256 (reading all of it): '
                         '%s–%s s, median %s s, counted in neither ckpt nor restore.' % (
                             _f(verify['min'], '%.1f'), _f(verify['max'], '%.1f'), _f(verify['median'], '%.1f')))
    cut = results.get('cut') or []
    if cut:
        lines += ['', '**Cut by the time budget** (not measured, or fewer repetitions than planned): ' + '; '.join(
            '%s on %s' % (c.get('what') or c['vm'], c['host']) + (
                ': %d of %d repetitions' % (c['reps_done'], c['reps_planned']) if 'reps_planned' in c else '')
            for c in cut) + '.']
    return lines + _error_lines(results)


def _error_lines(results):
    errors = results.get('errors') or []
    if not errors:
        return []
    return ['', '**Failed measurements** (in results.json `errors`; a failed repetition is measured again once): '
            + '; '.join(_error_text(e) for e in errors) + '.']


def _error_text(e):
    where = '%s on %s' % (e.get('what') or '%s %s' % (e.get('vm'), e.get('workload')), e.get('host'))
    if e.get('rep') is not None:
        where += ', repetition %d%s' % (e['rep'] + 1, ' (%s)' % e['mode'] if e.get('mode') else ', set-up')
    msg = ' '.join(str(e.get('error', '')).split())
    return '%s: %s' % (where, msg if len(msg) <= 300 else msg[:297] + '...')


def _disk_lines(results):
    lines = []
    runs = results.get('disks')
    if runs:
        lines += ['', '### Disk capture (consistent checkpoints)', '',
                  'A running VM checkpointed with the disk strategies where they apply: its root disk (xvda) on the '
                  'NFS store, and data disks on storage local to its host. The VM stands still for the save plus '
                  'the disk capture (`xl save -p`, snapshots, unpause); the sha256 of a copy is computed after the '
                  'unpause. Per disk: the capture\'s seconds while paused and the space its snapshot holds, as the '
                  'filesystem or LVM reports it: a reflink clone\'s blocks are shared with the disk until either is '
                  'written, a thin snapshot takes space from its pool only as the disk changes (0 shown), a classic '
                  'LVM snapshot reserves its copy-on-write area, and a copy holds every block it copied. The '
                  '"qcow2 root" runs are of another guest, booted from a qcow2 image on the store served by Xen\'s '
                  'qdisk backend: its internal snapshot is taken by the guest\'s device model (QMP), and what it adds '
                  'to the image is shown (the clusters it keeps are shared until the guest writes them).', '',
                  '| run | VM stood still s (save + disks) | image MB | disk | on | strategy | capture s | snapshot MB | '
                  'sha256 after s |', '|---|---|---|---|---|---|---|---|---|']
        for r in runs:
            if r.get('refused'):
                lines.append('| %s | – | – | %s | | | | | not possible here: %s |' % (
                    r['run'], ', '.join('%s: %s' % kv for kv in sorted(r['strategies'].items()) if kv[1] != 'none'),
                    r['refused'].replace('|', '/')[:240]))
                continue
            for i, d in enumerate(r['disks']):
                head = ('%s | %s (%s + %s) | %s' % (r['run'], _f(r['still_s']), _f(r['save_s']), _f(r.get('pause_s')),
                                                    _mb(r['image_bytes']))) if i == 0 else ' |  | '
                lines.append('| %s | %s | %s | %s | %s | %s | %s |' % (
                    head, d['vdev'], d['on'], d['strategy'] + (' (memory only)' if d['strategy'] == 'none' else ''),
                    '–' if d.get('seconds') is None else '%.2f' % d['seconds'], _mb(d['bytes']),
                    _f(r.get('finalize_s')) if i == 0 else ''))
    return lines


def update_doc(doc_text, section, begin=DOC_BEGIN, end=DOC_END):
    """Replace a generated section of docs/benchmarks.md (between the markers), keeping the rest."""
    pattern = re.compile(re.escape(begin) + '.*?' + re.escape(end), re.S)
    block = begin + '\n' + section.rstrip('\n') + '\n' + end
    if not pattern.search(doc_text):
        raise ValueError('docs/benchmarks.md has no generated section markers %s' % begin)
    return pattern.sub(lambda _m: block, doc_text, count=1)


# --- plots ---------------------------------------------------------------------------------------------------------
COLORS = {'native': '#7f7f7f', 'native+zstd': '#bcbd22', 'vmme': '#1f77b4', 'vmme+zstd': '#2ca02c'}


def _grouped(ax, groups, cells, metric, scale, ylabel):
    labels = [label(m, c) for m, c in MODES]
    width = 0.8 / len(labels)
    for i, lab in enumerate(labels):
        xs, ys, lo, hi = [], [], [], []
        for j, g in enumerate(groups):
            c = next((c for c in cells if (c['workload'], c['ram_mb'], c['state']) == g and c['label'] == lab), None)
            if c is None or c.get(metric) is None:
                continue
            s = c['spread'][metric]
            xs.append(j + (i - 1.5) * width)
            ys.append(s['median'] / scale)
            lo.append((s['median'] - s['min']) / scale)
            hi.append((s['max'] - s['median']) / scale)
        if xs:
            ax.bar(xs, ys, width, yerr=[lo, hi], label=lab, color=COLORS[lab], capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(['%s\n%s %d MB' % (w, s, r) for w, r, s in groups], fontsize=8)
    ax.set_ylabel(ylabel)


def _save(plt, fig, ax, path, title):
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def plots(results, outdir):
    """Write the PNG figures; returns their file names."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    written = _cell_plots(plt, results, outdir) if results['cells'] else []  # none in --disks-only, --fleet-only
    fleet = (results.get('fleet') or {}).get('runs') or []
    if fleet:
        written.append(_fleet_plot(plt, fleet, outdir))
    return written


def _cell_plots(plt, results, outdir):
    cells = results['cells']
    written = []
    groups = sorted({(c['workload'], c['ram_mb'], c['state']) for c in cells}, key=lambda g: (g[0] != 'idle', g))
    for name, metric, scale, ylabel, title in (
            ('size.png', 'size_bytes', MB, 'checkpoint size (MB)', 'Checkpoint size (Table I, Figure 2)'),
            ('ckpt_time.png', 'ckpt_s', 1.0, 'checkpoint time (s)', 'Checkpoint time (Figure 3)'),
            ('restore_time.png', 'restore_s', 1.0, 'restore time incl. memory back (s)', 'Restore time (Figure 4)'),
            ('pause.png', 'pause_s', 1.0, 'guest paused by the save (s)', 'Guest downtime per mode')):
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
        _grouped(ax, groups, cells, metric, scale, ylabel)
        written.append(_save(plt, fig, ax, outdir / name, title + (' — QUICK' if results.get('quick') else '')))
    over = [o for o in results.get('overheads', []) if o['total_s'] is not None]
    if over:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(over)), 4))
        xs = range(len(over))
        q = [o['query_s'] for o in over]
        b = [o['balloon_s'] for o in over]
        d = [o['deflate_s'] for o in over]
        ax.bar(xs, q, label='query (agent)', color='#9467bd')
        ax.bar(xs, b, bottom=q, label='balloon', color='#1f77b4')
        ax.bar(xs, d, bottom=[x + y for x, y in zip(q, b)], label='deflate (memory back)', color='#17becf')
        ax.plot(list(xs), [o['native_ckpt_s'] or 0 for o in over], 'k_', markersize=20, label='native checkpoint')
        ax.set_xticks(list(xs))
        ax.set_xticklabels(['%s\n%s %d MB\n%s' % (o['workload'], o['state'], o['ram_mb'], o['label']) for o in over],
                           fontsize=7)
        ax.set_ylabel('seconds')
        written.append(_save(plt, fig, ax, outdir / 'overhead.png', 'Memory-exclusion overhead per VM (Figure 5)'))
    return written


def _fleet_plot(plt, fleet, outdir):
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({f['mode'] for f in fleet}):
        for nh in sorted({len(f['hosts']) for f in fleet}):
            pts = sorted((f['per_host'], f['wall_s']) for f in fleet if f['mode'] == mode and len(f['hosts']) == nh)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label='%s, %d host(s)' % (mode, nh))
    ax.set_xlabel('VMs per host')
    ax.set_ylabel('wall time (s)')
    return _save(plt, fig, ax, outdir / 'fleet.png', 'Fleet scaling')
