# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Checkpoint and restore flows: query -> balloon -> save -> give the memory back; verify -> restore -> give back.

Guarantees (tested in tests/unit and on the lab):
* the memory is given back in a ``finally``: a failure never leaves a running VM ballooned down;
* a checkpoint becomes visible only when complete (atomic directory rename) and only if the balloon
  reached its target before the save, so every image reported valid is restorable;
* restore verifies the image's sha256, the host's free memory and the Xen version before touching
  the host, and refuses to create a second live copy of a VM.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils import _disks
from ansible_collections.fleetckpt.xen.plugins.module_utils._balloon import Balloon, KIB_PER_MIB, guest_health
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import (
    BalloonError, FleetckptError, InvalidInput, PolicyRefused, StoreError, XlError)
from ansible_collections.fleetckpt.xen.plugins.module_utils._imagestream import restore_stream, save_stream
from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import compute_target
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import utc_iso
from ansible_collections.fleetckpt.xen.plugins.module_utils._xlimage import config_disks, make_transform, read_config
from ansible_collections.fleetckpt.xen.plugins.module_utils._xl import destroy_confirmed

COLLECTION_VERSION = '0.1.0'
MODES = ('vmme', 'native')
FALLBACKS = ('native', 'fail')
COMPRESSIONS = ('none', 'zstd')
RESTORE_MARGIN_KB = 16 * KIB_PER_MIB


def host_facts(xl):
    info = xl.info()
    return {
        'host': info.get('host') or socket.gethostname(),
        'xen_version': str(info.get('xen_version', '')),
        'hw_caps': str(info.get('hw_caps', '')),
        'virt_caps': str(info.get('virt_caps', '')),
        'free_memory_kb': int(info.get('free_memory', 0)) * KIB_PER_MIB,
        'total_memory_kb': int(info.get('total_memory', 0)) * KIB_PER_MIB,
    }


def vm_facts(dom, report=None, decision=None):
    """The machine-readable per-VM facts returned by memory_pressure and used by selection."""
    facts = dict((k, dom.get(k)) for k in ('name', 'domid', 'uuid', 'type', 'current_kb', 'static_max_kb',
                                           'target_kb', 'state', 'flags', 'vcpus'))
    facts['mem_mib'] = dom.get('mem_mib')
    if report is not None:
        facts['agent'] = dict((k, report.get(k)) for k in ('status', 'problems', 'values', 'clamped', 'age_s',
                                                           'fresh', 'version', 'query_s'))
    if decision is not None:
        facts['policy'] = decision
        facts['target_mem_kb'] = decision.get('target_kb')
        facts['reclaimable_kb'] = decision.get('reclaimable_kb')
    return facts


