# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import struct
import subprocess
import uuid

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _xlimage as xi
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, StoreError

DATA = os.path.join(os.path.dirname(__file__), 'data')
REAL_HEADERS = sorted(glob.glob(os.path.join(DATA, 'xl-header-*.bin')))
HAS_ZSTD = shutil.which('zstd') is not None

# What libxl_domain_config_to_json (yajl, beautify) writes for a small PV domain: note the empty
# objects ("{\n\n}"), ": " and the 4-space indent.
YAJL_TEXT = '''{
    "c_info": {
        "type": "pv",
        "name": "g3",
        "uuid": "5fe716fb-a246-4f34-bb1b-45ee77eac808",
        "run_hotplug_scripts": "True"
    },
    "b_info": {
        "max_vcpus": 1,
        "avail_vcpus": [
            0
        ],
        "max_memkb": 262144,
        "cmdline": "root=/dev/xvda rw \\"quoted\\" tab\\t nl\\n ctl\\u001F del\\u007f caf\\u00e9 / ok",
        "type.pv": {

        },
        "empty_list": [

        ],
        "nothing": null,
        "yes": true,
        "no": false,
        "big": 18446744073709551615,
        "neg": -1
    },
    "disks": [
        {
            "pdev_path": "/srv/fleetckpt/lab/disks/g3.img",
            "vdev": "xvda",
            "format": "raw",
            "readwrite": 1
        },
        {
            "pdev_path": "/srv/iso/tools.iso",
            "vdev": "xvdb",
            "is_cdrom": 1
        }
    ],
    "nics": [
        {
            "devid": 0,
            "mac": "00:16:3e:fc:00:0d",
            "bridge": "xenbr0"
        }
    ],
    "on_reboot": "restart"
}
'''
# yajl writes \u007f and é raw; \u00e9 above is only to keep this file ASCII
YAJL_BYTES = YAJL_TEXT.replace('\\u007f', '\x7f').replace('\\u00e9', '\u00e9').encode('utf-8')


def make_image(config_bytes=YAJL_BYTES, order='<', mandatory=xi.FLAG_JSON | xi.FLAG_STREAMV2, optional=0, tail=b'',
               config_len=None, optlen=None, magic=xi.MAGIC, byteorder=xi.BYTEORDER_VALUE, stream=b'STREAM-V2' * 10):
    raw = config_bytes + b'\x00'
    clen = len(raw) if config_len is None else config_len
    opt = struct.pack(order + 'I', clen) + raw + tail
    olen = len(opt) if optlen is None else optlen
    return magic + struct.pack(order + '4I', byteorder, mandatory, optional, olen) + opt + stream


def test_synthetic_header_parses_and_round_trips():
    image = make_image()
    header = xi.parse_header(image)
    assert header.byteorder == '<' and header.mandatory_flags == 3 and header.optional_flags == 0
    assert header.stream_version == 2
    assert header.size == len(image) - len(b'STREAM-V2' * 10)
    assert header.config['c_info']['name'] == 'g3'
    assert header.config['b_info']['big'] == 2 ** 64 - 1
    assert list(header.config) == ['c_info', 'b_info', 'disks', 'nics', 'on_reboot']
    assert header.config_bytes == YAJL_BYTES and header.tail == b''
    assert xi.config_to_json(header.config) == YAJL_BYTES
    assert xi.encode_header(header) == image[:header.size]
    assert xi.encode_header(header, header.config) == image[:header.size]
    assert 'g3' in repr(header)


def test_fixed_layout_matches_xl():
    header = xi.parse_header(make_image())
    data = xi.encode_header(header)
    assert data[:32] == b'Xen saved domain, xl format\n \x00 \r'
    assert data[32:36] == b'\x04\x03\x02\x01'  # 0x01020304 little-endian
    byteorder, mandatory, optional, optlen = struct.unpack('<4I', data[32:48])
    assert optlen == len(data) - 48 == 4 + len(YAJL_BYTES) + 1
    assert struct.unpack('<I', data[48:52])[0] == len(YAJL_BYTES) + 1
    assert data[-1:] == b'\x00'


def test_big_endian_and_tail_and_optional_flags_are_kept():
    image = make_image(order='>', optional=0x5, tail=b'future-xl-data')
    header = xi.parse_header(image)
    assert header.byteorder == '>' and header.optional_flags == 5 and header.tail == b'future-xl-data'
    assert xi.encode_header(header) == image[:header.size]
    renamed = xi.encode_header(header, xi.transform_config(header.config, name='g3-clone'))
    again = xi.parse_header(renamed)
    assert again.byteorder == '>' and again.tail == b'future-xl-data' and again.config['c_info']['name'] == 'g3-clone'


