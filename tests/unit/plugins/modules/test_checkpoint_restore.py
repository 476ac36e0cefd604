# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""checkpoint / restore / checkpoint_info / memory_pressure / balloon main() against a fake Xen host."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ansible_collections.fleetckpt.xen.plugins.modules import (
    balloon, checkpoint, checkpoint_info, memory_pressure, restore)

from module_runner import run_module

MIB = 1024


@pytest.fixture
def host(xen):
    xen.xl.add('web', 1024, domid=3)
    xen.xl.add('db', 512, domid=4)
    xen.agents.publish(3, committed_mib=40)  # db (domid 4) has no agent
    web = xen.agents.values[3]

    def web_sample(_request):
        # web's MemTotal follows its memory, as a ballooned guest's does: 37 MiB of it are the kernel's own (the lab's
        # 1 GiB guest: MemTotal 987 MiB)
        dom = xen.xl.domain('web')
        return dict(web, mem_total_kb=((dom['mem_mib'] if dom else 1024) - 37) * MIB)
    xen.agents.values[3] = web_sample
    return xen


def ckpt(host, capsys, check_mode=False, **args):
    base = dict(host.args, store=host.store, init_store=True)
    base.update(args)
    return run_module(checkpoint, base, check_mode=check_mode, capsys=capsys)


def test_memory_pressure_reports_targets_and_agent_status(host, capsys):
    res = run_module(memory_pressure, dict(host.args), capsys=capsys)
    assert res['_rc'] == 0 and res['changed'] is False and res['host']['xen_version'] == '4.20.1'
    vms = {v['name']: v for v in res['vms']}
    assert set(vms) == {'web', 'db'}
    # 40 + 10 + 1 + 1 + 20 + (1024 - 987) + max(32, 3% of 1024) = 141 MiB
    assert vms['web']['agent']['status'] == 'ok' and vms['web']['target_mem_kb'] == 141 * MIB
    assert vms['web']['reclaimable_kb'] == (1024 - 141) * MIB
    assert vms['db']['agent']['status'] == 'missing' and vms['db']['policy']['status'] == 'no_agent'
    assert res['total_reclaimable_kb'] == (1024 - 141) * MIB
    res = run_module(memory_pressure, dict(host.args, name=['nope']), capsys=capsys)
    assert res['_rc'] == 1 and 'no such VM: nope' in res['msg']


def test_vmme_checkpoint_is_small_and_gives_memory_back(host, capsys):
    res = ckpt(host, capsys, name=['web'])
    assert res['_rc'] == 0 and res['changed'] and res['failures'] == []
    [c] = res['checkpoints']
    assert c['mode'] == 'vmme' and c['saved_kb'] == 141 * MIB and c['original_kb'] == 1024 * MIB
    assert c['memory_restored'] is True and c['still_running'] is True
    assert host.xl.domain('web')['mem_mib'] == 1024  # memory given back
    assert set(c['timings']) >= {'query_s', 'balloon_s', 'save_s', 'deflate_s', 'total_s'}
    manifest = json.load(open(os.path.join(c['path'], 'manifest.json')))
    assert manifest['memory'] == {'original_kb': 1024 * MIB, 'static_max_kb': 1024 * MIB, 'saved_kb': 141 * MIB}
    assert manifest['state'] == 'complete' and manifest['mode'] == 'vmme' and manifest['config']['c_info']['name'] == 'web'
    assert manifest['source_host'] == 'xen1' and manifest['image']['sha256'] == c['sha256']
    native = ckpt(host, capsys, name=['web'], mode='native')['checkpoints'][0]
    assert native['mode'] == 'native' and native['size_bytes'] > 5 * c['size_bytes']
    info = run_module(checkpoint_info, dict(store=host.store, verify_checksum=True), capsys=capsys)
    assert [e['valid'] for e in info['checkpoints']] == [True, True] and info['partials'] == []
    assert {e['mode'] for e in info['checkpoints']} == {'vmme', 'native'}


def test_no_agent_falls_back_to_native_or_fails(host, capsys):
    res = ckpt(host, capsys, name=['db'])
    [c] = res['checkpoints']
    assert res['_rc'] == 0 and c['mode'] == 'native' and 'agent data missing' in c['fallback_reason']
    res = ckpt(host, capsys, name=['db'], fallback='fail')
    assert res['_rc'] == 1 and 'memory exclusion not possible' in res['msg']
    assert host.xl.domain('db')['mem_mib'] == 512
    assert 'mem-set' not in host.xl.commands()


