# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Read and rewrite the header of an ``xl save`` image, so a restore can change the domain's configuration.

Layout (Xen 4.17 .. 4.20, ``tools/xl/xl.h`` ``struct save_file_header``, written by
``save_domain_core_writeconfig`` in ``tools/xl/xl_saverestore.c``, read by ``create_domain`` in
``tools/xl/xl_vmcontrol.c``)::

    char     magic[32]          "Xen saved domain, xl format\\n \\0 \\r" (exactly 32 bytes, no terminator)
    uint32_t byteorder          0x01020304 in the saving host's byte order (xl refuses any other value)
    uint32_t mandatory_flags    bit 0 JSON config, bit 1 libxc stream v2; xl refuses unknown bits
    uint32_t optional_flags     always 0; xl ignores it
    uint32_t optional_data_len  length of what follows, no padding or alignment
    optional data:
      uint32_t config_len       host byte order, includes the trailing NUL
      char     config[config_len]   libxl_domain_config JSON (yajl, beautified, 4-space indent) + NUL
      ...                       anything left of optional_data_len: ignored by xl, kept here
    then the libxc migration stream, untouched.

The config is re-serialised exactly as libxl's yajl generator does (``libxl_domain_config_to_json``), so
an unchanged config gives back the very bytes ``xl save`` wrote. Pure except :func:`read_config` on a
zstd-compressed file, which runs ``zstd -d`` for the first bytes only.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import struct
import subprocess
import uuid as uuidlib

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, StoreError
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import validate_vm_name

MAGIC = b'Xen saved domain, xl format\n \x00 \r'
BYTEORDER_VALUE = 0x01020304
FLAG_JSON = 1 << 0
FLAG_STREAMV2 = 1 << 1
KNOWN_MANDATORY_FLAGS = FLAG_JSON | FLAG_STREAMV2
FIXED_SIZE = 48  # 32-byte magic + 4 uint32
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_TAIL_BYTES = 64 * 1024
ZSTD_MAGIC = b'\x28\xb5\x2f\xfd'
COPY_CHUNK = 1024 * 1024
_INDENT = '    '  # yajl's default indent string; libxl only turns beautify on
_ESCAPES = {'\r': '\\r', '\n': '\\n', '\\': '\\\\', '"': '\\"', '\f': '\\f', '\b': '\\b', '\t': '\\t'}


class XlImageHeader:
    """What precedes the libxc stream in an ``xl save`` image.

    ``byteorder`` is ``'<'`` or ``'>'`` (struct notation), ``config`` the parsed libxl_domain_config,
    ``config_bytes`` its raw JSON (without the NUL), ``tail`` optional data after the config (normally
    empty), ``size`` the number of bytes the header takes in the image.
    """

    __slots__ = ('byteorder', 'mandatory_flags', 'optional_flags', 'optional_data', 'config_bytes', 'config',
                 'tail', 'size')

    def __init__(self, byteorder, mandatory_flags, optional_flags, optional_data, config_bytes, config, tail):
        self.byteorder = byteorder
        self.mandatory_flags = mandatory_flags
        self.optional_flags = optional_flags
        self.optional_data = optional_data
        self.config_bytes = config_bytes
        self.config = config
        self.tail = tail
        self.size = FIXED_SIZE + len(optional_data)

    @property
    def stream_version(self):
        """libxc stream version xl passes to libxl (``params.stream_version``)."""
        return 2 if self.mandatory_flags & FLAG_STREAMV2 else 1

    def __repr__(self):
        return ('XlImageHeader(byteorder=%r, mandatory_flags=%#x, optional_flags=%#x, optional_data_len=%d, '
                'name=%r)' % (self.byteorder, self.mandatory_flags, self.optional_flags, len(self.optional_data),
                              config_name(self.config)))


def _read_exactly(reader, size, what):
    chunks = []
    left = size
    while left > 0:
        try:
            chunk = reader.read(left)
        except OSError as exc:
            raise StoreError('reading the xl image %s failed: %s' % (what, exc))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    data = b''.join(chunks)
    if len(data) != size:
        raise StoreError('xl image is truncated: %s needs %d bytes, got %d' % (what, size, len(data)))
    return data


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError('duplicate key %r' % key)
        result[key] = value
    return result


def _reject_constant(name):
    raise ValueError('non-standard JSON constant %s' % name)


