# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import StoreError, XlError
from ansible_collections.fleetckpt.xen.plugins.module_utils._imagestream import restore_stream, save_stream

HAS_ZSTD = shutil.which('zstd') is not None
WRITER = "import sys; open(sys.argv[1], 'wb').write(bytes(range(256)) * 4096 * int(sys.argv[2]))"


def writer(size_units, extra=''):
    return lambda fifo: [sys.executable, '-c', WRITER + extra, fifo, str(size_units)]


def test_save_stream_hashes_what_it_stores(tmp_path):
    dest = str(tmp_path / 'image.xl')
    res = save_stream(writer(3), dest)
    data = open(dest, 'rb').read()
    assert len(data) == 3 * 256 * 4096 == res['size_bytes'] == res['raw_bytes']
    assert res['sha256'] == hashlib.sha256(data).hexdigest()
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


def test_save_stream_failure_removes_partial_image(tmp_path):
    dest = str(tmp_path / 'image.xl')
    with pytest.raises(XlError, match='rc=3'):
        save_stream(writer(1, "; sys.exit(3)"), dest)
    assert not os.path.exists(dest)


def test_save_stream_xl_never_opens_the_fifo(tmp_path):
    dest = str(tmp_path / 'image.xl')
    with pytest.raises(XlError, match='failed'):
        save_stream(lambda fifo: ['sh', '-c', 'echo "domain not found" >&2; exit 1'], dest, timeout=10)
    assert not os.path.exists(dest)


def test_save_stream_empty_stream_is_an_error(tmp_path):
    with pytest.raises(XlError, match='empty stream'):
        save_stream(lambda fifo: ['sh', '-c', ': > "$0"', fifo], str(tmp_path / 'i'))


def test_save_stream_timeout_kills_writer(tmp_path):
    dest = str(tmp_path / 'image.xl')
    with pytest.raises(XlError, match='timed out'):
        save_stream(lambda fifo: ['sleep', '30'], dest, timeout=0.5, abort_grace=0.5)
    assert not os.path.exists(dest)


def test_save_stream_refuses_existing_destination(tmp_path):
    dest = tmp_path / 'image.xl'
    dest.write_bytes(b'old')
    with pytest.raises(StoreError, match='cannot create image'):
        save_stream(writer(1), str(dest))
    assert dest.read_bytes() == b'old'


@pytest.mark.skipif(not HAS_ZSTD, reason='zstd not installed')
def test_zstd_round_trip(tmp_path):
    dest = str(tmp_path / 'image.xl.zst')
    res = save_stream(writer(8), dest, compress='zstd', zstd_level=3)
    assert res['raw_bytes'] == 8 * 256 * 4096 and res['size_bytes'] < res['raw_bytes'] / 10
    assert res['sha256'] == hashlib.sha256(open(dest, 'rb').read()).hexdigest()
    out = tmp_path / 'restored'
    restore_stream(lambda path: ['sh', '-c', 'cat "$0" > "$1"', path, str(out)], dest, compressed=True)
    assert out.read_bytes() == bytes(range(256)) * 4096 * 8


def test_restore_stream_plain_and_failure(tmp_path):
    image = tmp_path / 'img'
    image.write_bytes(b'abc')
    assert 'restore_s' in restore_stream(lambda p: ['cat', p], str(image), compressed=False)
    with pytest.raises(XlError, match='Over-allocation'):
        restore_stream(lambda p: ['sh', '-c', 'echo "Over-allocation for d1" ; exit 1'], str(image), compressed=False)


@pytest.mark.skipif(not HAS_ZSTD, reason='zstd not installed')
def test_restore_stream_compressed_failure_does_not_hang(tmp_path):
    image = tmp_path / 'img.zst'
    image.write_bytes(b'not zstd at all')
    with pytest.raises(XlError):
        restore_stream(lambda p: ['sh', '-c', 'exit 1'], str(image), compressed=True, timeout=10)


# ---------------------------------------------------------------- restore with a rewritten config header

def _xl_image(stream):
    from ansible_collections.fleetckpt.xen.plugins.module_utils import _xlimage
    cfg = {'c_info': {'type': 'pv', 'name': 'g3', 'uuid': '5fe716fb-a246-4f34-bb1b-45ee77eac808'},
           'disks': [{'pdev_path': '/d/g3.img', 'vdev': 'xvda', 'readwrite': 1}],
           'nics': [{'devid': 0, 'mac': '00:16:3e:fc:00:0d'}]}
    raw = _xlimage.config_to_json(cfg) + b'\x00'
    import struct
    opt = struct.pack('<I', len(raw)) + raw
    return _xlimage.MAGIC + struct.pack('<4I', 0x01020304, 3, 0, len(opt)) + opt + stream


