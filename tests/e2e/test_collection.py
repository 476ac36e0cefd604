# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Every module of the collection, driven through real ansible-playbook runs against the Xen lab.

The tests in this file run in order and share the lab (session fixture) and one checkpoint store on NFS.
They assert on the real systems: `xl list` in the dom0s, /proc/meminfo and files in the guests, the store.
They work on xen2 and its guests g3/g4 (test_faults.py runs on xen1 at the same time, see conftest.py). The
restore on the other host (g3 to xen1 and back, under xen1's memory lock) is in test_consistency.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'lab'))

from playbook import run_playbook, run_task  # noqa: E402

STORE = '/srv/fleetckpt/checkpoints'
PLAYBOOKS = Path(__file__).resolve().parents[2] / 'playbooks'
GUESTS = 'g3,g4'  # xen2's guests: test_faults.py uses xen1's (g1, g2) at the same time
AGENT = '/usr/local/lib/fleetckpt/fleetckpt_agent.py'
MIB = 1024


def meminfo(lab, guest, key, via=None):
    out = lab.sh(guest, 'grep "^%s:" /proc/meminfo' % key, via=via).stdout
    return int(out.split()[1])


def play(lab, hosts, module, args=None, check=False, **kw):
    res = run_task(lab.inventory_path, hosts, module, args, check=check, **kw)
    return res


@pytest.fixture(scope='module')
def store(lab):
    lab.sh('xen2', 'rm -rf %s && mkdir -p %s' % (STORE, STORE))
    return STORE


def test_install_agent_playbook_check_mode_then_installs_idempotently(lab):
    """The guest_agent module and role through the install_agent playbook (by collection name, then by path):
    removed, a check-mode run that reports the install and writes nothing, the install (the agent publishes, seen
    from the guest and from xen2's dom0), a second run that changes nothing. Every later test needs the agent."""
    res = play(lab, GUESTS, 'guest_agent', {'state': 'absent'})
    assert res.rc == 0, res.output
    for guest in ('g3', 'g4'):
        assert lab.sh(guest, 'test -e %s' % AGENT, check=False).rc != 0, 'state=absent left the agent'

    res = run_playbook(lab.inventory_path, 'fleetckpt.xen.install_agent', limit=GUESTS, check=True)
    assert res.rc == 0, res.output
    for guest in ('g3', 'g4'):
        assert res.fact('guest_agent_report', guest)['changed_files'], 'check mode should report the install'
        assert lab.sh(guest, 'test -e %s' % AGENT, check=False).rc != 0, 'check mode installed the agent'

    res = run_playbook(lab.inventory_path, 'fleetckpt.xen.install_agent', limit=GUESTS)
    assert res.rc == 0, res.output
    for guest in ('g3', 'g4'):
        assert res.changed(guest) >= 1, res.output
        report = res.fact('guest_agent_report', guest)
        assert report['version'] == '1' and int(report['committed_as_kb']) > 0, report
        assert report['seen_by_host'] == 'ok', report  # xen2's dom0 read a fresh sample from XenStore
        assert lab.sh(guest, 'systemctl is-active fleetckpt-agent').stdout.strip() == 'active'

    res = run_playbook(lab.inventory_path, str(PLAYBOOKS / 'install_agent.yml'), limit=GUESTS)
    assert res.rc == 0, res.output
    for guest in ('g3', 'g4'):
        assert res.changed(guest) == 0 and not res.fact('guest_agent_report', guest)['changed_files'], res.output
        assert res.fact('guest_agent_report', guest)['seen_by_host'] == 'ok'


def test_memory_pressure_matches_guest_meminfo(lab):
    res = play(lab, 'xen2', 'memory_pressure', {})
    assert res.rc == 0, res.output
    seen = {}
    for host in ('xen2',):
        for vm in res[host]['vms']:
            seen[vm['name']] = (host, vm)
    assert set(seen) == {'g3', 'g4'}
    for name, (host, vm) in sorted(seen.items()):
        assert vm['agent']['status'] == 'ok' and vm['agent']['fresh'], vm['agent']
        reported = vm['agent']['values']['committed_as_kb']
        actual = meminfo(lab, name, 'Committed_AS')
        assert abs(reported - actual) <= max(0.05 * actual, 8 * MIB), (name, reported, actual)
        assert vm['policy']['status'] == 'ok'
        assert 128 * MIB <= vm['target_mem_kb'] <= vm['current_kb']


def test_checkpoint_check_mode_changes_nothing(lab, store):
    before = lab.domain_row('xen2', 'g4')
    # every g* of xen2 but g3 (exclude): g4 alone
    res = play(lab, 'xen2', 'checkpoint', {'store': store, 'pattern': ['g*'], 'exclude': ['g3'], 'init_store': True},
               check=True)
    assert res.rc == 0 and res['xen2']['changed'], res.output
    [plan] = res['xen2']['checkpoints']
    assert plan['vm'] == 'g4', plan
    assert plan['mode'] == 'vmme' and plan['saved_kb'] < plan['original_kb']
    # a running VM's disk (a raw file on the NFS store) would be copied while it stands paused
    assert [(d['vdev'], d['strategy']) for d in plan['disks']] == [('xvda', 'copy')], plan['disks']
    assert lab.sh('xen2', 'ls -A %s' % store).stdout.strip() == ''
    mem, state = lab.domain_row('xen2', 'g4')
    # the memory is unchanged and the domain not paused (its r/b flags only say whether it ran at that instant)
    assert mem == before[0] and 'p' not in state, (before, (mem, state))


def test_vmme_checkpoint_is_much_smaller_than_native_and_vm_keeps_running(lab, store):
    memory_only = {'disks': 'none', 'force_memory_only': True}  # the memory is compared here, not the disks
    native = play(lab, 'xen2', 'checkpoint', dict(memory_only, store=store, name=['g4'], mode='native', init_store=True))
    assert native.rc == 0, native.output
    vmme = play(lab, 'xen2', 'checkpoint', dict(memory_only, store=store, name=['g4'], mode='vmme'))
    assert vmme.rc == 0, vmme.output
    [n] = native['xen2']['checkpoints']
    [v] = vmme['xen2']['checkpoints']
    print('\nnative: %d B in %.1fs; vmme: %d B in %.1fs (query %.2fs, balloon %.1fs, save %.1fs, deflate %.1fs)' % (
        n['size_bytes'], n['timings']['total_s'], v['size_bytes'], v['timings']['total_s'], v['timings']['query_s'],
        v['timings']['balloon_s'], v['timings']['save_s'], v['timings']['deflate_s']))
    assert v['mode'] == 'vmme' and v['saved_kb'] < 300 * MIB
    assert v['size_bytes'] < 0.6 * n['size_bytes']
    assert v['memory_restored'] is True
    mem, state = lab.domain_row('xen2', 'g4')
    assert mem == 512 and 'p' not in state  # running, memory given back
    assert meminfo(lab, 'g4', 'MemTotal') > 400 * 1024


def test_checkpoint_info_lists_and_verifies(lab, store):
    res = play(lab, 'xen1', 'checkpoint_info', {'store': store, 'vm': ['g4'], 'verify_checksum': True})
    assert res.rc == 0, res.output
    entries = res['xen1']['checkpoints']
    assert len(entries) == 2 and all(e['valid'] and e['checksum_verified'] for e in entries)
    assert sorted(e['mode'] for e in entries) == ['native', 'vmme']
    assert all(e['source_host'] == 'xen2' for e in entries) and res['xen1']['partials'] == []


def test_balloon_committed_then_original(lab, store):
    res = play(lab, 'xen2', 'balloon', {'name': ['g4'], 'target': 'committed'})
    assert res.rc == 0, res.output
    [entry] = res['xen2']['vms']
    low = lab.domain_row('xen2', 'g4')[0]
    assert entry['changed'] and low * MIB <= entry['target_kb'] and low < 400
    res = play(lab, 'xen2', 'balloon', {'name': ['g4'], 'target': 'original', 'store': store})
    assert res.rc == 0, res.output
    assert lab.domain_row('xen2', 'g4')[0] == 512
    res = play(lab, 'xen2', 'balloon', {'name': ['g4'], 'target': 'original', 'store': store})
    assert res.rc == 0 and res['xen2']['changed'] is False, res.output