def parse_config_json(raw):
    """Parse libxl_domain_config JSON bytes (no NUL) into a dict, keeping key order and odd bytes."""
    try:
        text = raw.decode('utf-8', 'surrogateescape')
        config = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ValueError as exc:
        raise StoreError('xl image config is not valid JSON: %s' % exc)
    if not isinstance(config, dict) or not isinstance(config.get('c_info'), dict):
        raise StoreError('xl image config is not a libxl_domain_config (no c_info object)')
    return config


def read_header(reader, max_config_bytes=MAX_CONFIG_BYTES):
    """Read and validate the header at the start of ``reader`` (binary, ``.read(n)``); consume nothing more."""
    fixed = _read_exactly(reader, FIXED_SIZE, 'header')
    if fixed[:32] != MAGIC:
        if fixed[:4] == ZSTD_MAGIC:
            raise StoreError('not an xl save image: zstd-compressed data (decompress it first)')
        raise StoreError('not an xl save image: bad magic %r' % fixed[:32])
    if struct.unpack('<I', fixed[32:36])[0] == BYTEORDER_VALUE:
        order = '<'
    elif struct.unpack('>I', fixed[32:36])[0] == BYTEORDER_VALUE:
        order = '>'
    else:
        raise StoreError('xl image has an invalid byte order marker %s' % fixed[32:36].hex())
    mandatory, optional, optlen = struct.unpack(order + '3I', fixed[36:])
    unknown = mandatory & ~KNOWN_MANDATORY_FLAGS
    if unknown:
        raise StoreError('xl image has unknown mandatory flag(s) %#x (written by a newer xl?)' % unknown)
    if not mandatory & FLAG_JSON:
        raise StoreError('xl image config is not in JSON (mandatory flags %#x): an image from a very old xl, '
                         'not supported for config rewriting' % mandatory)
    limit = 4 + max_config_bytes + MAX_TAIL_BYTES
    if optlen > limit:
        raise StoreError('xl image header claims %d bytes of optional data (limit %d): corrupt image' % (optlen, limit))
    if optlen < 4:
        raise StoreError('xl image has no config (optional data length %d)' % optlen)
    optdata = _read_exactly(reader, optlen, 'header optional data')
    config_len = struct.unpack(order + 'I', optdata[:4])[0]
    if config_len == 0:
        raise StoreError('xl image has no config (config length 0)')
    if config_len > max_config_bytes:
        raise StoreError('xl image config is %d bytes (limit %d): corrupt image' % (config_len, max_config_bytes))
    if config_len > optlen - 4:
        raise StoreError('xl image header is truncated: config of %d bytes in %d bytes of optional data'
                         % (config_len, optlen - 4))
    raw = optdata[4:4 + config_len]
    if raw[-1:] != b'\x00' or b'\x00' in raw[:-1]:
        raise StoreError('xl image config is not one NUL-terminated string')
    tail = optdata[4 + config_len:]
    if len(tail) > MAX_TAIL_BYTES:
        raise StoreError('xl image has %d unexpected bytes after its config: corrupt image' % len(tail))
    config = parse_config_json(raw[:-1])
    return XlImageHeader(order, mandatory, optional, optdata, raw[:-1], config, tail)


def parse_header(data, max_config_bytes=MAX_CONFIG_BYTES):
    """:func:`read_header` on bytes; ``header.size`` tells where the libxc stream starts."""
    return read_header(io.BytesIO(data), max_config_bytes=max_config_bytes)


def _json_string(text):
    out = []
    for ch in text:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch < ' ':
            out.append('\\u00%02X' % ord(ch))
        else:
            out.append(ch)
    return '"' + ''.join(out) + '"'


def _gen(obj, depth, out):
    if obj is None:
        out.append('null')
    elif obj is True:
        out.append('true')
    elif obj is False:
        out.append('false')
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise InvalidInput('config holds a non-finite number')
        text = '%.20g' % obj
        if text.lstrip('-').isdigit():
            text += '.0'
        out.append(text)
    elif isinstance(obj, str):
        out.append(_json_string(obj))
    elif isinstance(obj, dict):
        out.append('{\n')
        first = True
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InvalidInput('config keys must be strings, got %r' % (key,))
            if not first:
                out.append(',\n')
            first = False
            out.append(_INDENT * (depth + 1))
            out.append(_json_string(key))
            out.append(': ')
            _gen(value, depth + 1, out)
        out.append('\n' + _INDENT * depth + '}')
    elif isinstance(obj, (list, tuple)):
        out.append('[\n')
        first = True
        for value in obj:
            if not first:
                out.append(',\n')
            first = False
            out.append(_INDENT * (depth + 1))
            _gen(value, depth + 1, out)
        out.append('\n' + _INDENT * depth + ']')
    else:
        raise InvalidInput('config holds a %s, which JSON cannot express' % type(obj).__name__)


