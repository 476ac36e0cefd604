# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _store
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, LockBusy, StoreError
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import (
    MARKER, CheckpointStore, id_time, new_checkpoint_id, plan_retention, validate_checkpoint_id, validate_vm_name,
    write_json_atomic)


@pytest.fixture
def store(tmp_path):
    s = CheckpointStore(str(tmp_path / 'store'))
    assert s.init() is True
    assert s.init() is False
    return s


def make_checkpoint(store, vm='web', data=b'image-bytes', now=None, compression='none'):
    pending = store.begin(vm, compression=compression, now=now)
    with open(pending.image_path, 'wb') as handle:
        handle.write(data)
    manifest = {'vm': {'name': vm}, 'image': {'file': pending.image_name, 'size_bytes': len(data),
                                              'sha256': hashlib.sha256(data).hexdigest()}}
    pending.commit(manifest)
    return pending


@pytest.mark.parametrize('name', ['', '.', '..', '../x', 'a/b', '/abs', 'x\x00y', 'a' * 65, '-rf', 'sp ace',
                                  'semi;colon', '..hidden', 'é', None, 5])
def test_bad_vm_names(name):
    with pytest.raises(InvalidInput):
        validate_vm_name(name)


@pytest.mark.parametrize('name', ['web', 'web-1', 'db_2.prod', 'A+B', 'a' * 64])
def test_good_vm_names(name):
    assert validate_vm_name(name) == name


@pytest.mark.parametrize('bad', ['x', '20261125T134501.000Z-XYZ', '../20261125T134501.000Z-1a2b3c4d',
                                 '20261125T134501.000Z-1a2b3c4d/..', '20261125T134501Z-1a2b3c4d'])
def test_bad_checkpoint_ids(bad):
    with pytest.raises(InvalidInput):
        validate_checkpoint_id(bad)


def test_ids_encode_utc_time():
    ckpt_id = new_checkpoint_id(now=1764078301.25)
    assert ckpt_id.startswith('20251125T134501.250Z-') and id_time(ckpt_id) == 1764078301.25
    later = new_checkpoint_id(now=1764078301.251)
    assert sorted([later, ckpt_id]) == [ckpt_id, later]


def test_store_path_must_be_absolute():
    with pytest.raises(InvalidInput):
        CheckpointStore('relative/store')


def test_check_detects_missing_marker_and_read_only(tmp_path):
    unmounted = tmp_path / 'mnt'
    unmounted.mkdir()
    with pytest.raises(StoreError, match='marker: is the shared store mounted'):
        CheckpointStore(str(unmounted)).check()
    with pytest.raises(StoreError, match='does not exist'):
        CheckpointStore(str(tmp_path / 'none')).check()
    assert CheckpointStore(str(unmounted), require_marker=False).check()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_commit_is_atomic_and_private(store):
    pending = store.begin('web')
    with open(pending.image_path, 'wb') as handle:
        handle.write(b'x' * 10)
    # while being written: invisible
    assert store.list('web') == []
    assert store.partials('web') == [os.path.basename(pending.partial_dir)]
    image = {'file': 'image.xl', 'size_bytes': 10, 'sha256': hashlib.sha256(b'x' * 10).hexdigest()}
    pending.commit({'vm': {'name': 'web'}, 'image': image})
    [entry] = store.list('web', verify_checksum=True)
    assert entry['valid'] and entry['checksum_verified'] and entry['id'] == pending.id
    assert entry['manifest']['state'] == 'complete' and entry['manifest']['schema_version'] == 1
    assert store.partials('web') == []
    assert mode(pending.final_dir) == 0o700 and mode(store.vm_dir('web')) == 0o700
    assert mode(os.path.join(pending.final_dir, 'image.xl')) == 0o600
    assert mode(os.path.join(pending.final_dir, 'manifest.json')) == 0o600


def test_abort_leaves_nothing(store):
    pending = store.begin('web')
    pending.abort()
    assert store.partials('web') == [] and store.list('web') == []


def test_partials_are_never_listed_and_are_cleaned_under_lock(store):
    make_checkpoint(store)
    store.begin('web')  # an interrupted run
    assert [e['valid'] for e in store.list('web')] == [True]
    with store.lock('web'):
        assert len(store.remove_partials('web')) == 1
    assert store.partials('web') == []