class Checkpointer:
    """Checkpoint one VM. ``xs`` is an entered XenStore (or None when no VM needs the agent)."""

    def __init__(self, xl, xs, store, options, clock=time.monotonic, balloon=None, disk_env=None):
        self.xl = xl
        self.xs = xs
        self.store = store
        self.opt = options
        self.clock = clock
        self.balloon = balloon or Balloon(xl, poll=options.get('poll_s', 0.5))
        self.disk_env = disk_env

    def _env(self):
        if self.disk_env is None:
            self.disk_env = _disks.DiskEnv()
        return self.disk_env

    def plan_disks(self, dom, dest_dir):
        """A strategy for every disk of the domain (see ``_disks.plan_disks``), before anything is touched:
        raises PolicyRefused, naming the disk and why, when one cannot be captured as asked."""
        config = dom.get('config') or {}
        if not config.get('disks'):
            return []
        return _disks.plan_disks(config, self.opt.get('disks', 'auto'), dest={'dir': dest_dir}, env=self._env(),
                                 per_disk=self.opt.get('disk_strategies') or None,
                                 stopped=not self.opt['keep_running'],
                                 force_none=self.opt.get('force_memory_only', False),
                                 portable=self.opt.get('portable', True), lvm_size=self.opt.get('lvm_snapshot_size'),
                                 domid=dom.get('domid') if self.opt['keep_running'] else None)

    def _disk_options(self):
        return {'copy': {'digest': self.opt.get('disk_digest', 'deferred')},
                'lvm': {'size': self.opt.get('lvm_snapshot_size')}}

    def _snapshot_disks(self, name, dom, disk_plans, dest, paused, timings):
        """Capture the disks after the save: while the domain is paused (``paused``: unpaused here, in a
        ``finally``), or after a save that stopped it. Returns the records (deferred work: ``_finalize_disks``)."""
        env = self._env()
        t = self.clock()
        records = []
        try:
            quiesce = _disks.quiesce(disk_plans, env, domid=dom.get('domid') if paused else None)
            timings['quiesce_s'] = quiesce['seconds']
            records = _disks.snapshot_all(disk_plans, dest, env, self._disk_options())
        finally:
            if paused:
                try:
                    self.unpause(name)
                except BaseException:
                    # the checkpoint is abandoned: its snapshots outside the store go too (copies go with it)
                    _disks.cleanup_disks(records, dest['dir'], env, vm=dest['vm'], ckpt_id=dest['id'])
                    raise
                timings['pause_s'] = round(self.clock() - t, 3)
            timings['disks_s'] = round(self.clock() - t, 3)
        return records

    def _finalize_disks(self, records, dest, pending, timings):
        """Deferred work on the snapshots (the sha256 of copies), once the VM runs with its memory back."""
        if not records:
            return records
        t = self.clock()
        try:
            records = _disks.finalize_all(records, dest, self._env(), self._disk_options())
        except BaseException:
            _disks.cleanup_disks(records, dest['dir'], self._env(), vm=dest['vm'], ckpt_id=dest['id'])
            pending.abort()
            raise
        timings['disks_finalize_s'] = round(self.clock() - t, 3)
        return records

    def unpause(self, name):
        """Unpause a domain this run paused; tried twice, then a loud error naming the paused VM."""
        for attempt in (1, 2):
            try:
                self.xl.unpause(name)
                return
            except FleetckptError as exc:
                if attempt == 2:
                    raise FleetckptError('%s is left PAUSED by the checkpoint: xl unpause failed twice (%s); run '
                                         '"xl unpause %s"' % (name, exc, name)) from exc

    def plan(self, dom):
        """What would be done (also used for check mode): mode used, target, reason."""
        return plan_memory(self.xs, dom, self.opt)

    def run(self, dom, host, plan=None):
        name = dom['name']
        t0 = self.clock()
        timings = {'query_s': 0.0, 'balloon_s': 0.0, 'save_s': 0.0, 'deflate_s': 0.0}
        plan = plan or self.plan(dom)
        timings['query_s'] = (plan.get('report') or {}).get('query_s') or 0.0
        original_kb = dom.get('target_kb') or dom['current_kb']
        keep_running = self.opt['keep_running']
        result = {'vm': name, 'host': host['host'], 'requested_mode': plan['requested_mode'], 'mode': plan['mode'],
                  'fallback_reason': plan['reason'], 'original_kb': original_kb, 'saved_kb': dom['current_kb'],
                  'changed': True}
        with self.store.lock(name, timeout=self.opt['lock_timeout_s']):
            recovered = self.converge(dom)
            if recovered:
                result['recovered'] = recovered
                original_kb = result['original_kb'] = recovered.get('original_kb', original_kb)
            self.store.remove_partials(name)
            disk_plans = self.plan_disks(dom, self.store.root)
            # a running VM's disks are captured while it stands paused after the save (xl save -p)
            pause = keep_running and any(p['choice']['strategy'] != 'none' for p in disk_plans)
            pending = self.store.begin(name, compression=self.opt['compression'])
            pending.write_intent({'vm': name, 'uuid': dom.get('uuid'), 'domid': dom.get('domid'),
                                  'original_kb': original_kb, 'host': host['host'], 'pid': os.getpid(),
                                  'started_at': utc_iso(), 'pauses': pause})
            ballooned = False
            destroyed = False
            records = []
            # domid: the device model of a domain paused after the save snapshots its qcow2 disks (QMP)
            dest = {'dir': pending.partial_dir, 'vm': name, 'id': pending.id, 'host': host['host'],
                    'domid': dom.get('domid') if pause else None}
            try:
                if plan['mode'] == 'vmme' and plan['target_kb'] < dom['current_kb']:
                    ballooned = True
                    res = balloon_to_plan(self.balloon, self.xs, dom, plan, self.opt, self.clock, timings,
                                          'nothing saved')
                    result['balloon'] = res
                    result['saved_kb'] = res['target_kb']
                saved = save_stream(
                    lambda fifo: (self.xl.save_argv(name, fifo, keep_running=False, paused=True) if pause
                                  else self.xl.save_argv(name, fifo, keep_running=keep_running)),
                    pending.image_path, compress=self.opt['compression'] if self.opt['compression'] != 'none' else None,
                    zstd_level=self.opt['zstd_level'], zstd_threads=self.opt['zstd_threads'],
                    timeout=self.opt['save_timeout_s'])
                timings['save_s'] = saved['save_s']
                destroyed = not keep_running
                if disk_plans:
                    records = self._snapshot_disks(name, dom, disk_plans, dest, pause, timings)
            except BaseException as exc:
                pending.abort()
                # xl resumes the domain when a save fails, but not when xl itself was killed: do it here,
                # before the memory is given back (a suspended guest cannot inflate its balloon)
                try:
                    if self.xl.recover_suspended(name) == 'resumed' and isinstance(exc, FleetckptError):
                        exc.args = ('%s (the domain, left suspended by the interrupted save, was resumed)'
                                    % exc.args[0],) + exc.args[1:]
                except FleetckptError as rexc:
                    raise FleetckptError('%s; AND resuming the suspended domain failed: %s' % (exc, rexc)) from exc
                raise
            finally:
                if ballooned and not destroyed:
                    t = self.clock()
                    give_back = self.balloon.restore_memory(name, original_kb, timeout=self.opt['balloon_timeout_s'])
                    timings['deflate_s'] = round(self.clock() - t, 3)
                    result['memory_restored'] = give_back.get('reached', False)
            records = self._finalize_disks(records, dest, pending, timings)
            timings['total_s'] = round(self.clock() - t0, 3)
            manifest = {
                'vm': {'name': name, 'uuid': dom.get('uuid'), 'type': dom.get('type')},
                'source_host': host['host'],
                'xen_version': host['xen_version'],
                'hw_caps': host['hw_caps'],
                'memory': {'original_kb': original_kb, 'static_max_kb': dom.get('static_max_kb'),
                           'saved_kb': result['saved_kb']},
                'config': dom.get('config') or {},
                'mode': plan['mode'],
                'requested_mode': plan['requested_mode'],
                'fallback_reason': plan['reason'],
                'keep_running': keep_running,
                'compression': self.opt['compression'],
                'image': {'file': pending.image_name, 'size_bytes': saved['size_bytes'], 'sha256': saved['sha256'],
                          'raw_bytes': saved['raw_bytes']},
                'agent': (plan.get('report') or {}).get('values'),
                'policy': plan.get('decision'),
                'disks': records,
                'timings': timings,
                'created_at': utc_iso(),
                'collection_version': COLLECTION_VERSION,
            }
            try:
                path = pending.commit(manifest)
            except BaseException:
                _disks.cleanup_disks(records, pending.partial_dir, self._env(), vm=name, ckpt_id=pending.id)
                pending.abort()
                raise
            result['placement'] = record_placement(self.store, name, host['host'],
                                                   'checkpointed' if keep_running else 'stopped', pending.id)
        result.update(id=pending.id, path=path, size_bytes=saved['size_bytes'], sha256=saved['sha256'],
                      raw_bytes=saved['raw_bytes'], timings=timings, still_running=keep_running,
                      disks=[disk_summary(r) for r in records])
        return result

    def converge(self, dom):
        """Undo what a run that died (SIGKILL, host crash) left behind, from its intent in the store: resume the
        domain if it is left suspended, give it its original memory back. Call with the VM's lock held.
        Returns what was done, or None."""
        intents = [i for i in self.store.interrupted(dom['name'])
                   if not i.get('unreadable') and (not dom.get('uuid') or i.get('uuid') in (None, dom.get('uuid')))]
        if not intents:
            return None
        original_kb = max(int(i.get('original_kb') or 0) for i in intents)
        done = {'interrupted_runs': len(intents)}
        if self.xl.recover_suspended(dom['name']) == 'resumed':
            done['resumed'] = True
        elif any(i.get('pauses') for i in intents) and 'p' in str(dom.get('state') or ''):
            # the run died while the domain stood paused for its disk snapshots
            self.unpause(dom['name'])
            done['unpaused'] = True
        if dom.get('static_max_kb'):
            original_kb = min(original_kb, dom['static_max_kb'])
        if original_kb and min(dom['current_kb'], dom.get('target_kb') or dom['current_kb']) < original_kb:
            # even a domain just below its original gets the target set back (see restore_checkpoint)
            back = self.balloon.restore_memory(dom['name'], original_kb, timeout=self.opt['balloon_timeout_s'])
            done.update(original_kb=original_kb, memory_restored=back.get('reached', False))
            dom['current_kb'] = self.balloon.current_kb(dom['name'])
            dom['target_kb'] = original_kb
        return done