def test_stream_v1_image_is_readable():
    header = xi.parse_header(make_image(mandatory=xi.FLAG_JSON))
    assert header.stream_version == 1
    assert xi.parse_header(xi.encode_header(header)).mandatory_flags == xi.FLAG_JSON


def test_read_header_consumes_only_the_header():
    image = make_image()
    reader = io.BytesIO(image)
    header = xi.read_header(reader)
    assert reader.read() == b'STREAM-V2' * 10
    assert reader.tell() == len(image) and header.size == len(image) - 90


class Trickle(io.RawIOBase):
    """Returns at most 7 bytes per read, like a pipe under load."""

    def __init__(self, data):
        super().__init__()
        self.buf = io.BytesIO(data)

    def readable(self):
        return True

    def read(self, size=-1):
        return self.buf.read(min(7, size if size >= 0 else 7))


def test_short_reads_are_retried():
    header = xi.read_header(Trickle(make_image()))
    assert header.config['c_info']['name'] == 'g3'


@pytest.mark.parametrize('kwargs,match', [
    ({'magic': b'Xen saved domain, xl format\n \x00 \n'}, 'bad magic'),
    ({'magic': b'LinuxGuestRecord' + b'\x00' * 16}, 'bad magic'),
    ({'magic': xi.ZSTD_MAGIC + b'\x00' * 28}, 'zstd-compressed'),
    ({'byteorder': 0x04030201 + 1}, 'byte order'),
    ({'mandatory': xi.FLAG_JSON | xi.FLAG_STREAMV2 | 0x4}, r'unknown mandatory flag\(s\) 0x4'),
    ({'mandatory': xi.FLAG_STREAMV2}, 'not in JSON'),
    ({'optlen': 0xFFFFFFFF}, 'claims 4294967295 bytes'),
    ({'optlen': 2}, 'no config'),
    ({'config_len': 0}, 'no config'),
    ({'config_len': 64 * 1024 * 1024}, 'limit'),
    ({'config_len': len(YAJL_BYTES) + 1000}, 'truncated: config of'),
    ({'config_bytes': b'{"c_info": {}}\x00x'}, 'one NUL-terminated string'),
    ({'config_bytes': b'name = "g3"\n'}, 'not valid JSON'),
    ({'config_bytes': b'{"c_info": {"name": "a", "name": "b"}}'}, 'duplicate key'),
    ({'config_bytes': b'{"c_info": {"x": NaN}}'}, 'not valid JSON'),
    ({'config_bytes': b'[1, 2]'}, 'not a libxl_domain_config'),
    ({'config_bytes': b'{"b_info": {}}'}, 'not a libxl_domain_config'),
    ({'tail': b'x' * (xi.MAX_TAIL_BYTES + 1)}, 'unexpected bytes after its config'),
])
def test_bad_headers_are_refused(kwargs, match):
    with pytest.raises(StoreError, match=match):
        xi.parse_header(make_image(**kwargs))


@pytest.mark.parametrize('cut', [0, 10, 47, 48, 51, 60, 300])
def test_truncated_headers_are_refused(cut):
    with pytest.raises(StoreError, match='truncated'):
        xi.parse_header(make_image(stream=b'')[:cut])


def test_max_config_bytes_is_configurable():
    with pytest.raises(StoreError, match='limit 100'):
        xi.parse_header(make_image(), max_config_bytes=100)


def test_read_error_is_a_store_error():
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def read(self, size=-1):
            raise OSError(5, 'Input/output error')

    with pytest.raises(StoreError, match='Input/output error'):
        xi.read_header(Broken())


def test_encoder_matches_yajl_escapes():
    text = '\x00\x01\x1f"\\/\r\n\t\b\f\x7f\u00e9\u20ac'
    assert xi.config_to_json({'s': text}) == (
        b'{\n    "s": "\\u0000\\u0001\\u001F\\"\\\\/\\r\\n\\t\\b\\f\x7f\xc3\xa9\xe2\x82\xac"\n}\n')
    assert json.loads(xi.config_to_json({'s': text}).decode()) == {'s': text}
    assert xi.config_to_json({}) == b'{\n\n}\n'
    assert xi.config_to_json({'a': [], 'b': [{}]}) == b'{\n    "a": [\n\n    ],\n    "b": [\n        {\n\n        }\n    ]\n}\n'
    assert xi.config_to_json({'f': 1.5, 'g': 2.0}) == b'{\n    "f": 1.5,\n    "g": 2.0\n}\n'


