# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Disk snapshots taken with a checkpoint, so memory and disks are captured together (issue #8).

The flow this module serves (the caller owns it): ``xl save -p`` leaves the domain paused after the save;
while it is paused each writable disk is snapshotted by a *strategy*; then the domain is unpaused (always, in
a ``finally``). Everything a strategy needs is checked before anything is paused (:func:`choose_strategy`).

Strategies (design and measured costs: docs/disk-strategies.md):

* ``copy``    sparse copy of the disk into the checkpoint directory (holes stay holes: SEEK_DATA/SEEK_HOLE,
  plus zero-block detection where the filesystem does not report holes, e.g. NFS 4.1), sha256 of the logical
  content on the fly, temp name + fsync + rename. Works for file and block disks, across hosts.
* ``reflink`` FICLONE clone; only within the disk's own filesystem, so the clone lives beside the disk in
  ``<disk dir>/.fleetckpt/<vm>/<id>/<vdev>.img`` (or in the checkpoint directory when the disk shares its
  filesystem). Local to that filesystem: restorable where that filesystem is mounted.
* ``lvm``     LVM snapshot LV of an LV-backed disk (classic COW snapshot with a size, or a thin snapshot).
* ``qcow2``   internal snapshot ``fleetckpt-<id>`` inside a qcow2 disk served by Xen's qdisk backend: through the
  device model's QMP (``blockdev-snapshot-internal-sync``) while the domain is paused, or ``qemu-img snapshot
  -c`` once the save stopped it. The disk keeps its path, so libxl's view of the domain stays true. Restore:
  ``qemu-img snapshot -a`` (revert) or ``qemu-img convert -l snapshot.name=`` (clone).
* ``none``    memory only: the disk's identity (st_dev, st_ino, size, mtime_ns, ctime_ns, optionally sha256)
  is recorded so a restore can refuse when the disk changed since (:func:`changed_since`).

