# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Consistent checkpoints (#8) through Checkpointer.run and the restore plan: the domain is saved paused, its
disks captured, then unpaused, also when the capture fails; the manifest records the disks; a memory-only
checkpoint is refused once its disk changed."""
from __future__ import annotations

import errno
import hashlib
import os
import sys

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _disks
from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import (
    Checkpointer, plan_restore_disks, planned_disk, restore_checkpoint, restore_preflight)
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import PolicyRefused, StoreError, XlError
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import CheckpointStore
from ansible_collections.fleetckpt.xen.plugins.module_utils._xlimage import encode_header, read_header_file

WRITE_IMAGE = 'import sys; open(sys.argv[1], "wb").write(open(sys.argv[2], "rb").read())'
HEADER = os.path.join(os.path.dirname(__file__), 'data', 'xl-header-4.20.bin')  # g3, saved on the lab
HOST = {'host': 'xen1', 'xen_version': '4.20', 'hw_caps': '', 'free_memory_kb': 4 << 20}


class Xl:
    """Records the save mode and unpauses; the 'save' writes a small image into the FIFO."""

    image = None  # an image header naming the test's disk (set by the fixture)

    def __init__(self, unpause_fails=0):
        self.calls = []
        self.unpause_fails = unpause_fails

    def save_argv(self, name, path, keep_running=True, paused=False):
        self.calls.append(('save', keep_running, paused))
        return [sys.executable, '-c', WRITE_IMAGE, path, Xl.image]

    def unpause(self, name):
        self.calls.append(('unpause', name))
        if self.unpause_fails:
            self.unpause_fails -= 1
            raise StoreError('xl unpause: simulated failure')

    def recover_suspended(self, name):
        self.calls.append(('recover', name))
        return 'running'


def refusing_ioctl(fd, request, arg, *rest):
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


@pytest.fixture
def lab(tmp_path):
    disk = tmp_path / 'disks' / 'g1.img'
    disk.parent.mkdir()
    with open(disk, 'wb') as handle:
        handle.truncate(8 << 20)
        handle.seek(1 << 20)
        handle.write(b'data' * 4096)
    header = read_header_file(HEADER)
    config = header.config
    config['disks'][0]['pdev_path'] = str(disk)
    Xl.image = str(tmp_path / 'image.xl')
    with open(Xl.image, 'wb') as handle:
        handle.write(encode_header(header, config) + b'memory' * 1000)
    store = CheckpointStore(str(tmp_path / 'store'), require_marker=False)
    os.mkdir(store.root)
    env = _disks.DiskEnv(host='xen1', sysfs=str(tmp_path / 'sys'), ioctl=refusing_ioctl, runner=object())
    dom = {'name': 'g1', 'uuid': 'u-1', 'domid': 5, 'current_kb': 262144, 'target_kb': 262144,
           'static_max_kb': 262144, 'state': 'r-----',
           'config': {'disks': [{'pdev_path': str(disk), 'vdev': 'xvda', 'format': 'raw', 'readwrite': 1}]}}
    return {'disk': str(disk), 'store': store, 'env': env, 'dom': dom}


def options(**kw):
    opts = {'mode': 'native', 'keep_running': True, 'lock_timeout_s': 0, 'compression': 'none', 'zstd_level': 3,
            'zstd_threads': 1, 'save_timeout_s': 30, 'balloon_timeout_s': 10, 'disks': 'auto'}
    opts.update(kw)
    return opts


def run(lab, xl, **kw):
    ckpt = Checkpointer(xl, None, lab['store'], options(**kw), disk_env=lab['env'])
    plan = {'requested_mode': 'native', 'mode': 'native', 'target_kb': None, 'reason': None, 'report': None}
    return ckpt.run(dict(lab['dom']), HOST, plan)


def sha256(path):
    with open(path, 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_running_vm_is_saved_paused_its_disk_copied_then_unpaused(lab):
    xl = Xl()
    res = run(lab, xl)
    assert xl.calls == [('save', False, True), ('unpause', 'g1')]  # xl save -p, then unpause
    assert [(d['vdev'], d['strategy'], d['memory_only']) for d in res['disks']] == [('xvda', 'copy', False)]
    assert res['timings']['pause_s'] >= 0 and 'disks_finalize_s' in res['timings']
    entry = lab['store'].inspect('g1', res['id'], verify_checksum=True)
    assert entry['valid'], entry['problems']
    record = entry['manifest']['disks'][0]
    assert entry['manifest']['schema_version'] == 2 and record['location'] == {'type': 'checkpoint', 'file': 'disk-xvda.img'}
    assert record['sha256'] == sha256(lab['disk']) == sha256(os.path.join(res['path'], 'disk-xvda.img'))
    # a corrupted copy makes the checkpoint invalid once checksums are verified
    with open(os.path.join(res['path'], 'disk-xvda.img'), 'r+b') as handle:
        handle.seek(1 << 20)
        handle.write(b'XXXX')
    bad = lab['store'].inspect('g1', res['id'], verify_checksum=True)
    assert not bad['valid'] and 'sha256' in ' '.join(bad['problems'])


def test_the_domid_reaches_the_strategies_only_while_the_domain_stands_paused(lab, monkeypatch):
    seen = []
    real = _disks.snapshot_all
    monkeypatch.setattr(_disks, 'snapshot_all', lambda plans, dest, *a, **kw: seen.append(dest['domid']) or real(
        plans, dest, *a, **kw))
    run(lab, Xl())  # paused after the save: its device model (qcow2 disks) is there to be asked
    run(lab, Xl(), keep_running=False, disks='copy')  # the save stopped it: no domain, no device model
    assert seen == [5, None]


def test_failed_disk_capture_unpauses_and_leaves_no_checkpoint(lab, monkeypatch):
    xl = Xl()

    def broken_copy(*a, **kw):
        raise StoreError('no space left on the store (simulated)')

    monkeypatch.setattr(_disks, 'sparse_copy', broken_copy)
    with pytest.raises(StoreError, match='simulated'):
        run(lab, xl)
    assert ('unpause', 'g1') in xl.calls
    assert lab['store'].list('g1') == [] and lab['store'].partials('g1') == []


def test_unpause_is_retried_then_reported_loudly(lab, monkeypatch):
    assert run(lab, Xl(unpause_fails=1))['disks'][0]['strategy'] == 'copy'
    cleaned = []
    real_cleanup = _disks.cleanup_disks
    monkeypatch.setattr(_disks, 'cleanup_disks', lambda records, *a, **kw: cleaned.append(
        [r['vdev'] for r in records]) or real_cleanup(records, *a, **kw))
    before = [e['id'] for e in lab['store'].list('g1')]
    with pytest.raises(Exception, match='left PAUSED.*xl unpause g1'):
        run(lab, Xl(unpause_fails=2))
    assert cleaned == [['xvda']], 'the abandoned checkpoint kept its snapshots'
    assert [e['id'] for e in lab['store'].list('g1')] == before and lab['store'].partials('g1') == []


def test_memory_only_for_a_running_vm_needs_force(lab):
    with pytest.raises(PolicyRefused, match='memory-only'):
        run(lab, Xl(), disks='none')
    xl = Xl()
    res = run(lab, xl, disks='none', force_memory_only=True)
    assert xl.calls == [('save', True, False)]  # xl save -c: nothing to capture while paused
    assert res['disks'][0]['memory_only'] is True


def test_stopped_vm_records_identity_and_restore_refuses_a_changed_disk(lab):
    xl = Xl()
    res = run(lab, xl, keep_running=False)
    assert xl.calls == [('save', False, False)] and res['disks'][0]['strategy'] == 'none'
    entry = lab['store'].inspect('g1', res['id'])
    assert entry['valid']
    plan = plan_restore_disks(entry, {}, 'xen1', env=lab['env'])
    assert plan['mode'] == 'revert' and plan['problems'] == [] and plan['actions'] == []
    with open(lab['disk'], 'r+b') as handle:  # the disk moves on after the checkpoint
        handle.write(b'newer')
    plan = plan_restore_disks(entry, {}, 'xen1', env=lab['env'])
    assert 'changed since' in plan['problems'][0]
    with pytest.raises(PolicyRefused, match='changed since'):
        restore_preflight(entry, HOST, set(), disk_plan=plan)
    assert plan_restore_disks(entry, {'force_changed_disks': True}, 'xen1', env=lab['env'])['problems'] == []


def test_revert_and_clone_restore_the_checkpoint_content(lab, tmp_path):
    res = run(lab, Xl())
    entry = lab['store'].inspect('g1', res['id'])
    at_checkpoint = sha256(lab['disk'])
    with open(lab['disk'], 'r+b') as handle:
        handle.write(b'moved on')
    clone = plan_restore_disks(entry, {'restore_as': 'g1-copy', 'disk_work_dir': str(tmp_path)}, 'xen2', env=lab['env'])
    assert clone['mode'] == 'clone' and not clone['problems']
    restore_preflight(entry, HOST, {'g1'}, restore_as='g1-copy', disk_plan=clone)  # every writable disk covered
    _disks.apply_restore_plan(clone, lab['env'])
    (work,) = clone['disk_map'].values()
    assert sha256(work) == at_checkpoint and sha256(lab['disk']) != at_checkpoint
    revert = plan_restore_disks(entry, {}, 'xen1', env=lab['env'])
    assert revert['mode'] == 'revert' and revert['disk_map'] == {}
    _disks.apply_restore_plan(revert, lab['env'])
    assert sha256(lab['disk']) == at_checkpoint
    assert lab['store'].inspect('g1', res['id'], verify_checksum=True)['valid']  # revert keeps the snapshot


def test_delete_removes_the_copies_with_the_checkpoint(lab):
    res = run(lab, Xl())
    assert lab['store'].delete('g1', res['id'], env=lab['env'])
    assert not os.path.exists(res['path']) and lab['store'].list('g1') == []


class FailingRestoreXl:
    """``xl restore`` that reads its image, then fails; no domain appears."""

    def __init__(self, tmp_path):
        self.xl_path = str(tmp_path / 'xl')
        with open(self.xl_path, 'w') as handle:
            handle.write('#!%s\nimport sys\nopen(sys.argv[-1], "rb").read()\nsys.exit("libxl: error: simulated")\n'
                         % sys.executable)
        os.chmod(self.xl_path, 0o755)

    def list_plain(self):
        return {}


def test_failed_restore_removes_the_working_disks_it_made(lab, tmp_path):
    res = run(lab, Xl())
    entry = lab['store'].inspect('g1', res['id'], verify_checksum=True)
    opts = {'restore_as': 'g1-copy', 'disk_work_dir': str(tmp_path), 'restore_timeout_s': 30, 'balloon_timeout_s': 5}
    opts['disk_plan'] = plan_restore_disks(entry, opts, 'xen1', env=lab['env'])
    (work,) = opts['disk_plan']['disk_map'].values()
    with pytest.raises(XlError, match='simulated'):
        restore_checkpoint(FailingRestoreXl(tmp_path), entry, opts, disk_env=lab['env'])
    assert not os.path.exists(work), 'the working disk of a failed restore was left behind'


def test_revert_checks_the_copy_while_copying_and_leaves_the_disk_alone_if_corrupt(lab):
    res = run(lab, Xl())
    entry = lab['store'].inspect('g1', res['id'], verify_checksum=True, verify_disks=False)
    assert entry['valid'] and entry['disks_verified'] is False
    with open(os.path.join(res['path'], 'disk-xvda.img'), 'r+b') as handle:  # bit rot in the store
        handle.seek(1 << 20)
        handle.write(b'XXXX')
    with open(lab['disk'], 'r+b') as handle:
        handle.write(b'moved on')
    before = sha256(lab['disk'])
    plan = plan_restore_disks(lab['store'].inspect('g1', res['id']), {}, 'xen1', env=lab['env'])
    assert plan['actions'][0]['sha256'] == entry['manifest']['disks'][0]['sha256']
    with pytest.raises(StoreError, match='does not match its recorded sha256.*left as it was'):
        _disks.apply_restore_plan(plan, lab['env'])
    assert sha256(lab['disk']) == before
    assert [n for n in os.listdir(os.path.dirname(lab['disk'])) if n != 'g1.img'] == []  # no temp file left


def test_next_run_unpauses_a_domain_a_dead_run_left_paused_for_its_disks(lab):
    store = lab['store']
    dead = store.begin('g1')
    dead.write_intent({'vm': 'g1', 'uuid': 'u-1', 'original_kb': 262144, 'pauses': True})
    xl = Xl()
    ckpt = Checkpointer(xl, None, store, options(), disk_env=lab['env'])
    paused = dict(lab['dom'], state='--p---')
    assert ckpt.converge(paused) == {'interrupted_runs': 1, 'unpaused': True}
    assert ('unpause', 'g1') in xl.calls
    xl = Xl()  # a domain paused by its operator, without such an intent, is left alone
    store.remove_partials('g1')
    store.begin('g1').write_intent({'vm': 'g1', 'uuid': 'u-1', 'original_kb': 262144, 'pauses': False})
    assert Checkpointer(xl, None, store, options(), disk_env=lab['env']).converge(paused) == {'interrupted_runs': 1}
    assert ('unpause', 'g1') not in xl.calls


def test_check_mode_disk_plan_has_the_shape_of_a_real_result(lab):
    ckpt = Checkpointer(Xl(), None, lab['store'], options(), disk_env=lab['env'])
    [planned] = [planned_disk(p) for p in ckpt.plan_disks(lab['dom'], lab['store'].root)]
    real = run(lab, Xl())['disks'][0]
    assert set(planned) == set(real) and planned['strategy'] == real['strategy'] == 'copy'
    assert planned['allocated_bytes'] is None and planned['memory_only'] is False


def test_lvm_snapshot_size_reaches_the_snapshot_it_sizes(lab):
    """lvm_snapshot_size is the COW size of the snapshots taken, not only of the free-space check (the lab's disk
    study found its snapshots at the 64 MiB default while 128 MiB was asked)."""
    ckpt = Checkpointer(Xl(), None, lab['store'], options(lvm_snapshot_size=96 << 20), disk_env=lab['env'])
    impl = _disks.strategy('lvm', lab['env'], **ckpt._disk_options()['lvm'])
    origin = {'lv_size': 256 << 20, 'vg_extent_size': 4 << 20}
    assert _disks.snapshot_size(origin, impl.size) == 96 << 20
    default = Checkpointer(Xl(), None, lab['store'], options(), disk_env=lab['env'])
    impl = _disks.strategy('lvm', lab['env'], **default._disk_options()['lvm'])
    assert _disks.snapshot_size(origin, impl.size) == 64 << 20  # 20 % of 256 MiB is below the 64 MiB floor