def test_non_utf8_bytes_survive_a_round_trip():
    raw = YAJL_BYTES.replace(b'/srv/iso/tools.iso', b'/srv/iso/t\xe9\xff.iso')
    image = make_image(config_bytes=raw)
    header = xi.parse_header(image)
    assert xi.encode_header(header) == image[:header.size]


@pytest.mark.parametrize('bad', [{'c_info': {}, 'x': float('nan')}, {'c_info': {}, 'x': object()},
                                 {'c_info': {}, 1: 2}, {'b_info': {}}, ['c_info']])
def test_encode_refuses_what_json_or_libxl_cannot_take(bad):
    header = xi.parse_header(make_image())
    with pytest.raises(InvalidInput):
        xi.encode_header(header, bad)


def test_encode_refuses_huge_config():
    header = xi.parse_header(make_image())
    with pytest.raises(InvalidInput, match='limit'):
        xi.encode_header(header, {'c_info': {'x': 'a' * xi.MAX_CONFIG_BYTES}})


# ---------------------------------------------------------------- transform_config

def config():
    return xi.parse_header(make_image()).config


def test_transform_clone_beside_the_original():
    orig = config()
    orig['c_info']['domid'] = 7  # as saved by xl save -D
    before = json.dumps(orig, sort_keys=True)
    new = xi.transform_config(orig, name='g3-clone', new_uuid=True,
                              disk_map={'/srv/fleetckpt/lab/disks/g3.img': '/root/g3-clone.img'}, drop_nics=True,
                              require_all_disks_mapped=True)
    assert json.dumps(orig, sort_keys=True) == before  # input untouched
    assert new['c_info']['name'] == 'g3-clone'
    assert new['c_info']['uuid'] != orig['c_info']['uuid']
    assert uuid.UUID(new['c_info']['uuid']).version == 4 and new['c_info']['uuid'] == str(uuid.UUID(new['c_info']['uuid']))
    assert 'domid' not in new['c_info']
    assert [d['pdev_path'] for d in new['disks']] == ['/root/g3-clone.img', '/srv/iso/tools.iso']
    assert 'nics' not in new
    assert list(new) == ['c_info', 'b_info', 'disks', 'on_reboot']  # order kept
    assert new['b_info'] == orig['b_info']


def test_transform_nothing_is_identity_copy():
    orig = config()
    new = xi.transform_config(orig)
    assert new == orig and new is not orig and new['c_info'] is not orig['c_info']


def test_transform_explicit_uuid_and_two_fresh_uuids_differ():
    orig = config()
    fixed = xi.transform_config(orig, new_uuid='5FE716FB-0000-4F34-BB1B-45EE77EAC808')
    assert fixed['c_info']['uuid'] == '5fe716fb-0000-4f34-bb1b-45ee77eac808'
    assert fixed['c_info']['name'] == 'g3'
    assert xi.transform_config(orig, new_uuid=True)['c_info']['uuid'] != xi.transform_config(orig, new_uuid=True)['c_info']['uuid']


def test_transform_missing_mapped_disk_lists_the_disks():
    with pytest.raises(InvalidInput, match=r'/nope.img to remap are not in the image config g3; its disks are: '
                                           r'/srv/fleetckpt/lab/disks/g3.img \(xvda\), /srv/iso/tools.iso \(xvdb\)'):
        xi.transform_config(config(), disk_map={'/nope.img': '/x.img'})


def test_transform_require_all_disks_mapped():
    with pytest.raises(InvalidInput, match=r'writable disk\(s\) /srv/fleetckpt/lab/disks/g3.img \(xvda\) of g3 are not '
                                           r'remapped'):
        xi.transform_config(config(), name='g3-clone', require_all_disks_mapped=True)
    # the read-only cdrom needs no mapping
    xi.transform_config(config(), disk_map={'/srv/fleetckpt/lab/disks/g3.img': '/c.img'}, require_all_disks_mapped=True)


def test_transform_drop_nics_without_nics_is_fine():
    orig = config()
    del orig['nics']
    assert 'nics' not in xi.transform_config(orig, drop_nics=True)


@pytest.mark.parametrize('kwargs', [
    {'name': 'a/b'}, {'name': ''}, {'name': 'x' * 65}, {'name': 'bad name'},
    {'new_uuid': 'not-a-uuid'}, {'new_uuid': 5}, {'new_uuid': '00000000-0000-0000-0000-000000000000'},
    {'disk_map': ['a']}, {'disk_map': {'/a': ''}}, {'disk_map': {'': '/b'}}, {'disk_map': {'/a': 'b\x00'}},
])
def test_transform_bad_options(kwargs):
    with pytest.raises(InvalidInput):
        xi.transform_config(config(), **kwargs)
    with pytest.raises(InvalidInput):
        xi.make_transform(**kwargs)


