# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Live migration (_migrate) against two simulated hosts; the destination answers through the real migration gate
(roles/xen_host/files/fleetckpt_migrate_gate.py), called in-process with the command line ssh would carry."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import shlex

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._balloon import Balloon
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, XlError
from ansible_collections.fleetckpt.xen.plugins.module_utils._migrate import (
    AWAY_SUFFIX, MigrateError, Migrator, Peer, RemoteXl, check_dest, dirty_tracking_problem, disk_paths, parse_probe,
    preflight, ssh_argv)

from sim_clock import Clock  # tests/unit is on sys.path (its conftest.py)

MIB = 1024
GATE_PATH = os.path.join(os.path.dirname(__file__), '..', '..', '..', '..', 'roles', 'xen_host', 'files',
                         'fleetckpt_migrate_gate.py')


def load_gate():
    loader = importlib.machinery.SourceFileLoader('fleetckpt_migrate_gate', GATE_PATH)
    spec = importlib.util.spec_from_loader('fleetckpt_migrate_gate', loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


gate = load_gate()


# --- the gate: what another dom0's migration key may run here ------------------------------------------------------

@pytest.mark.parametrize('command, argv', [
    ('xl migrate-receive', ['xl', 'migrate-receive']),
    ('xl -t -vvv migrate-receive -e -p', ['xl', '-t', '-vvv', 'migrate-receive', '-e', '-p']),
    ('xl -T migrate-receive -d', ['xl', '-T', 'migrate-receive', '-d']),
    ('fleetckpt-mem-set g1 524288', ['xl', 'mem-set', 'g1', '524288k']),
])
def test_gate_allows_only_migration_commands(command, argv):
    assert gate.parse(command) == argv


def test_gate_probe_takes_plain_absolute_paths():
    assert gate.parse('fleetckpt-probe /srv/a.img /dev/vg0/lv1') == ('probe', ['/srv/a.img', '/dev/vg0/lv1'])
    assert gate.parse('fleetckpt-probe') == ('probe', [])


@pytest.mark.parametrize('command', [
    '', 'bash', 'sh -c id', 'xl list', 'xl destroy g1', 'xl migrate-receive -r', 'xl migrate-receive --colo',
    'xl migrate-receive --coloft-script /tmp/x', 'xl migrate-receive; id', 'xl migrate-receive extra',
    'xl -t create /etc/xen/g.cfg', 'fleetckpt-probe relative/path', 'fleetckpt-probe /srv/../etc/shadow',
    'fleetckpt-probe "/a b"', 'fleetckpt-mem-set g1', 'fleetckpt-mem-set "g1;id" 10', 'fleetckpt-mem-set g1 -5',
    'fleetckpt-mem-set g1 0', 'fleetckpt-mem-set -g 10', 'xl migrate-receive "unterminated',
])
def test_gate_refuses_anything_else(command):
    with pytest.raises(gate.Refused):
        gate.parse(command)


def test_gate_mem_set_only_gives_memory_back(tmp_path):
    world = World(tmp_path)
    world.dst['g'] = {'domid': 9, 'mem_kb': 160 * MIB, 'state': '-b----', 'flags': []}
    assert gate.authorize(gate.parse('fleetckpt-mem-set g %d' % (512 * MIB)), xl=world.dst_xl)
    with pytest.raises(gate.Refused, match='never takes it'):
        gate.authorize(gate.parse('fleetckpt-mem-set other %d' % (128 * MIB)), xl=world.dst_xl)
    with pytest.raises((gate.Refused, RuntimeError)):
        gate.authorize(gate.parse('fleetckpt-mem-set nosuch %d' % (128 * MIB)), xl=world.dst_xl)
    assert gate.authorize(gate.parse('xl migrate-receive'), xl=None) == ['xl', 'migrate-receive']


def test_gate_main_refuses_with_126_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setenv('SSH_ORIGINAL_COMMAND', 'rm -rf /')
    monkeypatch.setattr(gate.os, 'execvp', lambda *a: pytest.fail('executed %r' % (a,)))
    assert gate.main() == 126
    assert 'refused' in capsys.readouterr().err


# --- a simulated source host and destination -------------------------------------------------------------------------

class World:
    def __init__(self, tmp_path, behaviour='ok'):
        self.disk = str(tmp_path / 'g.img')
        open(self.disk, 'w').close()
        self.src = {'g': {'domid': 5, 'mem_kb': 512 * MIB, 'state': '-b----', 'flags': []}}
        self.dst = {'other': {'domid': 3, 'mem_kb': 256 * MIB, 'state': '-b----', 'flags': []}}
        self.dst_free_kb = 2048 * MIB
        self.dst_grows = True       # the destination's balloon reaches what mem-set asks
        self.behaviour = behaviour
        self.calls = []
        self.resumed = []

    # source xl
    def list_plain(self):
        return dict((n, {'mem_mib': d['mem_kb'] // MIB, 'domid': d['domid'], 'state': d['state'], 'flags': d['flags']})
                    for n, d in self.src.items())

    def mem_set(self, name, kib):
        self.calls.append(('src mem-set', name, kib // MIB))
        self.src[name]['mem_kb'] = kib

    def recover_suspended(self, name):
        if 'suspended' in self.src[name]['flags']:
            self.src[name]['flags'] = []
            self.resumed.append(name)
            return 'resumed'
        return None

    def migrate(self, name, dest, ssh_command, timeout=None):
        self.calls.append(('migrate', name, dest, ssh_command))
        argv = ['xl', 'migrate', '-s', ssh_command, name, dest]
        if self.behaviour == 'ok':
            self.dst[name] = dict(self.src.pop(name), domid=9)
            return
        if self.behaviour == 'fails-resumed':      # xl's failed_resume: the domain runs on here
            raise XlError(argv, 1, stderr='migration sender: libxl_domain_suspend failed | Migration failed, resuming at sender.')
        if self.behaviour == 'killed':             # timeout: xl killed, the domain left suspended here
            self.src[name]['flags'] = ['suspended']
            raise XlError(argv, None, timed_out=True, timeout=timeout)
        if self.behaviour == 'badly':              # after the point of no return
            self.src[name + AWAY_SUFFIX] = self.src.pop(name)
            raise XlError(argv, 1, stderr='** Migration failed during final handshake **')
        if self.behaviour == 'error-but-there':
            self.dst[name] = dict(self.src.pop(name), domid=9)
            raise XlError(argv, 1, stderr='migration child [123] exited with error status 1')
        raise AssertionError(self.behaviour)

    # the destination, behind its gate
    def dst_xl(self, *args):
        if args == ('info',):
            return 'host                   : xen2\nxen_version            : 4.20.1\nfree_memory            : %d\n' % (
                self.dst_free_kb // MIB)
        if args[0] == 'list':
            rows = ['Name ID Mem VCPUs State Time(s)', 'Domain-0 0 1024 1 r----- 1.0']
            rows += ['%s %d %d 1 %s 1.0' % (n, d['domid'], d['mem_kb'] // MIB, d['state']) for n, d in self.dst.items()]
            if len(args) == 2:  # xl list NAME
                rows = rows[:1] + [r for r in rows[1:] if r.split()[0] == args[1]]
                if len(rows) == 1:
                    raise RuntimeError('xl list %s failed (rc=1)' % args[1])
            return '\n'.join(rows) + '\n'
        raise AssertionError(args)

    def run(self, argv, timeout):
        """The runner of Peer: argv is ssh ... <dest> <command>; the gate decides what the command may do."""
        assert argv[0] == 'ssh' and argv[-2] == 'xen2.lab'
        what = gate.parse(argv[-1])
        if isinstance(what, tuple):
            return 0, json.dumps(gate.probe(what[1], xl=self.dst_xl)), ''
        if what[1] == 'mem-set':
            gate.authorize(what, xl=self.dst_xl)
            self.calls.append(('dst mem-set', what[2], int(what[3][:-1]) // MIB))
            if self.dst_grows:
                self.dst[what[2]]['mem_kb'] = int(what[3][:-1])
            return 0, '', ''
        raise AssertionError(what)


SOURCE = {'xen_version': '4.20.1', 'virt_caps': 'pv hvm hap shadow gnttab-v1 gnttab-v2'}
OPTS = {'balloon_timeout_s': 60, 'stall_s': 10, 'settle_slack_mib': 8, 'agent_timeout_s': 1, 'agent_max_age_s': 60,
        'migrate_timeout_s': 600}


def dom(world):
    return {'name': 'g', 'domid': 5, 'current_kb': world.src['g']['mem_kb'], 'target_kb': 512 * MIB,
            'static_max_kb': 512 * MIB, 'state': '-b----',
            'config': {'disks': [{'pdev_path': world.disk, 'vdev': 'xvda', 'readwrite': 1}]}}


def plan(mode='vmme', target_mib=160):
    return {'requested_mode': 'vmme', 'mode': mode, 'target_kb': target_mib * MIB if mode == 'vmme' else None,
            'reason': None, 'report': None, 'decision': None}


def migrator(world):
    clock = Clock()
    peer = Peer('xen2.lab', world, ssh_argv(key='/root/.ssh/fleetckpt_migrate', known_hosts='/etc/fleetckpt/kh'))
    return Migrator(world, None, peer, OPTS, clock=clock, balloon=Balloon(world, clock=clock, sleep=clock.sleep),
                    dest_balloon=Balloon(RemoteXl(peer), clock=clock, sleep=clock.sleep))


def test_moves_ballooned_and_gives_the_memory_back_on_the_destination(tmp_path):
    world = World(tmp_path)
    m = migrator(world)
    d = dom(world)
    full = m.plan(d, plan(), SOURCE)
    assert full['problems'] == [] and full['disks'] == [world.disk] and full['dest_host'] == 'xen2'
    res = m.run(d, full)
    assert [c[0] for c in world.calls] == ['src mem-set', 'migrate', 'dst mem-set']
    assert world.calls[0][2] == 160 and world.calls[2][2] == 512
    assert 'g' not in world.src and world.dst['g']['mem_kb'] == 512 * MIB
    assert res['moved_kb'] == 160 * MIB and res['original_kb'] == 512 * MIB and res['memory_restored'] is True
    assert res['dest_domid'] == 9 and res['dest_kb'] == 512 * MIB
    assert set(res['timings']) >= {'balloon_s', 'migrate_s', 'give_back_s', 'total_s'}


def test_native_mode_moves_as_is_without_any_balloon(tmp_path):
    world = World(tmp_path)
    m = migrator(world)
    res = m.run(dom(world), m.plan(dom(world), plan('native'), SOURCE))
    assert [c[0] for c in world.calls] == ['migrate'] and res['moved_kb'] == 512 * MIB and 'memory_restored' not in res


def test_the_ssh_command_survives_xls_shell_rune_intact(tmp_path):
    """xl runs sh -c "exec <ssh_command> <host> xl migrate-receive": the words must come out as they went in."""
    world = World(tmp_path)
    key = "/root/my keys/it's"
    peer = Peer('xen2.lab', world, ssh_argv(key=key, known_hosts='/etc/fleetckpt/kh', port=2222))
    rune = 'exec %s %s xl migrate-receive' % (peer.xl_ssh_command(), 'xen2.lab')
    words = shlex.split(rune)
    assert words[1:-3] == ssh_argv(key=key, known_hosts='/etc/fleetckpt/kh', port=2222)
    assert words[-3:] == ['xen2.lab', 'xl', 'migrate-receive']
    assert 'BatchMode=yes' in words and 'StrictHostKeyChecking=yes' in words


@pytest.mark.parametrize('behaviour, resumed', [('fails-resumed', False), ('killed', True)])
def test_a_failed_migration_leaves_the_vm_running_here_with_its_memory(tmp_path, behaviour, resumed):
    world = World(tmp_path, behaviour)
    m = migrator(world)
    d = dom(world)
    with pytest.raises(MigrateError) as err:
        m.run(d, m.plan(d, plan(), SOURCE))
    assert err.value.where == 'source' and 'left running on this host' in str(err.value)
    assert world.src['g']['mem_kb'] == 512 * MIB and world.src['g']['flags'] == [] and 'g' not in world.dst
    assert world.resumed == (['g'] if resumed else [])
    # the memory came back after the resume (a suspended guest cannot inflate its balloon)
    assert [c[0] for c in world.calls] == ['src mem-set', 'migrate', 'src mem-set']


def test_a_failure_after_the_point_of_no_return_is_reported_and_nothing_is_guessed(tmp_path):
    world = World(tmp_path, 'badly')
    m = migrator(world)
    d = dom(world)
    with pytest.raises(MigrateError) as err:
        m.run(d, m.plan(d, plan(), SOURCE))
    assert err.value.where == 'undefined' and AWAY_SUFFIX in str(err.value) and 'the destination has no g' in str(err.value)
    assert world.resumed == [] and 'g' + AWAY_SUFFIX in world.src


def test_xl_failing_while_the_vm_arrived_counts_as_moved_with_a_warning(tmp_path):
    world = World(tmp_path, 'error-but-there')
    m = migrator(world)
    d = dom(world)
    res = m.run(d, m.plan(d, plan(), SOURCE))
    assert 'warning' in res and res['memory_restored'] is True and world.dst['g']['mem_kb'] == 512 * MIB


def test_memory_not_given_back_on_the_destination_is_reported(tmp_path):
    world = World(tmp_path)
    world.dst_grows = False
    m = migrator(world)
    d = dom(world)
    res = m.run(d, m.plan(d, plan(), SOURCE))
    assert res['memory_restored'] is False and 'give_back_error' in res and res['dest_kb'] == 160 * MIB


def test_preflight_names_every_reason_a_move_cannot_be_live(tmp_path):
    world = World(tmp_path)
    d = dom(world)
    os.unlink(world.disk)
    world.dst['g'] = {'domid': 4, 'mem_kb': 512 * MIB, 'state': '-b----', 'flags': []}
    world.dst_free_kb = 300 * MIB
    probe = parse_probe(json.dumps(gate.probe([world.disk], xl=world.dst_xl)), 'xen2.lab')
    problems = preflight(dict(d, state='--p---'), probe, 160 * MIB, 512 * MIB,
                         {'xen_version': '4.21.0', 'virt_caps': 'pv hvm gnttab-v1 gnttab-v2'}, margin_kb=64 * MIB)
    text = ' | '.join(problems)
    assert len(problems) == 6, problems
    for words in ('not running', 'already exists on xen2', '300 MiB free', 'not found on xen2 at the same path',
                  'older than', 'cannot track the dirty pages of a PV guest'):
        assert words in text


@pytest.mark.parametrize('kind, caps, refused', [
    ('pv', 'pv hvm gnttab-v1 gnttab-v2', True),    # Debian's Xen 4.20 (no CONFIG_SHADOW_PAGING), as in the lab
    ('pv', 'pv hvm hap shadow gnttab-v1', False),
    ('hvm', 'pv hvm hap gnttab-v1', False),        # hardware-assisted paging tracks an HVM guest's dirty pages
    ('pvh', 'pv hvm gnttab-v1', True),
    ('pvh', 'pv hvm hap gnttab-v1 gnttab-v2', False),  # Debian's Xen 4.20 on a CPU with nested paging, as in the lab
    ('pv', '', False),                             # an older xl info without virt_caps: not known, not refused
])
def test_dirty_page_tracking_is_required_for_a_live_move(kind, caps, refused):
    assert (dirty_tracking_problem({'name': 'g', 'type': kind}, caps) is not None) is refused


def test_nothing_is_touched_when_the_preflight_refuses(tmp_path):
    world = World(tmp_path)
    world.dst_free_kb = 100 * MIB
    m = migrator(world)
    full = m.plan(dom(world), plan(), SOURCE)
    assert full['problems'] and world.calls == []


@pytest.mark.parametrize('text', ['', 'not json', '[]', '{"gate": 2}', json.dumps(
    {'gate': 1, 'domains': {'g': {'domid': -1, 'mem_kb': 1}}, 'exists': {}, 'free_memory_kb': 1, 'xen_version': '4'}),
    json.dumps({'gate': 1, 'domains': {}, 'exists': {}, 'free_memory_kb': '9', 'xen_version': '4'})])
def test_probe_answers_are_checked_strictly(text):
    with pytest.raises(MigrateError):
        parse_probe(text, 'xen2')


@pytest.mark.parametrize('dest', ['-oProxyCommand=id', 'a b', 'x;id', '', 'host$(id)', None])
def test_destination_must_be_a_plain_address(dest):
    with pytest.raises(InvalidInput):
        check_dest(dest)


def test_ssh_options_are_checked():
    with pytest.raises(InvalidInput):
        ssh_argv(port=0)
    with pytest.raises(InvalidInput):
        ssh_argv(user='root -oX')


def test_login_failure_names_the_missing_key_setup(tmp_path):
    class Refusing:
        def run(self, argv, timeout):
            return 255, '', 'Permission denied (publickey).'
    with pytest.raises(XlError) as err:
        Peer('xen2.lab', Refusing(), ssh_argv()).probe()
    assert 'xen_host role' in str(err.value)


def test_disk_paths_are_the_absolute_non_cdrom_targets():
    d = {'config': {'disks': [{'pdev_path': '/srv/a.img'}, {'pdev_path': '/dev/vg/lv'},
                              {'pdev_path': '/iso/x.iso', 'is_cdrom': 1}, {'pdev_path': 'iscsi:foo'}]}}
    assert disk_paths(d) == ['/srv/a.img', '/dev/vg/lv']