def plan_memory(xs, dom, opt):
    """How much of a VM's memory to keep before it is saved or moved: ``mode`` (vmme, or native when asked or when
    the policy refuses and ``opt['fallback']`` is native), ``target_kb``, the ``reason`` of a fallback, and the agent
    ``report`` and policy ``decision`` behind it. Raises PolicyRefused when the policy refuses and fallback is fail."""
    mode = opt['mode']
    plan = {'requested_mode': mode, 'mode': mode, 'target_kb': None, 'reason': None, 'report': None, 'decision': None}
    if mode == 'native':
        return plan
    report = None
    if xs is not None:
        report = xs.query_agent(dom['domid'], dom.get('static_max_kb'), timeout=opt['agent_timeout_s'],
                                max_age_s=opt['agent_max_age_s'])
    decision = compute_target(dom, report, opt.get('policy'))
    plan.update(report=report, decision=decision)
    if decision['status'] != 'ok':
        if opt['fallback'] == 'fail':
            raise PolicyRefused('%s: memory exclusion not possible: %s' % (dom['name'], decision['reason']))
        plan.update(mode='native', reason=decision['reason'])
        return plan
    plan['target_kb'] = decision['target_kb']
    return plan


# Before a save or a move, a balloon that stops above its target by at most this fraction of the target (or by
# settle_slack_mib, when more) counts as reached, at what it reached: the guest gave back nearly all that was asked,
# and a native save instead would move all of it. Measured on the lab: an idle 1 GiB PV guest reached the 128 MiB
# floor when young, and stopped at 139-144 MiB after a dozen save/restore cycles (60 MiB of it are the kernel's own,
# never ballooned; the rest its page cache, slab and processes down to the allocator's watermarks).
SETTLE_FRACTION = 0.25


