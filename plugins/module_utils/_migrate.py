# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Live migration with memory exclusion: balloon down -> ``xl migrate`` over SSH -> memory given back on the destination.

The destination dom0 is reached with the fleetckpt migration key, whose forced command there
(roles/xen_host/files/fleetckpt_migrate_gate.py) allows only ``xl migrate-receive``, a JSON probe of the host and
``xl mem-set``. ``Peer`` speaks to it; ``RemoteXl`` makes the destination look like ``Xl`` to ``Balloon``.

Guarantees (tests/unit/plugins/module_utils/test_migrate.py, and the lab):
* everything that can refuse does so before the VM is touched: the destination answers, has the Xen version, the
  free memory and the disk paths the VM needs, and runs no domain of that name;
* a failed migration leaves the VM running on its source with its memory given back (xl resumes it there; when xl
  itself was killed, the domain left suspended is resumed here), unless xl reports the undefined state of a failure
  after its point of no return, which is reported as such and never resolved by guessing;
* after a migration the memory is given back on the destination, and a failure to do so is an error naming where
  the VM runs and at what size.
"""

from __future__ import annotations

import json
import re
import shlex
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils._balloon import Balloon, KIB_PER_MIB
from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import balloon_to_plan, xen_version_tuple
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError, InvalidInput, XlError
from ansible_collections.fleetckpt.xen.plugins.module_utils._xlimage import config_disks

DEST_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}$')
AWAY_SUFFIX = '--migratedaway'
# free memory the destination keeps on top of the VM's original memory (its give-back must fit)
DEFAULT_MARGIN_KB = 64 * KIB_PER_MIB


class MigrateError(FleetckptError):
    """A live migration failed; ``where`` says where the VM is (source, destination, undefined)."""

    def __init__(self, msg, where='source'):
        self.where = where
        super().__init__(msg)


def check_dest(dest):
    if not isinstance(dest, str) or not DEST_RE.match(dest):
        raise InvalidInput('dest must be a host name or IP address (letters, digits, ".", ":", "-", "_"): %r' % (dest,))
    return dest


def ssh_argv(user='root', port=22, key=None, known_hosts=None, connect_timeout=15):
    """The ssh command (without the destination) shared by the probe, mem-set and ``xl migrate -s``: batch mode
    (never a password prompt), the host key checked against the migration known_hosts file."""
    if not 0 < int(port) < 65536:
        raise InvalidInput('ssh_port must be 1-65535, not %r' % (port,))
    if not re.match(r'^[a-z_][a-z0-9_-]{0,31}$', user or ''):
        raise InvalidInput('ssh_user is not a user name: %r' % (user,))
    argv = ['ssh', '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=%d' % int(connect_timeout),
            '-o', 'ServerAliveInterval=15', '-o', 'ServerAliveCountMax=4', '-p', str(int(port)), '-l', user]
    if key:
        argv += ['-i', key, '-o', 'IdentitiesOnly=yes']
    if known_hosts:
        argv += ['-o', 'UserKnownHostsFile=%s' % known_hosts, '-o', 'StrictHostKeyChecking=yes']
    return argv


def parse_probe(text, dest):
    """The destination's probe answer, strictly checked (it comes from another host)."""
    try:
        data = json.loads((text or '').strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MigrateError('%s: the migration gate did not answer the probe with JSON: %r' % (dest, (text or '')[:200]))
    ok = (isinstance(data, dict) and data.get('gate') == 1 and isinstance(data.get('domains'), dict)
          and isinstance(data.get('exists'), dict) and isinstance(data.get('free_memory_kb'), int)
          and data['free_memory_kb'] >= 0 and isinstance(data.get('xen_version'), str))
    if ok:
        for name, row in data['domains'].items():
            ok = ok and isinstance(name, str) and isinstance(row, dict) and all(
                isinstance(row.get(k), int) and row[k] >= 0 for k in ('domid', 'mem_kb'))
    if not ok:
        raise MigrateError('%s: unexpected probe answer from the migration gate: %r' % (dest, text[:200]))
    return data


class Peer:
    """The destination dom0, through its migration gate."""

    def __init__(self, dest, runner, ssh, timeout=60):
        self.dest = check_dest(dest)
        self.runner = runner
        self.ssh = list(ssh)
        self.timeout = timeout

    def _run(self, words):
        argv = self.ssh + [self.dest, ' '.join(shlex.quote(w) for w in words)]
        rc, out, err = self.runner.run(argv, self.timeout)
        if rc != 0:
            hint = ''
            if rc == 255:
                hint = ' (ssh could not log in: is the migration key authorized there, see the xen_host role?)'
            elif rc == 126:
                hint = ' (refused by its migration gate)'
            raise XlError(argv, rc, out, (err or '') + hint)
        return out

    def probe(self, paths=()):
        return parse_probe(self._run(['fleetckpt-probe'] + list(paths)), self.dest)

    def xl_ssh_command(self):
        """The ``-s`` value of ``xl migrate``: xl runs ``sh -c "exec <this> <dest> xl migrate-receive..."``."""
        return ' '.join(shlex.quote(w) for w in self.ssh)

    def mem_set(self, name, kib):
        self._run(['fleetckpt-mem-set', name, str(int(kib))])


class RemoteXl:
    """What ``Balloon`` needs of ``Xl`` (list, mem-set), on the destination through its gate."""

    def __init__(self, peer):
        self.peer = peer

    def list_plain(self):
        return dict((name, {'mem_mib': row['mem_kb'] // KIB_PER_MIB, 'domid': row['domid'], 'state': row.get('state')})
                    for name, row in self.peer.probe()['domains'].items())

    def mem_set(self, name, kib):
        self.peer.mem_set(name, kib)


def disk_paths(dom):
    """Absolute paths of the VM's disks (file, phy) the destination must see at the same place."""
    paths = []
    for disk in config_disks(dom.get('config') or {}):
        target = disk.get('pdev_path') or ''
        if target.startswith('/') and not disk.get('is_cdrom'):
            paths.append(target)
    return paths


def dirty_tracking_problem(dom, virt_caps):
    """Why this host's Xen cannot track the VM's dirty pages, which a live migration needs (None: it can, or its
    ``xl info`` does not say). PV guests need shadow paging; HVM/PVH guests hardware-assisted paging or shadow."""
    caps = set(str(virt_caps or '').split())
    if not caps:
        return None
    kind = str(dom.get('type') or 'pv').lower()
    needed = ('shadow',) if kind == 'pv' else ('hap', 'shadow')
    if caps & set(needed):
        return None
    return ('this host\'s Xen cannot track the dirty pages of a %s guest (virt_caps: %s; no %s - a Xen built without '
            'CONFIG_SHADOW_PAGING, as Debian\'s is), so xl migrate cannot move %s live: a cold move can'
            % (kind.upper(), ' '.join(sorted(caps)), ' or '.join(needed), dom['name']))


def preflight(dom, probe, moving_kb, original_kb, source, margin_kb=DEFAULT_MARGIN_KB):
    """Why the VM cannot move live to the probed host (empty: it can). ``source``: this host's facts (xen_version,
    virt_caps). Pure."""
    name = dom['name']
    problems = []
    tracking = dirty_tracking_problem(dom, source.get('virt_caps'))
    if tracking:
        problems.append(tracking)
    state = str(dom.get('state') or '')
    if any(flag in state for flag in 'pscd'):
        problems.append('%s is not running (state %s)' % (name, state))
    if name in probe['domains'] or name + AWAY_SUFFIX in probe['domains']:
        problems.append('a domain named %s already exists on %s' % (name, probe['host']))
    full_kb = max(moving_kb, original_kb)
    if probe['free_memory_kb'] < full_kb + margin_kb:
        problems.append('%s has %d MiB free, %s needs %d MiB (its memory %d MiB + %d MiB margin)' % (
            probe['host'], probe['free_memory_kb'] // KIB_PER_MIB, name, (full_kb + margin_kb) // KIB_PER_MIB,
            full_kb // KIB_PER_MIB, margin_kb // KIB_PER_MIB))
    missing = sorted(p for p, there in probe['exists'].items() if not there)
    if missing:
        problems.append('disk(s) of %s not found on %s at the same path: %s (a live move needs shared storage)'
                        % (name, probe['host'], ', '.join(missing)))
    if xen_version_tuple(probe['xen_version']) < xen_version_tuple(source['xen_version']):
        problems.append('%s runs Xen %s, older than this host\'s %s'
                        % (probe['host'], probe['xen_version'], source['xen_version']))
    return problems


class Migrator:
    def __init__(self, xl, xs, peer, options, clock=time.monotonic, balloon=None, dest_balloon=None):
        self.xl = xl
        self.xs = xs
        self.peer = peer
        self.opt = options
        self.clock = clock
        self.balloon = balloon or Balloon(xl)
        self.dest_balloon = dest_balloon or Balloon(RemoteXl(peer), poll=2.0)

    def plan(self, dom, memory_plan, source):
        """memory_plan: from _checkpoint.plan_memory; source: this host's facts (_checkpoint.host_facts). Adds the
        destination's probe and the problems found."""
        original_kb = dom.get('target_kb') or dom['current_kb']
        moving_kb = memory_plan['target_kb'] if memory_plan['mode'] == 'vmme' else dom['current_kb']
        probe = self.peer.probe(disk_paths(dom))
        plan = dict(memory_plan, original_kb=original_kb, moving_kb=moving_kb, dest_host=probe['host'],
                    dest_free_kb=probe['free_memory_kb'], disks=sorted(probe['exists']))
        plan['problems'] = preflight(dom, probe, moving_kb, original_kb, source,
                                     margin_kb=self.opt.get('margin_kb', DEFAULT_MARGIN_KB))
        return plan

    def _recover(self, name, exc):
        """After xl migrate failed or was killed: find the VM, resume it on the source if that is safe."""
        local = self.xl.list_plain()
        try:
            remote = self.peer.probe()['domains']
        except FleetckptError:
            remote = None  # the destination did not answer
        if name + AWAY_SUFFIX in local:
            raise MigrateError(
                '%s; xl failed after its point of no return: the source holds %s%s%s. Check both hosts and resume at '
                'most one copy (xl migrate\'s own advice); nothing was resumed by fleetckpt' % (
                    exc, name, AWAY_SUFFIX, ', and the destination runs %s' % name if remote and name in remote
                    else (', the destination has no %s' % name if remote is not None else ', the destination did not '
                          'answer')), where='undefined')
        if remote is not None and name in remote and name not in local:
            return 'dest'
        if name in local:
            if remote is None or name not in remote:
                if self.xl.recover_suspended(name) == 'resumed':
                    return 'source-resumed'
            return 'source'
        raise MigrateError('%s; and %s runs on neither host now%s' % (
            exc, name, '' if remote is not None else ' (the destination did not answer)'), where='undefined')

    def run(self, dom, plan):
        name = dom['name']
        t0 = self.clock()
        timings = {'query_s': (plan.get('report') or {}).get('query_s') or 0.0, 'balloon_s': 0.0, 'migrate_s': 0.0,
                   'give_back_s': 0.0}
        original_kb = plan['original_kb']
        result = {'vm': name, 'to': self.peer.dest, 'dest_host': plan.get('dest_host'), 'mode': plan['mode'],
                  'requested_mode': plan['requested_mode'], 'fallback_reason': plan.get('reason'),
                  'original_kb': original_kb, 'moved_kb': dom['current_kb'], 'changed': True}
        ballooned = False
        moved = False
        try:
            if plan['mode'] == 'vmme' and plan['target_kb'] < dom['current_kb']:
                ballooned = True
                res = balloon_to_plan(self.balloon, self.xs, dom, plan, self.opt, self.clock, timings, 'not moved')
                result['moved_kb'] = res['target_kb']
            t = self.clock()
            try:
                self.xl.migrate(name, self.peer.dest, self.peer.xl_ssh_command(), timeout=self.opt['migrate_timeout_s'])
            except XlError as exc:
                where = self._recover(name, exc)
                if where != 'dest':
                    raise MigrateError('%s; %s is left running on this host%s' % (
                        exc, name, ' (resumed after the killed migration)' if where == 'source-resumed' else ''))
                result['warning'] = 'xl reported a failure (%s) but %s runs on the destination' % (exc, name)
            moved = True
            timings['migrate_s'] = round(self.clock() - t, 3)
        finally:
            if ballooned and not moved:
                back = self.balloon.restore_memory(name, original_kb, timeout=self.opt['balloon_timeout_s'])
                result['memory_restored'] = back.get('reached', False)
        if ballooned:
            t = self.clock()
            back = self.dest_balloon.restore_memory(name, original_kb, timeout=self.opt['balloon_timeout_s'])
            timings['give_back_s'] = round(self.clock() - t, 3)
            result['memory_restored'] = back.get('reached', False)
            if 'error' in back and not back.get('reached'):
                result['give_back_error'] = back['error']
        timings['total_s'] = round(self.clock() - t0, 3)
        result['timings'] = timings
        after = RemoteXl(self.peer).list_plain().get(name)
        if after is None:
            raise MigrateError('xl migrate of %s reported success but the destination has no such domain' % name,
                               where='undefined')
        result.update(dest_domid=after['domid'], dest_kb=after['mem_mib'] * KIB_PER_MIB)
        return result
