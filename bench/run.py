#!/usr/bin/env python
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""`make bench` (a one-hour budget) and `make bench QUICK=1` (meant for 10 minutes): memory exclusion against native
`xl save`, side by side, on the local Xen lab.

Every measurement goes through the collection's own modules run by ansible-playbook (checkpoint, then restore
with the memory given back), for each mode in turn on the same VM in the same state: native, native+zstd, vmme,
vmme+zstd. The modes rotate between repetitions. Guests are "aged" before each checkpoint (their free memory
holds stale data, like a long-running VM's; bench/workload.py) or "fresh" (free memory zeroed by a balloon
down and up, like a just-booted VM's). The two Xen hosts measure their own cells at once, the required ones first,
within the time budget (60 min by default). Output: bench/results/<timestamp>/ (results.json, results.md, PNG plots)
and the generated section of docs/benchmarks.md (with the plots copied to docs/benchmarks/). The fleet study
(--fleet-only) and the disk study (--disks-only) are runs of their own.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests' / 'lab'))
sys.path.insert(0, str(REPO / 'bench'))

import labctl  # noqa: E402
import lablib  # noqa: E402
import report  # noqa: E402
from playbook import run_task, run_tasks  # noqa: E402

STORES = {'local': '/var/lib/fleetckpt/bench',  # on each dom0's own disk, like the paper's local disk
          'nfs': '/srv/fleetckpt/bench'}         # the lab's shared NFS store, as every dom0 mounts it
SHARED_STORE = STORES['nfs']                     # the fleet study: all hosts write one shared store
TOOL = '/usr/local/lib/fleetckpt-bench.py'  # bench/workload.py in the guests (run with python3)
BENCH_GUESTS = [lablib.GuestSpec('b1', 'xen1', 5, 1024),   # booted for the cells that name them, destroyed after
                lablib.GuestSpec('b2', 'xen2', 7, 512)]
# the fleet study checkpoints the lab's own guests and two more 256 MB guests per host, booted for it: n VMs per host
# are the first n of the host's list
FLEET_GUESTS = [lablib.GuestSpec('f1', 'xen1', 11, 256), lablib.GuestSpec('f2', 'xen1', 12, 256),
                lablib.GuestSpec('f3', 'xen2', 13, 256), lablib.GuestSpec('f4', 'xen2', 14, 256)]
FLEET_VMS = {'xen1': ['g1', 'g2', 'f1', 'f2'], 'xen2': ['g3', 'g4', 'f3', 'f4']}
AGE = '0.8'    # fraction of MemAvailable touched to age a guest
HOLD = '0.7'   # anonymous-memory workload: fraction of MemTotal held
FILE = '/var/tmp/fleetckpt-bench.data'  # page-cache workload: a file of about half the RAM
SEARCH_S = 360  # what the smallest-target search takes (five probes), for the time budget
PROBE_S = 240   # what one probe of it can take (balloon down and up, checks), for the time budget
PROBE_SSH_S = 60  # a probed guest that takes longer to answer over SSH is not healthy
# The checkpoint's agent_timeout: after the balloon the agent must answer within max(this, 15 s). Under emulation a
# guest squeezed while it holds 70 % of its RAM took longer (its processes paged back in from an emulated disk), and
# the checkpoint was refused; an operator on slow hardware raises it the same way.
AGENT_TIMEOUT_S = 30
FINISH_S = 120  # what the run needs after its last measurement (guests destroyed, results, plots, docs)


class BenchError(Exception):
    pass


@dataclass
class Cell:
    vm: str
    ram_mb: int
    workload: str   # idle | pagecache | anon | build
    state: str      # aged | fresh
    reps: int
    walk: int = 0      # repetitions of the frame-walk study (idle only)
    priority: int = 2  # 0: the cells the issue requires (3 repetitions each); 1: another target needs it; 2: the rest

    @property
    def name(self):
        return '%s %s %s %d MB' % (self.vm, self.state, self.workload, self.ram_mb)


def plan(quick):
    """Per host, the cells it measures. QUICK: one repetition of two cells. The full run: the required cells first
    (each on its own guest, so their repetitions interleave), then what the targets need, then the rest, within the
    time budget (schedule())."""
    if quick:  # the lab's 256 MB guests: a measurement takes about half what a 512 MB one does
        return {'xen1': [Cell('g1', 256, 'idle', 'aged', 1)],
                'xen2': [Cell('g3', 256, 'pagecache', 'aged', 1)]}
    # xen1 measures the 1024 MB guest alone (its twelve measurements are the longest), then what the fresh-guest and
    # balloon-target targets need of it; xen2 the two 512 MB cells, each on its own guest
    return {'xen1': [Cell('b1', 1024, 'idle', 'aged', 3, walk=2, priority=0), Cell('b1', 1024, 'idle', 'fresh', 1, priority=1),
                     Cell('g2', 512, 'idle', 'aged', 3), Cell('g1', 256, 'idle', 'aged', 3)],
            'xen2': [Cell('g4', 512, 'anon', 'aged', 3, priority=0), Cell('b2', 512, 'pagecache', 'aged', 3, priority=0),
                     Cell('g4', 512, 'build', 'aged', 1), Cell('g3', 256, 'anon', 'aged', 1),
                     Cell('g3', 256, 'pagecache', 'aged', 1)]}


def schedule(cells):
    """The (cell, repetition) steps of one host in the order it measures them: by priority, and within a priority
    repetition by repetition across its cells, so a time budget that runs out leaves them as even as it can."""
    steps = []
    for prio in sorted({c.priority for c in cells}):
        group = [c for c in cells if c.priority == prio]
        for rep in range(max(c.reps for c in group)):
            steps += [(c, rep) for c in group if rep < c.reps]
    return steps


def select(cells, specs):
    """The cells of ``cells`` (a plan) that ``specs`` name, as WORKLOAD:STATE:RAM_MB[:REPS] (REPS overrides the
    plan's repetitions): a part of the full run, for a machine where the whole does not fit the time at hand."""
    picked = {}
    for spec in specs:
        parts = spec.split(':')
        if len(parts) not in (3, 4) or not all(parts) or not all(p.isdigit() for p in parts[2:]):
            raise BenchError('--cell %r: expected WORKLOAD:STATE:RAM_MB[:REPS], e.g. idle:aged:1024:3' % spec)
        found = [(h, c) for h, cs in cells.items() for c in cs if (c.workload, c.state, str(c.ram_mb)) == tuple(parts[:3])]
        if not found:
            raise BenchError('--cell %r: no such cell in the full run (%s)' % (spec, ', '.join(sorted(
                '%s:%s:%d' % (c.workload, c.state, c.ram_mb) for cs in cells.values() for c in cs))))
        for host, c in found:
            reps = int(parts[3]) if len(parts) == 4 else c.reps
            picked.setdefault(host, []).append(Cell(c.vm, c.ram_mb, c.workload, c.state, reps, min(c.walk, reps),
                                                    c.priority))
    return picked


def oom_kills(text):
    """The guest's OOM-kill count from the probe's output (the oom_kill value of /proc/vmstat)."""
    try:
        return int(text.split()[-1])
    except (IndexError, ValueError):
        raise BenchError('no oom_kill count in /proc/vmstat: %r' % text[-200:]) from None


T0 = time.monotonic()
_print_lock = threading.Lock()


def log(msg):
    with _print_lock:
        print('[bench %6.0fs] %s' % (time.monotonic() - T0, msg), flush=True)


class Bench:
    def __init__(self, lab, inventory, store=STORES['local'], deadline=None):
        self.lab = lab
        self.inv = inventory
        self.store = store
        self.deadline = deadline  # time.monotonic() by which the cells must be done (the time budget), or None
        self.runs = []
        self.errors = []
        self.walk = []
        self.cut = []     # the cells the time budget cut short
        self.kept = {}    # vm -> the state (aged, fresh) its memory is known to be in still (prepare())
        self.setup = {}   # vm -> the cell whose workload it is set up for (setup_cell())
        self.tooled = set()  # the guests with the agent and the workload tool installed (install_tools())
        self.lock = threading.Lock()

    # -- helpers ------------------------------------------------------------------------------------------
    def install_tools(self, vms):
        """The guest agent (the collection's guest_agent module) and the workload tool on those of ``vms`` that
        lack them, all at once. Only where a cell about to run needs them: under emulation each install is a
        minute of the guest's host."""
        with self.lock:
            vms = sorted(set(vms) - self.tooled)
        if not vms:
            return
        log('installing the guest agent and the workload tool on %s' % ', '.join(vms))
        res = run_task(self.inv, ','.join(vms), 'guest_agent', {}, timeout=1800, forks=len(vms))
        if res.rc != 0 or not all(res.ok(vm) for vm in vms):
            raise BenchError('installing the guest agent on %s failed: %s' % (', '.join(vms), res.output[-2000:]))
        tool = (REPO / 'bench' / 'workload.py').read_bytes()
        for vm in vms:
            self.lab.put_file(vm, TOOL, tool)
        with self.lock:
            self.tooled.update(vms)

    def task(self, host, module, args, what):
        res = run_task(self.inv, host, module, args, timeout=3600)
        if res.rc != 0 or not res.ok(host):
            msg = (res.results.get(host) or {}).get('msg') or res.output[-1500:]
            raise BenchError('%s on %s failed: %s' % (what, host, msg))
        return res[host]

    def guest(self, vm, cmd, timeout=900):
        r = self.lab.sh(vm, 'python3 %s %s' % (TOOL, cmd), timeout=timeout)
        return json.loads(r.stdout.strip().splitlines()[-1])

    def mem_mib(self, host, vm):
        row = self.lab.domain_row(host, vm)
        if row is None:
            raise BenchError('%s is not running on %s' % (vm, host))
        return row[0]

    def balloon_to(self, host, vm, mib, timeout=180, slack=8):
        """`xl mem-set`, then wait until the domain is within ``slack`` MiB or stops moving for 20 s."""
        self.lab.sh(host, 'xl mem-set %s %dm' % (vm, mib))
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = self.mem_mib(host, vm)
            if abs(now - mib) <= slack:
                return now
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > 20:
                return now
            time.sleep(1)
        return self.mem_mib(host, vm)

    # -- one measurement ----------------------------------------------------------------------------------
    def prepare(self, host, cell):
        """Put the guest in the cell's state; returns what that took: 'aged', 'freshened' or 'kept'. A restore puts
        back exactly the memory that was saved, so after a native measurement the guest is still in its state and is
        not aged again; a balloon gives memory back zeroed, so after a vmme one an aged guest is aged anew (a fresh
        guest stays fresh either way)."""
        if self.kept.pop(cell.vm, None) == cell.state:
            done = 'kept'
        elif cell.state == 'fresh':
            self.balloon_to(host, cell.vm, max(192, cell.ram_mb // 4))
            self.balloon_to(host, cell.vm, cell.ram_mb)
            done = 'freshened'
        else:
            self.guest(cell.vm, 'age %s' % AGE)
            done = 'aged'
        if cell.workload == 'anon' and not self.guest(cell.vm, 'status')['hold']:
            raise BenchError('the anonymous-memory workload of %s is gone (OOM killed?)' % cell.vm)
        if cell.workload == 'pagecache':
            self.guest(cell.vm, 'readfile %s' % FILE)
        if cell.workload == 'build':
            self.guest(cell.vm, 'build start')
        return done

    def cycle(self, host, cell, mode, compression, rep):
        """Checkpoint (the VM stops with the save) and restore with memory back: one measured run. Both modules
        run in one ansible-playbook (one start-up per measurement, not two)."""
        t0 = time.monotonic()
        prepared = self.prepare(host, cell)
        prepare_s = time.monotonic() - t0
        try:
            # wait_agent 0: the next measurement's own query waits for the agent; the bench's wall time need not
            res = run_tasks(self.inv, host, [
                ('ck', 'checkpoint', {'store': self.store, 'init_store': True, 'name': [cell.vm], 'mode': mode,
                                      'compression': compression, 'keep_running': False, 'fallback': 'fail',
                                      'keep_last': 1, 'agent_timeout': AGENT_TIMEOUT_S}),
                ('rs', 'restore', {'store': self.store, 'vm': cell.vm, 'checkpoint_id': '{{ ck.checkpoints[0].id }}',
                                   'wait_agent': 0})], timeout=3600)
            steps = res.results.get(host) or {}
            for name, what in (('ck', 'checkpoint %s %s' % (cell.vm, mode)), ('rs', 'restore %s' % cell.vm)):
                step = steps.get(name) or {}
                if step.get('failed') or step.get('skipped') or not step:
                    raise BenchError('%s on %s failed: %s' % (what, host, step.get('msg') or res.output[-1500:]))
            ck, r = steps['ck']['checkpoints'][0], steps['rs']['restored']
            if ck.get('mode') != mode:
                raise BenchError('%s was saved %s, not %s: %s' % (
                    cell.vm, ck.get('mode'), mode, ck.get('fallback_reason')))
        finally:
            if cell.workload == 'build' and self.lab.locate_guest(cell.vm):
                self.guest(cell.vm, 'build stop')
        if not r.get('memory_restored', True):
            raise BenchError('%s came back without its memory: %s' % (cell.vm, r))
        t, rt = ck['timings'], r['timings']
        run = {'workload': cell.workload, 'ram_mb': cell.ram_mb, 'state': cell.state, 'mode': mode,
               'compression': compression, 'vm': cell.vm, 'host': host, 'rep': rep,
               'size_bytes': ck['size_bytes'], 'ckpt_s': t['total_s'], 'pause_s': t['save_s'],
               'restore_s': round(rt['restore_s'] + rt.get('deflate_s', 0.0), 3), 'restore_xl_s': rt['restore_s'],
               'restore_verify_s': rt.get('verify_s'),
               'saved_mib': ck['saved_kb'] // 1024, 'original_mib': ck['original_kb'] // 1024,
               # the policy's target; saved_mib is above it when the balloon settled short of it (and was accepted)
               'target_mib': (ck.get('balloon') or {}).get('requested_kb', ck['saved_kb']) // 1024,
               'prepared': prepared, 'prepare_s': round(prepare_s, 1), 'wall_s': round(time.monotonic() - t0, 1)}
        if mode == 'native' or cell.state == 'fresh':
            self.kept[cell.vm] = cell.state
        if mode == 'vmme':
            run.update(overhead_query_s=t['query_s'], overhead_balloon_s=t['balloon_s'],
                       overhead_deflate_s=rt.get('deflate_s'))
        return run

    def mean_wall(self, host, cell):
        """The mean wall time of the cell's measurements so far; else of its twin's (the same workload, RAM and state
        on another guest); else of the host's; else 0."""
        with self.lock:
            own = [x for x in self.runs if x['host'] == host and (x['vm'], x['workload'], x['state']) == (
                cell.vm, cell.workload, cell.state)]
            twin = [x for x in self.runs if (x['workload'], x['ram_mb'], x['state']) == (cell.workload, cell.ram_mb, cell.state)]
            for runs in (own, twin, [x for x in self.runs if x['host'] == host]):
                if runs:
                    return sum(x['wall_s'] for x in runs) / len(runs)
        return 0.0

    def cell_runs(self, cell, mode, compression=None):
        """The runs measured so far for ``cell`` in ``mode`` (and ``compression``, unless None: both)."""
        with self.lock:
            return [x for x in self.runs if (x['vm'], x['workload'], x['state'], x['mode']) == (
                cell.vm, cell.workload, cell.state, mode) and compression in (None, x['compression'])]

    def null_save(self, host, vm):
        """`xl save -c` into a pipe drained to /dev/null: the frame walk and stream without any storage."""
        r = self.lab.sh(host, (
            'd=$(mktemp -d) && mkfifo $d/f && { wc -c < $d/f > $d/n & } && t0=$(date +%s.%N) && '
            'xl save -c {vm} $d/f >/dev/null 2>$d/e; rc=$?; t1=$(date +%s.%N); wait; '
            'echo "$rc $t0 $t1 $(cat $d/n)"; cat $d/e >&2; rm -rf $d').replace('{vm}', vm), timeout=1800, check=False)
        fields = r.stdout.split()
        if r.rc != 0 or len(fields) != 4 or fields[0] != '0':
            raise BenchError('xl save -c %s to a pipe failed: %s %s' % (vm, r.stdout, r.stderr[-500:]))
        return round(float(fields[2]) - float(fields[1]), 3), int(fields[3])

    def walk_study(self, host, cell, rep):
        """The save of the same aged VM at full memory and ballooned to the policy target, into /dev/null."""
        vmme = self.cell_runs(cell, 'vmme', 'none')
        native = self.cell_runs(cell, 'native', 'none')
        if not vmme or not native:
            return
        self.kept.pop(cell.vm, None)  # aged here, then ballooned: zeroed where the balloon gave memory back
        self.guest(cell.vm, 'age %s' % AGE)
        secs, nbytes = self.null_save(host, cell.vm)
        self.walk.append({'vm': cell.vm, 'ram_mb': cell.ram_mb, 'memory_mib': cell.ram_mb, 'rep': rep,
                          'null_s': secs, 'stream_bytes': nbytes, 'store_save_s': native[-1]['pause_s']})
        target = vmme[-1]['saved_mib']
        try:
            reached = self.balloon_to(host, cell.vm, target)
            secs, nbytes = self.null_save(host, cell.vm)
        finally:
            self.balloon_to(host, cell.vm, cell.ram_mb)
        self.walk.append({'vm': cell.vm, 'ram_mb': cell.ram_mb, 'memory_mib': reached, 'rep': rep,
                          'null_s': secs, 'stream_bytes': nbytes, 'store_save_s': vmme[-1]['pause_s']})

    # the disk study's data disks, attached to the VM on storage local to its host (lablib.Lab.local_storage)
    STUDY_DISKS = [('xvdb', 'files', 'bench-data.img', 'XFS file, local'), ('xvdc', 'thin', 'bench-thin', 'thin LV, local'),
                   ('xvdd', 'classic', 'bench-classic', 'classic LV, local')]
    STUDY_FILL_MB = 96  # random data written to each data disk, so a copy moves real bytes
    STUDY_RUNS = [  # (label, per-disk strategies; xvda is the root disk on the NFS store)
        ('memory only', {'xvda': 'none', 'xvdb': 'none', 'xvdc': 'none', 'xvdd': 'none'}),
        ('clones', {'xvda': 'none', 'xvdb': 'reflink', 'xvdc': 'lvm', 'xvdd': 'lvm'}),
        ('copies', {'xvda': 'copy', 'xvdb': 'copy', 'xvdc': 'copy', 'xvdd': 'copy'}),
        ('reflink on NFS', {'xvda': 'reflink', 'xvdb': 'none', 'xvdc': 'none', 'xvdd': 'none'}),
    ]

    def disk_study(self, host, vm):
        """A running VM checkpointed with each disk strategy where it applies: its root disk on the NFS store, and
        three data disks on storage local to its host (an XFS file, a thin LV, a classic LV). Per run: how long the
        VM stands still (the save plus the disk capture while paused); per disk: the capture's seconds and the
        bytes its snapshot takes. A strategy that cannot work somewhere is asked for too: the refusal is recorded."""
        backing = {'xvda': 'NFS file (store)'}
        parts = {'files': {}, 'thin': {}, 'classic': {}}
        for vdev, kind, name, label in self.STUDY_DISKS:
            parts[kind][name] = '256M'
            backing[vdev] = label
        made = self.lab.local_storage(host, **parts)
        rows = []
        try:
            for vdev, _kind, name, _label in self.STUDY_DISKS:
                self.lab.sh(host, 'xl block-attach %s format=raw,vdev=%s,access=rw,target=%s' % (vm, vdev, made[name]),
                            timeout=300)
            fill = '; '.join('dd if=/dev/urandom of=/dev/%s bs=1M count=%d oflag=direct 2>/dev/null' % (vdev, self.STUDY_FILL_MB)
                             for vdev, _k, _n, _l in self.STUDY_DISKS)
            self.lab.sh(vm, 'for i in $(seq 120); do test -b /dev/xvdd && break; sleep 1; done; %s; sync' % fill,
                        timeout=1800)
            for label, strategies in self.STUDY_RUNS:
                rows.append(self.disk_run(host, vm, label, strategies, backing))
        finally:
            self._drop_last(host, vm, rows)  # its clones and snapshot LVs live on the local storage about to go
            for vdev, _k, _n, _l in self.STUDY_DISKS:
                self.lab.sh(host, 'xl block-detach %s %s' % (vm, vdev), check=False, timeout=300)
            self.lab.local_storage_remove(host)
        return rows

    QCOW2_RUNS = [('qcow2 root, memory only', {'xvda': 'none'}), ('qcow2 root, internal snapshot', {'xvda': 'qcow2'}),
                  ('qcow2 root, copied live', {'xvda': 'copy'})]

    def qcow2_study(self, spec):
        """The qcow2 strategy where it applies: a guest booted from a qcow2 image on the store, served by Xen's qdisk
        backend (Xen's QEMU installed in its dom0 first), checkpointed running with its root disk memory-only, by an
        internal snapshot, and copied (refused: a byte copy of a disk its device model writes is not consistent)."""
        self.lab.install_qemu(spec.host)
        rows = []
        try:
            labctl.start_extra_guests(self.lab, [spec])
            labctl.write_inventory(dict(self.lab.state, inventory=self.inv))
            res = run_task(self.inv, spec.name, 'guest_agent', {}, timeout=1800)
            if res.rc != 0 or not res.ok(spec.name):
                raise BenchError('installing the guest agent on %s failed: %s' % (spec.name, res.output[-2000:]))
            for label, strategies in self.QCOW2_RUNS:
                rows.append(self.disk_run(spec.host, spec.name, label, strategies, {'xvda': 'qcow2 file (store), qdisk'}))
        finally:
            self._drop_last(spec.host, spec.name, rows)  # the checkpoint and the snapshot inside the image
            labctl.stop_extra_guests(self.lab, [spec])
        return rows

    def _drop_last(self, host, vm, rows):
        """Delete the checkpoint the last of a disk study's ``rows`` kept (disk_run keeps one), with its snapshots."""
        last = [r for r in rows if r.get('id')]
        if last:
            run_task(self.inv, host, 'checkpoint', {'store': self.store, 'name': [vm], 'state': 'absent',
                                                    'checkpoint_id': last[-1]['id']}, timeout=600)

    def disk_run(self, host, vm, label, strategies, backing):
        args = {'store': self.store, 'init_store': True, 'name': [vm], 'mode': 'vmme', 'keep_running': True,
                'disks': 'none', 'disk_strategies': strategies, 'force_memory_only': 'none' in strategies.values(),
                'lvm_snapshot_size': 128 * 1024 * 1024, 'portable': False, 'keep_last': 1, 'fallback': 'fail'}
        res = run_task(self.inv, host, 'checkpoint', args, timeout=3600)
        row = {'run': label, 'host': host, 'vm': vm, 'strategies': strategies}
        out = res.results.get(host) or {}
        if res.rc != 0 or not res.ok(host):
            row['refused'] = out.get('msg') or res.output[-500:]
            log('%s on %s, %s: not possible here: %s' % (vm, host, label, row['refused'][:300]))
            return row
        c = out['checkpoints'][0]
        t = c['timings']
        row.update(id=c['id'], image_bytes=c['size_bytes'], save_s=t['save_s'], pause_s=t.get('pause_s'),
                   still_s=round(t['save_s'] + (t.get('pause_s') or 0), 3), finalize_s=t.get('disks_finalize_s'),
                   total_s=t['total_s'],
                   disks=[{'vdev': d['vdev'], 'on': backing.get(d['vdev'], '?'), 'strategy': d['strategy'],
                           'seconds': d.get('seconds'), 'bytes': d.get('allocated_bytes') or 0,
                           'logical_bytes': d.get('size_bytes') or 0, 'reason': d.get('reason')} for d in c['disks']])
        log('%s on %s, %s: stood still %.1f s (save %.1f + disks %s); %s' % (
            vm, host, label, row['still_s'], row['save_s'], row['pause_s'], ', '.join(
                '%s %s %.2f s %.1f MB' % (d['vdev'], d['strategy'], d['seconds'] or 0, d['bytes'] / 1e6)
                for d in row['disks'])))
        return row

    # -- per host --------------------------------------------------------------------------------------------
    def setup_cell(self, cell):
        """Set the guest up for the cell's workload (stopping the one it had), unless it is already."""
        if self.setup.get(cell.vm) == cell.name:
            return
        self.install_tools([cell.vm])
        self.setup.pop(cell.vm, None)
        self.guest(cell.vm, 'stop')
        if cell.workload == 'anon':
            log('%s: holding %s of its RAM (anonymous memory)' % (cell.vm, HOLD))
            self.guest(cell.vm, 'hold %s' % HOLD)
        elif cell.workload == 'pagecache':
            log('%s: writing its page-cache data file' % cell.vm)
            self.guest(cell.vm, 'mkfile %s %d' % (FILE, cell.ram_mb // 2), timeout=1800)
        self.setup[cell.vm] = cell.name

    def host_track(self, host, cells):
        """Measure the host's cells in schedule() order. A repetition (its four modes, and the walk study) starts
        only if four (five) times the cell's mean measurement so far (else the host's) still end before the
        deadline; the steps left then are recorded in ``cut``. A measurement that fails is recorded in ``errors``
        (the report lists it) and its guest recovered; the repetition is measured again once, after the other
        repetitions of its priority, so one failure does not leave a required cell short. A cell's second failure
        ends the cell; the other cells go on."""
        steps = schedule(cells)
        done = {c.name: 0 for c in cells}
        failures = {c.name: 0 for c in cells}
        failed = set()
        try:
            for i, (cell, rep) in enumerate(steps):
                if cell.name in failed:
                    continue
                need = (4 + (rep < cell.walk)) * self.mean_wall(host, cell)  # the walk study: about one more
                if self.deadline is not None and time.monotonic() + need > self.deadline:
                    left = list({c.name: c for c, _r in steps[i:] if c.name not in failed}.values())
                    log('%s: time budget: %s not measured (a repetition takes about %.0f s)' % (
                        host, ', '.join('%s (%d of %d repetitions done)' % (c.name, done[c.name], c.reps) for c in left),
                        need))
                    with self.lock:
                        self.cut += [{'host': host, 'what': c.name, 'vm': c.vm, 'workload': c.workload, 'state': c.state,
                                      'ram_mb': c.ram_mb, 'reps_planned': c.reps, 'reps_done': done[c.name]} for c in left]
                    return
                mode, compression = None, None
                try:
                    self.setup_cell(cell)
                    for mode, compression in report.MODES[rep % 4:] + report.MODES[:rep % 4]:
                        run = self.cycle(host, cell, mode, compression, rep)
                        with self.lock:
                            self.runs.append(run)
                        log('%s %s %s rep %d: %.1f MB, ckpt %.1f s, restore %.1f s (%.0f s wall, of which %.0f s %s)' % (
                            host, cell.name, report.label(mode, compression), rep + 1, run['size_bytes'] / 1e6,
                            run['ckpt_s'], run['restore_s'], run['wall_s'], run['prepare_s'], run['prepared']))
                    if rep < cell.walk:
                        self.walk_study(host, cell, rep)
                    done[cell.name] += 1
                except Exception as e:  # pylint: disable=broad-exception-caught  # recorded; the other cells go on
                    failures[cell.name] += 1
                    again = failures[cell.name] == 1
                    label = report.label(mode, compression) if mode else None
                    log('%s: cell %s rep %d %s FAILED (%s): %s' % (
                        host, cell.name, rep + 1, label or 'set-up',
                        'measured again later' if again else 'its second failure ends the cell', e))
                    if again:
                        last = max(j for j, (c, _r) in enumerate(steps) if c.priority == cell.priority)
                        steps.insert(max(last, i) + 1, (cell, rep))
                    else:
                        failed.add(cell.name)
                    self.errors.append({'host': host, 'vm': cell.vm, 'workload': cell.workload, 'what': cell.name,
                                        'rep': rep, 'mode': label,
                                        'error': ('%s: %s' % (type(e).__name__, e))[-2000:]})
                    self.setup.pop(cell.vm, None)
                    self.kept.pop(cell.vm, None)
                    self.lab.drop(cell.vm)
                    self.recover(host, cell.vm)
        finally:
            for vm in sorted({c.vm for c in cells} & self.tooled):
                self.setup.pop(vm, None)
                try:
                    if self.lab.locate_guest(vm):
                        self.guest(vm, 'stop', timeout=120)
                except Exception as e:  # pylint: disable=broad-exception-caught
                    log('%s: could not stop its workloads: %s' % (vm, e))

    def recover(self, host, vm):
        """After a failed measurement: the VM must run again, at its memory (restore its newest checkpoint).
        A guest left crashed or unreachable is reported for the operator (`labctl.py up` repairs lab guests)."""
        try:
            where = self.lab.locate_guest(vm)
            if where is None:
                log('%s: not running after the failure; restoring its newest checkpoint' % vm)
                self.task(host, 'restore', {'store': self.store, 'vm': vm}, 'recovering restore of %s' % vm)
            elif not self.lab.try_sh(vm, 'true', timeout=30):
                log('%s: runs on %s but does not answer SSH; see its console' % (vm, where))
        except Exception as e:  # pylint: disable=broad-exception-caught
            log('%s: recovery failed: %s' % (vm, e))

    # -- target search ------------------------------------------------------------------------------------------
    def healthy_at(self, host, vm, target_mib, ram_mb):
        """Balloon to the target and check the guest: reached it, no OOM kill, agent publishing, SSH answering."""
        before = self.guest(vm, 'meminfo', timeout=PROBE_SSH_S)
        probe = {'target_mib': target_mib}
        try:
            reached = self.balloon_to(host, vm, target_mib, timeout=120)
            probe['reached_mib'] = reached
            problem = None
            if reached > target_mib + 8:
                problem = 'balloon stopped at %d MiB' % reached
            domid = self.lab.sh(host, 'xl domid %s' % vm).stdout.strip()
            seq_path = '/local/domain/%s/data/fleetckpt/seq' % domid
            seq0 = self.lab.sh(host, 'xenstore-read %s' % seq_path, check=False).stdout.strip()
            if problem is None:
                try:
                    lablib.wait_for(
                        lambda: self.lab.sh(host, 'xenstore-read %s' % seq_path, check=False).stdout.strip() != seq0,
                        30, 'agent of %s publishing' % vm, interval=2)
                except lablib.LabTimeout:
                    problem = 'agent stopped publishing'
            if problem is None:  # SSH answers, and the OOM-kill count: a shell built-in read, not a program to page in
                after = oom_kills(self.lab.sh(vm, 'while read -r k v; do if [ "$k" = oom_kill ]; then echo "$v"; fi; done '
                                                  '< /proc/vmstat', timeout=PROBE_SSH_S, connect_timeout=PROBE_SSH_S).stdout)
                if after != before.get('oom_kill', 0):
                    problem = 'OOM killer fired %d time(s)' % (after - before.get('oom_kill', 0))
        except lablib.LabError as e:  # a command in the guest timed out or failed
            problem = 'guest unresponsive: %s' % str(e)[-200:]
        finally:
            self.balloon_to(host, vm, ram_mb, timeout=180)
        probe.update(healthy=problem is None, problem=problem)
        log('%s: target %d MiB -> %s' % (vm, target_mib, 'healthy' if problem is None else problem))
        return probe

    def target_search(self, host, cell, probes=5):
        """The smallest balloon target the guest reaches (within 8 MiB) and stays healthy at, against the policy's.
        Below the policy's target when the guest is healthy there (bisecting down towards half its Committed_AS);
        above it when not (a big guest's kernel can keep more than the policy's floor allows): stepping up from where
        the balloon stopped until a probe is healthy, then bisecting between. At most ``probes`` probes."""
        vmme = self.cell_runs(cell, 'vmme')  # the caller passes the bench guest's idle aged cell
        if not vmme:
            return None
        self.guest(cell.vm, 'stop')
        self.kept.pop(cell.vm, None)
        policy = sorted(x['target_mib'] for x in vmme)[len(vmme) // 2]
        committed = self.guest(cell.vm, 'meminfo')['Committed_AS'] // 1024
        out = {'vm': cell.vm, 'ram_mb': cell.ram_mb, 'policy_mib': policy, 'committed_mib': committed, 'probes': []}

        def probe(target):
            if out['probes'] and self.deadline is not None and time.monotonic() + PROBE_S > self.deadline:
                out['cut'] = 'time budget: %d probe(s) done' % len(out['probes'])
                log('%s: time budget: no more probes' % cell.vm)
                return None
            p = self.healthy_at(host, cell.vm, target, cell.ram_mb)
            out['probes'].append(p)
            return p['healthy']

        lo, hi, target = max(64, committed // 2), None, policy
        while len(out['probes']) < probes:
            ok = probe(target)
            if ok is None:
                break
            if ok:
                hi = target
            else:
                lo = target
            if hi is None:  # nothing healthy yet: step up, above where the balloon stopped
                reached = out['probes'][-1].get('reached_mib') or target
                target = max(target + 16, -(-(reached + 8) // 8) * 8)
            elif hi - lo <= 8:
                break
            else:
                target = (lo + hi) // 2
        out['smallest_healthy_mib'] = hi
        out['policy_over_smallest'] = round(policy / float(hi), 3) if hi else None
        return out

    # -- fleet ----------------------------------------------------------------------------------------------
    def raw_write(self, hosts):
        def one(h):
            r = self.lab.sh(h, 'mkdir -p %s && t0=$(date +%%s.%%N) && dd if=/dev/zero of=%s/dd.%s bs=1M count=256 '
                               'conv=fsync status=none && t1=$(date +%%s.%%N) && rm -f %s/dd.%s && echo $t0 $t1'
                            % (SHARED_STORE, SHARED_STORE, h, SHARED_STORE, h), timeout=900)
            t0, t1 = r.stdout.split()
            return float(t1) - float(t0)
        with ThreadPoolExecutor(len(hosts)) as ex:
            secs = list(ex.map(one, hosts))
        return round(256 * len(hosts) * 1.048576 / max(secs), 1)

    # memory exclusion with 1, 2 and 4 VMs per host, on one host and on both (each host alone for 2 and 4: the
    # slowest host the wall time is compared with); native with 2 per host on both, for the store's throughput
    FLEET_CASES = [('vmme', ['xen1'], 1), ('vmme', ['xen1', 'xen2'], 1), ('vmme', ['xen1'], 2), ('vmme', ['xen2'], 2),
                   ('vmme', ['xen1', 'xen2'], 2), ('vmme', ['xen1'], 4), ('vmme', ['xen2'], 4),
                   ('vmme', ['xen1', 'xen2'], 4), ('native', ['xen1', 'xen2'], 2)]

    def fleet(self, vms_by_host):
        runs = []
        for mode, hosts, n in self.FLEET_CASES:
            res = self._fleet_run(hosts, n, mode, vms_by_host)
            runs.append(res)
            log('fleet %s %s x%d: %.1f s wall, %.0f MB' % (mode, ','.join(hosts), n, res['wall_s'], res['bytes'] / 1e6))
        raw = {'1': self.raw_write(['xen1']), '2': self.raw_write(['xen1', 'xen2'])}
        return dict(fleet_summary(runs, raw), runs=runs, raw_mbps=raw, note=(
            'VMs per host: 1, 2 and 4 (the two guests per host of the lab and two 256 MB guests per host booted for the '
            'study); native saves with 2 per host on both hosts, for the store throughput. Wall time is the whole '
            'ansible-playbook run, Ansible overhead included, alike in every case. Uncompressed saves, so the guests '
            'are not aged first: what their free memory holds changes neither the bytes written nor the balloon '
            'target.'))

    def _fleet_run(self, hosts, n, mode, vms_by_host):
        results = {}
        t = time.monotonic()

        def one(h):
            results[h] = self.task(h, 'checkpoint', {
                'store': SHARED_STORE, 'init_store': True, 'name': vms_by_host[h][:n], 'mode': mode, 'keep_running': True,
                'parallel': n, 'keep_last': 1, 'fallback': 'fail', 'disks': 'none', 'force_memory_only': True},
                'fleet checkpoint')
        with ThreadPoolExecutor(len(hosts)) as ex:
            list(ex.map(one, hosts))
        wall = time.monotonic() - t
        cks = [c for h in hosts for c in results[h]['checkpoints']]
        total = sum(c['size_bytes'] for c in cks)
        save = max(c['timings']['save_s'] for c in cks)
        return {'mode': mode, 'hosts': hosts, 'per_host': n, 'wall_s': round(wall, 1), 'bytes': total,
                'mbps': round(total / 1e6 / save, 1) if save else None,
                'vms': [{'vm': c['vm'], 'size_bytes': c['size_bytes'], 'timings': c['timings']} for c in cks]}


def fleet_summary(runs, raw_mbps):
    """The fleet targets from the fleet runs: per number of VMs per host measured on each host alone and on both,
    the wall time on both over the slowest host alone (``wall_over_slowest_host_by_vms``; the target reads the
    largest such number); the native run on both hosts' throughput over the raw write from both."""
    by_n = {}
    for n in sorted({r['per_host'] for r in runs}):
        cases = [r for r in runs if r['mode'] == 'vmme' and r['per_host'] == n]
        single = max((r['wall_s'] for r in cases if len(r['hosts']) == 1), default=None)
        multi = next((r['wall_s'] for r in cases if len(r['hosts']) == 2), None)
        if single and multi and len({h for r in cases if len(r['hosts']) == 1 for h in r['hosts']}) == 2:
            by_n[str(n)] = round(multi / single, 3)
    out = {'wall_over_slowest_host_by_vms': by_n,
           'wall_over_slowest_host': by_n[max(by_n, key=int)] if by_n else None, 'throughput_over_raw': None}
    nat = next((r for r in runs if r['mode'] == 'native' and len(r['hosts']) == 2), None)
    if nat and nat.get('mbps') and raw_mbps.get('2'):
        out['throughput_over_raw'] = round(nat['mbps'] / raw_mbps['2'], 3)
    return out


# --- lab set-up --------------------------------------------------------------------------------------------------
def machine():
    cpu = ''
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            cpu = line.split(':', 1)[1].strip()
            break
    mem = int(re.search(r'MemTotal:\s+(\d+)', Path('/proc/meminfo').read_text()).group(1)) // 1024
    return {'cpu': cpu, 'cores': os.cpu_count(), 'mem_mb': mem, 'kernel': platform.release(),
            'description': '%s, %d cores, %d MB (%s)' % (cpu or 'unknown CPU', os.cpu_count(), mem, platform.node())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    ap.add_argument('--quick', action='store_true', help='the ten-minute subset')
    ap.add_argument('--store', choices=sorted(STORES), default='local',
                    help='where the measured checkpoints go: each dom0\'s own disk (default, like the paper\'s '
                         'local disk) or the lab\'s shared NFS store (reached through QEMU user networking and a '
                         'user-space NFS server). The fleet study always uses the NFS store.')
    ap.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    ap.add_argument('--no-docs', action='store_true', help='do not update docs/benchmarks.md')
    ap.add_argument('--budget-min', type=float, default=None,
                    help='time budget of the whole run, lab start-up included (default: 60 for the full run, none '
                         'for QUICK and --cell): a repetition that would end past it is not started, and results '
                         'say what was cut')
    ap.add_argument('--cell', action='append', default=[], metavar='WORKLOAD:STATE:RAM_MB[:REPS]',
                    help='measure only these cells of the full run (repeatable; REPS overrides its repetitions), '
                         'without the fleet and disk studies; writes results.json/results.md, not the docs')
    ap.add_argument('--disks-only', action='store_true',
                    help='only the disk-capture study (consistent checkpoints of a running VM, per disk strategy); '
                         'writes results.json/results.md, not the docs')
    ap.add_argument('--fleet-only', action='store_true',
                    help='only the fleet-scaling study (the lab\'s four guests on one and two hosts, to the shared '
                         'store): its own run, outside the full run\'s hour; writes its section of the docs')
    args = ap.parse_args(argv)
    if sum(map(bool, (args.cell, args.quick, args.disks_only, args.fleet_only))) > 1:
        ap.error('--quick, --cell, --disks-only and --fleet-only are different runs: pick one')
    cells = {} if args.disks_only or args.fleet_only else plan(args.quick)
    if args.cell:
        try:
            cells = select(cells, args.cell)
        except BenchError as e:
            ap.error(str(e))
    partial = bool(args.cell) or args.disks_only
    if partial:
        args.no_docs = True
    if args.budget_min is None and not args.quick and not partial and not args.fleet_only:
        args.budget_min = 60.0
    started = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
    outdir = Path(args.out) / time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    log('bringing the Xen lab up (or reusing it)')
    state = labctl.up()
    lab = lablib.Lab(state)
    specs = [g for g in BENCH_GUESTS if any(c.vm == g.name for cs in cells.values() for c in cs)]
    if args.fleet_only:
        specs += FLEET_GUESTS
    extras = {'walk': [], 'target_search': None, 'fleet': None, 'disks': []}
    bench = None
    try:
        if specs:
            log('booting the benchmark guests: %s' % ', '.join(
                '%s (%d MB on %s)' % (g.name, g.memory_mb, g.host) for g in specs))
            labctl.start_extra_guests(lab, specs)
        inv = Path(state['run_dir']) / 'bench-inventory.yml'
        labctl.write_inventory(dict(lab.state, inventory=str(inv)))
        bench = Bench(lab, str(inv), STORES[args.store])
        if args.budget_min:
            bench.deadline = T0 + args.budget_min * 60 - FINISH_S
        # the guests of the cells the targets need, at once; the others' when their cell starts (setup_cell)
        bench.install_tools({c.vm for cs in cells.values() for c in cs if c.priority < 2} | ({'g1'} if args.disks_only else set())
                            | ({vm for vms in FLEET_VMS.values() for vm in vms} if args.fleet_only else set()))
        if args.fleet_only:
            log('fleet scaling: %s' % ', '.join('%s on %s' % (' and '.join(v), h) for h, v in sorted(FLEET_VMS.items())))
            extras['fleet'] = bench.fleet(FLEET_VMS)

        def track(host):
            bench.host_track(host, [c for c in cells[host] if c.priority < 2])
            search = [c for c in cells[host] if c.vm in {g.name for g in specs} and c.workload == 'idle'
                      and c.state == 'aged']
            if search and bench.deadline is not None and time.monotonic() + SEARCH_S > bench.deadline:
                log('time budget: no smallest-target search of %s' % search[0].vm)
                bench.cut.append({'host': host, 'vm': search[0].vm, 'what': 'smallest healthy target search'})
            elif search:  # after the cells the targets need: probing low targets may leave the guest unfit for more
                log('searching the smallest healthy balloon target of %s' % search[0].vm)
                try:
                    extras['target_search'] = bench.target_search(host, search[0])
                except (BenchError, lablib.LabError) as e:
                    bench.errors.append({'host': host, 'vm': search[0].vm, 'workload': 'target search',
                                         'error': str(e)[-2000:]})
            bench.host_track(host, [c for c in cells[host] if c.priority == 2])
        if cells:
            with ThreadPoolExecutor(len(cells)) as ex:
                list(ex.map(track, sorted(cells)))
        if args.disks_only:
            log('disk capture: g1 on xen1 checkpointed running, per disk strategy (root on NFS, data disks local)')
            try:
                extras['disks'] = bench.disk_study('xen1', 'g1')
            except (BenchError, lablib.LabError) as e:
                bench.errors.append({'host': 'xen1', 'vm': 'g1', 'workload': 'disk study', 'error': str(e)[-2000:]})
            q1 = lablib.QCOW2_GUEST
            log('disk capture: %s on %s, its root disk a qcow2 image served by qdisk' % (q1.name, q1.host))
            try:
                extras['disks'] += bench.qcow2_study(q1)
            except (BenchError, lablib.LabError) as e:
                bench.errors.append({'host': q1.host, 'vm': q1.name, 'workload': 'qcow2 disk study', 'error': str(e)[-2000:]})
    finally:
        if specs:
            labctl.stop_extra_guests(lab, specs)
        shutil.rmtree(Path(state['store']['controller_path']) / 'bench', ignore_errors=True)
        if args.store == 'local':
            for h in set(cells) | {'xen1'} | ({lablib.QCOW2_GUEST.host} if args.disks_only else set()):
                lab.sh(h, 'rm -rf %s' % STORES['local'], check=False, timeout=300)
        lab.drop()
    extras.update(walk=bench.walk, cut=bench.cut)
    meta = {'schema': 1, 'started': started, 'quick': args.quick, 'cells_selected': args.cell, 'fleet_only': args.fleet_only,
            'budget_min': args.budget_min, 'duration_s': round(time.monotonic() - T0, 1),
            'machine': machine(), 'errors': bench.errors,
            'lab': {'xen_version': state['xen_version'], 'dist': state['dist'], 'accel': state['accel'],
                    'kernel': state.get('kernel'), 'host_mem_mb': lablib.HOST_MEM_MB,
                    'dom0_mem_mb': lablib.DOM0_MEM_MB, 'cpu_model': 'qemu64 (TCG, software emulation)'},
            'method': {'age_fraction': float(AGE), 'hold_fraction': float(HOLD),
                       'store': {'local': 'each dom0\'s own disk (%s)', 'nfs': 'the lab\'s NFS store (%s)'}[args.store]
                       % STORES[args.store],
                       'zstd': 'level 3, 1 thread (module defaults)'},
            'notes': ['Times come from Xen under QEMU software emulation (TCG) on the machine above, not bare metal.']}
    results = report.assemble(meta, bench.runs, extras)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / 'results.json').write_text(json.dumps(results, indent=2, sort_keys=True) + '\n')
    section = report.markdown(results)
    figs = report.plots(results, outdir)
    (outdir / 'results.md').write_text(section)
    log('results in %s' % outdir)
    if not args.no_docs:
        docs = REPO / 'docs' / 'benchmarks'
        docs.mkdir(exist_ok=True)
        for f in figs:
            shutil.copy(outdir / f, docs / f)
        section += '\n' + '\n'.join('![%s](benchmarks/%s)' % (f[:-4], f) for f in figs) + '\n'
        doc = REPO / 'docs' / 'benchmarks.md'
        markers = (report.FLEET_BEGIN, report.FLEET_END) if args.fleet_only else (report.DOC_BEGIN, report.DOC_END)
        doc.write_text(report.update_doc(doc.read_text(), section, *markers))
        log('docs/benchmarks.md updated')
    print(section)
    for t in results['targets']:
        if t['met'] is False:
            log('target missed: %s (%s, measured %s)' % (t['name'], t['goal'], t['value']))
    if bench.errors:
        log('%d cell(s) failed; see results.json "errors"' % len(bench.errors))
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