def balloon_to_plan(balloon, xs, dom, plan, opt, clock, timings, undone):
    """Balloon a VM down to ``plan['target_kb']`` and check the guest took it (its agent answers, no OOM kill):
    the step before a save or a move. A balloon that settles above the target within ``SETTLE_FRACTION`` of it (or
    ``settle_slack_mib``) has the target raised to what it reached (``adjusted`` in the result). Records
    ``timings['balloon_s']``; raises BalloonError (the caller gives the memory back), whose message ends with
    ``undone`` (what was not done)."""
    t = clock()
    slack_kb = max(opt['settle_slack_mib'] * KIB_PER_MIB, int(plan['target_kb'] * SETTLE_FRACTION))
    res = balloon.set_and_wait(dom['name'], plan['target_kb'], timeout=opt['balloon_timeout_s'], stall_s=opt['stall_s'],
                               settle_slack_kb=slack_kb)
    timings['balloon_s'] = round(clock() - t, 3)
    if xs is not None:
        problem = guest_health(xs, dom, plan.get('report'), timeout=opt['agent_timeout_s'],
                               max_age_s=opt['agent_max_age_s'])
        if problem:
            raise BalloonError('%s: %s; memory given back, %s' % (dom['name'], problem, undone))
    return res


def disk_summary(record):
    """The per-disk facts a playbook shows: vdev, strategy and why, bytes the snapshot takes, seconds."""
    return {'vdev': record.get('vdev'), 'target': record.get('target'), 'strategy': record.get('strategy'),
            'reason': record.get('reason'), 'size_bytes': record.get('size_bytes'),
            'allocated_bytes': record.get('allocated_bytes'), 'seconds': record.get('seconds'),
            'memory_only': record.get('strategy') == 'none' and _disks.needs_snapshot(record)}