def config_to_json(config):
    """Serialise like ``libxl_domain_config_to_json`` (yajl beautify): bytes, without the NUL."""
    out = []
    _gen(config, 0, out)
    out.append('\n')
    return ''.join(out).encode('utf-8', 'surrogateescape')


def encode_header(header, config=None):
    """The header bytes for ``config`` (default: ``header.config``), keeping byte order, flags and tail."""
    if config is None:
        config = header.config
    if not isinstance(config, dict) or not isinstance(config.get('c_info'), dict):
        raise InvalidInput('config must be a libxl_domain_config dict with a c_info object')
    raw = config_to_json(config) + b'\x00'
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidInput('config is %d bytes, over the %d limit' % (len(raw), MAX_CONFIG_BYTES))
    order = header.byteorder
    optdata = struct.pack(order + 'I', len(raw)) + raw + header.tail
    mandatory = header.mandatory_flags | FLAG_JSON
    return MAGIC + struct.pack(order + '4I', BYTEORDER_VALUE, mandatory, header.optional_flags, len(optdata)) + optdata


def config_name(config):
    return ((config or {}).get('c_info') or {}).get('name')


def config_disks(config):
    """The disks of a config: [{'pdev_path', 'vdev', 'readwrite', 'is_cdrom'}] in config order."""
    disks = []
    for disk in (config or {}).get('disks') or []:
        if isinstance(disk, dict):
            disks.append({'pdev_path': disk.get('pdev_path'), 'vdev': disk.get('vdev'),
                          'readwrite': bool(disk.get('readwrite')), 'is_cdrom': bool(disk.get('is_cdrom'))})
    return disks


def _check_path(path, what):
    if not isinstance(path, str) or not path:
        raise InvalidInput('%s must be a non-empty string, got %r' % (what, path))
    if '\x00' in path:
        raise InvalidInput('%s contains a NUL byte' % what)
    return path


def _check_options(name, new_uuid, disk_map):
    if name is not None:
        validate_vm_name(name)
    if not isinstance(new_uuid, bool):
        if not isinstance(new_uuid, str):
            raise InvalidInput('new_uuid must be true/false or a UUID string, got %r' % (new_uuid,))
        try:
            new_uuid = str(uuidlib.UUID(new_uuid))
        except ValueError:
            raise InvalidInput('new_uuid %r is not a UUID' % new_uuid)
        if new_uuid == str(uuidlib.UUID(int=0)):
            raise InvalidInput('new_uuid must not be the nil UUID')
    if disk_map is not None:
        if not isinstance(disk_map, dict):
            raise InvalidInput('disk_map must be a mapping {old pdev_path: new pdev_path}')
        for old, new in disk_map.items():
            _check_path(old, 'disk_map key')
            _check_path(new, 'disk_map value for %s' % old)
    return new_uuid


def transform_config(config, *, name=None, new_uuid=False, disk_map=None, drop_nics=False,
                     require_all_disks_mapped=False):
    """A changed copy of a libxl_domain_config; ``config`` is never modified.

    * ``name``: new ``c_info.name``.
    * ``new_uuid``: True for a fresh random ``c_info.uuid``, or a UUID string. Needed for a copy beside the
      original: libxl keys ``/vm/<uuid>`` in XenStore on the uuid, removes it when creating a domain with that
      uuid and again when destroying it, so two domains with one uuid break each other's ``/vm`` node.
    * ``disk_map``: ``{old pdev_path: new pdev_path}``; every key must name a disk of the config.
      ``require_all_disks_mapped`` also refuses writable non-cdrom disks left unmapped (a copy beside the
      original must not write the original's disks).
    * ``drop_nics``: remove every network interface.

    Renaming or a new uuid also drops ``c_info.domid`` (``xl save -D``): a copy cannot have the original's domid.
    """
    new_uuid = _check_options(name, new_uuid, disk_map)
    if not isinstance(config, dict) or not isinstance(config.get('c_info'), dict):
        raise InvalidInput('config must be a libxl_domain_config dict with a c_info object')
    result = copy.deepcopy(config)
    c_info = result['c_info']
    if name is not None:
        c_info['name'] = name
    if new_uuid is True:
        c_info['uuid'] = str(uuidlib.uuid4())
    elif new_uuid:
        c_info['uuid'] = new_uuid
    if name is not None or new_uuid:
        c_info.pop('domid', None)
    disks = result.get('disks') or []
    if disk_map or require_all_disks_mapped:
        disk_map = disk_map or {}
        found = set()
        unmapped = []
        for disk in disks:
            if not isinstance(disk, dict):
                continue
            path = disk.get('pdev_path')
            if path in disk_map:
                disk['pdev_path'] = disk_map[path]
                found.add(path)
            elif disk.get('readwrite') and not disk.get('is_cdrom'):
                unmapped.append('%s (%s)' % (path, disk.get('vdev')))
        missing = sorted(set(disk_map) - found)
        if missing:
            raise InvalidInput('disk(s) %s to remap are not in the image config %s; its disks are: %s'
                               % (', '.join(missing), config_name(config),
                                  ', '.join('%s (%s)' % (d['pdev_path'], d['vdev']) for d in config_disks(config))
                                  or 'none'))
        if require_all_disks_mapped and unmapped:
            raise InvalidInput('writable disk(s) %s of %s are not remapped: a copy would write the original\'s '
                               'disks' % (', '.join(unmapped), config_name(config)))
    if drop_nics:
        result.pop('nics', None)
    return result


