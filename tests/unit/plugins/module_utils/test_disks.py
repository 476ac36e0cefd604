# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Disk strategies for consistent checkpoints (issue #8): real sparse files in tmp_path, fakes for the rest."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _disks as d
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import (
    FleetckptError, InvalidInput, PolicyRefused, StoreError)
from ansible_collections.fleetckpt.xen.plugins.module_utils._xlimage import read_config

HEADER = os.path.join(os.path.dirname(__file__), 'data', 'xl-header-4.20.bin')  # g3, saved on the lab
CKPT_ID = '20261125T134501.123Z-1a2b3c4d'
MIB = 1024 * 1024


def lvm_report(rows, section='lv', std=False, before=''):
    """Text exactly as LVM 2.03 prints ``--reportformat json``: two-space indent, one object per row on one
    line, keys in ``-o`` order, ``"key":"value"`` pairs joined by ``", "`` (json_std: numbers and null unquoted,
    then a ``log`` section)."""
    def value(v):
        return json.dumps(v) if std else '"%s"' % v
    lines = ['{%s}' % ', '.join('"%s":%s' % (k, value(v)) for k, v in row) for row in rows]
    body = (',\n' + ' ' * 18).join(lines)
    tail = '\n      ,\n      "log": [\n      ]\n' if std else '\n'
    return (before + '  {\n      "report": [\n          {\n              "%s": [\n                  %s\n'
            '              ]\n          }\n      ]%s  }\n' % (section, body, tail))


def lv_row(name, size, attr, major, minor, origin='', pool='', pct='', tags='', vg_free=1069547520, path=True):
    return [('lv_name', name), ('vg_name', 'vg0'), ('lv_path', '/dev/vg0/%s' % name if path else ''),
            ('lv_dm_path', '/dev/mapper/vg0-%s' % name.replace('-', '--')), ('lv_size', str(size)), ('lv_attr', attr),
            ('origin', origin), ('pool_lv', pool), ('data_percent', pct), ('vg_free', str(vg_free)),
            ('vg_extent_size', '4194304'), ('lv_kernel_major', str(major)), ('lv_kernel_minor', str(minor)),
            ('lv_uuid', 'p3Xr1T-0aQm-V3pL-2c9d-Hn1K-sb8Y-%06d' % minor), ('lv_tags', tags)]


# `lvs --reportformat json --units b --nosuffix -o <LVS_FIELDS>`: a VG vg0 with an LV g3 in use (open, origin of
# a snapshot), an old snapshot of g3 that overflowed ('I' in the 5th attr), a thin pool, a thin LV g4 and an
# inactive LV. g3 is dm-0 (253:0), the thin LV dm-3 (253:3).
LVS_SAMPLE = lvm_report([
    lv_row('g3', 2147483648, 'owi-aos---', 253, 0),
    lv_row('old', 436207616, 'swi-I-s---', 253, 1, origin='g3', pct='100.00', tags='fleetckpt,fleetckpt-vm-g3'),
    lv_row('pool', 4294967296, 'twi-aotz--', 253, 2, pct='12.41', path=False),
    lv_row('g4', 2147483648, 'Vwi-aotz--', 253, 3, pool='pool', pct='24.80'),
    lv_row('swap', 536870912, '-wi-------', -1, -1),
])
# The new snapshot as `lvs ... vg0/fc-<id>-xvda` shows it right after lvcreate.
LVS_NEW_SNAP = lvm_report([lv_row('fc-%s-xvda' % CKPT_ID, 432013312, 'swi-a-s---', 253, 5, origin='g3', pct='0.01',
                                  tags='fleetckpt,fleetckpt-vm-g3,fleetckpt-id-%s' % CKPT_ID, vg_free=637534208)])
# RHEL's documented `lvs --reportformat json` (default fields and units): "6.67g" is not a byte count.
LVS_DEFAULT_UNITS = lvm_report([[('lv_name', 'root'), ('vg_name', 'rhel_host-075'), ('lv_attr', '-wi-ao----'),
                                 ('lv_size', '6.67g'), ('pool_lv', ''), ('origin', ''), ('data_percent', ''),
                                 ('metadata_percent', ''), ('move_pv', ''), ('mirror_log', ''), ('copy_percent', ''),
                                 ('convert_lv', '')]])
# --reportformat json_std after a warning line: numbers and null, and a log section
LVS_JSON_STD = lvm_report([[('lv_name', 'g3'), ('vg_name', 'vg0'), ('lv_size', 2147483648), ('lv_attr', '-wi-ao----'),
                            ('data_percent', None), ('lv_kernel_major', 253), ('lv_kernel_minor', 0), ('lv_tags', '')]],
                          std=True, before='  WARNING: Not using device /dev/sdc for PV 3fd2ab.\n')


class FakeRunner:
    def __init__(self, replies=None):
        self.calls = []
        self.replies = list(replies or [])

    def run(self, argv, timeout):
        self.calls.append(list(argv))
        for index, (match, reply) in enumerate(self.replies):
            if match(argv):
                if reply[0] == 'once':
                    del self.replies[index]
                    reply = reply[1:]
                return reply
        return (0, '', '')


def clone_ioctl(fd, request, arg, *rest):
    """FICLONE that works (a data copy: what a reflink-capable filesystem would expose)."""
    if request == d.FICLONE:
        os.lseek(arg, 0, os.SEEK_SET)
        while True:
            data = os.read(arg, MIB)
            if not data:
                break
            os.write(fd, data)
        return 0
    raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))


def refusing_ioctl(code):
    def ioctl(fd, request, arg, *rest):
        raise OSError(code, os.strerror(code))
    return ioctl


class FakeEnv(d.DiskEnv):
    """DiskEnv with faked stats (block devices without root), free space and no real commands."""

    def __init__(self, tmp_path, stats=None, free=None, **kw):
        kw.setdefault('runner', FakeRunner())
        kw.setdefault('ioctl', refusing_ioctl(errno.EOPNOTSUPP))
        kw.setdefault('host', 'xen1')
        kw.setdefault('sysfs', str(tmp_path / 'sys'))
        kw.setdefault('which', lambda name: '/usr/sbin/' + name)
        kw.setdefault('qemu_candidates', ())
        super().__init__(**kw)
        self.stats = stats or {}
        self.free = free

    def stat(self, path):
        if path in self.stats:
            return self.stats[path]
        return os.stat(path)

    fresh_stat = stat

    def statvfs(self, path):
        real = os.statvfs(path)
        if self.free is None:
            return real
        return os.statvfs_result((real.f_bsize, 1, 0, 0, self.free, 0, 0, 0, 0, 255))


def _stat(mode, size, rdev, ino, dev, mtime_ns, ctime_ns):
    class St:
        pass
    st = St()
    st.st_mode, st.st_size, st.st_rdev, st.st_ino, st.st_dev = mode, size, rdev, ino, dev
    st.st_mtime_ns, st.st_ctime_ns, st.st_blocks = mtime_ns, ctime_ns, 0
    return st