@pytest.mark.parametrize('corrupt,problem', [
    (lambda d: open(os.path.join(d, 'image.xl'), 'ab').write(b'more'), 'size'),
    (lambda d: open(os.path.join(d, 'image.xl'), 'r+b').write(b'X'), 'sha256'),
    (lambda d: os.unlink(os.path.join(d, 'image.xl')), 'missing'),
    (lambda d: open(os.path.join(d, 'manifest.json'), 'w').write('{trunc'), 'manifest unreadable'),
    (lambda d: open(os.path.join(d, 'manifest.json'), 'w').write('[1]'), 'not a JSON object'),
])
def test_corruption_is_reported(store, corrupt, problem):
    pending = make_checkpoint(store)
    corrupt(pending.final_dir)
    [entry] = store.list('web', verify_checksum=True)
    assert not entry['valid'] and any(problem in p for p in entry['problems'])
    assert store.latest_valid('web') is None


def test_manifest_edits_are_caught(store):
    pending = make_checkpoint(store)
    path = os.path.join(pending.final_dir, 'manifest.json')
    for key, value, problem in [('state', 'writing', 'not complete'), ('schema_version', 99, 'schema_version'),
                                ('id', 'other', 'another checkpoint')]:
        with open(path) as handle:
            manifest = json.load(handle)
        good = manifest[key]
        manifest[key] = value
        write_json_atomic(path, manifest)
        [entry] = store.list('web')
        assert not entry['valid'] and any(problem in p for p in entry['problems']), key
        manifest[key] = good
        write_json_atomic(path, manifest)
    manifest['image']['file'] = '../../etc/passwd'
    write_json_atomic(path, manifest)
    assert 'not allowed' in store.list('web')[0]['problems'][0]


def test_latest_valid_skips_corrupt_newer(store):
    old = make_checkpoint(store, now=1000)
    new = make_checkpoint(store, now=2000)
    with open(new.final_dir + '/image.xl', 'r+b') as handle:
        handle.write(b'Z')
    assert store.latest_valid('web')['id'] == old.id
    assert [e['id'] for e in store.list('web')] == [new.id, old.id]


def test_delete(store):
    pending = make_checkpoint(store)
    assert store.delete('web', pending.id) is True
    assert store.delete('web', pending.id) is False
    assert store.list('web') == []


def test_vms_ignores_marker_and_junk(store):
    make_checkpoint(store, vm='b')
    make_checkpoint(store, vm='a')
    open(os.path.join(store.root, 'stray-file'), 'w').close()
    assert store.vms() == ['a', 'b']
    assert os.path.isfile(os.path.join(store.root, MARKER)) and store.marker()['schema_version'] == 1


def test_write_json_atomic_leaves_no_temp_on_failure(tmp_path):
    target = tmp_path / 'm.json'
    with pytest.raises(TypeError):
        write_json_atomic(str(target), {'bad': object()})
    assert os.listdir(tmp_path) == []


def entries(*specs):
    return [{'id': new_checkpoint_id(now=t), 'valid': v} for t, v in specs]


DAY = 86400


def test_retention_keep_last():
    e = entries((50 * DAY, True), (40 * DAY, True), (30 * DAY, True))
    assert plan_retention(e, keep_last=2) == [e[2]['id']]
    assert plan_retention(e) == []


def test_retention_max_age_never_drops_only_valid():
    now = 100 * DAY
    e = entries((10 * DAY, False), (5 * DAY, True), (4 * DAY, True))
    assert plan_retention(e, max_age_days=30, now=now) == [e[0]['id'], e[2]['id']]
    # everything is old and the newest valid one is protected unless asked
    e = entries((10 * DAY, True), (5 * DAY, True))
    assert plan_retention(e, max_age_days=30, now=now) == [e[1]['id']]
    assert plan_retention(e, max_age_days=30, now=now, keep_one_valid=False) == [e[0]['id'], e[1]['id']]


def test_retention_keeps_newest_valid_even_beyond_keep_last():
    e = entries((9 * DAY, False), (8 * DAY, False), (7 * DAY, True))
    assert plan_retention(e, keep_last=1) == [e[1]['id']]


@pytest.mark.parametrize('kwargs', [{'keep_last': 0}, {'keep_last': '3'}, {'keep_last': True}, {'max_age_days': 0},
                                    {'max_age_days': -1}])