def make_transform(*, name=None, new_uuid=False, disk_map=None, drop_nics=False, require_all_disks_mapped=False):
    """A ``config -> config`` callable for :func:`copy_with_new_header` / ``restore_stream``.

    Options are checked now, so bad input fails before any process is started.
    """
    _check_options(name, new_uuid, disk_map)
    disk_map = dict(disk_map) if disk_map is not None else None

    def transform(config):
        return transform_config(config, name=name, new_uuid=new_uuid, disk_map=disk_map, drop_nics=drop_nics,
                                require_all_disks_mapped=require_all_disks_mapped)
    return transform


def rewrite_header(reader, transform):
    """Read the header from ``reader`` and return ``(old_header, new_header_bytes, new_config)``.

    ``transform(config) -> config`` may be None (re-encode unchanged: byte-identical for xl's own images).
    """
    header = read_header(reader)
    new_config = transform(header.config) if transform is not None else header.config
    return header, encode_header(header, new_config), new_config


def copy_with_new_header(reader, write, transform, chunk=COPY_CHUNK):
    """Write to ``write(bytes)`` the image read from ``reader`` with its header rewritten by ``transform``.

    Everything after the header is copied unchanged. Returns ``{'header_in', 'header_out', 'stream_bytes',
    'name', 'uuid'}``.
    """
    header, prefix, new_config = rewrite_header(reader, transform)
    write(prefix)
    copied = 0
    while True:
        data = reader.read(chunk)
        if not data:
            break
        copied += len(data)
        write(data)
    return {'header_in': header.size, 'header_out': len(prefix), 'stream_bytes': copied,
            'name': config_name(new_config), 'uuid': new_config['c_info'].get('uuid')}


def _read_header_zstd(path, zstd_path):
    try:
        proc = subprocess.Popen([zstd_path, '-q', '-d', '-c', path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise StoreError('cannot run %s on %s: %s' % (zstd_path, path, exc))
    try:
        return read_header(proc.stdout)
    except StoreError as exc:
        # a corrupt .zst shows up here as a short header: say so if zstd failed
        try:
            rc = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
        if rc not in (0, None):
            err = proc.stderr.read(2000).decode('utf-8', 'replace').strip()
            raise StoreError('zstd -d failed on %s (rc=%s): %s' % (path, rc, err or exc))
        raise
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def read_header_file(path, zstd_path='zstd'):
    """:func:`read_header` of an image file, plain or zstd-compressed (detected by its magic)."""
    try:
        with open(path, 'rb') as handle:
            if handle.read(4) != ZSTD_MAGIC:
                handle.seek(0)
                return read_header(handle)
    except OSError as exc:
        raise StoreError('cannot read xl image %s: %s' % (path, exc))
    return _read_header_zstd(path, zstd_path)


def read_config(path_or_stream, zstd_path='zstd'):
    """The libxl_domain_config saved in an image: a path (plain or zstd) or a binary stream at its start."""
    if isinstance(path_or_stream, (str, bytes, os.PathLike)):
        return read_header_file(path_or_stream, zstd_path=zstd_path).config
    return read_header(path_or_stream).config
