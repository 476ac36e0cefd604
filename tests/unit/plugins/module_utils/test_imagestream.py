# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import hashlib
import os
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
        save_stream(lambda fifo: ['sleep', '30'], dest, timeout=0.5)
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