While paused, :func:`quiesce` first waits for requests still in flight (loop/block device ``inflight``,
blkback's per-vbd counters) and fsyncs file disks; :func:`snapshot_all` then snapshots every disk.

Manifest: one record per disk (:func:`make_record`), ``disk_map`` for restore (:func:`disk_map`), a pure
restore plan per strategy (:func:`restore_plan`) and its executor, validity/size/cleanup helpers for
retention and checkpoint_info. Side effects go through :class:`DiskEnv` so unit tests need no root.
"""

from __future__ import annotations

import array
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import stat as statmod
import struct
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import (
    FleetckptError, InvalidInput, PolicyRefused, StoreError)
from ansible_collections.fleetckpt.xen.plugins.module_utils._qmp import QMP_SOCKET, Qmp, QmpError, find_node, socket_path
from ansible_collections.fleetckpt.xen.plugins.module_utils._xl import SubprocessRunner

STRATEGIES = ('copy', 'reflink', 'lvm', 'qcow2', 'none')
REQUESTS = ('auto',) + STRATEGIES
RESTORE_MODES = ('revert', 'clone', 'consume')

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FS_IOC_GETFLAGS = 0x80086601  # the kernel reads/writes an int despite the 'long' in the macro
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000  # btrfs chattr +C: clones need the same flag on both files
REFLINK_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)

SNAPSHOT_DIR = '.fleetckpt'  # beside a disk: <disk dir>/.fleetckpt/<vm>/<id>/<vdev>.img
CONSUMED = 'consumed.json'  # in a checkpoint dir: its disk snapshots were handed to a restored VM
COPY_CHUNK = 1024 * 1024
ZERO_BLOCK = 4096
DIR_MODE = 0o700
FILE_MODE = 0o600
QCOW_MAGIC = b'QFI\xfb'
LV_TAG = 'fleetckpt'
DEFAULT_LVM_SNAPSHOT_FRACTION = 0.2  # COW area of a classic snapshot, as a fraction of the origin
MIN_LVM_SNAPSHOT_BYTES = 64 * 1024 * 1024
QEMU_DM_CANDIDATES = ('/usr/libexec/xen-qemu-system-i386', '/usr/lib/xen-*/bin/qemu-system-i386',
                      '/usr/lib/xen/bin/qemu-system-i386', '/usr/bin/qemu-system-i386')
QCOW2_SNAPSHOT_PREFIX = 'fleetckpt-'  # internal snapshot names: fleetckpt-<checkpoint id>
LVS_FIELDS = ('lv_name', 'vg_name', 'lv_path', 'lv_dm_path', 'lv_size', 'lv_attr', 'origin', 'pool_lv', 'data_percent',
              'vg_free', 'vg_extent_size', 'lv_kernel_major', 'lv_kernel_minor', 'lv_uuid', 'lv_tags')
_LVS_INTS = ('lv_size', 'vg_free', 'vg_extent_size', 'lv_kernel_major', 'lv_kernel_minor')
_VDEV = re.compile(r'[A-Za-z0-9]{1,32}')
_LVM_NAME = re.compile(r'[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}')
_COPY_FILE = re.compile(r'disk-[A-Za-z0-9]{1,32}\.(img|qcow2)')
_ID_SAFE = re.compile(r'[0-9A-Za-z.-]{1,40}')
_DEFAULT_SCRIPTS = ('', 'block', '/etc/xen/scripts/block')
_QDISK_FORMATS = ('qcow', 'qcow2', 'vhd', 'qed')


# ------------------------------------------------------------------------------------------------------------
# environment: every side effect, so unit tests can substitute fakes
# ------------------------------------------------------------------------------------------------------------
def default_runner():
    """xl's runner (timeouts, typed errors), with LVM told not to warn about the file descriptors an Ansible
    module inherits, and to speak C."""
    return SubprocessRunner(env={'LC_ALL': 'C', 'LVM_SUPPRESS_FD_WARNINGS': '1'})


class DiskEnv:
    """The host as this module sees it. Override methods (or pass a runner / ioctl) in tests."""

    def __init__(self, runner=None, ioctl=None, host=None, sysfs='/sys', mountinfo='/proc/self/mountinfo',
                 clock=time.monotonic, sleep=time.sleep, timeout=120, which=None, qemu_candidates=None):
        self.runner = runner or default_runner()
        self.ioctl = ioctl or fcntl.ioctl
        self.host = host or socket.gethostname()
        self.sysfs = sysfs
        self.mountinfo_path = mountinfo
        self.clock = clock
        self.sleep = sleep
        self.timeout = timeout
        self._which = which
        self.qemu_candidates = QEMU_DM_CANDIDATES if qemu_candidates is None else qemu_candidates

    def stat(self, path):
        return os.stat(path)

    def fresh_stat(self, path):
        """stat through an open descriptor: an NFS client revalidates a file's attributes on open
        (close-to-open), where a plain stat may answer from its attribute cache for up to a minute."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return self.stat(path)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def statvfs(self, path):
        return os.statvfs(path)

    def exists(self, path):
        return os.path.exists(path)

    def read_text(self, path):
        with open(path) as handle:
            return handle.read()

    def listdir(self, path):
        return os.listdir(path)

    def glob(self, pattern):
        return sorted(glob.glob(pattern))

    def which(self, name):
        if self._which is not None:
            return self._which(name)
        return shutil.which(name, path=os.environ.get('PATH', '') + ':/sbin:/usr/sbin')

    def run(self, argv, timeout=None):
        return self.runner.run(list(argv), timeout or self.timeout)

    def mounts(self):
        try:
            return parse_mountinfo(self.read_text(self.mountinfo_path))
        except OSError:
            return []


# ------------------------------------------------------------------------------------------------------------
# disks of a domain config
# ------------------------------------------------------------------------------------------------------------
def _effective_backend(backend, fmt):
    """libxl's choice when the config leaves the backend to it (``libxl__device_disk_set_backend``): blkback
    ('phy', a loop device for a file) for raw, the qdisk QEMU for image formats."""
    if backend not in ('', 'unknown'):
        return backend
    return 'qdisk' if fmt in _QDISK_FORMATS else 'phy'


def disk_specs(config, stat=os.stat):
    """The disks of a libxl_domain_config (``xl list -l`` or an image header) as plain dicts.

    Each: ``target`` (pdev_path), ``vdev``, ``format`` ('raw', 'qcow2', ..., 'unknown'), ``backend`` (what
    libxl uses: the configured one, else 'phy' for raw and 'qdisk' for image formats), ``backend_configured``,
    ``readwrite``, ``is_cdrom``, ``script`` and ``kind``: 'file' | 'block' (stat of the target on this host),
    'missing' (not visible here), 'empty' (empty cdrom drive), 'script' (a custom hotplug script: the target
    is not a path), 'other'.
    """
    specs = []
    seen = set()
    for index, disk in enumerate((config or {}).get('disks') or []):
        if not isinstance(disk, dict):
            raise InvalidInput('disk #%d of the config is not an object' % index)
        vdev = disk.get('vdev')
        if not isinstance(vdev, str) or not _VDEV.fullmatch(vdev):
            raise InvalidInput('disk #%d has an unusable vdev %r' % (index, vdev))
        if vdev in seen:
            raise InvalidInput('vdev %s appears twice in the config' % vdev)
        seen.add(vdev)
        target = disk.get('pdev_path') or None
        if target is not None and (not isinstance(target, str) or '\x00' in target):
            raise InvalidInput('disk %s has an unusable target %r' % (vdev, target))
        fmt = str(disk.get('format') or 'unknown').lower()
        backend_configured = str(disk.get('backend') or 'unknown').lower()
        script = disk.get('script') or ''
        spec = {'target': target, 'vdev': vdev, 'format': fmt, 'backend': _effective_backend(backend_configured, fmt),
                'backend_configured': backend_configured, 'readwrite': bool(disk.get('readwrite')),
                'is_cdrom': bool(disk.get('is_cdrom')), 'script': script or None}
        if not target or fmt == 'empty':
            spec['kind'] = 'empty'
        elif script not in _DEFAULT_SCRIPTS:
            spec['kind'] = 'script'
        elif not os.path.isabs(target):
            spec['kind'] = 'other'
        else:
            try:
                mode = stat(target).st_mode
            except OSError:
                spec['kind'] = 'missing'
            else:
                spec['kind'] = 'block' if statmod.S_ISBLK(mode) else 'file' if statmod.S_ISREG(mode) else 'other'
        specs.append(spec)
    return specs


def needs_snapshot(disk):
    """Whether the guest can change this disk: only writable, non-cdrom disks need a snapshot."""
    return bool(disk.get('readwrite')) and not disk.get('is_cdrom') and disk.get('kind') != 'empty'


# ------------------------------------------------------------------------------------------------------------
# probing (all before anything is paused)
# ------------------------------------------------------------------------------------------------------------
def _unescape_mount(text):
    return re.sub(r'\\([0-7]{3})', lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text):
    """``/proc/self/mountinfo`` -> [{'mount_point', 'fstype', 'source', 'options', 'dev'}] in file order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if '-' not in fields or len(fields) < 7:
            continue
        sep = fields.index('-')
        if len(fields) < sep + 3:
            continue
        mounts.append({'mount_point': _unescape_mount(fields[4]), 'dev': fields[2], 'options': fields[5],
                       'fstype': fields[sep + 1], 'source': _unescape_mount(fields[sep + 2])})
    return mounts


def mount_of(path, mounts):
    """The mount holding ``path`` (longest mount point that is a prefix; the last one wins when stacked)."""
    best = None
    for mount in mounts:
        point = mount['mount_point']
        if path == point or path.startswith(point.rstrip('/') + '/') or point == '/':
            if best is None or len(point) >= len(best['mount_point']):
                best = mount
    return best


def parse_qcow_header(data):
    """Facts from the first bytes of a qcow/qcow2 image, or None when ``data`` is not one."""
    if len(data) < 32 or data[:4] != QCOW_MAGIC:
        return None
    version, backing_offset, backing_size = struct.unpack('>IQI', data[4:20])
    size = struct.unpack('>Q', data[24:32])[0]
    info = {'version': version, 'virtual_size': size, 'has_backing_file': backing_offset != 0 and backing_size != 0}
    if len(data) >= 64 and version >= 2:
        info['snapshots'] = struct.unpack('>I', data[60:64])[0]
    return info


def _read_head(path, size=512):
    with open(path, 'rb') as handle:
        return handle.read(size)


def find_qemu_dm(env):
    """The QEMU device model Xen's qdisk backend would run, or None. Only a Xen build serves qdisk: a plain
    distribution qemu-system-i386 is reported with ``xen_build: False`` unless it sits in a Xen path."""
    for pattern in env.qemu_candidates:
        for path in (env.glob(pattern) if '*' in pattern else [pattern]):
            if env.exists(path):
                return {'path': path, 'xen_build': path != '/usr/bin/qemu-system-i386'}
    return None


def parse_lvs_json(text):
    """LV rows of ``lvs --reportformat json`` (or json_std) output with ``--units b --nosuffix``.

    Sizes and kernel major/minor become ints (None when empty or -1), ``data_percent`` a float or None,
    ``lv_tags`` a list."""
    start = text.find('{')  # LVM may print WARNING lines before the report
    try:
        data = json.loads(text[start:] if start >= 0 else text)
    except ValueError as exc:
        raise FleetckptError('lvs printed no JSON: %s' % exc)
    rows = []
    for report in (data.get('report') or []) if isinstance(data, dict) else []:
        for lv in (report.get('lv') or []) if isinstance(report, dict) else []:
            if not isinstance(lv, dict):
                continue
            row = dict(lv)
            for key in _LVS_INTS:
                value = row.get(key)
                if value in (None, ''):
                    row[key] = None
                    continue
                try:
                    number = int(float(str(value).rstrip('Bb')))
                except ValueError:
                    raise FleetckptError('lvs field %s=%r is not a number (use --units b --nosuffix)' % (key, value))
                row[key] = None if number < 0 and key.startswith('lv_kernel') else number
            pct = row.get('data_percent')
            row['data_percent'] = float(pct) if pct not in (None, '') else None
            tags = row.get('lv_tags') or ''
            row['lv_tags'] = tags if isinstance(tags, list) else [t for t in str(tags).split(',') if t]
            rows.append(row)
    return rows


def lvs_argv(selector=None, lvs='lvs'):
    argv = [lvs, '--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', ','.join(LVS_FIELDS)]
    if selector:
        argv.append(selector)
    return argv


def find_lv(rows, rdev=None, path=None):
    """The LV whose kernel device is ``rdev`` (st_rdev), else the one whose lv_path / lv_dm_path is ``path``."""
    if rdev is not None:
        major, minor = os.major(rdev), os.minor(rdev)
        for row in rows:
            if row.get('lv_kernel_major') == major and row.get('lv_kernel_minor') == minor:
                return row
    if path:
        for row in rows:
            if path in (row.get('lv_path'), row.get('lv_dm_path')):
                return row
    return None


def lv_kind(row):
    """'linear' (an ordinary LV, also one that is already a snapshot origin), 'thin', 'snapshot', 'thin-pool'
    or 'other' (mirror, raid, cache, ...) from lv_attr[0]."""
    attr = (row.get('lv_attr') or '-')[0]
    if attr in '-o':
        return 'linear'
    if attr == 'V':
        return 'thin'
    if attr in 'sS':
        return 'snapshot'
    if attr in 'tT':
        return 'thin-pool'
    return 'other'


def probe(disk, env=None, lvs_rows=None):
    """What is true of one disk on this host, for :func:`choose_strategy`: exists, kind, size, allocated bytes,
    st_dev/st_ino, filesystem (type, mount point), qcow header, LV, loop devices serving it."""
    env = env or DiskEnv()
    facts = {'target': disk.get('target'), 'kind': disk.get('kind'), 'exists': False, 'size': None,
             'allocated': None, 'st_dev': None, 'st_ino': None, 'st_rdev': None, 'fstype': None, 'mount_point': None,
             'qcow': None, 'lv': None, 'lvm_tools': None, 'loop_devices': [], 'problems': []}
    target = disk.get('target')
    if disk.get('kind') in ('empty', 'script', 'other') or not target:
        return facts
    try:
        st = env.stat(target)
    except OSError as exc:
        facts['problems'].append('%s is not accessible on %s: %s' % (target, env.host, exc.strerror or exc))
        return facts
    facts.update(exists=True, st_dev=st.st_dev, st_ino=st.st_ino)
    if statmod.S_ISBLK(st.st_mode):
        facts['kind'] = 'block'
        facts['st_rdev'] = st.st_rdev
        facts['size'] = block_size(env, st.st_rdev)
        facts['lvm_tools'] = bool(env.which('lvcreate') and env.which('lvs'))
        if facts['lvm_tools']:
            rows = lvs_rows
            if rows is None:
                rc, out, err = env.run(lvs_argv())
                rows = parse_lvs_json(out) if rc == 0 else []
                if rc != 0:
                    facts['problems'].append('lvs failed (rc=%s): %s' % (rc, (err or out).strip()[-300:]))
            facts['lv'] = find_lv(rows, rdev=st.st_rdev, path=target)
    else:
        facts['kind'] = 'file' if statmod.S_ISREG(st.st_mode) else 'other'
        facts['size'] = st.st_size
        facts['allocated'] = st.st_blocks * 512
        mount = mount_of(os.path.realpath(target), env.mounts())
        if mount:
            facts.update(fstype=mount['fstype'], mount_point=mount['mount_point'])
        facts['loop_devices'] = loop_devices_for(target, env)
        try:
            facts['qcow'] = parse_qcow_header(_read_head(target))
        except OSError:
            facts['qcow'] = None
    return facts


def block_size(env, rdev):
    """Size in bytes of a block device from sysfs (512-byte sectors), or None."""
    try:
        return int(env.read_text('%s/dev/block/%d:%d/size' % (env.sysfs, os.major(rdev), os.minor(rdev))).strip()) * 512
    except (OSError, ValueError):
        return None


def loop_devices_for(path, env):
    """Loop devices whose backing file is ``path`` (how blkback serves a file-backed 'phy' disk)."""
    found = []
    real = os.path.realpath(path)
    try:
        names = env.listdir('%s/block' % env.sysfs)
    except OSError:
        return found
    for name in sorted(names):
        if not name.startswith('loop'):
            continue
        try:
            backing = env.read_text('%s/block/%s/loop/backing_file' % (env.sysfs, name)).strip()
        except OSError:
            continue
        if backing in (path, real):
            found.append(name)
    return found


# ------------------------------------------------------------------------------------------------------------
# strategy selection
# ------------------------------------------------------------------------------------------------------------
def _free_bytes(env, path):
    try:
        st = env.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_strategy(name, disk, facts, dest, env=None, stopped=False, force_none=False, lvm_size=None, domid=None):
    """Reasons why strategy ``name`` cannot snapshot ``disk`` here ([] = it can). Cheap and side-effect free
    except for ``reflink``, which clones a 4 KiB probe file beside the disk (and removes it)."""
    env = env or DiskEnv()
    if name not in STRATEGIES:
        raise InvalidInput('unknown disk strategy %r (one of %s)' % (name, ', '.join(REQUESTS)))
    kind = facts.get('kind') or disk.get('kind')
    fmt = disk.get('format')
    problems = []
    if name == 'none':
        if needs_snapshot(disk) and not (stopped or force_none):
            problems.append('memory-only (none) for writable disk %s of a VM that keeps running: its disk moves on '
                            'and the checkpoint could only be restored onto a changed disk; allowed only when the '
                            'save stops the VM or when forced' % disk['vdev'])
        return problems
    if kind in ('empty', 'script', 'other', 'missing') or not facts.get('exists'):
        what = {'empty': 'an empty drive', 'script': 'served by hotplug script %s' % disk.get('script'),
                'other': 'neither a file nor a block device'}.get(kind, 'not visible')
        return ['%s (%s) is %s on %s: only none applies' % (disk.get('target'), disk['vdev'], what, env.host)]
    qdisk_live = disk.get('backend') == 'qdisk' and not stopped
    if name == 'copy':
        if qdisk_live:
            problems.append('%s is served by the qdisk QEMU, which may hold unwritten qcow2 metadata: a byte copy '
                            'while the VM lives is not consistent (use qcow2, or stop the VM with the save)' % disk['vdev'])
        need = facts.get('allocated') if kind == 'file' else facts.get('size')
        free = _free_bytes(env, dest['dir']) if dest and dest.get('dir') else None
        if need is not None and free is not None and free < need:
            problems.append('copy of %s needs up to %d MiB in %s, %d MiB free' % (disk['vdev'], need >> 20, dest['dir'], free >> 20))
    elif name == 'reflink':
        if kind != 'file':
            problems.append('reflink needs a file-backed disk; %s is a %s device' % (disk['vdev'], kind))
        elif qdisk_live:
            problems.append('%s is served by the qdisk QEMU (format %s): a clone while it runs is not consistent' % (disk['vdev'], fmt))
        else:
            reason = trial_reflink(os.path.dirname(disk['target']), env)
            if reason:
                problems.append('reflink of %s: %s (filesystem %s at %s)'
                                % (disk['vdev'], reason, facts.get('fstype') or '?', facts.get('mount_point') or '?'))
    elif name == 'lvm':
        lv = facts.get('lv')
        if kind != 'block':
            problems.append('lvm needs an LV-backed disk; %s is a file' % disk['vdev'])
        elif facts.get('lvm_tools') is False:
            problems.append('lvm tools (lvs, lvcreate) are not installed on %s' % env.host)
        elif not lv:
            problems.append('%s (%s) is a block device but not an LVM logical volume' % (disk['target'], disk['vdev']))
        else:
            kind_lv = lv_kind(lv)
            if kind_lv not in ('linear', 'thin'):
                problems.append('%s/%s is a %s LV: only ordinary and thin LVs are snapshotted' % (lv['vg_name'], lv['lv_name'], kind_lv))
            elif kind_lv == 'linear':
                size = snapshot_size(lv, lvm_size)
                if lv.get('vg_free') is not None and lv['vg_free'] < size:
                    problems.append('volume group %s has %d MiB free; a snapshot of %s needs %d MiB (lvm_snapshot_size)'
                                    % (lv['vg_name'], lv['vg_free'] >> 20, lv['lv_name'], size >> 20))
    elif name == 'qcow2':
        problems.extend(qcow2_problems(disk, facts, env, domid=domid, stopped=stopped))
    return problems


def qcow2_problems(disk, facts, env, domid=None, stopped=False):
    """Reasons why the qcow2 strategy cannot snapshot ``disk`` here ([] = it can). A VM that keeps running needs
    its device model's QMP socket (``domid``: checked when known); after a save that stops the VM, qemu-img
    snapshots the file itself."""
    problems = []
    if disk.get('format') not in ('qcow2',) and not (facts.get('qcow') or {}).get('version'):
        problems.append('%s is not a qcow2 disk (format %s)' % (disk['vdev'], disk.get('format')))
        return problems
    if (facts.get('qcow') or {}).get('version', 3) < 2:
        problems.append('%s is a qcow version 1 image: internal snapshots need qcow2' % disk['vdev'])
    if facts.get('kind', disk.get('kind')) != 'file':
        problems.append('%s: internal qcow2 snapshots are taken in an image file, not a %s device'
                        % (disk['vdev'], facts.get('kind', disk.get('kind'))))
    qemu = find_qemu_dm(env)
    if qemu is None or not qemu['xen_build']:
        problems.append('qcow2 disks need Xen\'s qdisk backend, a QEMU built for Xen: none on %s (Debian: install '
                        'qemu-system-xen)' % env.host)
    if not env.which('qemu-img'):
        problems.append('qemu-img is not installed on %s (Debian: qemu-utils): the snapshot could not be checked, '
                        'reverted or cloned' % env.host)
    if not stopped and disk.get('backend') not in (None, 'qdisk'):
        problems.append('%s is served by the %s backend, not qdisk: no QEMU to snapshot it while the VM runs'
                        % (disk['vdev'], disk.get('backend')))
    elif not stopped and domid is not None and not env.exists(socket_path(domid)):
        problems.append('no QMP socket %s: no device model runs for domain %s' % (socket_path(domid), domid))
    return problems


def qcow2_snapshot_name(ckpt_id):
    if not isinstance(ckpt_id, str) or not _ID_SAFE.fullmatch(ckpt_id):
        raise InvalidInput('bad checkpoint id for a qcow2 snapshot name: %r' % (ckpt_id,))
    return QCOW2_SNAPSHOT_PREFIX + ckpt_id


def parse_qemu_img_snapshots(text):
    """Names of the internal snapshots in ``qemu-img info --output=json`` output (strictly parsed)."""
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise StoreError('qemu-img info did not print JSON: %s' % exc)
    if not isinstance(info, dict):
        raise StoreError('qemu-img info printed %r, not an object' % (type(info).__name__,))
    snaps = info.get('snapshots') or []
    if not isinstance(snaps, list):
        raise StoreError('qemu-img info: snapshots is not a list')
    return [sn['name'] for sn in snaps if isinstance(sn, dict) and isinstance(sn.get('name'), str)]


def _same_fs(env, facts, dest):
    if not dest or not dest.get('dir') or facts.get('st_dev') is None:
        return False
    try:
        return env.stat(dest['dir']).st_dev == facts['st_dev']
    except OSError:
        return False


def _auto_order(disk, facts, portable, same_fs):
    kind = facts.get('kind') or disk.get('kind')
    if disk.get('format') in _QDISK_FORMATS or disk.get('backend') == 'qdisk':
        return ['qcow2', 'copy']
    if kind == 'block':
        return ['copy'] if portable else ['lvm', 'copy']
    # a clone on the store's own filesystem lands in the checkpoint dir: as portable as a copy
    return ['copy'] if portable and not same_fs else ['reflink', 'copy']


def choose_strategy(disk, requested='auto', facts=None, dest=None, env=None, stopped=False, force_none=False,
                    portable=False, lvm_size=None, domid=None):
    """Pick the strategy for one disk, or raise PolicyRefused with every reason, before anything is paused.

    ``requested``: 'auto' or one of STRATEGIES. ``stopped``: the save stops the VM (no -c/-p), so its disks
    cannot move on (then 'none' is allowed, and copying a qdisk disk is consistent). ``force_none``: allow
    memory-only for a VM that keeps running. ``portable``: the checkpoint must restore on any host that
    sees the store (auto then skips lvm, and reflink unless the disk is on the store's own filesystem, where
    the clone goes into the checkpoint dir).
    Returns ``{'vdev', 'strategy', 'reason', 'rejected': {strategy: [reasons]}}``.
    """
    env = env or DiskEnv()
    if requested not in REQUESTS:
        raise InvalidInput('disk strategy must be one of %s, got %r' % (', '.join(REQUESTS), requested))
    facts = facts if facts is not None else probe(disk, env)
    rejected = {}
    if not needs_snapshot(disk):
        why = 'read-only disk' if not disk.get('readwrite') else 'cdrom' if disk.get('is_cdrom') else 'empty drive'
        if requested not in ('auto', 'none'):
            why += ' (requested %s not needed: the guest cannot change it)' % requested
        return {'vdev': disk['vdev'], 'strategy': 'none', 'reason': '%s: identity recorded, not copied' % why,
                'rejected': rejected}
    if requested == 'auto' and stopped:
        return {'vdev': disk['vdev'], 'strategy': 'none', 'reason': 'auto: the save stops the VM, so its disk does not '
                'move on until the restore (identity recorded; a restore refuses if it changed)', 'rejected': rejected}
    if requested != 'auto':
        problems = check_strategy(requested, disk, facts, dest, env, stopped=stopped, force_none=force_none,
                                  lvm_size=lvm_size, domid=domid)
        if problems:
            raise PolicyRefused('disk %s (%s): strategy %s cannot work here: %s'
                                % (disk['vdev'], disk.get('target'), requested, '; '.join(problems)))
        return {'vdev': disk['vdev'], 'strategy': requested, 'reason': 'requested', 'rejected': rejected}
    for name in _auto_order(disk, facts, portable, _same_fs(env, facts, dest)):
        problems = check_strategy(name, disk, facts, dest, env, stopped=stopped, force_none=force_none, lvm_size=lvm_size,
                                  domid=domid)
        if not problems:
            reason = 'auto: %s' % name
            if rejected:
                reason += ' (%s)' % '; '.join('%s: %s' % (k, ' / '.join(v)) for k, v in rejected.items())
            return {'vdev': disk['vdev'], 'strategy': name, 'reason': reason, 'rejected': rejected}
        rejected[name] = problems
    if stopped or force_none:
        return {'vdev': disk['vdev'], 'strategy': 'none', 'reason': 'auto: no snapshot possible; memory-only '
                '(%s)' % ('VM stopped by the save' if stopped else 'forced'), 'rejected': rejected}
    raise PolicyRefused('disk %s (%s): no strategy can snapshot it here: %s' % (
        disk['vdev'], disk.get('target'), '; '.join('%s: %s' % (k, ' / '.join(v)) for k, v in rejected.items())))


def plan_disks(config, requested='auto', dest=None, env=None, per_disk=None, **options):
    """:func:`choose_strategy` for every disk of a config; ``per_disk`` maps vdev -> requested strategy.
    Raises on the first disk that cannot be handled, so a checkpoint is refused before the VM is touched."""
    env = env or DiskEnv()
    plans = []
    for disk in disk_specs(config, stat=env.stat):
        facts = probe(disk, env)
        choice = choose_strategy(disk, (per_disk or {}).get(disk['vdev'], requested), facts=facts, dest=dest, env=env,
                                 **options)
        plans.append({'disk': disk, 'facts': facts, 'choice': choice})
    return plans


# ------------------------------------------------------------------------------------------------------------
# primitives: sparse copy, sparse sha256, reflink
# ------------------------------------------------------------------------------------------------------------
def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(action, path, exc):
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return StoreError('no space left while %s %s' % (action, path))
        if exc.errno == errno.EROFS:
            return StoreError('read-only filesystem while %s %s' % (action, path))
    return StoreError('%s %s failed: %s' % (action, path, exc))


def _extents(fd, size):
    """(start, end, is_data) covering [0, size). Uses SEEK_DATA/SEEK_HOLE; where unsupported (block devices,
    some filesystems) the whole range is one data extent. Returns (extents, 'seek'|'none')."""
    out = []
    pos = 0
    try:
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                    out.append((pos, size, False))
                    break
                raise
            if data >= size:
                out.append((pos, size, False))
                break
            if data > pos:
                out.append((pos, data, False))
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            out.append((data, hole, True))
            pos = hole
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ESPIPE):
            return [(0, size, True)] if size else [], 'none'
        raise
    return out, 'seek'


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


_COARSE = 64 * 1024


def _is_zero(buf, start, end, zeros):
    # a bytes slice compares with memcmp; a memoryview compares element by element, ~30x slower
    size = end - start
    return buf[start:end] == (zeros if size == len(zeros) else zeros[:size])


def _runs(buf, length, block, zero_block):
    """Runs (start, end) of buf[:length] that are not ``block``-aligned zero blocks (a zero partial tail block
    counts as zero). Two levels to keep Python iterations few: a 64 KiB piece without one zero block (one
    C-speed ``bytes.find``) is data, an all-zero piece is a hole; only mixed pieces are scanned per block."""
    if buf.find(zero_block, 0, length) < 0:
        return [(0, length)]
    coarse = max(_COARSE // block, 1) * block
    zero_coarse = bytes(coarse)
    runs = []
    start = None

    def mark(pos, is_zero):
        nonlocal start
        if not is_zero and start is None:
            start = pos
        elif is_zero and start is not None:
            runs.append((start, pos))
            start = None

    piece = 0
    while piece < length:
        piece_end = min(piece + coarse, length)
        if buf.find(zero_block, piece, piece_end) < 0 and piece_end - piece >= block:
            mark(piece, False)
        elif _is_zero(buf, piece, piece_end, zero_coarse):
            mark(piece, True)
        else:
            pos = piece
            while pos < piece_end:
                end = min(pos + block, piece_end)
                mark(pos, _is_zero(buf, pos, end, zero_block))
                pos = end
        piece = piece_end
    if start is not None:
        runs.append((start, length))
    return runs


def _device_size(fd, st):
    if statmod.S_ISBLK(st.st_mode):
        size = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        return size
    return st.st_size


def sparse_copy(src, dst, digest=True, chunk=COPY_CHUNK, zero_block=ZERO_BLOCK, zero_detect=True, fsync=True,
                mode=FILE_MODE, clock=time.monotonic, in_place=False, expect_sha256=None):
    """Copy ``src`` (file or block device) to ``dst`` keeping holes, hashing the logical content.

    Holes of the source (SEEK_DATA/SEEK_HOLE) are never read; data chunks that are all zero (per
    ``zero_block`` bytes) are not written either, so a filesystem that does not report holes (NFS 4.1, block
    devices) still gives a sparse copy. The copy is written to ``dst.tmp-<pid>``, fsynced, renamed to ``dst``
    and the directory fsynced. ``in_place``: ``dst`` is an existing file or block device written over in place
    (restore onto a block device): holes are written as zeros, nothing is renamed. ``expect_sha256``: the source
    must have this content (a checkpoint's copy read once, verified while it is copied): otherwise the copy is
    removed before it replaces ``dst`` (in place: the error says ``dst`` was written) and StoreError raised.

    Returns ``{'size', 'sha256', 'bytes_read', 'bytes_written', 'allocated', 'data_extents', 'hole_detection',
    'seconds'}``.
    """
    t0 = clock()
    hasher = hashlib.sha256() if digest or expect_sha256 else None
    zero_chunk = bytes(chunk)
    zero_small = bytes(zero_block)
    try:
        sfd = os.open(src, os.O_RDONLY)
    except OSError as exc:
        raise _io_error('opening', src, exc)
    tmp = dst if in_place else '%s.tmp-%d' % (dst, os.getpid())
    dfd = None
    stats = {'bytes_read': 0, 'bytes_written': 0, 'data_extents': 0}
    try:
        st = os.fstat(sfd)
        size = _device_size(sfd, st)
        extents, detection = _extents(sfd, size)
        try:
            dfd = os.open(tmp, os.O_WRONLY) if in_place else os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as exc:
            raise _io_error('creating', tmp, exc)
        zero_seen = False
        for start, end, is_data in extents:
            pos = start
            if not is_data:
                while pos < end:
                    n = min(chunk, end - pos)
                    if hasher:
                        hasher.update(zero_chunk[:n] if n < chunk else zero_chunk)
                    if in_place:
                        _pwrite_all(dfd, zero_chunk[:n], pos)
                        stats['bytes_written'] += n
                    pos += n
                continue
            stats['data_extents'] += 1
            while pos < end:
                want = min(chunk, end - pos)
                data = os.pread(sfd, want, pos)
                if len(data) != want:
                    raise StoreError('%s changed size while being copied (short read at %d)' % (src, pos))
                stats['bytes_read'] += want
                if hasher:
                    hasher.update(data)
                if in_place:
                    _pwrite_all(dfd, data, pos)
                    stats['bytes_written'] += want
                elif not zero_detect:
                    _pwrite_all(dfd, data, pos)
                    stats['bytes_written'] += want
                elif data == (zero_chunk if want == chunk else zero_chunk[:want]):
                    zero_seen = True
                else:
                    runs = _runs(data, want, zero_block, zero_small)
                    if len(runs) != 1 or runs[0] != (0, want):
                        zero_seen = True
                    view = memoryview(data)
                    for run_start, run_end in runs:
                        _pwrite_all(dfd, view[run_start:run_end], pos + run_start)
                        stats['bytes_written'] += run_end - run_start
                pos += want
        if not in_place:
            os.ftruncate(dfd, size)
        if fsync:
            os.fsync(dfd)
        allocated = os.fstat(dfd).st_blocks * 512
        os.close(dfd)
        dfd = None
        if expect_sha256 and hasher.hexdigest() != expect_sha256:
            raise StoreError('%s does not match its recorded sha256 (%s, recorded %s)%s' % (
                src, hasher.hexdigest(), expect_sha256, '; %s was written with it' % dst if in_place else
                '; %s left as it was' % dst))
        if not in_place:
            os.rename(tmp, dst)
            if fsync:
                _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    except BaseException as exc:
        if dfd is not None:
            os.close(dfd)
        if not in_place:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise _io_error('copying %s to' % src, dst, exc) from exc
        raise
    finally:
        os.close(sfd)
    if detection == 'none' and zero_detect:
        detection = 'zero-blocks'
    elif zero_detect and zero_seen:
        detection += '+zero-blocks'
    stats.update(size=size, sha256=hasher.hexdigest() if hasher else None, allocated=allocated,
                 hole_detection=detection, seconds=round(clock() - t0, 3))
    return stats


def sha256_sparse(path, chunk=COPY_CHUNK):
    """sha256 of a file's (or block device's) logical content, never reading its holes."""
    hasher = hashlib.sha256()
    zero_chunk = bytes(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = _device_size(fd, os.fstat(fd))
        extents = _extents(fd, size)[0]
        for start, end, is_data in extents:
            pos = start
            while pos < end:
                n = min(chunk, end - pos)
                if is_data:
                    data = os.pread(fd, n, pos)
                    if len(data) != n:
                        raise StoreError('%s changed size while being hashed' % path)
                    hasher.update(data)
                else:
                    hasher.update(zero_chunk if n == chunk else zero_chunk[:n])
                pos += n
    finally:
        os.close(fd)
    return hasher.hexdigest()


def _copy_nocow(src_fd, dst_fd, ioctl):
    """btrfs refuses to clone between a nodatacow (chattr +C) file and a normal one: give the empty clone
    the source's flag. Best effort: filesystems without these flags just say ENOTTY."""
    try:
        flags = array.array('i', [0])
        ioctl(src_fd, FS_IOC_GETFLAGS, flags, True)
        if flags[0] & FS_NOCOW_FL:
            ioctl(dst_fd, FS_IOC_SETFLAGS, array.array('i', [FS_NOCOW_FL]), True)
    except (OSError, TypeError):
        pass


def reflink(src, dst, ioctl=None, fsync=True, mode=FILE_MODE, clock=time.monotonic):
    """Clone ``src`` into a new file ``dst`` with FICLONE (same filesystem only), via a temp name + rename.

    Raises PolicyRefused when the filesystem cannot clone (EOPNOTSUPP, EXDEV, EINVAL, ...), StoreError on other
    I/O errors. Returns ``{'size', 'seconds'}``."""
    ioctl = ioctl or fcntl.ioctl
    t0 = clock()
    tmp = '%s.tmp-%d' % (dst, os.getpid())
    try:
        sfd = os.open(src, os.O_RDONLY)
    except OSError as exc:
        raise _io_error('opening', src, exc)
    dfd = None
    try:
        size = os.fstat(sfd).st_size
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as exc:
            raise _io_error('creating', tmp, exc)
        _copy_nocow(sfd, dfd, ioctl)
        try:
            ioctl(dfd, FICLONE, sfd)
        except OSError as exc:
            if exc.errno in REFLINK_UNSUPPORTED:
                code = 'EOPNOTSUPP' if exc.errno == errno.EOPNOTSUPP else errno.errorcode.get(exc.errno, exc.errno)
                raise PolicyRefused('cannot reflink %s to %s: %s (%s): the filesystem does not support FICLONE '
                                    'there' % (src, dst, code, os.strerror(exc.errno)))
            raise _io_error('cloning %s to' % src, dst, exc)
        if fsync:
            os.fsync(dfd)
        os.close(dfd)
        dfd = None
        os.rename(tmp, dst)
        if fsync:
            _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    except BaseException:
        if dfd is not None:
            os.close(dfd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(sfd)
    return {'size': size, 'seconds': round(clock() - t0, 3)}


def trial_reflink(directory, env=None):
    """None when FICLONE works in ``directory`` (tested on a 4 KiB probe file in ``directory/.fleetckpt``,
    removed after), else the reason."""
    env = env or DiskEnv()
    base = os.path.join(directory, SNAPSHOT_DIR)
    try:
        os.makedirs(base, DIR_MODE, exist_ok=True)
    except OSError as exc:
        return 'cannot create %s: %s' % (base, exc.strerror or exc)
    src = os.path.join(base, '.probe-%d-%s' % (os.getpid(), os.urandom(4).hex()))
    dst = src + '-clone'
    try:
        fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, b'fleetckpt reflink probe\n'.ljust(4096, b'.'))
            os.fsync(fd)
        finally:
            os.close(fd)
        reflink(src, dst, ioctl=env.ioctl, fsync=False)
    except PolicyRefused as exc:
        return str(exc).split(': ', 1)[-1]
    except (OSError, StoreError) as exc:
        return 'probe in %s failed: %s' % (base, exc)
    finally:
        for path in (src, dst, dst + '.tmp-%d' % os.getpid()):
            try:
                os.unlink(path)
            except OSError:
                pass
        try:
            os.rmdir(base)  # only when empty: clones of earlier checkpoints keep it
        except OSError:
            pass
    return None


# ------------------------------------------------------------------------------------------------------------
# settling I/O while the domain is paused
# ------------------------------------------------------------------------------------------------------------
def inflight(env, sysfs_dev):
    """(reads, writes) in flight on a block device, from ``<sysfs_dev>/inflight``; None if unreadable."""
    try:
        fields = env.read_text(sysfs_dev + '/inflight').split()
        return int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def _counters(env, paths):
    values = []
    for path in paths:
        try:
            values.append(int(env.read_text(path).strip()))
        except (OSError, ValueError):
            values.append(None)
    return values


def quiesce(plans, env=None, domid=None, timeout=10.0, poll=0.05, fsync=True):
    """Call while the domain is paused, before the snapshots. ``plans``: [{'disk', 'facts'}] (:func:`plan_disks`).

    Requests the guest queued before it was suspended may still be on their way: blkback keeps serving the
    ring while the domain is paused. Wait until the devices serving the disks (loop devices of file disks,
    the block device itself) have nothing in flight and, with ``domid``, blkback's request counters
    (``/sys/bus/xen-backend/devices/vbd-<domid>-*/statistics``) stop moving; then fsync file disks (on NFS
    this also fixes the server's mtime, which the ``none`` identity relies on). Raises FleetckptError on
    timeout. Returns ``{'seconds', 'devices', 'vbds'}``."""
    env = env or DiskEnv()
    t0 = env.clock()
    devices = []
    for plan in plans:
        facts = plan.get('facts') or {}
        if facts.get('kind') == 'block' and facts.get('st_rdev') is not None:
            devices.append('%s/dev/block/%d:%d' % (env.sysfs, os.major(facts['st_rdev']), os.minor(facts['st_rdev'])))
        for name in facts.get('loop_devices') or []:
            devices.append('%s/block/%s' % (env.sysfs, name))
    vbds = env.glob('%s/bus/xen-backend/devices/vbd-%d-*' % (env.sysfs, domid)) if domid is not None else []
    counter_files = ['%s/statistics/%s' % (vbd, name) for vbd in vbds for name in ('rd_req', 'wr_req', 'f_req', 'ds_req')]
    previous = None
    while True:
        busy = [(dev, now) for dev, now in ((dev, inflight(env, dev)) for dev in devices) if now not in (None, (0, 0))]
        counters = _counters(env, counter_files)
        if not busy and (not counter_files or counters == previous):
            break
        if env.clock() - t0 > timeout:
            if busy:
                raise FleetckptError('%s still has %d read(s) / %d write(s) in flight after %ss with the domain paused'
                                     % (busy[0][0], busy[0][1][0], busy[0][1][1], timeout))
            raise FleetckptError('blkback kept taking requests of domain %s for %ss after it was paused' % (domid, timeout))
        previous = counters
        env.sleep(poll)
    if fsync:
        for plan in plans:
            if (plan.get('facts') or {}).get('kind') != 'file':
                continue
            target = plan['disk']['target']
            try:
                fd = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise _io_error('flushing', target, exc)
    return {'seconds': round(env.clock() - t0, 3), 'devices': [os.path.basename(dev) for dev in devices],
            'vbds': [os.path.basename(vbd) for vbd in vbds]}


# ------------------------------------------------------------------------------------------------------------
# records (manifest `disks[]` entries)
# ------------------------------------------------------------------------------------------------------------
def make_record(disk, strategy, location, size=None, **extra):
    """One manifest ``disks[]`` entry. ``location``: {'type': 'checkpoint', 'file'} (in the checkpoint dir),
    {'type': 'path', 'path', 'host'} (beside the disk), {'type': 'lv', 'vg', 'lv', 'path', 'host', 'thin'},
    or {'type': 'origin'} (none: the disk itself)."""
    record = {'target': disk.get('target'), 'vdev': disk['vdev'], 'backend': disk.get('backend'),
              'format': disk.get('format'), 'kind': disk.get('kind'), 'readwrite': bool(disk.get('readwrite')),
              'is_cdrom': bool(disk.get('is_cdrom')), 'strategy': strategy, 'location': location,
              'size_bytes': size, 'sha256': None, 'identity': None, 'seconds': None}
    record.update(extra)
    return record


def copy_file_name(disk):
    return 'disk-%s.%s' % (disk['vdev'], 'qcow2' if disk.get('format') == 'qcow2' else 'img')


def snapshot_path(record, checkpoint_dir=None):
    """Where a record's snapshot is (a file or an LV device path), or the original target for ``none``."""
    loc = record.get('location') or {}
    if loc.get('type') == 'checkpoint':
        if not checkpoint_dir:
            raise InvalidInput('the checkpoint directory is needed to locate %s' % loc.get('file'))
        return os.path.join(checkpoint_dir, loc['file'])
    if loc.get('type') in ('path', 'lv'):
        return loc.get('path')
    return record.get('target')


def validate_records(records, vm=None, ckpt_id=None):
    """Problems with ``disks`` records read from a manifest (the store is shared: never trust a path in it
    before it passed here; cleanup deletes only what matches these rules)."""
    problems = []
    if not isinstance(records, list):
        return ['disks is not a list']
    vdevs = set()
    for index, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append('disks[%d] is not an object' % index)
            continue
        vdev = rec.get('vdev')
        where = 'disk %s' % vdev
        if not isinstance(vdev, str) or not _VDEV.fullmatch(vdev) or vdev in vdevs:
            problems.append('disks[%d] has a bad or repeated vdev %r' % (index, vdev))
            continue
        vdevs.add(vdev)
        strategy = rec.get('strategy')
        loc = rec.get('location')
        if strategy not in STRATEGIES or not isinstance(loc, dict):
            problems.append('%s: unknown strategy %r or no location' % (where, strategy))
            continue
        if loc.get('type') == 'checkpoint':
            if not isinstance(loc.get('file'), str) or not _COPY_FILE.fullmatch(loc['file']):
                problems.append('%s: snapshot file %r is not allowed' % (where, loc.get('file')))
        elif loc.get('type') == 'path':
            if not _reflink_path_ok(loc.get('path'), rec.get('target'), vdev, vm, ckpt_id):
                problems.append('%s: snapshot path %r is not <disk dir>/%s/<vm>/<id>/<vdev>.img'
                                % (where, loc.get('path'), SNAPSHOT_DIR))
        elif loc.get('type') == 'lv':
            if not _lv_location_ok(loc, vdev, ckpt_id):
                problems.append('%s: snapshot LV %r/%r is not a fleetckpt snapshot of this checkpoint'
                                % (where, loc.get('vg'), loc.get('lv')))
        elif loc.get('type') == 'internal':
            if strategy != 'qcow2' or not _internal_location_ok(loc, rec.get('target'), ckpt_id):
                problems.append('%s: internal snapshot %r of %r is not a fleetckpt snapshot of this checkpoint\'s disk'
                                % (where, loc.get('snapshot'), loc.get('path')))
        elif loc.get('type') != 'origin':
            problems.append('%s: unknown location type %r' % (where, loc.get('type')))
        if strategy == 'none' and not isinstance(rec.get('identity'), dict):
            problems.append('%s: memory-only record without the disk identity' % where)
    return problems


def _reflink_path_ok(path, target, vdev, vm=None, ckpt_id=None):
    if not isinstance(path, str) or not os.path.isabs(path) or '\x00' in path or os.path.normpath(path) != path:
        return False
    parts = path.split('/')
    if len(parts) < 6 or parts[-4] != SNAPSHOT_DIR or parts[-1] != '%s.img' % vdev or '..' in parts:
        return False
    if vm is not None and parts[-3] != vm or ckpt_id is not None and parts[-2] != ckpt_id:
        return False
    return not target or os.path.dirname(target) == '/'.join(parts[:-4])


def _internal_location_ok(loc, target, ckpt_id=None):
    path, name = loc.get('path'), loc.get('snapshot')
    if not isinstance(path, str) or not os.path.isabs(path) or '\x00' in path or os.path.normpath(path) != path:
        return False
    if path != target or not isinstance(name, str) or not name.startswith(QCOW2_SNAPSHOT_PREFIX):
        return False
    try:
        return name == qcow2_snapshot_name(name[len(QCOW2_SNAPSHOT_PREFIX):] if ckpt_id is None else ckpt_id)
    except InvalidInput:
        return False


def _lv_location_ok(loc, vdev, ckpt_id=None):
    vg, lv = loc.get('vg'), loc.get('lv')
    if not isinstance(vg, str) or not _LVM_NAME.fullmatch(vg) or not isinstance(lv, str) or not _LVM_NAME.fullmatch(lv):
        return False
    if not lv.startswith('fc-') or not lv.endswith('-%s' % vdev):
        return False
    try:
        return ckpt_id is None or lv == lvm_snapshot_name(vdev, ckpt_id)
    except InvalidInput:
        return False


def disk_map(records, checkpoint_dir=None):
    """{original target: snapshot path} for every disk that has a snapshot (``none`` disks are left out: the
    restored VM uses them where they are). This maps the restored VM straight onto the snapshots, which
    consumes them: use :func:`restore_plan` unless that is what is wanted."""
    mapping = {}
    for rec in records:
        if rec.get('strategy') != 'none' and rec.get('target'):
            mapping[rec['target']] = snapshot_path(rec, checkpoint_dir)
    return mapping


# ------------------------------------------------------------------------------------------------------------
# identity (strategy none) and change detection
# ------------------------------------------------------------------------------------------------------------
def identity(path, env=None, hash_max_bytes=0):
    """What proves a disk unchanged later: st_dev/st_ino (file) or st_rdev (block), size, mtime_ns, ctime_ns,
    and its sha256 when it is no larger than ``hash_max_bytes``. Read through an open descriptor, as
    :func:`changed_since` reads it later: an NFS client's attribute cache must not answer either."""
    env = env or DiskEnv()
    st = env.fresh_stat(path)
    block = statmod.S_ISBLK(st.st_mode)
    ident = {'path': path, 'host': env.host, 'kind': 'block' if block else 'file', 'st_dev': st.st_dev, 'st_ino': st.st_ino,
             'size': block_size(env, st.st_rdev) if block else st.st_size, 'mtime_ns': st.st_mtime_ns,
             'ctime_ns': st.st_ctime_ns, 'sha256': None}
    if block:
        ident['st_rdev'] = st.st_rdev
    if hash_max_bytes and ident['size'] is not None and ident['size'] <= hash_max_bytes:
        ident['sha256'] = sha256_sparse(path)
    return ident


def changed_since(record, env=None, deep=False):
    """Reasons to believe the disk of a memory-only record changed since the checkpoint ([] = unchanged).

    ``record``: a ``none`` record (or a bare identity). st_dev is compared only on the recording host (NFS
    clients each number the mount differently; st_ino is the server's file id everywhere). A block device's
    metadata does not show writes: without a recorded sha256 (and ``deep``) it cannot be proved unchanged."""
    env = env or DiskEnv()
    ident = record.get('identity') if 'identity' in record else record
    path = record.get('target') or ident.get('path')
    if not ident or not path:
        return ['no identity recorded']
    try:
        st = env.fresh_stat(path)
    except OSError as exc:
        return ['%s is gone: %s' % (path, exc.strerror or exc)]
    reasons = []
    block = statmod.S_ISBLK(st.st_mode)
    if block != (ident.get('kind') == 'block'):
        return ['%s is now a %s' % (path, 'block device' if block else 'file')]
    if block:
        if st.st_rdev != ident.get('st_rdev'):
            reasons.append('%s is another device now (%d:%d)' % (path, os.major(st.st_rdev), os.minor(st.st_rdev)))
        size = block_size(env, st.st_rdev)
    else:
        size = st.st_size
        if st.st_ino != ident.get('st_ino'):
            reasons.append('%s was replaced (inode %s, was %s)' % (path, st.st_ino, ident.get('st_ino')))
        if ident.get('host') == env.host and st.st_dev != ident.get('st_dev'):
            reasons.append('%s is on another filesystem now' % path)
        if st.st_mtime_ns != ident.get('mtime_ns'):
            reasons.append('%s was modified (mtime %s, was %s)' % (path, st.st_mtime_ns, ident.get('mtime_ns')))
        elif st.st_ctime_ns != ident.get('ctime_ns'):
            reasons.append('%s changed (ctime %s, was %s)' % (path, st.st_ctime_ns, ident.get('ctime_ns')))
    if size != ident.get('size'):
        reasons.append('%s size is %s, was %s' % (path, size, ident.get('size')))
    if ident.get('sha256') and deep and not reasons:
        digest = sha256_sparse(path)
        if digest != ident['sha256']:
            reasons.append('%s content differs (sha256 %s, was %s)' % (path, digest, ident['sha256']))
    elif block and not reasons and not (ident.get('sha256') and deep):
        reasons.append('%s is a block device: writes leave no trace in its metadata, so it cannot be shown '
                       'unchanged%s' % (path, ' (verify with its sha256)' if ident.get('sha256') else ''))
    return reasons


# ------------------------------------------------------------------------------------------------------------
# LVM: argv builders and parsers are pure
# ------------------------------------------------------------------------------------------------------------
def lvm_snapshot_name(vdev, ckpt_id):
    """``fc-<id>-<vdev>``, within LVM's name rules; the id's dots and dashes are kept."""
    if not _ID_SAFE.fullmatch(str(ckpt_id)) or not _VDEV.fullmatch(str(vdev)):
        raise InvalidInput('cannot name an LVM snapshot after id %r / vdev %r' % (ckpt_id, vdev))
    return 'fc-%s-%s' % (ckpt_id, vdev)


def lvm_tags(vm, ckpt_id):
    return [LV_TAG, 'fleetckpt-vm-%s' % vm, 'fleetckpt-id-%s' % ckpt_id]


def snapshot_size(lv, size=None):
    """COW size in bytes for a classic snapshot of ``lv`` (an lvs row): ``size`` as bytes (int > 1) or a
    fraction of the origin (float <= 1); default 20 %, at least 64 MiB, never more than the origin (plus an
    extent), rounded up to the VG extent size."""
    origin = lv.get('lv_size') or 0
    if size is None:
        want = max(int(origin * DEFAULT_LVM_SNAPSHOT_FRACTION), MIN_LVM_SNAPSHOT_BYTES)
    elif isinstance(size, float) and 0 < size <= 1:
        want = max(int(origin * size), MIN_LVM_SNAPSHOT_BYTES)
    elif isinstance(size, int) and not isinstance(size, bool) and size > 1:
        want = size
    else:
        raise InvalidInput('lvm snapshot size must be a fraction (0, 1] or a byte count, got %r' % (size,))
    extent = lv.get('vg_extent_size') or 4 * 1024 * 1024
    want = min(want, origin + extent) if origin else want
    return -(-want // extent) * extent


def lvcreate_argv(lv, name, size_bytes=None, tags=(), lvcreate='lvcreate'):
    """``lvcreate -s -n <name> -L <size>b <vg/lv>`` (classic) or, for a thin LV, a thin snapshot without a size
    that is activated at once (``--setactivationskip n``)."""
    thin = lv_kind(lv) == 'thin'
    argv = [lvcreate, '--snapshot', '--name', name]
    if thin:
        argv += ['--setactivationskip', 'n']
    else:
        if not size_bytes:
            raise InvalidInput('a classic LVM snapshot needs a size')
        argv += ['--size', '%db' % size_bytes]
    for tag in tags:
        argv += ['--addtag', tag]
    argv.append('%s/%s' % (lv['vg_name'], lv['lv_name']))
    return argv


def lvremove_argv(vg, name, lvremove='lvremove'):
    return [lvremove, '--force', '%s/%s' % (vg, name)]


def lvconvert_merge_argv(vg, name, lvconvert='lvconvert'):
    return [lvconvert, '--merge', '%s/%s' % (vg, name)]


def lvm_error(stderr):
    """The line of an LVM error output that says what went wrong."""
    lines = [ln.strip() for ln in (stderr or '').splitlines() if ln.strip()]
    for line in lines:
        if 'insufficient free space' in line or 'not found' in line or 'already exists' in line:
            return line
    return lines[-1] if lines else 'no error output'


def snapshot_state(row):
    """Problems with a snapshot LV's lvs row ([] = usable)."""
    problems = []
    attr = row.get('lv_attr') or ''
    if len(attr) > 4 and attr[4] in 'IS':
        problems.append('snapshot %s/%s is invalid (its COW area overflowed or it failed)' % (row.get('vg_name'), row.get('lv_name')))
    elif attr[:1] == 's' and row.get('data_percent') is not None and row['data_percent'] >= 100.0:
        problems.append('snapshot %s/%s is full (100%% of its COW area used)' % (row.get('vg_name'), row.get('lv_name')))
    if len(attr) > 4 and attr[4] == 'm':
        problems.append('snapshot %s/%s: merge failed' % (row.get('vg_name'), row.get('lv_name')))
    return problems


# ------------------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------------------
def reflink_path(target, vm, ckpt_id, vdev):
    return os.path.join(os.path.dirname(target), SNAPSHOT_DIR, vm, ckpt_id, '%s.img' % vdev)


def _check_dest(dest):
    for key in ('dir', 'vm', 'id'):
        if not dest or not dest.get(key):
            raise InvalidInput('snapshot destination needs %s' % key)


class Strategy:
    """``snapshot(disk, dest) -> record`` (while the domain is paused), ``finalize(record, dest)`` (after it
    was unpaused: deferred work), ``cleanup(record, checkpoint_dir)`` and ``verify(record, checkpoint_dir,
    deep) -> problems``. ``dest``: {'dir': checkpoint dir being written, 'vm', 'id', 'host'}."""

    name = None

    def __init__(self, env=None):
        self.env = env or DiskEnv()

    def snapshot(self, disk, dest):
        raise NotImplementedError

    def finalize(self, record, dest):
        return record

    def cleanup(self, record, checkpoint_dir=None):
        return []

    def verify(self, record, checkpoint_dir=None, deep=False):
        return []


class CopyStrategy(Strategy):
    """Sparse copy into the checkpoint dir. ``digest``: 'inline' (sha256 while copying: no second read, but
    the hashing is in the pause window), 'deferred' (hash the copy in :meth:`finalize`, after the unpause)
    or 'none'."""

    name = 'copy'

    def __init__(self, env=None, digest='inline', chunk=COPY_CHUNK, zero_block=ZERO_BLOCK):
        super().__init__(env)
        if digest not in ('inline', 'deferred', 'none'):
            raise InvalidInput('copy digest must be inline, deferred or none, got %r' % (digest,))
        self.digest = digest
        self.chunk = chunk
        self.zero_block = zero_block

    def snapshot(self, disk, dest):
        _check_dest(dest)
        name = copy_file_name(disk)
        stats = sparse_copy(disk['target'], os.path.join(dest['dir'], name), digest=self.digest == 'inline',
                            chunk=self.chunk, zero_block=self.zero_block, clock=self.env.clock)
        return make_record(disk, 'copy', {'type': 'checkpoint', 'file': name}, size=stats['size'],
                           sha256=stats['sha256'], allocated_bytes=stats['allocated'], seconds=stats['seconds'],
                           bytes_read=stats['bytes_read'], bytes_written=stats['bytes_written'],
                           hole_detection=stats['hole_detection'])

    def finalize(self, record, dest):
        if self.digest == 'deferred' and not record.get('sha256'):
            t0 = self.env.clock()
            record['sha256'] = sha256_sparse(os.path.join(dest['dir'], record['location']['file']))
            record['hash_seconds'] = round(self.env.clock() - t0, 3)
        return record

    def cleanup(self, record, checkpoint_dir=None):
        path = snapshot_path(record, checkpoint_dir)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return []
        return [path]

    def verify(self, record, checkpoint_dir=None, deep=False):
        path = snapshot_path(record, checkpoint_dir)
        try:
            st = os.stat(path)
        except OSError:
            return ['disk %s: copy %s is missing' % (record['vdev'], os.path.basename(path))]
        if st.st_size != record.get('size_bytes'):
            return ['disk %s: copy is %d bytes, manifest says %r' % (record['vdev'], st.st_size, record.get('size_bytes'))]
        if deep and record.get('sha256'):
            digest = sha256_sparse(path)
            if digest != record['sha256']:
                return ['disk %s: copy sha256 %s does not match manifest %s' % (record['vdev'], digest, record['sha256'])]
        return []


class ReflinkStrategy(Strategy):
    """FICLONE into ``<disk dir>/.fleetckpt/<vm>/<id>/<vdev>.img``, or into the checkpoint dir when the disk
    and the checkpoint share a filesystem (then the clone is part of the checkpoint, on any host)."""

    name = 'reflink'

    def snapshot(self, disk, dest):
        _check_dest(dest)
        t0 = self.env.clock()
        same_fs = False
        try:
            same_fs = self.env.stat(dest['dir']).st_dev == self.env.stat(disk['target']).st_dev
        except OSError:
            pass
        if same_fs:
            name = copy_file_name(disk)
            path = os.path.join(dest['dir'], name)
            location = {'type': 'checkpoint', 'file': name}
        else:
            path = reflink_path(disk['target'], dest['vm'], dest['id'], disk['vdev'])
            try:
                os.makedirs(os.path.dirname(path), DIR_MODE, exist_ok=True)
            except OSError as exc:
                raise _io_error('creating', os.path.dirname(path), exc)
            location = {'type': 'path', 'path': path, 'host': dest.get('host') or self.env.host}
        stats = reflink(disk['target'], path, ioctl=self.env.ioctl)
        allocated = None
        try:
            allocated = os.stat(path).st_blocks * 512
        except OSError:
            pass
        return make_record(disk, 'reflink', location, size=stats['size'], allocated_bytes=allocated,
                           seconds=round(self.env.clock() - t0, 3), shared_extents=True)

    def cleanup(self, record, checkpoint_dir=None):
        path = snapshot_path(record, checkpoint_dir)
        removed = []
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
        if (record.get('location') or {}).get('type') == 'path':
            # <disk dir>/.fleetckpt/<vm>/<id>/ and <vm>/ go when empty; never above .fleetckpt
            parent = os.path.dirname(path)
            for directory in (parent, os.path.dirname(parent)):
                try:
                    os.rmdir(directory)
                except OSError:
                    break
        return removed

    def verify(self, record, checkpoint_dir=None, deep=False):
        loc = record.get('location') or {}
        path = snapshot_path(record, checkpoint_dir)
        try:
            st = os.stat(path)
        except OSError:
            if loc.get('type') == 'path' and loc.get('host') not in (None, self.env.host):
                return ['disk %s: clone %s lives on host %s\'s filesystem, not visible here'
                        % (record['vdev'], path, loc.get('host'))]
            return ['disk %s: clone %s is missing' % (record['vdev'], path)]
        if st.st_size != record.get('size_bytes'):
            return ['disk %s: clone is %d bytes, manifest says %r' % (record['vdev'], st.st_size, record.get('size_bytes'))]
        return []


class LvmStrategy(Strategy):
    """LVM snapshot LV ``<vg>/fc-<id>-<vdev>`` tagged ``fleetckpt``; classic (COW area of ``size``: bytes or a
    fraction of the origin) or thin."""

    name = 'lvm'

    def __init__(self, env=None, size=None):
        super().__init__(env)
        self.size = size

    def _lvs(self, selector=None):
        rc, out, err = self.env.run(lvs_argv(selector))
        if rc != 0:
            if selector and ('not found' in err or 'Failed to find' in err):
                return []
            raise FleetckptError('lvs failed (rc=%s): %s' % (rc, lvm_error(err)))
        return parse_lvs_json(out)

    def snapshot(self, disk, dest):
        _check_dest(dest)
        t0 = self.env.clock()
        st = self.env.stat(disk['target'])
        lv = find_lv(self._lvs(), rdev=st.st_rdev, path=disk['target'])
        if lv is None:
            raise PolicyRefused('%s is not an LVM logical volume' % disk['target'])
        name = lvm_snapshot_name(disk['vdev'], dest['id'])
        thin = lv_kind(lv) == 'thin'
        size = None if thin else snapshot_size(lv, self.size)
        argv = lvcreate_argv(lv, name, size, tags=lvm_tags(dest['vm'], dest['id']))
        rc, out, err = self.env.run(argv)
        if rc != 0:
            raise StoreError('LVM snapshot of %s/%s failed: %s' % (lv['vg_name'], lv['lv_name'], lvm_error(err or out)))
        rows = self._lvs('%s/%s' % (lv['vg_name'], name))
        snap = rows[0] if rows else {}
        location = {'type': 'lv', 'vg': lv['vg_name'], 'lv': name, 'path': snap.get('lv_path') or '/dev/%s/%s' % (lv['vg_name'], name),
                    'host': dest.get('host') or self.env.host, 'thin': thin, 'origin': lv['lv_name']}
        return make_record(disk, 'lvm', location, size=lv.get('lv_size'), allocated_bytes=snap.get('lv_size') if not thin else None,
                           cow_bytes=size, seconds=round(self.env.clock() - t0, 3), lvcreate=argv)

    def cleanup(self, record, checkpoint_dir=None):
        loc = record['location']
        rc, out, err = self.env.run(lvremove_argv(loc['vg'], loc['lv']))
        if rc != 0:
            if 'not found' in err or 'Failed to find' in err:
                return []
            raise StoreError('removing snapshot %s/%s failed: %s' % (loc['vg'], loc['lv'], lvm_error(err or out)))
        return ['%s/%s' % (loc['vg'], loc['lv'])]

    def verify(self, record, checkpoint_dir=None, deep=False):
        loc = record.get('location') or {}
        if loc.get('host') not in (None, self.env.host):
            return ['disk %s: snapshot LV %s/%s is on host %s' % (record['vdev'], loc.get('vg'), loc.get('lv'), loc.get('host'))]
        rows = self._lvs('%s/%s' % (loc.get('vg'), loc.get('lv')))
        if not rows:
            return ['disk %s: snapshot LV %s/%s is gone' % (record['vdev'], loc.get('vg'), loc.get('lv'))]
        return ['disk %s: %s' % (record['vdev'], p) for p in snapshot_state(rows[0])]


class NoneStrategy(Strategy):
    """Memory only: record the disk's identity while the domain is paused."""

    name = 'none'

    def __init__(self, env=None, hash_max_bytes=0):
        super().__init__(env)
        self.hash_max_bytes = hash_max_bytes

    def snapshot(self, disk, dest):
        t0 = self.env.clock()
        ident = None
        size = None
        if disk.get('kind') in ('file', 'block'):
            ident = identity(disk['target'], self.env, hash_max_bytes=self.hash_max_bytes)
            size = ident['size']
        return make_record(disk, 'none', {'type': 'origin'}, size=size, identity=ident or {'kind': disk.get('kind')},
                           seconds=round(self.env.clock() - t0, 3))

    def verify(self, record, checkpoint_dir=None, deep=False):
        if not needs_snapshot(record) and record.get('kind') not in ('file', 'block'):
            return []
        reasons = changed_since(record, self.env, deep=deep)
        return ['disk %s changed since the checkpoint: %s' % (record['vdev'], '; '.join(reasons))] if reasons else []


class Qcow2Strategy(Strategy):
    """Internal snapshot ``fleetckpt-<id>`` inside the qcow2 image: taken by the domain's device model over QMP
    while the domain is paused (``dest['domid']``), or by ``qemu-img snapshot -c`` when no QEMU holds the image
    (the save stopped the VM). The image keeps its path; the snapshot shares its clusters until either side
    is written."""

    name = 'qcow2'

    def __init__(self, env=None, qmp=None):
        super().__init__(env)
        self.qmp = qmp or (lambda path: Qmp(path, timeout=self.env.timeout))

    def _qemu_img(self, argv, what):
        rc, out, err = self.env.run(['qemu-img'] + argv)
        if rc != 0:
            raise StoreError('%s failed: qemu-img %s: %s' % (what, ' '.join(argv), (err or out).strip()[-400:]))
        return out

    def _node(self, q, path, domid, vdev=None):
        node = find_node(q.execute('query-named-block-nodes'), path, vdev=vdev)
        if node is None:
            raise PolicyRefused('the device model of domain %s serves no qcow2 node for %s' % (domid, path))
        return node

    def snapshot(self, disk, dest):
        _check_dest(dest)
        t0 = self.env.clock()
        name = qcow2_snapshot_name(dest['id'])
        path = disk['target']
        domid = dest.get('domid')
        location = {'type': 'internal', 'path': path, 'snapshot': name}
        before = self.env.fresh_stat(path).st_blocks * 512
        if domid is not None:
            try:
                with self.qmp(socket_path(domid)) as q:
                    location['node'] = node = self._node(q, path, domid, disk['vdev'])
                    q.execute('blockdev-snapshot-internal-sync', {'device': node, 'name': name})
            except QmpError as exc:
                raise StoreError('qcow2 snapshot of %s (%s): %s' % (disk['vdev'], path, exc))
            location['taken_by'] = 'qmp'
        else:
            self._qemu_img(['snapshot', '-c', name, path], 'qcow2 snapshot of %s' % disk['vdev'])
            location['taken_by'] = 'qemu-img'
        facts = parse_qcow_header(_read_head(path)) or {}
        # what the snapshot itself added to the image (its table, a copy of the L1 table): the clusters it keeps
        # are shared with the running disk until the guest writes them
        grown = max(0, self.env.fresh_stat(path).st_blocks * 512 - before)
        return make_record(disk, 'qcow2', location, size=facts.get('virtual_size'), allocated_bytes=grown,
                           seconds=round(self.env.clock() - t0, 3), shared_extents=True)

    def _snapshots(self, path):
        # -U (force share): the image may be open in a running QEMU; reading its snapshot table is safe
        return parse_qemu_img_snapshots(self._qemu_img(['info', '-U', '--output=json', path], 'listing snapshots'))

    def cleanup(self, record, checkpoint_dir=None):
        loc = record['location']
        path, name = loc['path'], loc['snapshot']
        if not self.env.exists(path):
            raise StoreError('%s is not visible on %s: delete its snapshot %s where it is (qemu-img snapshot -d)'
                             % (path, self.env.host, name))
        if name not in self._snapshots(path):
            return []
        rc, out, err = self.env.run(['qemu-img', 'snapshot', '-d', name, path])
        if rc == 0:
            return ['%s@%s' % (path, name)]
        if 'lock' not in (err or out):
            raise StoreError('deleting snapshot %s of %s failed: %s' % (name, path, (err or out).strip()[-400:]))
        # the image is open in a running QEMU (its write lock): delete through that QEMU
        for sock in self.env.glob(QMP_SOCKET.replace('%d', '*')):
            try:
                with self.qmp(sock) as q:
                    node = find_node(q.execute('query-named-block-nodes'), path)
                    if node is None:
                        continue
                    q.execute('blockdev-snapshot-delete-internal-sync', {'device': node, 'name': name})
                    return ['%s@%s' % (path, name)]
            except QmpError as exc:
                raise StoreError('deleting snapshot %s of %s through %s: %s' % (name, path, sock, exc))
        raise StoreError('%s is locked, but no device model on %s serves it: delete snapshot %s where it runs'
                         % (path, self.env.host, name))

    def verify(self, record, checkpoint_dir=None, deep=False):
        loc = record.get('location') or {}
        path, name = loc.get('path'), loc.get('snapshot')
        if not self.env.exists(path):
            return ['disk %s: qcow2 image %s is not visible on %s' % (record['vdev'], path, self.env.host)]
        if not self.env.which('qemu-img'):
            return ['disk %s: qemu-img is not installed on %s: its snapshot cannot be checked' % (record['vdev'], self.env.host)]
        try:
            names = self._snapshots(path)
        except StoreError as exc:
            return ['disk %s: %s' % (record['vdev'], exc)]
        if name not in names:
            return ['disk %s: snapshot %s is gone from %s' % (record['vdev'], name, path)]
        return []


def strategy(name, env=None, **options):
    """The implementation of strategy ``name``; ``options`` go to its constructor (copy: digest, chunk,
    zero_block; lvm: size; none: hash_max_bytes)."""
    classes = {'copy': CopyStrategy, 'reflink': ReflinkStrategy, 'lvm': LvmStrategy, 'none': NoneStrategy,
               'qcow2': Qcow2Strategy}
    if name not in classes:
        raise InvalidInput('unknown disk strategy %r' % (name,))
    return classes[name](env, **options)


# ------------------------------------------------------------------------------------------------------------
# checkpoint-level helpers: snapshot all, validity, size, cleanup
# ------------------------------------------------------------------------------------------------------------
def snapshot_all(plans, dest, env=None, options=None):
    """Snapshot every planned disk (call while the domain is paused). On any failure the snapshots already
    taken outside the checkpoint dir are removed again and the error is raised (the caller unpauses and
    aborts the checkpoint). Returns the records, in config order."""
    env = env or DiskEnv()
    options = options or {}
    records = []
    try:
        for plan in plans:
            name = plan['choice']['strategy']
            impl = strategy(name, env, **options.get(name, {}))
            record = impl.snapshot(plan['disk'], dest)
            record['reason'] = plan['choice'].get('reason')
            records.append(record)
    except BaseException:
        cleanup_disks(records, dest.get('dir'), env, outside_only=True, vm=dest.get('vm'), ckpt_id=dest.get('id'))
        raise
    return records


def finalize_all(records, dest, env=None, options=None):
    """Deferred work after the unpause (e.g. sha256 of copies with digest='deferred')."""
    env = env or DiskEnv()
    options = options or {}
    return [strategy(r['strategy'], env, **options.get(r['strategy'], {})).finalize(r, dest) for r in records]


def verify_snapshots(records, checkpoint_dir, env=None, deep=False, vm=None, ckpt_id=None):
    """What makes a checkpoint invalid in any listing: bad records, consumed snapshots, a missing, resized,
    overflowed or (``deep``) corrupt snapshot. Whether the disk of a memory-only record changed since is left
    out (:func:`memory_only_changes`): that refuses a restore (:func:`restore_plan`), it does not make the
    checkpoint's own files invalid."""
    env = env or DiskEnv()
    problems = validate_records(records, vm, ckpt_id)
    if problems:
        return problems
    if checkpoint_dir and os.path.exists(os.path.join(checkpoint_dir, CONSUMED)):
        problems.append('its disk snapshots were consumed by a restore (%s)' % CONSUMED)
    for rec in records:
        if rec['strategy'] != 'none':
            problems.extend(strategy(rec['strategy'], env).verify(rec, checkpoint_dir, deep=deep))
    return problems


def memory_only_changes(records, env=None):
    """{vdev: [reasons]} for the writable disks a memory-only record left where they were, and that changed
    since the checkpoint."""
    env = env or DiskEnv()
    changed = {}
    for rec in records:
        if rec.get('strategy') == 'none' and needs_snapshot(rec):
            reasons = changed_since(rec, env)
            if reasons:
                changed[rec['vdev']] = reasons
    return changed


def describe(records, checkpoint_dir, env=None):
    """What checkpoint_info shows of a checkpoint's disks: per disk its strategy and the bytes its snapshot
    takes, the total, and for memory-only disks whether they changed since (seen from this host): then a
    restore is refused. None for a checkpoint without disk records (made before 0.2.0)."""
    if not isinstance(records, list) or validate_records(records):
        return None
    env = env or DiskEnv()
    usage = disks_usage(records, checkpoint_dir, env)
    changed = memory_only_changes(records, env)
    return {'disks': [dict(d, memory_only=r['strategy'] == 'none' and needs_snapshot(r), target=r.get('target'),
                           changed_since=changed.get(r['vdev']))
                      for d, r in zip(usage['disks'], records)],
            'disk_bytes': usage['in_checkpoint_bytes'] + usage['outside_bytes'],
            'restorable': not changed}


def disks_usage(records, checkpoint_dir, env=None):
    """Space the disk snapshots take: ``in_checkpoint_bytes`` (files in the checkpoint dir, allocated),
    ``outside_bytes`` (clones beside disks: allocated, shared with the disk until either is written; LVM:
    the COW area reserved), ``logical_bytes`` and per disk."""
    env = env or DiskEnv()
    total = {'in_checkpoint_bytes': 0, 'outside_bytes': 0, 'logical_bytes': 0, 'disks': []}
    for rec in records:
        loc = rec.get('location') or {}
        used = 0
        if loc.get('type') in ('checkpoint', 'path'):
            try:
                used = os.stat(snapshot_path(rec, checkpoint_dir)).st_blocks * 512
            except OSError:
                used = 0
        elif loc.get('type') == 'lv':
            used = rec.get('allocated_bytes') or 0
        where = 'in_checkpoint_bytes' if loc.get('type') == 'checkpoint' else 'outside_bytes'
        if loc.get('type') != 'origin':
            total[where] += used
            total['logical_bytes'] += rec.get('size_bytes') or 0
        total['disks'].append({'vdev': rec.get('vdev'), 'strategy': rec.get('strategy'), 'bytes': used,
                               'where': loc.get('type')})
    return total


def cleanup_disks(records, checkpoint_dir, env=None, outside_only=True, vm=None, ckpt_id=None):
    """Remove the snapshots a checkpoint keeps outside its directory (reflink clones beside disks, LVM
    snapshot LVs); with ``outside_only=False`` also its copies. Call BEFORE deleting the checkpoint dir (its
    manifest is the index). Returns ``{'removed', 'errors'}``; never raises for one disk."""
    env = env or DiskEnv()
    removed, errors = [], []
    for rec in records:
        loc = rec.get('location') or {}
        if loc.get('type') == 'origin' or (outside_only and loc.get('type') == 'checkpoint'):
            continue
        if loc.get('host') not in (None, env.host):
            errors.append('disk %s: snapshot lives on host %s; delete it there' % (rec.get('vdev'), loc.get('host')))
            continue
        bad = validate_records([rec], vm, ckpt_id)
        if bad:
            errors.append('not removed: %s' % '; '.join(bad))
            continue
        try:
            removed.extend(strategy(rec['strategy'], env).cleanup(rec, checkpoint_dir))
        except (FleetckptError, OSError) as exc:
            errors.append('disk %s: %s' % (rec.get('vdev'), exc))
    return {'removed': removed, 'errors': errors}


# ------------------------------------------------------------------------------------------------------------
# restore
# ------------------------------------------------------------------------------------------------------------
def default_restore_mode(restore_as=None):
    """'clone' for a copy under a new name (the original keeps its disks), else 'revert'."""
    return 'clone' if restore_as else 'revert'


def restore_plan(records, checkpoint_dir, mode='revert', host=None, name=None, work_dir=None, stamp=None,
                 force_changed=False, changed=None):
    """What restore must do with each disk before ``xl restore`` (pure).

    The restored VM never writes into a checkpoint's snapshot unless ``mode='consume'``:

    * ``revert``: the VM's original disk paths get the checkpoint's content; the config is unchanged.
      copy -> sparse copy over the target (temp + rename; in place for a block device); reflink -> clone over
      the target (instant; the checkpoint keeps its clone); lvm -> thin: replace the origin with a thin
      snapshot of the snapshot (checkpoint kept); classic: ``lvconvert --merge`` (the checkpoint's snapshot is
      consumed); none -> nothing, provided the disk is unchanged.
    * ``clone``: a new working disk per snapshot, in ``work_dir`` (default: beside the original),
      ``<name>.<vdev>.<stamp>.img``, and ``disk_map`` original -> working disk. copy -> reflink if the
      filesystem can, else sparse copy; reflink -> clone beside it; lvm -> sparse copy of the snapshot LV into
      a file (thin: thin snapshot of the snapshot); none -> clone/copy of the unchanged original.
    * ``consume``: ``disk_map`` original -> the snapshot itself; the checkpoint's disks are used up (marked
      consumed: later restores refuse). Not for classic LVM snapshots (their COW area would fill).

    ``changed``: {vdev: [reasons]} from :func:`changed_since` for ``none`` disks (the caller probes); any
    reason refuses unless ``force_changed``. Snapshots on another host's local storage are refused.
    Returns ``{'mode', 'actions', 'disk_map', 'consumes_checkpoint', 'problems'}``.
    """
    if mode not in RESTORE_MODES:
        raise InvalidInput('restore disk mode must be one of %s, got %r' % (', '.join(RESTORE_MODES), mode))
    changed = changed or {}
    stamp = stamp or time.strftime('%Y%m%dT%H%M%S', time.gmtime())
    plan = {'mode': mode, 'actions': [], 'disk_map': {}, 'consumes_checkpoint': False, 'problems': []}
    problems = plan['problems']
    for rec in records:
        vdev = rec['vdev']
        target = rec.get('target')
        strategy_name = rec['strategy']
        loc = rec.get('location') or {}
        if loc.get('type') in ('path', 'lv') and host and loc.get('host') not in (None, host):
            problems.append('disk %s: its %s snapshot lives on host %s, not %s: restore it there'
                            % (vdev, strategy_name, loc.get('host'), host))
            continue
        if strategy_name == 'qcow2':
            name_in = loc.get('snapshot')
            if mode == 'consume':
                problems.append('disk %s: a qcow2 internal snapshot cannot serve as the running disk; use revert or '
                                'clone' % vdev)
            elif mode == 'revert':  # the image back to the snapshot (kept: the checkpoint can be restored again)
                plan['actions'].append({'op': 'qcow2_revert', 'vdev': vdev, 'dst': target, 'snapshot': name_in,
                                        'argv': ['qemu-img', 'snapshot', '-a', name_in, target]})
            else:
                dst = _work_path(rec, work_dir, name, stamp)
                plan['actions'].append({'op': 'qcow2_clone', 'vdev': vdev, 'src': target, 'snapshot': name_in, 'dst': dst})
                plan['disk_map'][target] = dst
            continue
        if strategy_name == 'none':
            reasons = changed.get(vdev) or []
            if needs_snapshot(rec) and reasons and not force_changed:
                problems.append('disk %s: memory-only checkpoint, and the disk changed since: %s (restoring would pair '
                                'the memory with a disk that moved on; force to do it anyway)' % (vdev, '; '.join(reasons)))
                continue
            if mode == 'clone' and needs_snapshot(rec):
                dst = _work_path(rec, work_dir, name, stamp)
                plan['actions'].append({'op': 'clone_or_copy', 'vdev': vdev, 'src': target, 'dst': dst})
                plan['disk_map'][target] = dst
            continue
        src = snapshot_path(rec, checkpoint_dir)
        thin = bool(loc.get('thin'))
        if mode == 'consume':
            if strategy_name == 'lvm' and not thin:
                problems.append('disk %s: a classic LVM snapshot cannot serve as the running disk (its COW area '
                                'would fill); use revert or clone' % vdev)
                continue
            plan['disk_map'][target] = src
            plan['consumes_checkpoint'] = True
        elif mode == 'revert':
            if strategy_name == 'copy':
                plan['actions'].append({'op': 'copy_over' if rec.get('kind') != 'block' else 'copy_into_device',
                                        'vdev': vdev, 'src': src, 'dst': target, 'sha256': rec.get('sha256')})
            elif strategy_name == 'reflink':
                plan['actions'].append({'op': 'reflink_over', 'vdev': vdev, 'src': src, 'dst': target})
            elif strategy_name == 'lvm' and thin:
                origin = loc.get('origin')
                plan['actions'].append({'op': 'run', 'vdev': vdev, 'argv': lvremove_argv(loc['vg'], origin)})
                plan['actions'].append({'op': 'run', 'vdev': vdev, 'argv': [
                    'lvcreate', '--snapshot', '--name', origin, '--setactivationskip', 'n', '%s/%s' % (loc['vg'], loc['lv'])]})
            elif strategy_name == 'lvm':
                plan['actions'].append({'op': 'run', 'vdev': vdev, 'argv': lvconvert_merge_argv(loc['vg'], loc['lv'])})
                plan['consumes_checkpoint'] = True
        else:  # clone
            if strategy_name == 'lvm' and thin:
                new = '%s.%s' % (name or loc.get('origin'), stamp)
                plan['actions'].append({'op': 'run', 'vdev': vdev, 'creates_lv': {'vg': loc['vg'], 'lv': new}, 'argv': [
                    'lvcreate', '--snapshot', '--name', new, '--setactivationskip', 'n', '%s/%s' % (loc['vg'], loc['lv'])]})
                plan['disk_map'][target] = '/dev/%s/%s' % (loc['vg'], new)
                continue
            dst = _work_path(rec, work_dir, name, stamp)
            op = 'reflink' if strategy_name == 'reflink' and not work_dir else 'clone_or_copy'
            plan['actions'].append({'op': op, 'vdev': vdev, 'src': src, 'dst': dst,
                                    'sha256': rec.get('sha256') if strategy_name == 'copy' else None})
            plan['disk_map'][target] = dst
    if plan['consumes_checkpoint'] and not problems:
        plan['actions'].append({'op': 'mark_consumed', 'dir': checkpoint_dir})
    return plan


def _work_path(rec, work_dir, name, stamp):
    directory = work_dir or os.path.dirname(rec['target'])
    base = name or os.path.splitext(os.path.basename(rec['target']))[0]
    return os.path.join(directory, '%s.%s.%s.%s' % (base, rec['vdev'], stamp, 'qcow2' if rec.get('format') == 'qcow2' else 'img'))


_WORKING_DISK_OPS = ('reflink', 'clone_or_copy', 'qcow2_clone')  # restore actions that make a new working disk file


def apply_restore_plan(plan, env=None):
    """Carry out :func:`restore_plan`'s actions (before ``xl restore``). On failure the working disks it
    created are removed and the error raised; a revert that already replaced a disk cannot be undone (the
    disk then holds the checkpoint's content, which is what a retry needs). Returns per-action results."""
    env = env or DiskEnv()
    if plan['problems']:
        raise PolicyRefused('cannot restore the disks: %s' % '; '.join(plan['problems']))
    done = []
    try:
        for action in plan['actions']:
            op = action['op']
            t0 = env.clock()
            result = {'op': op, 'vdev': action.get('vdev'), 'dst': action.get('dst')}
            if op in _WORKING_DISK_OPS and os.path.lexists(action['dst']):
                raise StoreError('working disk %s already exists' % action['dst'])
            if op in ('copy_over', 'reflink_over', 'reflink', 'clone_or_copy'):
                dst = action['dst']
                mode = FILE_MODE
                if op in ('copy_over', 'reflink_over'):
                    try:
                        mode = statmod.S_IMODE(os.stat(dst).st_mode)
                    except OSError:
                        pass
                if op in ('reflink', 'reflink_over'):
                    reflink(action['src'], dst, ioctl=env.ioctl, mode=mode)
                    result['method'] = 'reflink'
                elif op == 'clone_or_copy':
                    try:
                        reflink(action['src'], dst, ioctl=env.ioctl, mode=mode)
                        result['method'] = 'reflink'
                    except PolicyRefused:
                        sparse_copy(action['src'], dst, digest=False, mode=mode, expect_sha256=action.get('sha256'))
                        result.update(method='copy', verified=bool(action.get('sha256')))
                else:
                    sparse_copy(action['src'], dst, digest=False, mode=mode, expect_sha256=action.get('sha256'))
                    result.update(method='copy', verified=bool(action.get('sha256')))
            elif op == 'qcow2_revert':
                _qcow2_revert(action, env)
                result['method'] = 'qemu-img snapshot -a'
            elif op == 'qcow2_clone':
                # -U: the original may run (a drill beside it); the snapshot's clusters do not change
                argv = ['qemu-img', 'convert', '-U', '-f', 'qcow2', '-O', 'qcow2', '-l',
                        'snapshot.name=%s' % action['snapshot'], action['src'], action['dst']]
                try:
                    rc, out, err = env.run(argv, timeout=max(env.timeout, 3600))
                    if rc != 0:
                        raise StoreError('%s failed: %s' % (' '.join(argv), (err or out).strip()[-400:]))
                except BaseException:
                    remove_working_disks([action], env)  # a partial clone
                    raise
                os.chmod(action['dst'], FILE_MODE)
                result['method'] = 'qemu-img convert'
            elif op == 'copy_into_device':
                sparse_copy(action['src'], action['dst'], digest=False, in_place=True, expect_sha256=action.get('sha256'))
                result.update(method='copy', verified=bool(action.get('sha256')))
            elif op == 'run':
                rc, out, err = env.run(action['argv'])
                if rc != 0:
                    raise StoreError('%s failed: %s' % (' '.join(action['argv']), lvm_error(err or out)))
            elif op == 'mark_consumed':
                _mark_consumed(action['dir'], env)
            result['seconds'] = round(env.clock() - t0, 3)
            done.append(result)
    except BaseException:
        remove_working_disks(plan['actions'][:len(done)], env)
        raise
    return done


QCOW2_LOCK_WAIT_S = 30  # a replaced domain's device model may hold its image's lock a moment after xl destroy


def _qcow2_revert(action, env):
    """``qemu-img snapshot -a``; while the image is still locked (the device model of the domain the restore just
    replaced has not exited yet) it waits up to QCOW2_LOCK_WAIT_S for it."""
    deadline = env.clock() + QCOW2_LOCK_WAIT_S
    while True:
        rc, out, err = env.run(action['argv'])
        if rc == 0:
            return
        text = (err or out).strip()
        if 'lock' not in text or env.clock() >= deadline:
            raise StoreError('reverting %s to snapshot %s failed: %s' % (action['dst'], action['snapshot'], text[-400:]))
        env.sleep(0.5)


def remove_working_disks(actions, env=None):
    """Remove the working disks that ``actions`` (of a clone-mode :func:`restore_plan`, as carried out) created:
    files cloned or copied, LVs made by ``lvcreate``. What a revert replaced is never touched. Returns the
    errors, never raises (a cleanup)."""
    env = env or DiskEnv()
    errors = []
    for action in actions:
        if action.get('op') in _WORKING_DISK_OPS and action.get('dst'):
            try:
                os.unlink(action['dst'])
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append('%s: %s' % (action['dst'], exc.strerror or exc))
        elif action.get('creates_lv'):
            lv = action['creates_lv']
            rc, out, err = env.run(lvremove_argv(lv['vg'], lv['lv']))
            if rc != 0:
                errors.append('%s/%s: %s' % (lv['vg'], lv['lv'], lvm_error(err or out)))
    return errors


def _mark_consumed(checkpoint_dir, env):
    path = os.path.join(checkpoint_dir, CONSUMED)
    data = json.dumps({'host': env.host, 'at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.write(fd, data + b'\n')
        os.fsync(fd)
    finally:
        os.close(fd)
