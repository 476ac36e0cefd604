# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The collection's playbooks (and through them its roles), run with the real ansible-playbook against the Xen lab.

The tests run in order and share one checkpoint store of their own on the lab's NFS share (STORE). They act only on
host xen2 and guests g3 and g4 (other suites use xen1, g1 and g2 at the same time): every playbook run is limited to
xen2 or selects g3/g4 explicitly; xen1 is only read (surveys, store checks), except that the DR test restores g3/g4
onto it (holding xen1's memory lock, see conftest.py) and the last test moves them back. A module finalizer puts g3 and g4 back on xen2 at their original memory
whatever happened, so the lab ends as it started.
"""
from __future__ import annotations

import json
import re
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

from lablib import host_memory_lock  # noqa: E402
from playbook import run_playbook, run_task  # noqa: E402

from moves import MIGRATION_FILES, clean_guest, keep_in_guest, kept_in_guest, remove_migration_setup  # noqa: E402

STORE = '/srv/fleetckpt/e2e-playbooks'   # this file's own store on the lab's NFS share (dom0 path)
HOME, OTHER = 'xen2', 'xen1'
VMS = ['g3', 'g4']
MEMORY = {'g3': 256, 'g4': 512}
MARKER = '/root/fleetckpt-e2e-playbooks-marker'
# xen_host: a second mount of the NFS export and a private Python site on xen2, so that the mount and the pyxs
# wheel installation really happen without touching what the other suites use (/srv/fleetckpt, system pyxs)
ALT_MOUNT = '/mnt/fleetckpt-e2e'
ALT_DIR = '/tmp/fleetckpt-e2e-xen-host'
MIB = 1024


def xl_list(lab, host):
    """{name: (memory MiB, paused, domid)} of the domains on a host. Only what a test can compare: the running and
    blocked letters of xl's state column flip with what the guest is doing at that instant."""
    out = lab.sh(host, 'xl list | tail -n +2').stdout
    return {f[0]: (int(f[2]), 'p' in f[4], int(f[1])) for f in (line.split() for line in out.splitlines())
            if len(f) >= 5}


def play(lab, name, extra_vars=None, limit=None, check=False, inventory=None, **kw):
    ev = {'fleetckpt_store': STORE}
    ev.update(extra_vars or {})
    res = run_playbook(inventory or lab.inventory_path, name, ev, limit=limit, check=check, **kw)
    print('\n%s%s%s: rc=%d in %.1fs'
          % (name, ' --limit ' + limit if limit else '', ' --check' if check else '', res.rc, res.seconds))
    return res


def debug_msg(output, task):
    """The msg printed by a debug task, parsed from the default callback's output."""
    m = re.search(r'TASK \[[^\]]*%s\].*?=> (\{.*?\n\})' % re.escape(task), output, re.S)
    assert m, 'task %r printed nothing' % task
    return json.loads(m.group(1))['msg']


def store_ids(lab, vm):
    return sorted(lab.sh(HOME, 'ls %s/%s 2>/dev/null || true' % (STORE, vm)).stdout.split())


def bring_home(lab):
    """Put g3 and g4 back on xen2, running, at their original memory, whatever state a failed test left."""
    for vm in VMS:
        where = lab.locate_guest(vm)
        if where == OTHER:
            run_task(lab.inventory_path, OTHER, 'checkpoint', {'store': STORE, 'name': [vm], 'keep_running': False})
            where = lab.locate_guest(vm)
        if where is None:
            res = run_task(lab.inventory_path, HOME, 'restore', {'store': STORE, 'vm': vm})
            if res.rc != 0:  # no usable checkpoint: boot it afresh from its lab config
                lab.sh(HOME, 'xl create /srv/fleetckpt/lab/guests/%s.cfg' % vm, check=False, timeout=180)
                lab.wait_ssh(vm, 600, via=HOME)
        elif where == HOME and xl_list(lab, HOME)[vm][0] != MEMORY[vm]:
            run_task(lab.inventory_path, HOME, 'balloon', {'name': [vm], 'target': 'size', 'memory_mib': MEMORY[vm]})


@pytest.fixture(scope='module')
def store(lab):
    """A fresh store directory of this file's own (its marker is created by the xen_host test)."""
    lab.sh(HOME, 'rm -rf %s' % STORE)
    yield STORE
    try:
        bring_home(lab)
    finally:
        lab.sh(HOME, 'umount %s 2>/dev/null; rmdir %s 2>/dev/null; sed -i "\\# %s #d" /etc/fstab; rm -rf %s' % (
            ALT_MOUNT, ALT_MOUNT, ALT_MOUNT, ALT_DIR), check=False)
        for vm in VMS:
            lab.sh(vm, 'rm -f %s' % MARKER, check=False, via=lab.locate_guest(vm) or HOME)
        lab.sh(HOME, 'rm -rf %s' % STORE, check=False)  # this file's checkpoints (hundreds of MB)


def test_xen_host_mounts_installs_pyxs_and_sees_one_store(lab, store, tmp_path):
    wheels = Path(lab.state['images']).parent / 'wheels'
    assert list(wheels.glob('pyxs-*.whl')), wheels
    # xen2: a wrapper Python that cannot import the system's pyxs, so the role must push and unpack the wheel
    lab.sh(HOME, 'mkdir -p %s && printf "#!/bin/sh\\nPYTHONPATH=%s/site exec /usr/bin/python3 -S \\"\\$@\\"\\n" > %s/python3 '
           '&& chmod 755 %s/python3 && ! %s/python3 -c "import pyxs" 2>/dev/null' % (ALT_DIR, ALT_DIR, ALT_DIR, ALT_DIR, ALT_DIR))
    overlay = tmp_path / 'xen2-overlay.yml'
    overlay.write_text(json.dumps({'all': {'children': {'xen_hosts': {'hosts': {HOME: {
        'xen_host_store_path': ALT_MOUNT + '/e2e-playbooks',
        'xen_host_store_mount_src': lab.store['dom0_mount_source'],
        'xen_host_store_mount_point': ALT_MOUNT,
        'xen_host_store_mount_opts': 'vers=4.1,proto=tcp,port=2049,hard,timeo=600,lookupcache=positive',
        'xen_host_python': ALT_DIR + '/python3',
        'xen_host_pyxs_site_dir': ALT_DIR + '/site',
        'xen_host_pyxs_wheel': str(wheels),
        'xen_host_cache_dir': ALT_DIR + '/cache',
    }}}}}}))
    inventory = [lab.inventory_path, str(overlay)]
    ev = {'xen_host_store_init': True}

    def xen2_state():
        return lab.sh(HOME, 'mountpoint -q {m} && echo mounted; grep -c " {m} " /etc/fstab; test -d {d}/site/pyxs && echo pyxs; '
                      'test -e {s}/.fleetckpt-store && echo marker; true'.format(m=ALT_MOUNT, d=ALT_DIR, s=STORE)).stdout.split()

    res = play(lab, 'fleetckpt.xen.prepare_hosts', ev, check=True, inventory=inventory)
    assert res.rc == 0, res.output
    assert xen2_state() == ['0'], 'check mode changed xen2: %s' % xen2_state()
    assert res.fact('xen_host_info', HOME)['pyxs'] == 'would be installed'

    res = play(lab, 'fleetckpt.xen.prepare_hosts', ev, limit=HOME, inventory=inventory)  # creates the store marker
    assert res.rc == 0, res.output
    assert xen2_state() == ['mounted', '1', 'pyxs', 'marker'], xen2_state()
    assert lab.sh(HOME, '%s/python3 -c "import pyxs; print(pyxs.__file__)"' % ALT_DIR).stdout.startswith(ALT_DIR)
    info = res.fact('xen_host_info', HOME)
    assert info['pyxs'] == 'installed' and info['zstd'] == 'ok' and 0 < info['free_memory_mib'] < info['total_memory_mib']

    res = play(lab, 'fleetckpt.xen.prepare_hosts', ev, inventory=inventory)  # both hosts: read-only on xen1
    assert res.rc == 0 and res.changed() == 0, res.output
    marker = json.loads(lab.sh(HOME, 'cat %s/.fleetckpt-store' % STORE).stdout)
    ids = {host: res.fact('xen_host_info', host)['store_id'] for host in ('xen1', 'xen2')}
    assert ids == {'xen1': marker['store_id'], 'xen2': marker['store_id']}, ids  # two mount points, one store
    assert 'every host of the play sees store %s' % marker['store_id'] in res.output


def test_checkpoint_playbook_on_xen2_prints_a_plausible_summary(lab, store):
    # the fleet's memory is what this test measures; disk capture has its own test (test_consistency.py)
    ev = {'checkpoint_vms': VMS, 'checkpoint_disks': 'none', 'checkpoint_force_memory_only': True}
    ids_before = {vm: store_ids(lab, vm) for vm in VMS}
    res = play(lab, 'fleetckpt.xen.checkpoint', ev, limit=HOME, check=True)
    assert res.rc == 0, res.output
    assert {r['vm']: r['status'] for r in res.fact('checkpoint_summary', HOME)} == {'g3': 'planned', 'g4': 'planned'}
    assert {vm: store_ids(lab, vm) for vm in VMS} == ids_before, 'check mode wrote to the store'

    res = play(lab, 'fleetckpt.xen.checkpoint', ev, limit=HOME)
    assert res.rc == 0, res.output
    rows = {r['vm']: r for r in res.fact('checkpoint_summary', HOME)}
    assert set(rows) == set(VMS)
    for vm, r in rows.items():
        native = MEMORY[vm] * MIB * MIB
        assert r['status'] == 'ok' and r['mode'] == 'vmme' and r['host'] == HOME, r
        assert r['original_mib'] == MEMORY[vm] and 128 <= r['saved_mib'] < MEMORY[vm], r
        assert 64e6 < r['size_bytes'] < 0.75 * native, r  # memory exclusion: well below the VM's memory
        assert r['native_estimate_bytes'] == native and r['saved_pct'] > 25, r
        assert r['seconds'] > 0 and r['still_running'] is True and r['memory_restored'] is True, r
        assert r['id'] in store_ids(lab, vm)
    table = debug_msg(res.output, 'Print the checkpoint summary')
    print('\n'.join(table))
    assert res.output.count('Print the checkpoint summary]') == 1, 'the summary must be printed once'
    assert table[0].split()[:3] == ['VM', 'HOST', 'MODE']
    assert [line.split()[0] for line in table[1:3]] == VMS and table[3].startswith('2 VM(s), 0 failed')
    running = xl_list(lab, HOME)
    assert {vm: running[vm][0] for vm in VMS} == MEMORY  # memory given back, still running


def test_dr_restore_refuses_while_the_vms_run(lab, store, tmp_path):
    # the checkpoint test left checkpoints of g3 and g4 written by xen2, so without a VM list dr_restore finds them
    # in the store as xen2's VMs, and refuses before restoring anything
    res = play(lab, 'fleetckpt.xen.dr_restore', {'failed_host': HOME})
    assert res.rc != 0
    [(host, failure)] = res.failures()
    assert 'REFUSING to evacuate xen2: g3 runs on xen2; g4 runs on xen2' in failure['msg'], failure
    assert res.fact('restore_survey', HOME)['reachable'] is True
    # a host that cannot be surveyed (a copy may run there) stops the evacuation too
    ghost = tmp_path / 'ghost.yml'
    ghost.write_text(json.dumps({'all': {'children': {'xen_hosts': {'hosts': {'xen9': {
        'ansible_host': '127.0.0.1', 'ansible_port': 9}}}}}}))
    res = play(lab, 'fleetckpt.xen.dr_restore', {'failed_host': HOME, 'restore_evacuate_vms': VMS},
               inventory=[lab.inventory_path, str(ghost)])
    assert res.rc != 0 and any('xen9 could not be surveyed' in f['msg'] for _h, f in res.failures()), res.output
    assert res.fact('restore_survey', 'xen9')['reachable'] is False
    assert not set(VMS) & set(xl_list(lab, OTHER))
    assert {vm: xl_list(lab, HOME)[vm][0] for vm in VMS} == MEMORY


def test_dr_restore_evacuates_xen2_onto_xen1(lab, store):
    tokens = {vm: secrets.token_hex(8) for vm in VMS}
    for vm in VMS:
        lab.sh(vm, 'echo %s > %s && sync' % (tokens[vm], MARKER))
    # the host's VMs are gone: checkpointed and stopped (a checkpoint taken while a VM kept running would not match
    # the disk writes made after it), then destroyed for good measure, as a crash would leave them
    res = play(lab, 'fleetckpt.xen.checkpoint', {'checkpoint_vms': VMS, 'checkpoint_keep_running': False}, limit=HOME)
    assert res.rc == 0, res.output
    lab.sh(HOME, 'for vm in %s; do xl destroy $vm 2>/dev/null; done; true' % ' '.join(VMS))
    assert not set(VMS) & set(xl_list(lab, HOME))

    with host_memory_lock(OTHER):  # test_faults.py fills xen1's memory on purpose at some point: not meanwhile
        res = play(lab, 'fleetckpt.xen.dr_restore', {'failed_host': HOME, 'restore_evacuate_vms': VMS,
                                                     'restore_evacuate_targets': [OTHER]})
    assert res.rc == 0, res.output
    plan = res.fact('restore_evacuation')
    assert plan['plan'] == {OTHER: ['g4', 'g3']}, plan  # largest first
    print('\n'.join(debug_msg(res.output, 'Show the evacuation plan')))
    rows = {r['vm']: r for r in res.fact('restore_summary', OTHER)}
    running = xl_list(lab, OTHER)
    for vm in VMS:
        assert rows[vm]['status'] == 'ok' and rows[vm]['agent'] == 'ok' and rows[vm]['memory_restored'] is True, rows[vm]
        assert running[vm][0] == MEMORY[vm] and not running[vm][1], running
        assert lab.sh(vm, 'cat %s' % MARKER, via=OTHER).stdout.strip() == tokens[vm]
        memtotal = int(lab.sh(vm, 'grep MemTotal /proc/meminfo', via=OTHER).stdout.split()[1])
        assert memtotal > 0.7 * MEMORY[vm] * MIB, memtotal
    assert not set(VMS) & set(xl_list(lab, HOME))


def test_restore_playbook_moves_g3_back_to_xen2(lab, store):
    """g3 goes home by the checkpoint and restore playbooks (g4 by the rebalance test after this one)."""
    assert {vm: lab.locate_guest(vm) for vm in VMS} == {'g3': OTHER, 'g4': OTHER}, 'the DR test did not run'
    token = lab.sh('g3', 'cat %s' % MARKER, via=OTHER).stdout.strip()
    # restoring the same VMs onto two hosts at once is refused before anything happens
    res = play(lab, 'fleetckpt.xen.restore', {'restore_vms': VMS})
    assert res.rc != 0 and any('restore a VM onto ONE host' in f['msg'] for _h, f in res.failures()), res.output
    # and while they run on xen1, a restore onto xen2 is refused
    res = play(lab, 'fleetckpt.xen.restore', {'restore_vms': ['g3']}, limit=HOME)
    assert res.rc != 0 and any('g3 runs on xen1' in f['msg'] for _h, f in res.failures()), res.output
    # they came to xen1 by a restore, after their latest checkpoints (written by xen2): a DR of xen1 knows them
    # from their placement records (without them it would find no VM of xen1), and refuses while they run there
    res = play(lab, 'fleetckpt.xen.dr_restore', {'failed_host': OTHER, 'restore_evacuate_targets': [HOME]})
    assert res.rc != 0 and any('REFUSING to evacuate xen1: g3 runs on xen1; g4 runs on xen1' in f['msg']
                               for _h, f in res.failures()), res.output

    with host_memory_lock(OTHER):
        res = play(lab, 'fleetckpt.xen.checkpoint', {'checkpoint_vms': ['g3'], 'checkpoint_keep_running': False},
                   limit=OTHER)
    assert res.rc == 0, res.output
    latest = {r['vm']: r['id'] for r in res.fact('checkpoint_summary', OTHER)}
    res = play(lab, 'fleetckpt.xen.restore', {'restore_vms': ['g3']}, limit=HOME)
    assert res.rc == 0, res.output
    [row] = res.fact('restore_summary', HOME)
    assert row['vm'] == 'g3' and row['status'] == 'ok' and row['checkpoint'] == latest['g3'], row
    assert xl_list(lab, HOME)['g3'][0] == MEMORY['g3'] and 'g3' not in xl_list(lab, OTHER)
    assert lab.sh('g3', 'cat %s' % MARKER, via=HOME).stdout.strip() == token

    res = play(lab, 'fleetckpt.xen.restore', {'restore_vms': ['g3'], 'restore_if_running': 'skip'}, limit=HOME)
    assert res.rc == 0 and res.changed() == 0, res.output
    assert {r['status'] for r in res.fact('restore_summary', HOME)} == {'skipped'}


def test_rebalance_drains_xen1_of_g4_cold_where_xen_cannot_move_it_live(lab, store):
    """The migration keys between the dom0s (prepare_hosts, check mode first), then a rebalance that drains xen1 of
    this suite's VMs (g4; g1/g2 are the other suite's). A live move is asked first: Debian's Xen is built without
    shadow paging, so xl migrate cannot track a PV guest's dirty pages (measured on the lab: "Failed to enable
    logdirty: 95"); fleetckpt.xen.migrate says so from its probe of xen2, through the gate, before anything changes.
    rebalance_move_method=live then refuses; auto moves g4 cold, its processes and memory-only files intact."""
    assert {vm: lab.locate_guest(vm) for vm in VMS} == {'g3': HOME, 'g4': OTHER}, 'the restore test did not run'
    # xen1's memory lock for the whole test: test_live_move.py sets up and removes the same migration keys
    with host_memory_lock(OTHER):
        remove_migration_setup(lab)
        try:
            res = play(lab, 'fleetckpt.xen.prepare_hosts', {'xen_host_migration': True}, check=True,
                       tags=['xen_host_migration'])
            assert res.rc == 0, res.output
            assert lab.sh(HOME, 'grep -c " fleetckpt-migrate@" /root/.ssh/authorized_keys; test -e %s || echo none'
                          % MIGRATION_FILES[0], check=False).stdout.split() == ['0', 'none'], 'check mode wrote'
            res = play(lab, 'fleetckpt.xen.prepare_hosts', {'xen_host_migration': True}, tags=['xen_host_migration'])
            assert res.rc == 0, res.output
            # xen1's migration key opens nothing on xen2 but the gate
            out = lab.sh(OTHER, 'ssh -i %s -o BatchMode=yes -o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes %s id'
                         % (MIGRATION_FILES[0], MIGRATION_FILES[2], {h['name']: h['bridge_ip'] for h in lab.state['hosts']}[HOME]),
                         check=False)
            assert out.rc == 126 and 'refused' in out.stderr, (out.rc, out.stdout, out.stderr)

            kept = keep_in_guest(lab, 'g4', OTHER)
            # g3 stays on xen2: not ballooned (rebalance_reclaim), so the suite's VMs keep their sizes
            ev = {'rebalance_evacuate_hosts': [OTHER], 'rebalance_vms': VMS, 'rebalance_apply': True, 'rebalance_reclaim': False}
            res = play(lab, 'fleetckpt.xen.rebalance', dict(ev, rebalance_move_method='live'))
            assert res.rc != 0, res.output
            [(_host, failure)] = res.failures()
            assert 'g4 cannot move live from xen1 to xen2' in failure['msg'], failure
            assert 'cannot track the dirty pages of a PV guest' in failure['msg'], failure
            assert xl_list(lab, OTHER)['g4'][0] == MEMORY['g4'] and 'g4' not in xl_list(lab, HOME)

            res = play(lab, 'fleetckpt.xen.rebalance', ev)
            assert res.rc == 0, res.output
            print('\n'.join(debug_msg(res.output, 'Show the moves made')))
            [move] = res.fact('rebalance_moved')
            assert (move['vm'], move['from'], move['to'], move['method']) == ('g4', OTHER, HOME, 'cold'), move
            running = xl_list(lab, HOME)
            assert running['g4'][0] == MEMORY['g4'] and not running['g4'][1] and 'g4' not in xl_list(lab, OTHER)
            assert kept_in_guest(lab, 'g4', HOME, kept)
        finally:
            clean_guest(lab, 'g4')
            remove_migration_setup(lab)


def test_rebalance_dry_run_plans_draining_xen2_and_changes_nothing(lab, store):
    """The plan for draining xen2 of g3/g4 (largest first, onto xen1), printed and changing nothing. g1/g2 on xen1
    belong to the other suite: rebalance_vms keeps them out of the plan."""
    ev = {'rebalance_evacuate_hosts': [HOME], 'rebalance_vms': VMS, 'rebalance_store': STORE}
    before = {vm: xl_list(lab, HOME)[vm] for vm in VMS}
    with host_memory_lock(OTHER):  # the plan counts xen1's free memory, which test_faults.py fills at one point
        res = play(lab, 'fleetckpt.xen.rebalance', ev)
    assert res.rc == 0, res.output
    report = res.fact('rebalance_report')
    assert report['applied'] is False, report
    assert [(m['vm'], m['from'], m['to']) for m in report['plan']['moves']] == [('g4', HOME, OTHER), ('g3', HOME, OTHER)]
    assert report['plan']['unplaced'] == [] and report['plan']['balloons'] == []
    print('\n'.join(debug_msg(res.output, 'Show the plan')))
    assert {vm: xl_list(lab, HOME)[vm] for vm in VMS} == before and not set(VMS) & set(xl_list(lab, OTHER))