def make_sparse(path, size, extents):
    """A sparse file: ``extents`` [(offset, bytes)] written into a file of ``size``."""
    with open(path, 'wb') as handle:
        handle.truncate(size)
        for offset, data in extents:
            handle.seek(offset)
            handle.write(data)
    with open(path, 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def holes_supported(path):
    return os.stat(path).st_blocks * 512 < os.stat(path).st_size


def disk(target, vdev='xvda', kind='file', fmt='raw', readwrite=True, cdrom=False, backend=None):
    return {'target': target, 'vdev': vdev, 'format': fmt, 'kind': kind, 'readwrite': readwrite, 'is_cdrom': cdrom,
            'backend': backend or ('qdisk' if fmt in ('qcow2', 'vhd') else 'phy'), 'script': None}


def dest(tmp_path, host='xen1'):
    path = tmp_path / 'store' / 'g3' / ('.%s.partial' % CKPT_ID)
    path.mkdir(parents=True, exist_ok=True)
    return {'dir': str(path), 'vm': 'g3', 'id': CKPT_ID, 'host': host}


# ------------------------------------------------------------------------------------------------------------
# disk_specs
# ------------------------------------------------------------------------------------------------------------
def test_disk_specs_from_a_real_image_header():
    specs = d.disk_specs(read_config(HEADER), stat=lambda p: (x for x in ()).throw(FileNotFoundError(p)))
    assert specs == [{'target': '/srv/fleetckpt/lab/disks/g3.img', 'vdev': 'xvda', 'format': 'raw', 'backend': 'phy',
                      'backend_configured': 'unknown', 'readwrite': True, 'is_cdrom': False, 'script': None,
                      'kind': 'missing'}]


def test_disk_specs_kinds_and_backends(tmp_path):
    img = tmp_path / 'g.img'
    img.write_bytes(b'x')
    config = {'c_info': {}, 'disks': [
        {'pdev_path': str(img), 'vdev': 'xvda', 'format': 'raw', 'readwrite': 1},
        {'pdev_path': '/dev/vg0/g3', 'vdev': 'xvdb', 'format': 'raw', 'readwrite': 1, 'backend': 'phy'},
        {'pdev_path': '/srv/img/g.qcow2', 'vdev': 'xvdc', 'format': 'qcow2', 'readwrite': 1},
        {'pdev_path': '/srv/iso/tools.iso', 'vdev': 'xvdd', 'is_cdrom': 1},
        {'vdev': 'xvde', 'is_cdrom': 1, 'format': 'empty'},
        {'pdev_path': 'iqn.2026-01.lab:g3', 'vdev': 'xvdf', 'readwrite': 1, 'script': 'block-iscsi'},
    ]}
    stats = {'/dev/vg0/g3': _stat(stat.S_IFBLK | 0o660, 0, os.makedev(253, 0), 9, 5, 1, 1)}
    specs = {s['vdev']: s for s in d.disk_specs(config, stat=lambda p: stats[p] if p in stats else os.stat(p))}
    assert specs['xvda']['kind'] == 'file' and specs['xvda']['backend'] == 'phy'
    assert specs['xvdb']['kind'] == 'block' and specs['xvdb']['backend_configured'] == 'phy'
    assert specs['xvdc']['backend'] == 'qdisk' and specs['xvdc']['kind'] == 'missing'
    assert specs['xvdd']['is_cdrom'] and not specs['xvdd']['readwrite'] and not d.needs_snapshot(specs['xvdd'])
    assert specs['xvde']['kind'] == 'empty' and specs['xvde']['target'] is None
    assert specs['xvdf']['kind'] == 'script'
    assert d.needs_snapshot(specs['xvda']) and d.needs_snapshot(specs['xvdb'])


@pytest.mark.parametrize('disks, message', [
    ([{'pdev_path': '/a', 'vdev': '../x'}], 'unusable vdev'),
    ([{'pdev_path': '/a', 'vdev': 'xvda'}, {'pdev_path': '/b', 'vdev': 'xvda'}], 'twice'),
    ([{'pdev_path': '/a\x00b', 'vdev': 'xvda'}], 'unusable target'),
    (['xvda'], 'not an object'),
])
def test_disk_specs_rejects_bad_configs(disks, message):
    with pytest.raises(InvalidInput, match=message):
        d.disk_specs({'c_info': {}, 'disks': disks})


# ------------------------------------------------------------------------------------------------------------
# sparse copy
# ------------------------------------------------------------------------------------------------------------
def test_sparse_copy_keeps_holes_and_hashes_the_logical_content(tmp_path):
    src = str(tmp_path / 'src.img')
    size = 64 * MIB
    extents = [(0, os.urandom(4096)), (5 * MIB + 4096, os.urandom(3 * MIB + 123)), (40 * MIB, os.urandom(65536))]
    want = make_sparse(src, size, extents)
    if not holes_supported(src):
        pytest.skip('tmp_path does not keep holes')
    dst = str(tmp_path / 'dst.img')
    res = d.sparse_copy(src, dst)
    assert res['sha256'] == want == hashlib.sha256(open(dst, 'rb').read()).hexdigest()
    assert res['size'] == os.stat(dst).st_size == size
    data = sum(len(b) for dummy, b in extents)
    assert res['bytes_read'] < 2 * data and res['bytes_written'] <= res['bytes_read']
    assert os.stat(dst).st_blocks * 512 <= os.stat(src).st_blocks * 512 + 64 * 1024
    assert os.stat(dst).st_blocks * 512 < size // 8  # holes stayed holes
    assert res['hole_detection'].startswith('seek') and res['data_extents'] >= 3
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o600
    assert not [n for n in os.listdir(tmp_path) if '.tmp-' in n]
    assert d.sha256_sparse(dst) == want


def test_sparse_copy_turns_zero_blocks_into_holes_without_seek_data(tmp_path, monkeypatch):
    """NFS 4.1 (the lab's store) and block devices report everything as data: zero blocks still become holes."""
    src = str(tmp_path / 'src.img')
    payload = os.urandom(8192)
    with open(src, 'wb') as handle:  # written zeros: allocated in the source
        handle.write(bytes(3 * MIB) + payload + bytes(MIB + 100))
    want = hashlib.sha256(open(src, 'rb').read()).hexdigest()
    monkeypatch.setattr(d, '_extents', lambda fd, size: ([(0, size, True)], 'none'))
    dst = str(tmp_path / 'dst.img')
    res = d.sparse_copy(src, dst)
    assert res['sha256'] == want and res['hole_detection'] == 'zero-blocks'
    assert res['bytes_read'] == os.stat(src).st_size and res['bytes_written'] == len(payload)
    assert open(dst, 'rb').read() == open(src, 'rb').read()
    if holes_supported(dst):
        assert os.stat(dst).st_blocks * 512 <= 64 * 1024


def test_zero_block_runs_cover_every_nonzero_byte_and_skip_every_zero_block():
    import random
    rnd = random.Random(8)
    zero = bytes(4096)
    for size in (1000, 4096 * 3 + 4095, 65536, 200000, MIB - 5000, MIB):
        for trial in range(40):
            buf = bytearray(size)
            for stroke in range(rnd.randrange(0, 8)):
                start = rnd.randrange(0, size)
                for i in range(start, min(size, start + rnd.choice([1, 4095, 4096, 5000, 70000])), rnd.choice([1, 999, 4096])):
                    buf[i] = rnd.randrange(1, 256)
            buf = bytes(buf)
            runs = d._runs(buf, size, 4096, zero)
            covered = set()
            for start, end in runs:
                covered.update(range(start // 4096, (end - 1) // 4096 + 1))
            nonzero = set(p // 4096 for p in range(0, size, 4096) if buf[p:p + 4096].strip(b'\0'))
            tail = {(size - 1) // 4096} if size % 4096 else set()
            assert covered >= nonzero and (covered - nonzero <= tail or zero not in buf), (size, trial)
            assert all(a < b for a, b in runs) and all(runs[i][1] < runs[i + 1][0] for i in range(len(runs) - 1))


def test_sparse_copy_of_empty_and_all_hole_files(tmp_path):
    empty = str(tmp_path / 'empty')
    open(empty, 'wb').close()
    assert d.sparse_copy(empty, str(tmp_path / 'e2'))['sha256'] == hashlib.sha256(b'').hexdigest()
    hole = str(tmp_path / 'hole')
    make_sparse(hole, 3 * MIB + 7, [])
    res = d.sparse_copy(hole, str(tmp_path / 'h2'))
    assert res['sha256'] == hashlib.sha256(bytes(3 * MIB + 7)).hexdigest() and res['bytes_written'] == 0
    assert os.stat(str(tmp_path / 'h2')).st_size == 3 * MIB + 7


def test_sparse_copy_in_place_writes_the_holes_as_zeros(tmp_path):
    src = str(tmp_path / 'src.img')
    want = make_sparse(src, 4 * MIB, [(MIB, b'A' * 5000)])
    target = str(tmp_path / 'device')
    with open(target, 'wb') as handle:
        handle.write(b'\xff' * 4 * MIB)
    d.sparse_copy(src, target, in_place=True)
    assert hashlib.sha256(open(target, 'rb').read()).hexdigest() == want


def test_sparse_copy_digest_off_and_deferred_in_finalize(tmp_path):
    src = str(tmp_path / 'g3.img')
    want = make_sparse(src, 2 * MIB, [(4096, b'z' * 10000)])
    target = dest(tmp_path)
    impl = d.CopyStrategy(FakeEnv(tmp_path), digest='deferred')
    record = impl.snapshot(disk(src), target)
    assert record['sha256'] is None
    impl.finalize(record, target)
    assert record['sha256'] == want and record['hash_seconds'] >= 0


def test_sparse_copy_error_leaves_no_temp_file(tmp_path, monkeypatch):
    src = str(tmp_path / 'src.img')
    make_sparse(src, MIB, [(0, b'x' * 4096)])

    def full(*args):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(d.os, 'pwrite', full)
    with pytest.raises(StoreError, match='no space left'):
        d.sparse_copy(src, str(tmp_path / 'dst.img'))
    assert sorted(os.listdir(tmp_path)) == ['src.img']
    with pytest.raises(StoreError, match='opening'):
        d.sparse_copy(str(tmp_path / 'missing'), str(tmp_path / 'dst.img'))


def test_copy_strategy_record_and_verify(tmp_path):
    src = str(tmp_path / 'g3.img')
    want = make_sparse(src, 8 * MIB, [(MIB, os.urandom(70000))])
    target = dest(tmp_path)
    env = FakeEnv(tmp_path)
    record = d.CopyStrategy(env).snapshot(disk(src), target)
    assert record['strategy'] == 'copy' and record['location'] == {'type': 'checkpoint', 'file': 'disk-xvda.img'}
    assert record['sha256'] == want and record['size_bytes'] == 8 * MIB and record['seconds'] >= 0
    assert record['target'] == src and record['vdev'] == 'xvda' and record['format'] == 'raw'
    assert json.loads(json.dumps(record)) == record  # manifest-ready
    assert d.CopyStrategy(env).verify(record, target['dir'], deep=True) == []
    with open(os.path.join(target['dir'], 'disk-xvda.img'), 'r+b') as handle:
        handle.seek(MIB)
        handle.write(b'corrupt')
    assert 'sha256' in d.CopyStrategy(env).verify(record, target['dir'], deep=True)[0]
    assert d.CopyStrategy(env).verify(record, target['dir']) == []  # size only
    d.CopyStrategy(env).cleanup(record, target['dir'])
    assert 'missing' in d.CopyStrategy(env).verify(record, target['dir'])[0]


# ------------------------------------------------------------------------------------------------------------
# reflink
# ------------------------------------------------------------------------------------------------------------
def test_reflink_real_ficlone_if_tmp_supports_it(tmp_path):
    reason = d.trial_reflink(str(tmp_path))
    if reason:
        pytest.skip('tmp_path cannot reflink: %s' % reason)
    src = str(tmp_path / 'g3.img')
    want = make_sparse(src, 16 * MIB, [(MIB, os.urandom(MIB))])
    res = d.reflink(src, str(tmp_path / 'clone.img'))
    assert res['size'] == 16 * MIB and hashlib.sha256(open(str(tmp_path / 'clone.img'), 'rb').read()).hexdigest() == want


@pytest.mark.parametrize('code, name', [(errno.EOPNOTSUPP, 'EOPNOTSUPP'), (errno.EXDEV, 'EXDEV'),
                                        (errno.EINVAL, 'EINVAL')])
def test_reflink_unsupported_is_refused_cleanly(tmp_path, code, name):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [(0, b'a' * 4096)])
    with pytest.raises(PolicyRefused, match=name):
        d.reflink(src, str(tmp_path / 'clone.img'), ioctl=refusing_ioctl(code))
    assert sorted(os.listdir(tmp_path)) == ['g3.img']


def test_reflink_other_errors_are_store_errors(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [(0, b'a' * 4096)])
    with pytest.raises(StoreError, match='no space'):
        d.reflink(src, str(tmp_path / 'clone.img'), ioctl=refusing_ioctl(errno.ENOSPC))


def test_trial_reflink_reports_the_reason_and_leaves_nothing(tmp_path):
    env = FakeEnv(tmp_path, ioctl=refusing_ioctl(errno.EOPNOTSUPP))
    reason = d.trial_reflink(str(tmp_path), env)
    assert 'EOPNOTSUPP' in reason
    assert os.listdir(tmp_path) == []
    assert d.trial_reflink(str(tmp_path), FakeEnv(tmp_path, ioctl=clone_ioctl)) is None
    assert os.listdir(tmp_path) == []


def test_reflink_strategy_beside_the_disk_then_cleanup(tmp_path):
    disks_dir = tmp_path / 'disks'
    disks_dir.mkdir()
    src = str(disks_dir / 'g3.img')
    want = make_sparse(src, 4 * MIB, [(MIB, b'q' * 9000)])
    target = dest(tmp_path)
    env = FakeEnv(tmp_path, ioctl=clone_ioctl,
                  stats={target['dir']: _stat(stat.S_IFDIR, 0, 0, 2, 99, 1, 1)})  # the store: another filesystem
    record = d.ReflinkStrategy(env).snapshot(disk(src), target)
    path = os.path.join(str(disks_dir), '.fleetckpt', 'g3', CKPT_ID, 'xvda.img')
    assert record['location'] == {'type': 'path', 'path': path, 'host': 'xen1'}
    assert hashlib.sha256(open(path, 'rb').read()).hexdigest() == want
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert d.validate_records([record], 'g3', CKPT_ID) == []
    assert d.ReflinkStrategy(env).verify(record) == []
    other = FakeEnv(tmp_path, host='xen2')
    os.rename(path, path + '.away')
    assert 'host xen1' in d.ReflinkStrategy(other).verify(record)[0]
    os.rename(path + '.away', path)
    usage = d.disks_usage([record], target['dir'], env)
    assert usage['outside_bytes'] > 0 and usage['in_checkpoint_bytes'] == 0 and usage['logical_bytes'] == 4 * MIB
    assert d.cleanup_disks([record], target['dir'], other)['errors']  # not from another host
    out = d.cleanup_disks([record], target['dir'], env, vm='g3', ckpt_id=CKPT_ID)
    assert out == {'removed': [path], 'errors': []}
    assert os.listdir(str(disks_dir / '.fleetckpt')) == []


def test_reflink_strategy_into_the_checkpoint_when_the_disk_shares_its_filesystem(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [(0, b'w' * 4096)])
    target = dest(tmp_path)
    record = d.ReflinkStrategy(FakeEnv(tmp_path, ioctl=clone_ioctl)).snapshot(disk(src), target)
    assert record['location'] == {'type': 'checkpoint', 'file': 'disk-xvda.img'}
    assert os.path.exists(os.path.join(target['dir'], 'disk-xvda.img'))


# ------------------------------------------------------------------------------------------------------------
# LVM
# ------------------------------------------------------------------------------------------------------------
def test_parse_lvs_json_sample():
    rows = d.parse_lvs_json(LVS_SAMPLE)
    assert [r['lv_name'] for r in rows] == ['g3', 'old', 'pool', 'g4', 'swap']
    g3 = rows[0]
    assert g3['lv_size'] == 2 << 30 and g3['vg_free'] == 1069547520 and g3['vg_extent_size'] == 4 * MIB
    assert (g3['lv_kernel_major'], g3['lv_kernel_minor']) == (253, 0) and g3['data_percent'] is None
    assert rows[1]['lv_tags'] == ['fleetckpt', 'fleetckpt-vm-g3'] and rows[1]['data_percent'] == 100.0
    assert rows[4]['lv_kernel_major'] is None  # inactive
    assert [d.lv_kind(r) for r in rows] == ['linear', 'snapshot', 'thin-pool', 'thin', 'linear']
    assert d.find_lv(rows, rdev=os.makedev(253, 3))['lv_name'] == 'g4'
    assert d.find_lv(rows, path='/dev/mapper/vg0-g3')['lv_name'] == 'g3'
    assert d.find_lv(rows, rdev=os.makedev(8, 1)) is None
    assert d.snapshot_state(rows[1]) and not d.snapshot_state(d.parse_lvs_json(LVS_NEW_SNAP)[0])


def test_parse_lvs_json_variants():
    std = d.parse_lvs_json(LVS_JSON_STD)
    assert std[0]['lv_size'] == 2 << 30 and std[0]['data_percent'] is None
    with pytest.raises(FleetckptError, match='units b'):
        d.parse_lvs_json(LVS_DEFAULT_UNITS)
    with pytest.raises(FleetckptError, match='no JSON'):
        d.parse_lvs_json('  Volume group "vg9" not found\n')
    assert d.parse_lvs_json('  {\n      "report": [\n          {\n              "lv": [\n              ]\n          }\n      ]\n  }\n') == []


def test_lvm_argv_builders():
    rows = d.parse_lvs_json(LVS_SAMPLE)
    g3, g4 = rows[0], rows[3]
    assert d.lvs_argv() == ['lvs', '--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', ','.join(d.LVS_FIELDS)]
    name = d.lvm_snapshot_name('xvda', CKPT_ID)
    assert name == 'fc-%s-xvda' % CKPT_ID and d._LVM_NAME.fullmatch(name)
    size = d.snapshot_size(g3)
    assert size == 432013312 and size % (4 * MIB) == 0  # 20 % of 2 GiB, rounded up to an extent
    assert d.snapshot_size(g3, 0.5) == 1 << 30 and d.snapshot_size(g3, 10 * MIB + 1) == 12 * MIB
    assert d.snapshot_size(g3, 1 << 40) == (2 << 30) + 4 * MIB
    with pytest.raises(InvalidInput):
        d.snapshot_size(g3, -1)
    assert d.lvcreate_argv(g3, name, size, tags=d.lvm_tags('g3', CKPT_ID)) == [
        'lvcreate', '--snapshot', '--name', name, '--size', '432013312b', '--addtag', 'fleetckpt',
        '--addtag', 'fleetckpt-vm-g3', '--addtag', 'fleetckpt-id-%s' % CKPT_ID, 'vg0/g3']
    assert d.lvcreate_argv(g4, name) == ['lvcreate', '--snapshot', '--name', name, '--setactivationskip', 'n', 'vg0/g4']
    assert d.lvremove_argv('vg0', name) == ['lvremove', '--force', 'vg0/' + name]
    assert d.lvconvert_merge_argv('vg0', name) == ['lvconvert', '--merge', 'vg0/' + name]
    with pytest.raises(InvalidInput):
        d.lvm_snapshot_name('xvda', 'x/../y')


def lvm_env(tmp_path, lvcreate_reply=(0, '  Logical volume "fc" created.\n', '')):
    runner = FakeRunner([
        (lambda a: a[0] == 'lvs' and a[-1].startswith('vg0/fc-'), (0, LVS_NEW_SNAP, '')),
        (lambda a: a[0] == 'lvs', (0, LVS_SAMPLE, '')),
        (lambda a: a[0] == 'lvcreate', lvcreate_reply),
    ])
    stats = {'/dev/vg0/g3': _stat(stat.S_IFBLK | 0o660, 0, os.makedev(253, 0), 9, 5, 1, 1),
             '/dev/sdb': _stat(stat.S_IFBLK | 0o660, 0, os.makedev(8, 16), 10, 5, 1, 1)}
    return FakeEnv(tmp_path, runner=runner, stats=stats), runner


def test_lvm_snapshot_with_a_fake_runner(tmp_path):
    env, runner = lvm_env(tmp_path)
    target = dest(tmp_path)
    record = d.LvmStrategy(env).snapshot(disk('/dev/vg0/g3', kind='block'), target)
    name = 'fc-%s-xvda' % CKPT_ID
    assert runner.calls[1] == ['lvcreate', '--snapshot', '--name', name, '--size', '432013312b', '--addtag', 'fleetckpt',
                               '--addtag', 'fleetckpt-vm-g3', '--addtag', 'fleetckpt-id-' + CKPT_ID, 'vg0/g3']
    assert record['location'] == {'type': 'lv', 'vg': 'vg0', 'lv': name, 'path': '/dev/vg0/' + name, 'host': 'xen1',
                                  'thin': False, 'origin': 'g3'}
    assert record['size_bytes'] == 2 << 30 and record['allocated_bytes'] == 432013312
    assert d.validate_records([record], 'g3', CKPT_ID) == []
    assert d.LvmStrategy(env).verify(record) == []
    assert d.snapshot_path(record) == '/dev/vg0/' + name
    assert d.disks_usage([record], target['dir'], env)['outside_bytes'] == 432013312
    assert d.cleanup_disks([record], target['dir'], env, vm='g3', ckpt_id=CKPT_ID)['removed'] == ['vg0/' + name]
    assert runner.calls[-1] == ['lvremove', '--force', 'vg0/' + name]


def test_lvm_verify_finds_overflowed_and_missing_snapshots(tmp_path):
    env, runner = lvm_env(tmp_path)
    record = d.LvmStrategy(env).snapshot(disk('/dev/vg0/g3', kind='block'), dest(tmp_path))
    runner.replies.insert(0, (lambda a: a[0] == 'lvs', (0, LVS_NEW_SNAP.replace('swi-a-s---', 'swi-I-s---'), '')))
    assert 'invalid' in d.LvmStrategy(env).verify(record)[0]
    runner.replies.insert(0, (lambda a: a[0] == 'lvs', (5, '', '  Failed to find logical volume "vg0/%s"\n' % record['location']['lv'])))
    assert 'gone' in d.LvmStrategy(env).verify(record)[0]
    assert 'on host xen1' in d.LvmStrategy(FakeEnv(tmp_path, host='xen2')).verify(record)[0]


def test_lvm_snapshot_failure_says_why(tmp_path):
    reply = (5, '', '  Volume group "vg0" has insufficient free space (12 extents): 103 required.\n')
    env = lvm_env(tmp_path, lvcreate_reply=reply)[0]
    with pytest.raises(StoreError, match='insufficient free space'):
        d.LvmStrategy(env).snapshot(disk('/dev/vg0/g3', kind='block'), dest(tmp_path))


def test_lvm_checks_before_pausing(tmp_path):
    env = lvm_env(tmp_path)[0]
    g3 = disk('/dev/vg0/g3', kind='block')
    facts = d.probe(g3, env)
    assert facts['lv']['lv_name'] == 'g3' and facts['kind'] == 'block'
    assert d.check_strategy('lvm', g3, facts, dest(tmp_path), env) == []
    assert 'has 1020 MiB free' in d.check_strategy('lvm', g3, facts, dest(tmp_path), env, lvm_size=0.9)[0]
    sdb = disk('/dev/sdb', vdev='xvdb', kind='block')
    assert 'not an LVM logical volume' in d.check_strategy('lvm', sdb, d.probe(sdb, env), None, env)[0]
    nolvm = FakeEnv(tmp_path, stats=env.stats, which=lambda name: None)
    assert 'not installed' in d.check_strategy('lvm', g3, d.probe(g3, nolvm), None, nolvm)[0]
    snap = dict(facts, lv=d.parse_lvs_json(LVS_SAMPLE)[1])
    assert 'snapshot LV' in d.check_strategy('lvm', g3, snap, None, env)[0]


# ------------------------------------------------------------------------------------------------------------
# none: identity and changed_since
# ------------------------------------------------------------------------------------------------------------
def test_none_identity_and_changed_since(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, 2 * MIB, [(0, b'a' * 4096)])
    env = FakeEnv(tmp_path)
    record = d.NoneStrategy(env, hash_max_bytes=4 * MIB).snapshot(disk(src), dest(tmp_path))
    ident = record['identity']
    assert record['strategy'] == 'none' and record['location'] == {'type': 'origin'}
    assert ident['st_ino'] == os.stat(src).st_ino and ident['size'] == 2 * MIB and ident['sha256']
    assert d.changed_since(record, env) == [] and d.changed_since(record, env, deep=True) == []
    assert d.NoneStrategy(env).verify(record) == []
    assert d.changed_since(ident, env) == []  # a bare identity carries its path
    st = os.stat(src)
    with open(src, 'r+b') as handle:  # a write, then the mtime put back: ctime still tells
        handle.write(b'b')
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    reasons = d.changed_since(record, env)
    assert reasons and ('ctime' in reasons[0] or 'mtime' in reasons[0])
    assert 'changed since the checkpoint' in d.NoneStrategy(env).verify(record)[0]


def test_changed_since_replaced_resized_gone(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [])
    env = FakeEnv(tmp_path)
    record = d.NoneStrategy(env).snapshot(disk(src), dest(tmp_path))
    shutil.copy(src, src + '.new')
    with open(src + '.new', 'ab') as handle:
        handle.write(b'x')
    os.rename(src + '.new', src)
    reasons = ' '.join(d.changed_since(record, env))
    assert 'replaced' in reasons and 'size' in reasons
    os.unlink(src)
    assert 'gone' in d.changed_since(record, env)[0]


def test_changed_since_ignores_st_dev_on_another_host_but_not_content(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [(0, b'k' * 100)])
    record = d.NoneStrategy(FakeEnv(tmp_path), hash_max_bytes=MIB).snapshot(disk(src), dest(tmp_path))
    record['identity']['st_dev'] += 1  # NFS: another client numbers the mount differently
    assert d.changed_since(record, FakeEnv(tmp_path, host='xen2')) == []
    assert 'another filesystem' in d.changed_since(record, FakeEnv(tmp_path))[0]
    record['identity']['st_dev'] -= 1
    record['identity']['sha256'] = '0' * 64
    assert 'content differs' in d.changed_since(record, FakeEnv(tmp_path), deep=True)[0]


def test_block_device_identity_cannot_prove_unchanged(tmp_path):
    sysfs = tmp_path / 'sys' / 'dev' / 'block' / '253:0'
    sysfs.mkdir(parents=True)
    (sysfs / 'size').write_text('4194304\n')
    env = FakeEnv(tmp_path, stats={'/dev/vg0/g3': _stat(stat.S_IFBLK | 0o660, 0, os.makedev(253, 0), 9, 5, 1, 1)})
    record = d.NoneStrategy(env).snapshot(disk('/dev/vg0/g3', kind='block'), dest(tmp_path))
    assert record['identity']['size'] == 2 << 30 and record['identity']['st_rdev'] == os.makedev(253, 0)
    assert 'cannot be shown unchanged' in d.changed_since(record, env)[0]


# ------------------------------------------------------------------------------------------------------------
# qcow2
# ------------------------------------------------------------------------------------------------------------
def qcow_header(size=2 << 30, backing=False, snapshots=0):
    import struct
    head = d.QCOW_MAGIC + struct.pack('>IQI', 3, 0x200 if backing else 0, 9 if backing else 0)
    head += struct.pack('>I', 16) + struct.pack('>Q', size) + bytes(28) + struct.pack('>I', snapshots)
    return head + bytes(512 - len(head))


def test_parse_qcow_header():
    info = d.parse_qcow_header(qcow_header(backing=True, snapshots=2))
    assert info == {'version': 3, 'virtual_size': 2 << 30, 'has_backing_file': True, 'snapshots': 2}
    assert d.parse_qcow_header(b'\0' * 512) is None


def test_parse_qcow_header_of_a_real_qemu_img_file(tmp_path):
    qemu_img = shutil.which('qemu-img')
    if not qemu_img:
        pytest.skip('qemu-img not installed')
    path = str(tmp_path / 'g.qcow2')
    subprocess.run([qemu_img, 'create', '-q', '-f', 'qcow2', path, '64M'], check=True)
    info = d.parse_qcow_header(open(path, 'rb').read(512))
    assert info['virtual_size'] == 64 * MIB and info['version'] in (2, 3) and not info['has_backing_file']


def test_qcow2_is_refused_without_xen_qemu_and_checked_with_it(tmp_path):
    path = str(tmp_path / 'g.qcow2')
    with open(path, 'wb') as handle:
        handle.write(qcow_header())
    q = disk(path, fmt='qcow2')
    env = FakeEnv(tmp_path)
    facts = d.probe(q, env)
    assert facts['qcow']['version'] == 3
    problems = d.check_strategy('qcow2', q, facts, dest(tmp_path), env)
    assert 'qemu-system-xen' in problems[0]
    with pytest.raises(PolicyRefused, match='qemu-system-xen'):
        d.choose_strategy(q, 'qcow2', facts=facts, dest=dest(tmp_path), env=env)
    with pytest.raises(PolicyRefused, match='qdisk QEMU'):  # and auto has nothing consistent either
        d.choose_strategy(q, 'auto', facts=facts, dest=dest(tmp_path), env=env)
    # a save that stops the VM: auto records the disk's identity (it cannot move on); a copy is consistent too
    assert d.choose_strategy(q, 'auto', facts=facts, dest=dest(tmp_path), env=env, stopped=True)['strategy'] == 'none'
    assert d.choose_strategy(q, 'copy', facts=facts, dest=dest(tmp_path), env=env, stopped=True)['strategy'] == 'copy'
    dm = tmp_path / 'qemu-system-i386'
    dm.write_text('')
    with_qemu = FakeEnv(tmp_path, qemu_candidates=(str(dm),))
    assert d.find_qemu_dm(with_qemu) == {'path': str(dm), 'xen_build': True}
    assert d.check_strategy('qcow2', q, facts, None, with_qemu) == []
    # a running VM needs its device model's QMP socket; the save that stops it does not
    assert 'no QMP socket /run/xen/qmp-libxl-7' in d.check_strategy('qcow2', q, facts, None, with_qemu, domid=7)[0]
    assert d.check_strategy('qcow2', q, facts, None, with_qemu, domid=7, stopped=True) == []
    assert d.choose_strategy(q, 'auto', facts=facts, env=with_qemu)['strategy'] == 'qcow2'
    no_img = FakeEnv(tmp_path, qemu_candidates=(str(dm),), which=lambda name: None)
    assert 'qemu-img is not installed' in d.check_strategy('qcow2', q, facts, None, no_img)[0]
    raw = disk(path, fmt='qcow2', backend='phy')
    assert 'not qdisk' in d.check_strategy('qcow2', raw, facts, None, with_qemu)[0]


def qemu_tools():
    tools = {name: shutil.which(name) for name in ('qemu-img', 'qemu-io', 'qemu-system-x86_64')}
    if not all(tools.values()):
        pytest.skip('QEMU tools not installed: %s' % ', '.join(k for k, v in tools.items() if not v))
    return tools


def qcow2_image(tmp_path, pattern=0x41, name='g.qcow2'):
    path = str(tmp_path / name)
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', path, '16M'], check=True)
    subprocess.run(['qemu-io', '-c', 'write -P %d 0 1M' % pattern, path], check=True, stdout=subprocess.DEVNULL)
    return path


def first_mib(path, snapshot=None, force_share=False):
    """The first MiB of a qcow2 image's content (or of its internal snapshot), read by qemu-img."""
    out = path + '.raw'
    argv = ['qemu-img', 'convert'] + (['-U'] if force_share else []) + ['-f', 'qcow2', '-O', 'raw']
    argv += ['-l', 'snapshot.name=%s' % snapshot] if snapshot else []
    subprocess.run(argv + [path, out], check=True)
    with open(out, 'rb') as handle:
        data = handle.read(MIB)
    os.unlink(out)
    return data


def real_env(tmp_path, **kw):
    dm = tmp_path / 'qemu-system-i386'
    dm.write_text('')
    return d.DiskEnv(host='xen1', qemu_candidates=(str(dm),), **kw)


def test_qcow2_snapshot_of_a_stopped_vm_then_revert_clone_and_cleanup_with_qemu_img(tmp_path):
    qemu_tools()
    path = qcow2_image(tmp_path)
    env = real_env(tmp_path)
    q = disk(path, fmt='qcow2')
    assert d.check_strategy('qcow2', q, d.probe(q, env), None, env, stopped=True) == []
    record = d.Qcow2Strategy(env).snapshot(q, dest(tmp_path))  # no domid: no QEMU holds it, qemu-img does it
    assert record['strategy'] == 'qcow2' and record['size_bytes'] == 16 * MIB
    assert 0 <= record['allocated_bytes'] < MIB  # the snapshot's table, not the data it keeps
    assert record['location'] == {'type': 'internal', 'path': path, 'snapshot': 'fleetckpt-' + CKPT_ID,
                                  'taken_by': 'qemu-img'}
    assert d.validate_records([record], 'g3', CKPT_ID) == []
    assert d.verify_snapshots([record], None, env) == []
    # the guest writes on; the checkpoint still holds the old content
    subprocess.run(['qemu-io', '-c', 'write -P 0x42 0 1M', path], check=True, stdout=subprocess.DEVNULL)
    assert first_mib(path) == b'B' * MIB and first_mib(path, 'fleetckpt-' + CKPT_ID) == b'A' * MIB
    # clone (a drill, a copy under another name): a new image with the snapshot's content; the original untouched
    plan = d.restore_plan([record], None, mode='clone', name='g3-drill', stamp='S')
    assert plan['problems'] == [] and plan['disk_map'] == {path: str(tmp_path / 'g3-drill.xvda.S.qcow2')}
    done = d.apply_restore_plan(plan, env)
    assert done[0]['method'] == 'qemu-img convert'
    clone = plan['disk_map'][path]
    assert first_mib(clone) == b'A' * MIB and first_mib(path) == b'B' * MIB
    assert stat.S_IMODE(os.stat(clone).st_mode) == 0o600
    # a second clone to the same place is refused, the first one left alone
    with pytest.raises(StoreError, match='already exists'):
        d.apply_restore_plan(plan, env)
    assert os.path.exists(clone)
    # revert: the image gets the snapshot's content back, and keeps the snapshot (restorable again)
    plan = d.restore_plan([record], None, mode='revert')
    assert plan['disk_map'] == {} and plan['actions'][0]['argv'][:3] == ['qemu-img', 'snapshot', '-a']
    assert d.apply_restore_plan(plan, env)[0]['method'] == 'qemu-img snapshot -a'
    assert first_mib(path) == b'A' * MIB
    assert d.verify_snapshots([record], None, env) == []
    assert 'cannot serve as the running disk' in d.restore_plan([record], None, mode='consume')['problems'][0]
    # retention: the snapshot goes, then the checkpoint is invalid (and a second cleanup finds nothing to do)
    assert d.cleanup_disks([record], None, env) == {'removed': ['%s@fleetckpt-%s' % (path, CKPT_ID)], 'errors': []}
    assert 'is gone from' in d.verify_snapshots([record], None, env)[0]
    assert d.cleanup_disks([record], None, env) == {'removed': [], 'errors': []}


def test_qcow2_revert_waits_for_the_replaced_domains_device_model_to_let_go(tmp_path):
    clock = [0.0]
    answers = [(1, '', 'qemu-img: Could not open g.qcow2: Failed to get "write" lock')] * 3 + [(0, '', '')]
    runner = FakeRunner()
    runner.run = lambda argv, timeout: answers.pop(0)
    env = FakeEnv(tmp_path, runner=runner, clock=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    action = {'op': 'qcow2_revert', 'vdev': 'xvda', 'dst': '/d/g.qcow2', 'snapshot': 'fleetckpt-x',
              'argv': ['qemu-img', 'snapshot', '-a', 'fleetckpt-x', '/d/g.qcow2']}
    d.apply_restore_plan({'problems': [], 'actions': [action]}, env)
    assert answers == [] and clock[0] == 1.5
    # still locked after the wait (a domain really runs on it), or another error: refused at once, with qemu-img's words
    answers[:] = [(1, '', 'Failed to get "write" lock')] * 100
    with pytest.raises(StoreError, match='write. lock'):
        d.apply_restore_plan({'problems': [], 'actions': [action]}, env)
    assert clock[0] >= 1.5 + d.QCOW2_LOCK_WAIT_S
    answers[:] = [(1, '', "qemu-img: Could not apply snapshot 'fleetckpt-x': No such file or directory")]
    with pytest.raises(StoreError, match='Could not apply snapshot'):
        d.apply_restore_plan({'problems': [], 'actions': [action]}, env)


def test_qcow2_clone_that_fails_leaves_no_partial_disk(tmp_path):
    qemu_tools()
    path = qcow2_image(tmp_path)
    env = real_env(tmp_path)
    record = d.Qcow2Strategy(env).snapshot(disk(path, fmt='qcow2'), dest(tmp_path))
    record['location']['snapshot'] = 'fleetckpt-20261125T134501.123Z-00000000'  # not in the image
    plan = d.restore_plan([record], None, mode='clone', name='g3-drill', stamp='S')
    with pytest.raises(StoreError, match='qemu-img convert'):
        d.apply_restore_plan(plan, env)
    assert not os.path.exists(plan['disk_map'][path])


class RunningQemu:
    """A real QEMU (no machine, no guest) holding a qcow2 image open as node ``xvda-qcow2`` — what Xen's qdisk
    backend names a disk's node — with a QMP socket: the device model of a paused domain, as far as QMP goes."""

    def __init__(self, tmp_path, image):
        self.sock = str(tmp_path / 'qmp.sock')
        blockdev = json.dumps({'driver': 'qcow2', 'node-name': 'xvda-qcow2',
                               'file': {'driver': 'file', 'filename': image, 'node-name': 'xvda-file'}})
        self.proc = subprocess.Popen(['qemu-system-x86_64', '-machine', 'none', '-nodefaults', '-display', 'none',
                                      '-qmp', 'unix:%s,server=on,wait=off' % self.sock, '-blockdev', blockdev],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock) and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.exists(self.sock):
            self.stop()
            pytest.skip('QEMU did not start: %s' % self.proc.stderr.read().decode()[-300:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def test_qcow2_snapshot_through_qmp_while_qemu_holds_the_image(tmp_path):
    from ansible_collections.fleetckpt.xen.plugins.module_utils._qmp import Qmp
    qemu_tools()
    path = qcow2_image(tmp_path)
    qemu = RunningQemu(tmp_path, path)
    sockets = []
    try:
        env = real_env(tmp_path)
        env.glob = lambda pattern: [qemu.sock] if pattern == '/run/xen/qmp-libxl-*' else []
        strategy = d.Qcow2Strategy(env, qmp=lambda sock: sockets.append(sock) or Qmp(qemu.sock, timeout=30))
        record = strategy.snapshot(disk(path, fmt='qcow2'), dict(dest(tmp_path), domid=7))
        assert sockets == ['/run/xen/qmp-libxl-7']  # the domain's own device model
        assert record['location'] == {'type': 'internal', 'path': path, 'snapshot': 'fleetckpt-' + CKPT_ID,
                                      'node': 'xvda-qcow2', 'taken_by': 'qmp'}
        # qemu-img reads the snapshot table of the image QEMU holds (force share)
        assert d.verify_snapshots([record], None, env) == []
        assert first_mib(path, 'fleetckpt-' + CKPT_ID, force_share=True) == b'A' * MIB
        # qemu-img cannot delete it (QEMU's write lock): the QEMU serving the image does
        assert d.cleanup_disks([record], None, env) == {'removed': ['%s@fleetckpt-%s' % (path, CKPT_ID)], 'errors': []}
        assert 'is gone from' in d.verify_snapshots([record], None, env)[0]
        # a disk the device model does not serve is refused, with nothing taken
        other = qcow2_image(tmp_path, name='other.qcow2')
        with pytest.raises(PolicyRefused, match='serves no qcow2 node for %s' % other):
            strategy.snapshot(disk(other, fmt='qcow2'), dict(dest(tmp_path), domid=7))
    finally:
        qemu.stop()


def test_qcow2_records_are_validated_before_any_path_is_used():
    good = {'vdev': 'xvda', 'target': '/srv/d/g3.qcow2', 'strategy': 'qcow2',
            'location': {'type': 'internal', 'path': '/srv/d/g3.qcow2', 'snapshot': 'fleetckpt-' + CKPT_ID}}
    assert d.validate_records([good], 'g3', CKPT_ID) == []
    for loc in ({'path': '/srv/d/other.qcow2'},                       # not the disk's own image
                {'snapshot': 'mine'},                                # not ours
                {'snapshot': 'fleetckpt-20261125T134501.123Z-ffffffff'},  # another checkpoint's
                {'path': '/srv/d/../d/g3.qcow2'}):
        bad = dict(good, location=dict(good['location'], **loc), target=good['target'])
        assert 'is not a fleetckpt snapshot' in d.validate_records([bad], 'g3', CKPT_ID)[0], loc
    assert d.validate_records([dict(good, strategy='copy')], 'g3', CKPT_ID)


# ------------------------------------------------------------------------------------------------------------
# strategy selection matrix
# ------------------------------------------------------------------------------------------------------------
def facts_for(kind, lv=None, allocated=MIB):
    return {'kind': kind, 'exists': kind in ('file', 'block'), 'allocated': allocated, 'size': 8 * MIB, 'lv': lv,
            'lvm_tools': True, 'qcow': None, 'fstype': 'ext4', 'mount_point': '/'}


G3_LV = d.parse_lvs_json(LVS_SAMPLE)[0]
G4_THIN = d.parse_lvs_json(LVS_SAMPLE)[3]


@pytest.mark.parametrize('case, requested, options, expected', [
    # file disks
    ('file', 'auto', {}, 'copy'),                                   # no FICLONE here
    ('file+reflink', 'auto', {}, 'reflink'),
    ('file+reflink', 'auto', {'portable': True}, 'copy'),          # must restore on any host
    ('file', 'reflink', {}, PolicyRefused),
    ('file+reflink', 'reflink', {}, 'reflink'),
    ('file', 'copy', {}, 'copy'),
    ('file', 'lvm', {}, PolicyRefused),
    ('file', 'qcow2', {}, PolicyRefused),
    ('file', 'none', {}, PolicyRefused),                            # running VM, not forced
    ('file', 'none', {'force_none': True}, 'none'),
    ('file', 'none', {'stopped': True}, 'none'),
    # block disks
    ('lv', 'auto', {}, 'lvm'),
    ('lv', 'auto', {'portable': True}, 'copy'),
    ('thin', 'lvm', {}, 'lvm'),
    ('lv-nospace', 'auto', {}, 'copy'),
    ('lv-nospace', 'lvm', {}, PolicyRefused),
    ('block', 'auto', {}, 'copy'),
    ('block', 'lvm', {}, PolicyRefused),
    ('block', 'reflink', {}, PolicyRefused),
    # not snapshotted
    ('cdrom', 'auto', {}, 'none'),
    ('cdrom', 'copy', {}, 'none'),
    ('readonly', 'auto', {}, 'none'),
    ('missing', 'auto', {}, PolicyRefused),
    ('missing', 'auto', {'stopped': True}, 'none'),
    ('file-nospace', 'auto', {}, PolicyRefused),
    ('file-nospace', 'auto', {'force_none': True}, 'none'),
])
def test_strategy_selection_matrix(tmp_path, case, requested, options, expected):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, 8 * MIB, [(0, b'x' * 4096)])
    env = FakeEnv(tmp_path, ioctl=clone_ioctl if 'reflink' in case else refusing_ioctl(errno.EOPNOTSUPP),
                  free=1 if 'nospace' in case and case.startswith('file') else None)
    base = case.split('+')[0].split('-nospace')[0]
    if base in ('file', 'cdrom', 'readonly'):
        the_disk = disk(src, readwrite=base != 'readonly' and base != 'cdrom', cdrom=base == 'cdrom')
        facts = facts_for('file', allocated=os.stat(src).st_blocks * 512)
    elif base == 'missing':
        the_disk = disk('/nowhere/g3.img', kind='missing')
        facts = facts_for('missing')
    else:
        lv = {'lv': G3_LV, 'thin': G4_THIN, 'block': None}[base]
        if case == 'lv-nospace':
            lv = dict(G3_LV, vg_free=4 * MIB)
        the_disk = disk('/dev/vg0/x', kind='block')
        facts = facts_for('block', lv=lv)
    if expected is PolicyRefused:
        with pytest.raises(PolicyRefused) as info:
            d.choose_strategy(the_disk, requested, facts=facts, dest=dest(tmp_path), env=env, **options)
        assert the_disk['vdev'] in str(info.value)
    else:
        choice = d.choose_strategy(the_disk, requested, facts=facts, dest=dest(tmp_path), env=env, **options)
        assert choice['strategy'] == expected and choice['reason']
    assert not os.path.exists(str(tmp_path / '.fleetckpt'))  # reflink probes clean up after themselves


def test_portable_auto_keeps_reflink_when_the_clone_lands_in_the_store(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [(0, b'x')])
    env = FakeEnv(tmp_path, ioctl=clone_ioctl)
    facts = dict(facts_for('file'), st_dev=os.stat(str(tmp_path)).st_dev)
    choice = d.choose_strategy(disk(src), facts=facts, dest=dest(tmp_path), env=env, portable=True)
    assert choice['strategy'] == 'reflink'
    facts['st_dev'] += 1
    assert d.choose_strategy(disk(src), facts=facts, dest=dest(tmp_path), env=env, portable=True)['strategy'] == 'copy'


def test_auto_reports_what_it_rejected(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [(0, b'x')])
    choice = d.choose_strategy(disk(src), facts=facts_for('file'), dest=dest(tmp_path), env=FakeEnv(tmp_path))
    assert choice['strategy'] == 'copy' and 'EOPNOTSUPP' in choice['rejected']['reflink'][0]
    assert 'reflink' in choice['reason']
    with pytest.raises(InvalidInput):
        d.choose_strategy(disk(src), 'rsync', facts=facts_for('file'), env=FakeEnv(tmp_path))


def test_plan_disks_over_a_config(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [(0, b'x')])
    iso = tmp_path / 'tools.iso'
    iso.write_bytes(b'iso')
    config = {'c_info': {'name': 'g3'}, 'disks': [{'pdev_path': src, 'vdev': 'xvda', 'format': 'raw', 'readwrite': 1},
                                                  {'pdev_path': str(iso), 'vdev': 'xvdb', 'is_cdrom': 1}]}
    plans = d.plan_disks(config, 'auto', dest=dest(tmp_path), env=FakeEnv(tmp_path))
    assert [p['choice']['strategy'] for p in plans] == ['copy', 'none']
    plans = d.plan_disks(config, 'auto', dest=dest(tmp_path), env=FakeEnv(tmp_path), per_disk={'xvda': 'none'},
                         force_none=True)
    assert plans[0]['choice']['strategy'] == 'none'


# ------------------------------------------------------------------------------------------------------------
# probe helpers, quiesce
# ------------------------------------------------------------------------------------------------------------
MOUNTINFO = '''22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:45 / /srv/fleetckpt rw,relatime shared:20 - nfs4 169.254.78.100:/store rw,vers=4.1
31 22 0:46 / /srv/local\\040disks rw,relatime shared:21 - xfs /dev/loop1 rw,attr2,inode64
'''


def test_mountinfo_and_mount_of():
    mounts = d.parse_mountinfo(MOUNTINFO)
    assert d.mount_of('/srv/fleetckpt/lab/disks/g3.img', mounts)['fstype'] == 'nfs4'
    assert d.mount_of('/srv/local disks/g.img', mounts)['fstype'] == 'xfs'
    assert d.mount_of('/srv/fleetckptx/a', mounts)['fstype'] == 'ext4'


def test_loop_devices_and_quiesce(tmp_path):
    src = str(tmp_path / 'g3.img')
    make_sparse(src, MIB, [])
    sysblock = tmp_path / 'sys' / 'block'
    for name, backing in (('loop0', src), ('loop1', '/other.img'), ('vda', None)):
        (sysblock / name / 'loop').mkdir(parents=True)
        if backing:
            (sysblock / name / 'loop' / 'backing_file').write_text(backing + '\n')
        (sysblock / name / 'inflight').write_text('       0        0\n')
    (sysblock / 'loop0' / 'inflight').write_text('       0        2\n')
    vbd = tmp_path / 'sys' / 'bus' / 'xen-backend' / 'devices' / 'vbd-6-51712' / 'statistics'
    vbd.mkdir(parents=True)
    for name, value in (('rd_req', 1942), ('wr_req', 576), ('f_req', 109), ('ds_req', 0)):
        (vbd / name).write_text('%d\n' % value)
    sleeps = []

    def sleep(seconds):  # the ring drains: one more write is taken, then the loop device completes it
        sleeps.append(seconds)
        if len(sleeps) == 1:
            (vbd / 'wr_req').write_text('577\n')
        else:
            (sysblock / 'loop0' / 'inflight').write_text('0 0\n')
    ticks = iter(range(100))
    env = FakeEnv(tmp_path, clock=lambda: next(ticks) * 0.01, sleep=sleep)
    facts = d.probe(disk(src), env)
    assert facts['loop_devices'] == ['loop0'] and facts['kind'] == 'file' and facts['allocated'] is not None
    res = d.quiesce([{'disk': disk(src), 'facts': facts}], env, domid=6)
    assert res['devices'] == ['loop0'] and res['vbds'] == ['vbd-6-51712'] and len(sleeps) >= 2
    (sysblock / 'loop0' / 'inflight').write_text('1 0\n')
    stuck = FakeEnv(tmp_path, clock=lambda: next(ticks), sleep=lambda s: None)
    with pytest.raises(FleetckptError, match='in flight'):
        d.quiesce([{'disk': disk(src), 'facts': facts}], stuck, timeout=5)
    (sysblock / 'loop0' / 'inflight').write_text('0 0\n')
    counter = iter(range(1000))
    moving = FakeEnv(tmp_path, clock=lambda: next(ticks), sleep=lambda s: (vbd / 'rd_req').write_text('%d\n' % next(counter)))
    with pytest.raises(FleetckptError, match='blkback kept taking'):
        d.quiesce([{'disk': disk(src), 'facts': facts}], moving, domid=6, timeout=5)


# ------------------------------------------------------------------------------------------------------------
# records, disk_map, validation
# ------------------------------------------------------------------------------------------------------------
def sample_records(tmp_path):
    return [
        d.make_record(disk('/d/g3.img'), 'copy', {'type': 'checkpoint', 'file': 'disk-xvda.img'}, size=MIB, sha256='a' * 64),
        d.make_record(disk('/d/g3b.img', vdev='xvdb'), 'reflink',
                      {'type': 'path', 'path': '/d/.fleetckpt/g3/%s/xvdb.img' % CKPT_ID, 'host': 'xen1'}, size=MIB),
        d.make_record(disk('/dev/vg0/g3', vdev='xvdc', kind='block'), 'lvm',
                      {'type': 'lv', 'vg': 'vg0', 'lv': 'fc-%s-xvdc' % CKPT_ID, 'path': '/dev/vg0/fc-%s-xvdc' % CKPT_ID,
                       'host': 'xen1', 'thin': False, 'origin': 'g3'}, size=2 << 30),
        d.make_record(disk('/srv/iso/tools.iso', vdev='xvdd', readwrite=False, cdrom=True), 'none', {'type': 'origin'},
                      identity={'kind': 'file', 'path': '/srv/iso/tools.iso'}),
    ]


def test_disk_map_and_validation(tmp_path):
    records = sample_records(tmp_path)
    assert d.validate_records(records, 'g3', CKPT_ID) == []
    assert d.disk_map(records, '/store/g3/' + CKPT_ID) == {
        '/d/g3.img': '/store/g3/%s/disk-xvda.img' % CKPT_ID,
        '/d/g3b.img': '/d/.fleetckpt/g3/%s/xvdb.img' % CKPT_ID,
        '/dev/vg0/g3': '/dev/vg0/fc-%s-xvdc' % CKPT_ID}
    with pytest.raises(InvalidInput):
        d.disk_map(records)


@pytest.mark.parametrize('index, location, message', [
    (0, {'type': 'checkpoint', 'file': '../../etc/shadow'}, 'not allowed'),
    (0, {'type': 'checkpoint', 'file': 'manifest.json'}, 'not allowed'),
    (1, {'type': 'path', 'path': '/etc/passwd', 'host': 'xen1'}, 'is not <disk dir>'),
    (1, {'type': 'path', 'path': '/d/.fleetckpt/g3/other-id/xvdb.img'}, 'is not <disk dir>'),
    (1, {'type': 'path', 'path': '/elsewhere/.fleetckpt/g3/%s/xvdb.img' % CKPT_ID}, 'is not <disk dir>'),
    (1, {'type': 'path', 'path': '/d/.fleetckpt/g3/../../%s/xvdb.img' % CKPT_ID}, 'is not <disk dir>'),
    (2, {'type': 'lv', 'vg': 'vg0', 'lv': 'g3'}, 'not a fleetckpt snapshot'),
    (2, {'type': 'lv', 'vg': 'vg0;rm', 'lv': 'fc-%s-xvdc' % CKPT_ID}, 'not a fleetckpt snapshot'),
    (3, {'type': 'ftp'}, 'unknown location'),
])
def test_validate_records_rejects_what_cleanup_must_never_delete(tmp_path, index, location, message):
    records = sample_records(tmp_path)
    records[index]['location'] = location
    problems = d.validate_records(records, 'g3', CKPT_ID)
    assert problems and message in problems[0]
    out = d.cleanup_disks(records[index:index + 1], '/nonexistent', FakeEnv(tmp_path), outside_only=False,
                          vm='g3', ckpt_id=CKPT_ID)
    assert out['removed'] == [] and out['errors']


# ------------------------------------------------------------------------------------------------------------
# restore plans and their execution
# ------------------------------------------------------------------------------------------------------------
def test_restore_plan_revert(tmp_path):
    records = sample_records(tmp_path)
    plan = d.restore_plan(records, '/ck', mode='revert', host='xen1')
    assert plan['problems'] == [] and plan['disk_map'] == {}
    ops = [(a['op'], a.get('vdev')) for a in plan['actions']]
    assert ops == [('copy_over', 'xvda'), ('reflink_over', 'xvdb'), ('run', 'xvdc'), ('mark_consumed', None)]
    assert plan['actions'][2]['argv'] == ['lvconvert', '--merge', 'vg0/fc-%s-xvdc' % CKPT_ID]
    assert plan['consumes_checkpoint']  # a classic LVM snapshot is merged away


def test_restore_plan_clone_never_uses_the_checkpoint_itself(tmp_path):
    records = sample_records(tmp_path)[:2]
    plan = d.restore_plan(records, '/ck', mode='clone', host='xen1', name='g3copy', stamp='S')
    assert plan['disk_map'] == {'/d/g3.img': '/d/g3copy.xvda.S.img', '/d/g3b.img': '/d/g3copy.xvdb.S.img'}
    assert [(a['op'], a['src']) for a in plan['actions']] == [
        ('clone_or_copy', '/ck/disk-xvda.img'), ('reflink', '/d/.fleetckpt/g3/%s/xvdb.img' % CKPT_ID)]
    assert not plan['consumes_checkpoint']
    assert not set(plan['disk_map'].values()) & {'/ck/disk-xvda.img', '/d/.fleetckpt/g3/%s/xvdb.img' % CKPT_ID}


def test_restore_plan_consume_and_its_limits(tmp_path):
    records = sample_records(tmp_path)
    plan = d.restore_plan(records[:2], '/ck', mode='consume', host='xen1')
    assert plan['disk_map'] == d.disk_map(records[:2], '/ck') and plan['consumes_checkpoint']
    assert plan['actions'] == [{'op': 'mark_consumed', 'dir': '/ck'}]
    assert 'classic LVM snapshot' in d.restore_plan(records, '/ck', mode='consume', host='xen1')['problems'][0]


def test_restore_plan_refuses_other_hosts_and_changed_memory_only_disks(tmp_path):
    records = sample_records(tmp_path)
    plan = d.restore_plan(records, '/ck', mode='revert', host='xen2')
    assert len(plan['problems']) == 2 and 'host xen1' in plan['problems'][0]
    mem_only = [d.make_record(disk('/d/g3.img'), 'none', {'type': 'origin'}, identity={'kind': 'file'})]
    plan = d.restore_plan(mem_only, '/ck', changed={'xvda': ['mtime differs']})
    assert 'moved on' in plan['problems'][0]
    assert d.restore_plan(mem_only, '/ck', changed={'xvda': ['x']}, force_changed=True)['problems'] == []
    clone = d.restore_plan(mem_only, '/ck', mode='clone', name='c', stamp='S')
    assert clone['disk_map'] == {'/d/g3.img': '/d/c.xvda.S.img'}
    with pytest.raises(InvalidInput):
        d.restore_plan(records, '/ck', mode='overwrite')
    assert d.default_restore_mode('g3copy') == 'clone' and d.default_restore_mode() == 'revert'


def test_restore_plan_thin_lvm(tmp_path):
    rec = d.make_record(disk('/dev/vg0/g4', kind='block'), 'lvm',
                        {'type': 'lv', 'vg': 'vg0', 'lv': 'fc-%s-xvda' % CKPT_ID, 'path': '/dev/vg0/fc-%s-xvda' % CKPT_ID,
                         'host': 'xen1', 'thin': True, 'origin': 'g4'})
    revert = d.restore_plan([rec], '/ck', host='xen1')
    assert [a['argv'][0] for a in revert['actions']] == ['lvremove', 'lvcreate'] and not revert['consumes_checkpoint']
    clone = d.restore_plan([rec], '/ck', mode='clone', host='xen1', name='g4copy', stamp='S')
    assert clone['disk_map'] == {'/dev/vg0/g4': '/dev/vg0/g4copy.S'}


def test_apply_restore_plan_revert_and_clone_on_real_files(tmp_path):
    disks_dir = tmp_path / 'disks'
    disks_dir.mkdir()
    src = str(disks_dir / 'g3.img')
    want = make_sparse(src, 4 * MIB, [(MIB, b'checkpoint state' * 100)])
    os.chmod(src, 0o640)
    target = dest(tmp_path)
    env = FakeEnv(tmp_path)
    record = d.CopyStrategy(env).snapshot(disk(src), target)
    with open(src, 'r+b') as handle:  # the guest moves on
        handle.seek(MIB)
        handle.write(b'later state')
    plan = d.restore_plan([record], target['dir'], mode='revert', host='xen1')
    done = d.apply_restore_plan(plan, env)
    assert done[0]['method'] == 'copy'
    assert hashlib.sha256(open(src, 'rb').read()).hexdigest() == want and stat.S_IMODE(os.stat(src).st_mode) == 0o640
    plan = d.restore_plan([record], target['dir'], mode='clone', host='xen1', name='g3copy', stamp='S')
    done = d.apply_restore_plan(plan, env)  # FICLONE refused by the fake: falls back to a sparse copy
    work = plan['disk_map'][src]
    assert done[0]['method'] == 'copy' and hashlib.sha256(open(work, 'rb').read()).hexdigest() == want
    with pytest.raises(StoreError, match='already exists'):
        d.apply_restore_plan(plan, env)
    assert d.verify_snapshots([record], target['dir'], env, deep=True, vm='g3', ckpt_id=CKPT_ID) == []
    consume = d.restore_plan([record], target['dir'], mode='consume', host='xen1')
    d.apply_restore_plan(consume, env)
    problems = d.verify_snapshots([record], target['dir'], env)
    assert 'consumed' in problems[0]


def test_apply_restore_plan_refuses_a_plan_with_problems(tmp_path):
    with pytest.raises(PolicyRefused, match='moved on'):
        d.apply_restore_plan({'problems': ['disk xvda: ... moved on'], 'actions': []}, FakeEnv(tmp_path))


def test_apply_restore_plan_removes_working_copies_on_failure(tmp_path):
    src = str(tmp_path / 'a.img')
    make_sparse(src, MIB, [(0, b'x' * 10)])
    plan = {'problems': [], 'actions': [
        {'op': 'clone_or_copy', 'vdev': 'xvda', 'src': src, 'dst': str(tmp_path / 'w1.img')},
        {'op': 'run', 'vdev': 'xvdb', 'argv': ['lvcreate', 'boom']}]}
    runner = FakeRunner([(lambda a: True, (5, '', '  Volume group "vg0" not found\n'))])
    with pytest.raises(StoreError, match='not found'):
        d.apply_restore_plan(plan, FakeEnv(tmp_path, runner=runner))
    assert not os.path.exists(str(tmp_path / 'w1.img'))


def test_apply_restore_plan_removes_a_thin_clone_lv_when_a_later_step_fails(tmp_path):
    plan = {'problems': [], 'actions': [
        {'op': 'run', 'vdev': 'xvdc', 'creates_lv': {'vg': 'vg0', 'lv': 'g3copy.S'},
         'argv': ['lvcreate', '--snapshot', '--name', 'g3copy.S', '--setactivationskip', 'n', 'vg0/fc-snap']},
        {'op': 'run', 'vdev': 'xvda', 'argv': ['lvremove', '--force', 'vg0/origin']},  # a revert's: never undone
        {'op': 'clone_or_copy', 'vdev': 'xvdb', 'src': str(tmp_path / 'gone.img'), 'dst': str(tmp_path / 'w.img')}]}
    runner = FakeRunner()
    with pytest.raises(StoreError):
        d.apply_restore_plan(plan, FakeEnv(tmp_path, runner=runner))
    assert runner.calls[-1] == ['lvremove', '--force', 'vg0/g3copy.S'] and len(runner.calls) == 3
    # the clone plan of a thin snapshot says which LV it creates
    rec = {'vdev': 'xvdc', 'target': '/dev/vg0/g3', 'strategy': 'lvm', 'kind': 'block', 'readwrite': 1,
           'location': {'type': 'lv', 'vg': 'vg0', 'lv': 'fc-snap', 'origin': 'g3', 'thin': True, 'host': 'xen1'}}
    clone = d.restore_plan([rec], str(tmp_path), mode='clone', host='xen1', name='g3copy', stamp='S')
    assert clone['actions'][0]['creates_lv'] == {'vg': 'vg0', 'lv': 'g3copy.S'}
    revert = d.restore_plan([rec], str(tmp_path), mode='revert', host='xen1')
    assert not any(a.get('creates_lv') for a in revert['actions'])
    assert d.remove_working_disks(revert['actions'], FakeEnv(tmp_path, runner=FakeRunner())) == []


# ------------------------------------------------------------------------------------------------------------
# checkpoint-level: snapshot_all, verify, usage
# ------------------------------------------------------------------------------------------------------------
def test_snapshot_all_undoes_outside_snapshots_when_a_later_disk_fails(tmp_path):
    disks_dir = tmp_path / 'disks'
    disks_dir.mkdir()
    a = str(disks_dir / 'a.img')
    make_sparse(a, MIB, [(0, b'a' * 10)])
    target = dest(tmp_path)
    env = FakeEnv(tmp_path, ioctl=clone_ioctl, stats={target['dir']: _stat(stat.S_IFDIR, 0, 0, 2, 99, 1, 1)})
    plans = [{'disk': disk(a), 'choice': {'strategy': 'reflink', 'reason': 'auto'}},
             {'disk': disk(str(disks_dir / 'gone.img'), vdev='xvdb'), 'choice': {'strategy': 'copy', 'reason': 'auto'}}]
    with pytest.raises(StoreError):
        d.snapshot_all(plans, target, env)
    assert os.listdir(str(disks_dir / '.fleetckpt')) == []
    plans[1]['disk'] = disk(a, vdev='xvdb')
    records = d.snapshot_all(plans, target, env)
    assert [r['strategy'] for r in records] == ['reflink', 'copy'] and records[0]['reason'] == 'auto'
    assert d.verify_snapshots(records, target['dir'], env, vm='g3', ckpt_id=CKPT_ID) == []
    usage = d.disks_usage(records, target['dir'], env)
    assert usage['in_checkpoint_bytes'] >= 0 and [u['where'] for u in usage['disks']] == ['path', 'checkpoint']
    assert d.finalize_all(records, target, env) == records
    os.unlink(os.path.join(target['dir'], 'disk-xvdb.img'))
    problems = d.verify_snapshots(records, target['dir'], env, vm='g3', ckpt_id=CKPT_ID)
    assert 'missing' in problems[0]


def test_strategy_factory():
    assert isinstance(d.strategy('copy', digest='none'), d.CopyStrategy)
    with pytest.raises(InvalidInput):
        d.strategy('zfs')
    with pytest.raises(InvalidInput):
        d.CopyStrategy(digest='md5')