def test_retention_bad_args(kwargs):
    with pytest.raises(InvalidInput):
        plan_retention([], **kwargs)


LOCK_HOLDER = textwrap.dedent('''
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    os.write(fd, b'host=other pid=%d' % os.getpid())
    print('locked', flush=True)
    sys.stdin.readline()
''')


def test_lock_excludes_other_processes_and_frees_on_death(store):
    path = os.path.join(store.ensure_vm_dir('web'), '.lock')
    holder = subprocess.Popen([sys.executable, '-c', LOCK_HOLDER, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b'locked\n'
        with pytest.raises(LockBusy, match='another fleetckpt run holds .*host=other'):
            store.lock('web', timeout=0.3).acquire()
    finally:
        holder.kill()  # a dead holder's lock is released by the kernel (and by the NFS server)
        holder.wait()
    with store.lock('web', timeout=2):
        with open(path) as handle:
            assert 'pid=%d' % os.getpid() in handle.read()


def test_store_errors_are_clear(store, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(_store.os, 'mkdir', full)
    with pytest.raises(StoreError, match='store is full'):
        store.begin('new-vm')


def test_placement_roundtrip_and_overwrite(store):
    assert store.placement('web') is None
    ckpt_id = new_checkpoint_id()
    rec = store.record_placement('web', 'xen1', 'checkpointed', ckpt_id)
    assert store.placement('web') == rec and rec['checkpoint'] == ckpt_id and rec['at'].endswith('Z')
    rec2 = store.record_placement('web', 'xen2', 'restored', ckpt_id)
    assert store.placement('web') == rec2 and rec2['host'] == 'xen2'
    assert store.record_placement('web', 'xen2', 'stopped')['checkpoint'] is None


@pytest.mark.parametrize('host,event,ckpt,exc', [
    ('', 'restored', None, InvalidInput), ('a b', 'restored', None, InvalidInput), ('x/y', 'restored', None, InvalidInput),
    ('h' * 256, 'restored', None, InvalidInput), (5, 'restored', None, InvalidInput), ('xen1', 'moved', None, InvalidInput),
    ('xen1', 'restored', '../x', InvalidInput),
])
def test_record_placement_refuses_bad_records(store, host, event, ckpt, exc):
    with pytest.raises(exc):
        store.record_placement('web', host, event, ckpt)
    assert store.placement('web') is None


@pytest.mark.parametrize('content', [
    'not json', '[]', '{}', json.dumps({'vm': 'other', 'host': 'xen1', 'event': 'restored', 'checkpoint': None, 'at': 'x'}),
    json.dumps({'vm': 'web', 'host': 'xen1', 'event': 'restored', 'checkpoint': None, 'at': 'x', 'extra': 1}),
    json.dumps({'vm': 'web', 'host': 'xen1', 'event': 'teleported', 'checkpoint': None, 'at': 'x'}),
    json.dumps({'vm': 'web', 'host': 'xen 1', 'event': 'restored', 'checkpoint': None, 'at': 'x'}),
    json.dumps({'vm': 'web', 'host': 'xen1', 'event': 'restored', 'checkpoint': 'nope', 'at': 'x'}),
    json.dumps({'vm': 'web', 'host': 'xen1', 'event': 'restored', 'checkpoint': None, 'at': 'x' * 65}),
    '{"vm": "web", ' + '"pad": "' + 'x' * 5000 + '"}',
])
def test_untrusted_placement_files_read_as_none(store, content):
    store.ensure_vm_dir('web')
    with open(os.path.join(store.vm_dir('web'), _store.PLACEMENT), 'w') as handle:
        handle.write(content)
    assert store.placement('web') is None


def test_commit_leaves_the_intent_out_of_the_checkpoint(store):
    pending = store.begin('web')
    pending.write_intent({'vm': 'web', 'original_kb': 1024})
    assert store.interrupted('web') == [{'vm': 'web', 'original_kb': 1024}]
    with open(pending.image_path, 'wb') as handle:
        handle.write(b'img')
    image = {'file': pending.image_name, 'size_bytes': 3, 'sha256': hashlib.sha256(b'img').hexdigest()}
    path = pending.commit({'vm': {'name': 'web'}, 'image': image})
    assert sorted(os.listdir(path)) == ['image.xl', 'manifest.json']
    assert store.interrupted('web') == [] and store.inspect('web', pending.id)['valid']