def test_transform_refuses_non_config():
    with pytest.raises(InvalidInput):
        xi.transform_config({'b_info': {}}, name='x')


def test_config_disks():
    assert xi.config_disks(config()) == [
        {'pdev_path': '/srv/fleetckpt/lab/disks/g3.img', 'vdev': 'xvda', 'readwrite': True, 'is_cdrom': False},
        {'pdev_path': '/srv/iso/tools.iso', 'vdev': 'xvdb', 'readwrite': False, 'is_cdrom': True}]
    assert xi.config_disks({}) == []


# ---------------------------------------------------------------- streaming

def test_copy_with_new_header_keeps_the_stream():
    image = make_image(stream=os.urandom(3 * 1024 * 1024 + 17))
    out = io.BytesIO()
    res = xi.copy_with_new_header(io.BytesIO(image), out.write, xi.make_transform(name='g3-clone', drop_nics=True),
                                  chunk=65536)
    data = out.getvalue()
    new = xi.parse_header(data)
    assert new.config['c_info']['name'] == 'g3-clone' and 'nics' not in new.config
    assert data[new.size:] == image[res['header_in']:]
    assert res['stream_bytes'] == 3 * 1024 * 1024 + 17 and res['header_out'] == new.size
    assert res['name'] == 'g3-clone' and res['uuid'] == '5fe716fb-a246-4f34-bb1b-45ee77eac808'


def test_copy_with_identity_transform_is_byte_identical():
    image = make_image(stream=os.urandom(100000))
    out = io.BytesIO()
    xi.copy_with_new_header(io.BytesIO(image), out.write, None)
    assert out.getvalue() == image


def test_copy_with_failing_transform_writes_nothing():
    out = io.BytesIO()
    with pytest.raises(InvalidInput):
        xi.copy_with_new_header(io.BytesIO(make_image()), out.write, xi.make_transform(disk_map={'/x': '/y'}))
    assert out.getvalue() == b''


def test_read_config_path_stream_and_errors(tmp_path):
    path = tmp_path / 'img'
    path.write_bytes(make_image())
    assert xi.read_config(str(path))['c_info']['name'] == 'g3'
    assert xi.read_config(path)['c_info']['name'] == 'g3'
    with open(path, 'rb') as handle:
        assert xi.read_config(handle)['disks'][0]['vdev'] == 'xvda'
    with pytest.raises(StoreError, match='cannot read xl image'):
        xi.read_config(str(tmp_path / 'missing'))
    (tmp_path / 'junk').write_bytes(b'junk')
    with pytest.raises(StoreError, match='truncated'):
        xi.read_config(str(tmp_path / 'junk'))


@pytest.mark.skipif(not HAS_ZSTD, reason='zstd not installed')
def test_read_config_of_a_zstd_image(tmp_path):
    path = tmp_path / 'img.zst'
    big = make_image(stream=os.urandom(4 * 1024 * 1024))
    path.write_bytes(subprocess.run(['zstd', '-q', '-c'], input=big, stdout=subprocess.PIPE, check=True).stdout)
    assert xi.read_header_file(str(path)).config['c_info']['name'] == 'g3'
    # a corrupt .zst: zstd's failure is reported
    path.write_bytes(xi.ZSTD_MAGIC + b'garbage' * 10)
    with pytest.raises(StoreError, match='zstd -d failed'):
        xi.read_config(str(path))
    with pytest.raises(StoreError, match='cannot run'):
        xi.read_config(str(path), zstd_path='/nonexistent/zstd')


# ---------------------------------------------------------------- real headers captured on the lab

@pytest.mark.skipif(not REAL_HEADERS, reason='no captured header fixture')
@pytest.mark.parametrize('path', REAL_HEADERS, ids=os.path.basename)
def test_real_header_round_trip(path):
    with open(path, 'rb') as handle:
        data = handle.read()
    header = xi.parse_header(data)
    assert header.size == len(data)  # fixtures hold the header only
    assert header.byteorder == '<' and header.mandatory_flags == xi.FLAG_JSON | xi.FLAG_STREAMV2
    assert header.optional_flags == 0 and header.tail == b''
    assert header.config['c_info']['name'] == 'g3'
    assert xi.encode_header(header) == data
    assert xi.encode_header(header, json.loads(json.dumps(header.config))) == data
    clone = xi.transform_config(header.config, name='g3-clone', new_uuid=True,
                                disk_map={header.config['disks'][0]['pdev_path']: '/root/g3-clone.img'},
                                drop_nics=True, require_all_disks_mapped=True)
    again = xi.parse_header(xi.encode_header(header, clone))
    assert again.config == clone