def test_restore_stream_plain_without_transform_passes_the_file_itself(tmp_path):
    image = tmp_path / 'img'
    image.write_bytes(b'abc')
    seen = []
    restore_stream(lambda p: seen.append(p) or ['true'], str(image), compressed=False)
    assert seen == [str(image)]


@pytest.mark.parametrize('compressed', [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_ZSTD, reason='no zstd'))])
def test_restore_stream_rewrites_the_header(tmp_path, compressed):
    from ansible_collections.fleetckpt.xen.plugins.module_utils import _xlimage
    stream = os.urandom(2 * 1024 * 1024 + 5)
    data = _xl_image(stream)
    image = tmp_path / 'img'
    image.write_bytes(data)
    if compressed:
        import subprocess
        subprocess.run(['zstd', '-q', '--rm', str(image), '-o', str(image) + '.zst'], check=True)
        image = tmp_path / 'img.zst'
    out = tmp_path / 'received'
    seen = []

    def builder(path):
        seen.append(path)
        return ['sh', '-c', 'cat "$0" > "$1"', path, str(out)]

    res = restore_stream(builder, str(image), compressed=compressed,
                         config_transform=_xlimage.make_transform(name='g3-clone', new_uuid=True,
                                                                  disk_map={'/d/g3.img': '/d/clone.img'}, drop_nics=True))
    assert seen[0] != str(image) and seen[0].endswith('/stream')  # through the FIFO
    got = out.read_bytes()
    header = _xlimage.parse_header(got)
    assert header.config['c_info']['name'] == 'g3-clone'
    assert header.config['disks'][0]['pdev_path'] == '/d/clone.img' and 'nics' not in header.config
    assert got[header.size:] == stream
    info = res['config_header']
    assert info['name'] == 'g3-clone' and info['uuid'] == header.config['c_info']['uuid'] != '5fe716fb-a246-4f34-bb1b-45ee77eac808'
    assert info['header_out'] == header.size and info['header_in'] == len(data) - len(stream)
    assert 'restore_s' in res


def test_restore_stream_identity_transform_is_byte_identical(tmp_path):
    data = _xl_image(os.urandom(300000))
    image = tmp_path / 'img'
    image.write_bytes(data)
    out = tmp_path / 'received'
    restore_stream(lambda p: ['sh', '-c', 'cat "$0" > "$1"', p, str(out)], str(image), compressed=False,
                   config_transform=lambda cfg: cfg)
    assert out.read_bytes() == data


def test_restore_stream_transform_errors_before_xl_starts(tmp_path):
    from ansible_collections.fleetckpt.xen.plugins.module_utils import _xlimage
    from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput
    image = tmp_path / 'img'
    image.write_bytes(_xl_image(b'x' * 1000))
    started = []
    with pytest.raises(InvalidInput, match='not in the image config'):
        restore_stream(lambda p: started.append(p) or ['true'], str(image), compressed=False,
                       config_transform=_xlimage.make_transform(disk_map={'/other.img': '/x.img'}))
    image.write_bytes(b'not an image at all, long enough for the fixed header part...')
    with pytest.raises(StoreError, match='bad magic'):
        restore_stream(lambda p: started.append(p) or ['true'], str(image), compressed=False,
                       config_transform=lambda cfg: cfg)
    with pytest.raises(StoreError, match='cannot read image'):
        restore_stream(lambda p: started.append(p) or ['true'], str(tmp_path / 'missing'), compressed=False,
                       config_transform=lambda cfg: cfg)
    assert started == []


@pytest.mark.skipif(not HAS_ZSTD, reason='zstd not installed')
def test_restore_stream_transform_on_corrupt_zstd_reports_zstd(tmp_path):
    from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
    image = tmp_path / 'img.zst'
    image.write_bytes(b'not zstd at all')
    started = []
    with pytest.raises(FleetckptError, match='zstd -d failed'):
        restore_stream(lambda p: started.append(p) or ['true'], str(image), compressed=True, timeout=10,
                       config_transform=lambda cfg: cfg)
    assert started == []


def test_restore_stream_transform_xl_failure(tmp_path):
    image = tmp_path / 'img'
    image.write_bytes(_xl_image(b'y' * (3 * 1024 * 1024)))
    with pytest.raises(XlError, match='Over-allocation') as info:
        restore_stream(lambda p: ['sh', '-c', 'echo Loading new save file; head -c 100 "$0" >/dev/null; '
                                  'echo "xc: error: Over-allocation for d5"; exit 1', p],
                       str(image), compressed=False, timeout=10, config_transform=lambda cfg: cfg)
    # one line, the error first, then the whole output and how far the stream got
    msg = str(info.value).split('failed (rc=1): ', 1)[1]
    assert '\n' not in msg
    assert msg.index('xc: error: Over-allocation for d5') < msg.index('Loading new save file')
    assert re.search(r'xl stopped after \d+ bytes of the stream', msg), msg