def planned_disk(plan):
    """What check mode returns for one disk of ``Checkpointer.plan_disks``: the shape of :func:`disk_summary`,
    with nothing measured yet."""
    disk = plan['disk']
    return dict(disk_summary({'vdev': disk['vdev'], 'target': disk.get('target'), 'strategy': plan['choice']['strategy'],
                              'reason': plan['choice']['reason'], 'readwrite': disk.get('readwrite'),
                              'is_cdrom': disk.get('is_cdrom'), 'kind': disk.get('kind')}))


def record_placement(store, vm, host, event, checkpoint_id):
    """Record where the VM now is (see CheckpointStore.record_placement); the work is done, so a store that refuses
    the small record makes this return None instead of failing it."""
    try:
        return store.record_placement(vm, host, event, checkpoint_id)
    except FleetckptError:
        return None


def xen_version_tuple(text):
    parts = []
    for piece in str(text).split('.')[:2]:
        digits = ''.join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))


def refuse_if_running(name, running_names):
    """Refuse to restore ``name`` where a domain of that name runs (checked first: it needs no checksum)."""
    if name in running_names:
        raise PolicyRefused('a domain named %s already runs on this host: refusing to start a second copy '
                            '(two live copies of one VM on one shared disk corrupt it; restore_as restores a copy '
                            'under another name)' % name)


def replacing(host, dom):
    """The host as a restore that replaces the running ``dom`` (if_running=replace) will find it: the domain's
    memory counts as free, since it is destroyed before the restore."""
    return dict(host, free_memory_kb=host['free_memory_kb'] + int(dom.get('mem_mib') or 0) * KIB_PER_MIB)


def replaced_facts(dom):
    """What a replace destroyed, for the result (None when nothing was replaced)."""
    if dom is None:
        return None
    return {'domid': dom['domid'], 'mem_mib': dom.get('mem_mib'), 'state': dom.get('state')}


def destroy_replaced(xl, name, dom):
    """Destroy the domain a restore replaces, after every check passed; the domid must still be the one checked
    (another run may have replaced it meanwhile)."""
    now = xl.list_plain().get(name)
    if now is None or now['domid'] != dom['domid']:
        raise PolicyRefused('%s changed while the restore was being checked (domid %s, now %s): nothing replaced'
                            % (name, dom['domid'], now['domid'] if now else 'gone'))
    destroy_confirmed(xl, name)