def test_stuck_balloon_gives_memory_back_and_saves_nothing(host, capsys):
    host.xl.update('web', stuck_at_mib=600)
    res = ckpt(host, capsys, name=['web'], stall_timeout=1, balloon_timeout=3)
    assert res['_rc'] == 1 and 'stalled' in res['msg']
    assert host.xl.domain('web')['target_mib'] == 1024 and host.xl.domain('web')['mem_mib'] == 1024
    assert 'save' not in host.xl.commands()
    info = run_module(checkpoint_info, dict(store=host.store), capsys=capsys)
    assert info['checkpoints'] == [] and info['partials'] == []


def test_a_balloon_settling_a_little_above_its_target_is_saved_where_it_stopped(host, capsys):
    """Within 25 % of the target above it (a big guest's kernel keeps more than the floor allows): the target is
    raised to what the guest reached and the VM saved there, not natively."""
    target_mib = 141  # web's policy target (test_memory_pressure_reports_targets_and_agent_status)
    host.xl.update('web', stuck_at_mib=target_mib + target_mib // 8)
    res = ckpt(host, capsys, name=['web'], stall_timeout=1, balloon_timeout=3)
    [c] = res['checkpoints']
    assert res['_rc'] == 0 and c['mode'] == 'vmme', res
    assert c['saved_kb'] == (target_mib + target_mib // 8 + 1) * 1024
    assert host.xl.domain('web')['mem_mib'] == 1024  # given back after the save


def test_oom_during_balloon_gives_memory_back(host, capsys):
    before = host.agents.values[3]
    # first answer (before the balloon): no OOM kill; every later answer: the OOM killer fired twice
    host.agents.values[3] = lambda n: dict(before(n), oom_kill=0 if n == 1 else 2)
    res = ckpt(host, capsys, name=['web'])
    assert res['_rc'] == 1 and 'OOM killer fired 2' in res['msg'] and 'nothing saved' in res['msg']
    assert host.xl.domain('web')['mem_mib'] == 1024 and 'save' not in host.xl.commands()


def test_failed_save_loses_nothing(host, capsys):
    first = ckpt(host, capsys, name=['web'])['checkpoints'][0]
    host.xl.fail('save', 'xc: error: Failed to suspend domain')
    res = ckpt(host, capsys, name=['web'])
    assert res['_rc'] == 1 and 'Failed to suspend' in res['msg']
    assert host.xl.domain('web')['mem_mib'] == 1024
    info = run_module(checkpoint_info, dict(store=host.store, verify_checksum=True), capsys=capsys)
    assert [e['id'] for e in info['checkpoints']] == [first['id']] and info['checkpoints'][0]['valid']
    assert info['partials'] == []


def test_check_mode_changes_nothing(host, capsys):
    os.makedirs(host.store)
    res = ckpt(host, capsys, check_mode=True)
    assert res['_rc'] == 0 and res['changed'] is True
    plans = {c['vm']: c for c in res['checkpoints']}
    assert plans['web']['mode'] == 'vmme' and plans['web']['saved_kb'] == 141 * MIB and plans['db']['mode'] == 'native'
    assert not {'mem-set', 'save'} & set(host.xl.commands())
    assert os.listdir(host.store) == []  # not even the marker (init_store is skipped in check mode)


def test_store_must_be_mounted(host, capsys):
    os.makedirs(host.store)
    res = run_module(checkpoint, dict(host.args, store=host.store), capsys=capsys)
    assert res['_rc'] == 1 and 'is the shared store mounted' in res['msg']
    assert 'mem-set' not in host.xl.commands()


@pytest.mark.parametrize('args,msg', [
    ({'store': 'relative'}, 'absolute path'),
    ({'name': ['../x']}, 'no such VM'),
    ({'parallel': 0}, 'out of range: parallel'),
    ({'zstd_level': 40}, 'zstd_level'),
    ({'keep_last': 0}, 'keep_last must be an integer >= 1'),
    ({'floor_mib': 8}, 'floor_mib below 32'),
    ({'mode': 'fast'}, 'value of mode must be one of'),
    ({'state': 'absent', 'name': ['web'], 'checkpoint_id': '../../etc'}, 'checkpoint id'),
])
def test_bad_input_is_rejected_before_anything_happens(host, capsys, args, msg):
    res = ckpt(host, capsys, **args)
    assert res['_rc'] == 1 and msg in res['msg']
    assert not {'mem-set', 'save'} & set(host.xl.commands())


def test_retention_and_delete(host, capsys):
    ids = [ckpt(host, capsys, name=['web'], mode='native')['checkpoints'][0]['id'] for dummy in range(2)]
    res = ckpt(host, capsys, name=['web'], mode='native', keep_last=2)
    newest = res['checkpoints'][0]['id']
    assert res['deleted'] == ['web/%s' % ids[0]]
    res = ckpt(host, capsys, name=['web'], state='absent', checkpoint_id=ids[1])
    assert res['changed'] and res['deleted'] == ['web/%s' % ids[1]]
    res = ckpt(host, capsys, name=['web'], state='absent', checkpoint_id=ids[1])
    assert res['_rc'] == 0 and res['changed'] is False
    info = run_module(checkpoint_info, dict(store=host.store), capsys=capsys)
    assert [e['id'] for e in info['checkpoints']] == [newest]


def test_lock_held_elsewhere_fails_that_vm_only(host, capsys):
    ckpt(host, capsys, name=['db'], mode='native')
    lock = os.path.join(host.store, 'web', '.lock')
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    holder = subprocess.Popen([sys.executable, '-c', 'import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT);'
                               'fcntl.lockf(fd, fcntl.LOCK_EX); print("ok", flush=True); sys.stdin.readline()', lock],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b'ok\n'
        res = ckpt(host, capsys, mode='native')
    finally:
        holder.kill()
        holder.wait()
    assert res['_rc'] == 1 and [f['vm'] for f in res['failures']] == ['web'] and 'another fleetckpt run' in res['msg']
    assert [c['vm'] for c in res['checkpoints'] if not c.get('failed')] == ['db']


def rst(host, capsys, check_mode=False, **args):
    base = dict(host.args, store=host.store, vm='web', wait_agent=0)
    base.update(args)
    return run_module(restore, base, check_mode=check_mode, capsys=capsys)


def test_restore_gives_memory_back(host, capsys):
    c = ckpt(host, capsys, name=['web'], keep_running=False)['checkpoints'][0]
    assert c['still_running'] is False and host.xl.domain('web') is None
    res = rst(host, capsys, check_mode=True)
    assert res['_rc'] == 0 and res['changed'] and res['restored']['checksum_verified'] and host.xl.domain('web') is None
    assert c['placement'] == dict(c['placement'], vm='web', host='xen1', event='stopped', checkpoint=c['id'])
    res = rst(host, capsys)
    assert res['_rc'] == 0 and res['restored']['checkpoint'] == c['id'] and res['restored']['memory_restored'] is True
    assert set(res['restored']['timings']) >= {'verify_s', 'restore_s', 'total_s'} and res['restored']['timings']['verify_s'] >= 0
    assert res['restored']['placement']['event'] == 'restored' and res['restored']['placement']['host'] == 'xen1'
    info = run_module(checkpoint_info, dict(store=host.store), capsys=capsys)
    assert info['placements']['web'] == res['restored']['placement']
    dom = host.xl.domain('web')
    assert dom['mem_mib'] == 1024 and dom['domid'] != 3  # a restore gets a new domid
    # a second copy is refused; skip makes it idempotent
    res = rst(host, capsys)
    assert res['_rc'] == 1 and 'already runs on this host' in res['msg']
    res = rst(host, capsys, if_running='skip')
    assert res['_rc'] == 0 and res['changed'] is False


def test_a_vm_saved_just_below_its_memory_gets_its_target_back_at_restore(host, capsys):
    """A policy target 1 MiB under the VM's memory: the restore has nothing to wait for, but sets the target back,
    or the next checkpoint would take 1023 MiB for the VM's memory and each cycle would shrink it."""
    before = host.agents.values[3]
    # 922 + 10 + 1 + 1 + 20 + 37 (the kernel's own) + 32 = 1023 MiB
    host.agents.values[3] = lambda n: dict(before(n), committed_as_kb=922 * MIB)
    c = ckpt(host, capsys, name=['web'], keep_running=False)['checkpoints'][0]
    assert c['mode'] == 'vmme' and c['saved_kb'] == 1023 * MIB and c['original_kb'] == 1024 * MIB
    res = rst(host, capsys)
    assert res['_rc'] == 0 and res['restored']['memory_restored'] is True
    assert host.xl.domain('web')['target_mib'] == 1024 and host.xl.domain('web')['mem_mib'] == 1024
    again = ckpt(host, capsys, name=['web'], mode='native')['checkpoints'][0]
    assert again['original_kb'] == 1024 * MIB


def test_restore_replace_reverts_a_running_vm_only_after_every_check(host, capsys):
    c = ckpt(host, capsys, name=['web'], disks='none', force_memory_only=True)['checkpoints'][0]
    assert host.xl.domain('web')['domid'] == 3
    # not enough memory even counting what web frees: refused, web untouched
    host.xl.update(free_mib=0)
    res = rst(host, capsys, if_running='replace')
    assert res['_rc'] == 1 and 'needs 1040 MiB' in res['msg'] and host.xl.domain('web')['domid'] == 3
    assert 'destroy' not in host.xl.commands()
    host.xl.update(free_mib=100)  # 100 free + web's 1024 once it is destroyed
    res = rst(host, capsys, check_mode=True, if_running='replace')
    assert res['_rc'] == 0 and res['restored']['replaced'] == {'domid': 3, 'mem_mib': 1024, 'state': '-b----'}
    assert host.xl.domain('web')['domid'] == 3 and 'destroy' not in host.xl.commands()
    res = rst(host, capsys, if_running='replace')
    assert res['_rc'] == 0 and res['restored']['checkpoint'] == c['id'] and res['restored']['replaced']['domid'] == 3
    commands = host.xl.commands()
    assert commands.index('destroy') < commands.index('restore')
    assert host.xl.domain('web')['domid'] not in (3, None) and host.xl.domain('web')['mem_mib'] == 1024
    # a restore failing after the destroy says the VM is down
    host.xl.fail('restore', 'xc_domain_restore: boom')
    res = rst(host, capsys, if_running='replace')
    assert res['_rc'] == 1 and 'boom' in res['msg'] and 'DOWN' in res['msg'] and host.xl.domain('web') is None
    # nothing to replace: a plain restore
    host.xl.update(fail={})
    res = rst(host, capsys, if_running='replace')
    assert res['_rc'] == 0 and res['restored']['replaced'] is None and host.xl.domain('web') is not None


def test_restore_refuses_corrupt_image_before_touching_host(host, capsys):
    c = ckpt(host, capsys, name=['web'], keep_running=False)['checkpoints'][0]
    with open(os.path.join(c['path'], 'image.xl'), 'r+b') as handle:
        handle.seek(100)
        handle.write(b'CORRUPT')
    res = rst(host, capsys, checkpoint_id=c['id'])
    assert res['_rc'] == 1 and 'sha256' in res['msg'] and 'restore' not in host.xl.commands()
    res = rst(host, capsys)
    assert res['_rc'] == 1 and 'no valid checkpoint of web' in res['msg'] and 'sha256' in res['msg']


@pytest.mark.parametrize('change,msg', [
    ({'free_mib': 600}, 'needs 1040 MiB'),
    ({'xen_version': '4.17.5'}, 'older Xen 4.17.5'),
    ({'hw_caps': 'caps-b'}, 'CPU features differ'),
])
def test_restore_preflight_refusals(host, capsys, change, msg):
    ckpt(host, capsys, name=['web'], keep_running=False)
    host.xl.update(**change)
    res = rst(host, capsys)
    assert res['_rc'] == 1 and msg in res['msg'] and 'restore' not in host.xl.commands()


def test_restore_bad_names(host, capsys):
    ckpt(host, capsys, name=['web'], keep_running=False)
    for vm in ('../web', '/etc', 'a' * 100):
        res = rst(host, capsys, vm=vm)
        assert res['_rc'] == 1 and 'VM name' in res['msg']


def test_balloon_module_modes_check_and_idempotence(host, capsys):
    args = dict(host.args, name=['web'])
    res = run_module(balloon, args, check_mode=True, diff=True, capsys=capsys)
    assert res['changed'] and res['diff'] == {'before': {'web': '1024 MiB'}, 'after': {'web': '141 MiB'}}
    assert host.xl.domain('web')['mem_mib'] == 1024
    res = run_module(balloon, args, capsys=capsys)
    assert res['_rc'] == 0 and res['vms'][0]['after_kb'] == 141 * MIB and host.xl.domain('web')['mem_mib'] == 141
    res = run_module(balloon, args, capsys=capsys)
    assert res['changed'] is False
    res = run_module(balloon, dict(args, target='original'), capsys=capsys)
    assert res['changed'] and host.xl.domain('web')['mem_mib'] == 1024
    res = run_module(balloon, dict(args, target='size', memory_mib=700), capsys=capsys)
    assert res['changed'] and host.xl.domain('web')['mem_mib'] == 700
    res = run_module(balloon, dict(args, target='size', memory_mib=4096), capsys=capsys)
    assert res['_rc'] == 1 and 'exceeds the static maximum' in res['msg'] and host.xl.domain('web')['mem_mib'] == 700
    res = run_module(balloon, dict(args, target='size'), capsys=capsys)
    assert res['_rc'] == 1 and 'memory_mib' in res['msg']
    res = run_module(balloon, dict(host.args, name=['db']), capsys=capsys)
    assert res['_rc'] == 1 and 'cannot compute a balloon target' in res['msg'] and host.xl.domain('db')['mem_mib'] == 512


def test_init_store_reports_the_marker_it_creates(host, capsys):
    res = ckpt(host, capsys, check_mode=True, pattern=['/'])
    assert res['_rc'] == 0 and res['changed'] is True and res['store_initialized'] is True
    assert not os.path.exists(os.path.join(host.store, '.fleetckpt-store'))
    res = ckpt(host, capsys, pattern=['/'])
    assert res['_rc'] == 0 and res['changed'] is True and res['store_initialized'] is True
    res = ckpt(host, capsys, pattern=['/'])
    assert res['_rc'] == 0 and res['changed'] is False and res['store_initialized'] is False