def restore_preflight(entry, host, running_names, ignore_cpu_mismatch=False, restore_as=None, disk_map=None,
                      exists=os.path.exists, disk_plan=None):
    """Checks before anything is created on the host. Returns the name to restore as; raises otherwise.

    With ``restore_as`` the copy gets a new name (and a new uuid at restore); it must not share a writable disk
    with the original, which may still run here or elsewhere: every writable disk of the image must be mapped by
    ``disk_map`` to an existing path that is not one of the image's own disks."""
    if not entry or not entry.get('valid'):
        problems = '; '.join((entry or {}).get('problems') or ['no such checkpoint'])
        raise StoreError('checkpoint is not valid: %s' % problems)
    manifest = entry['manifest']
    name = restore_as or manifest['vm']['name']
    refuse_if_running(name, running_names)
    if restore_as or disk_map:
        check_disk_map(entry, disk_map or {}, require_all=bool(restore_as), exists=exists,
                       covered=set((disk_plan or {}).get('disk_map') or {}))
    src = xen_version_tuple(manifest.get('xen_version'))
    dst = xen_version_tuple(host['xen_version'])
    if dst < src:
        raise PolicyRefused('image was saved on Xen %s; this host runs older Xen %s, which cannot read it'
                            % (manifest.get('xen_version'), host['xen_version']))
    if not ignore_cpu_mismatch and manifest.get('hw_caps') and host['hw_caps'] and manifest['hw_caps'] != host['hw_caps']:
        raise PolicyRefused('CPU features differ from the saving host (hw_caps %s vs %s): Xen may refuse the '
                            'CPUID policy; set ignore_cpu_mismatch to try anyway' % (manifest['hw_caps'], host['hw_caps']))
    memory = manifest.get('memory') or {}
    need = max(memory.get('original_kb') or 0, memory.get('saved_kb') or 0) + RESTORE_MARGIN_KB
    if host['free_memory_kb'] < need:
        raise PolicyRefused('host %s has %d MiB free; restoring %s with its memory given back needs %d MiB'
                            % (host['host'], host['free_memory_kb'] // KIB_PER_MIB, name, need // KIB_PER_MIB))
    if disk_plan and disk_plan['problems']:
        raise PolicyRefused('cannot restore the disks of %s: %s' % (manifest['vm']['name'], '; '.join(disk_plan['problems'])))
    return name


def image_disks(entry):
    """The disks recorded in a checkpoint's image header: [{'pdev_path', 'vdev', 'readwrite', ...}]."""
    return config_disks(read_config(entry['image_path']))


def check_disk_map(entry, disk_map, require_all, exists=os.path.exists, covered=()):
    disks = image_disks(entry)
    own = set(d.get('pdev_path') for d in disks)
    unknown = sorted(set(disk_map) - own)
    if unknown:
        raise InvalidInput('disk_map names %s, which the image does not use (its disks: %s)'
                           % (', '.join(unknown), ', '.join(sorted(p for p in own if p)) or 'none'))
    for src, dst in sorted(disk_map.items()):
        if not isinstance(dst, str) or not os.path.isabs(dst) or '\x00' in dst:
            raise InvalidInput('disk_map target for %s must be an absolute path, got %r' % (src, dst))
        if dst in own:
            raise InvalidInput('disk_map maps %s onto %s, a disk of the image itself' % (src, dst))
        if not exists(dst):
            raise InvalidInput('disk_map target %s does not exist' % dst)
    if require_all:
        unmapped = [d.get('pdev_path') for d in disks if d.get('readwrite', 1) and not d.get('is_cdrom')
                    and d.get('pdev_path') and d.get('pdev_path') not in disk_map and d.get('pdev_path') not in covered]
        if unmapped:
            raise PolicyRefused('restoring a copy under a new name would share writable disk(s) %s with the original: '
                                'map each to a copy with disk_map' % ', '.join(unmapped))


def plan_restore_disks(entry, options, host, env=None):
    """What the restore does with the checkpoint's disk snapshots (``_disks.restore_plan``), or None for a
    checkpoint without disk records (schema 1). Disks the caller maps with ``disk_map`` are left to it.
    ``options``: ``restore_as``, ``disk_map``, ``disk_mode`` (None: clone for a copy, revert otherwise),
    ``disk_work_dir``, ``force_changed_disks``."""
    records = (entry.get('manifest') or {}).get('disks')
    if not isinstance(records, list):
        return None
    env = env or _disks.DiskEnv()
    user_map = options.get('disk_map') or {}
    records = [r for r in records if r.get('target') not in user_map]
    mode = options.get('disk_mode') or _disks.default_restore_mode(options.get('restore_as'))
    changed = _disks.memory_only_changes(records, env)
    return _disks.restore_plan(records, entry['path'], mode, host=host, name=options.get('restore_as') or
                               entry['manifest']['vm']['name'], work_dir=options.get('disk_work_dir'),
                               force_changed=bool(options.get('force_changed_disks')), changed=changed)


def restore_checkpoint(xl, entry, options, xs=None, clock=time.monotonic, balloon=None, disk_env=None):
    """Restore a checkpoint that passed ``restore_preflight`` and give its memory back.

    ``options`` may carry ``restore_as`` (new name and uuid), ``disk_map`` and ``network`` (False: no NICs); they
    rewrite the domain config in the image header on the way to ``xl restore`` (see ``_xlimage``)."""
    manifest = entry['manifest']
    name = options.get('restore_as') or manifest['vm']['name']
    balloon = balloon or Balloon(xl, poll=options.get('poll_s', 0.5))
    t0 = clock()
    paused = options.get('paused', False)
    timings = {}
    transform = None
    disk_plan = options.get('disk_plan')
    disk_map = dict(options.get('disk_map') or {})
    disk_actions = []
    if disk_plan:
        t = clock()
        disk_actions = _disks.apply_restore_plan(disk_plan, disk_env)
        timings['disks_s'] = round(clock() - t, 3)
        disk_map.update(disk_plan['disk_map'])
    if options.get('restore_as') or disk_map or options.get('network') is False:
        transform = make_transform(name=options.get('restore_as'), new_uuid=bool(options.get('restore_as')),
                                   disk_map=disk_map or None, drop_nics=options.get('network') is False,
                                   require_all_disks_mapped=bool(options.get('restore_as')))
    try:
        res = restore_stream(lambda path: [xl.xl_path, 'restore'] + (['-p'] if paused else []) + [path],
                             entry['image_path'], manifest.get('compression') == 'zstd',
                             timeout=options['restore_timeout_s'], config_transform=transform)
    except BaseException:
        # working disks made for this restore go again (unless a domain uses them after all); a reverted disk
        # keeps the checkpoint's content, which is what a retry needs
        try:
            exists = name in xl.list_plain()
        except FleetckptError:
            exists = True
        if disk_plan and not exists:
            _disks.remove_working_disks(disk_plan['actions'], disk_env)
        raise
    timings['restore_s'] = res['restore_s']
    dom = xl.list_plain().get(name)
    if dom is None:
        raise XlError(['xl', 'restore', entry['image_path']], 0, stderr='xl restore returned but no domain %s exists' % name)
    original_kb = (manifest.get('memory') or {}).get('original_kb')
    result = {'vm': name, 'domid': dom['domid'], 'paused': paused, 'memory_restored': None, 'agent': None,
              'source_vm': manifest['vm']['name'], 'network': options.get('network') is not False,
              'disks': {'mode': disk_plan['mode'], 'actions': disk_actions, 'disk_map': disk_map} if disk_plan else None}
    if res.get('config_header'):
        result['uuid'] = res['config_header'].get('uuid')
    if original_kb and dom['mem_mib'] * KIB_PER_MIB < original_kb:
        # even a VM saved just below its original (a policy target a MiB under it) gets the original back: else the
        # next checkpoint records the smaller memory as the VM's and every cycle shrinks it (the benchmark's 256 MB
        # guest went 256, 254, 252 MiB). Within the balloon's tolerance that is one mem-set and no wait.
        t = clock()
        if paused:
            # a paused guest cannot inflate its balloon: set the target, it fills up once unpaused
            xl.mem_set(name, original_kb)
            result['memory_restored'] = 'target set (domain paused)'
        else:
            give_back = balloon.restore_memory(name, original_kb, timeout=options['balloon_timeout_s'])
            result['memory_restored'] = give_back.get('reached', False)
            result['memory_error'] = give_back.get('error')
        timings['deflate_s'] = round(clock() - t, 3)
    else:
        result['memory_restored'] = True
    if xs is not None and options.get('wait_agent_s') and not paused:
        deadline = clock() + options['wait_agent_s']
        status = None
        while clock() < deadline:
            report = xs.query_agent(dom['domid'], manifest['memory'].get('static_max_kb'), timeout=1.0)
            status = report['status']
            if status == 'ok' and report.get('answered'):
                break
            time.sleep(0.5)
        result['agent'] = status
    timings['total_s'] = round(clock() - t0, 3)
    final = xl.list_plain().get(name) or {}
    result.update(timings=timings, memory_kb=final.get('mem_mib', 0) * KIB_PER_MIB, checkpoint=entry['id'],
                  state=final.get('state'))
    return result


def checkpoint_many(doms, worker, parallel, cancel=None):
    """Run ``worker(dom)`` for each VM with at most ``parallel`` at once; collect per-VM results/errors.
    Once ``cancel`` (a threading.Event) is set, VMs not yet started are skipped and reported as failed;
    the ones in progress finish normally (their memory is given back as usual)."""
    if parallel < 1:
        raise InvalidInput('parallel must be >= 1')
    from concurrent.futures import ThreadPoolExecutor
    cancel = cancel or threading.Event()

    def guarded(dom):
        if cancel.is_set():
            raise FleetckptError('%s: not started: the run was interrupted (%s)' % (dom['name'], getattr(cancel, 'reason', 'signal')))
        return worker(dom)

    results = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [(dom['name'], pool.submit(guarded, dom)) for dom in doms]
        for name, future in futures:
            try:
                results.append(future.result())
            except FleetckptError as exc:
                results.append({'vm': name, 'failed': True, 'msg': str(exc), 'error': type(exc).__name__,
                                'changed': False})
            except Exception as exc:  # an unexpected error of one VM must not hide the others' results
                results.append({'vm': name, 'failed': True, 'msg': '%s: unexpected %s: %s' % (name, type(exc).__name__, exc),
                                'error': type(exc).__name__, 'changed': False})
    return results
