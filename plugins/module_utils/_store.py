# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The checkpoint store: a directory (NFS in production) shared by the Xen hosts.

Layout::

    <store>/.fleetckpt-store                 marker: proves the store (not an empty mount point) is there
    <store>/<vm>/.lock                       per-VM lock (fcntl, works over NFSv4)
    <store>/<vm>/.<id>.partial/              a checkpoint being written: never listed as valid
    <store>/<vm>/<id>/image.xl[.zst]         the xl save image
    <store>/<vm>/<id>/manifest.json          schema in docs/manifest.md
    <store>/<vm>/placement.json              where the VM was last put: checkpointed, stopped or restored on a host

``<id>`` is ``<UTC timestamp with milliseconds>-<8 hex>``, e.g. ``20261125T134501.123Z-1a2b3c4d``; ids sort
in creation order (a VM's checkpoints are serialised by its lock, so two never share a millisecond). A checkpoint becomes visible
only by the atomic rename of its finished directory; it is valid only when its manifest says
``complete`` and the image's size and sha256 match the manifest.
"""

from __future__ import annotations

import binascii
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils import _disks
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, LockBusy, StoreError

SCHEMA_VERSION = 1  # of the store marker
MANIFEST_SCHEMA = 2  # 2: ``disks`` records the disk snapshots taken with the memory (docs/disk-strategies.md)
READABLE_MANIFEST_SCHEMAS = (1, 2)
MARKER = '.fleetckpt-store'
MANIFEST = 'manifest.json'
INTENT = 'intent.json'  # in a .partial dir only: what to undo if the run dies
PLACEMENT = 'placement.json'
PLACEMENT_EVENTS = ('checkpointed', 'stopped', 'restored')
MAX_HOST = 255
MAX_NAME = 64
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.+-]*')
_ID = re.compile(r'(?P<ts>\d{8}T\d{6})\.(?P<ms>\d{3})Z-(?P<rand>[0-9a-f]{8})')
DIR_MODE = 0o700
FILE_MODE = 0o600
HASH_CHUNK = 1024 * 1024


def validate_vm_name(name):
    """Reject names that could escape the store or confuse xl. Returns the name."""
    if not isinstance(name, str) or not name:
        raise InvalidInput('VM name must be a non-empty string')
    if '\x00' in name:
        raise InvalidInput('VM name contains a NUL byte')
    if '/' in name or name in ('.', '..') or '..' in name:
        raise InvalidInput('VM name %r contains a path separator or ".."' % name)
    if len(name) > MAX_NAME:
        raise InvalidInput('VM name is longer than %d characters' % MAX_NAME)
    if not _NAME.fullmatch(name):
        raise InvalidInput('VM name %r has characters outside [A-Za-z0-9_.+-] or starts with a symbol' % name)
    return name


def validate_checkpoint_id(ckpt_id):
    if not isinstance(ckpt_id, str) or not _ID.fullmatch(ckpt_id):
        raise InvalidInput('checkpoint id %r is not of the form YYYYMMDDTHHMMSS.mmmZ-xxxxxxxx' % (ckpt_id,))
    return ckpt_id


def new_checkpoint_id(now=None):
    now = time.time() if now is None else now
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    return '%s.%03dZ-%s' % (stamp.strftime('%Y%m%dT%H%M%S'), stamp.microsecond // 1000,
                            binascii.hexlify(os.urandom(4)).decode('ascii'))


def id_time(ckpt_id):
    """The UTC creation time encoded in a checkpoint id, as a unix timestamp."""
    match = _ID.fullmatch(ckpt_id)
    stamp = datetime.datetime.strptime(match.group('ts'), '%Y%m%dT%H%M%S')
    return stamp.replace(tzinfo=datetime.timezone.utc).timestamp() + int(match.group('ms')) / 1000.0


def utc_iso(now=None):
    now = time.time() if now is None else now
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%S.%fZ')


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data, mode=FILE_MODE):
    """Write bytes to ``path`` via a temp file + fsync + rename (+ fsync of the directory), created ``mode``."""
    tmp = '%s.tmp-%d' % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(path) or '.')


def write_json_atomic(path, data):
    """Write JSON atomically (see write_atomic); the file is created 0600."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + '\n').encode('utf-8'))


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        while True:
            chunk = handle.read(HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def _store_error(action, path, exc):
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return StoreError('store is full while %s %s' % (action, path))
        if exc.errno == errno.EROFS:
            return StoreError('store is read-only (%s %s)' % (action, path))
        if exc.errno in (errno.EACCES, errno.EPERM):
            return StoreError('permission denied %s %s' % (action, path))
    return StoreError('%s %s failed: %s' % (action, path, exc))


class VmLock:
    """Exclusive per-VM lock in the store (fcntl.lockf: honoured across NFSv4 clients, freed if the holder dies)."""

    def __init__(self, path, timeout=0.0, poll=0.5, clock=time.monotonic, sleep=time.sleep):
        self.path = path
        self.timeout = timeout
        self.poll = poll
        self.clock = clock
        self.sleep = sleep
        self.fd = None

    def acquire(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise _store_error('creating lock', self.path, exc)
        start = self.clock()
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise _store_error('locking', self.path, exc)
                if self.clock() - start >= self.timeout:
                    holder = ''
                    try:
                        with open(self.path) as handle:
                            holder = handle.read(200).strip()
                    except OSError:
                        pass
                    os.close(fd)
                    raise LockBusy('another fleetckpt run holds %s%s' % (self.path, (' (' + holder + ')') if holder else ''))
                self.sleep(self.poll)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, ('host=%s pid=%d since=%s\n' % (socket.gethostname(), os.getpid(), utc_iso())).encode())
            os.fsync(fd)  # so a run on another NFS client can name the holder
        except OSError:
            pass
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


class PendingCheckpoint:
    """A checkpoint being written in ``.<id>.partial``; ``commit`` makes it visible atomically."""

    def __init__(self, store, vm, ckpt_id, compression):
        self.store = store
        self.vm = vm
        self.id = ckpt_id
        self.vm_dir = store.vm_dir(vm)
        self.partial_dir = os.path.join(self.vm_dir, '.%s.partial' % ckpt_id)
        self.final_dir = os.path.join(self.vm_dir, ckpt_id)
        self.image_name = 'image.xl.zst' if compression == 'zstd' else 'image.xl'
        self.image_path = os.path.join(self.partial_dir, self.image_name)
        self.committed = False

    def create(self):
        try:
            os.mkdir(self.partial_dir, DIR_MODE)
        except OSError as exc:
            raise _store_error('creating', self.partial_dir, exc)
        return self

    def commit(self, manifest):
        manifest = dict(manifest)
        manifest.update(schema_version=MANIFEST_SCHEMA if 'disks' in manifest else 1, id=self.id, state='complete')
        try:
            fd = os.open(self.image_path, os.O_RDONLY)
            try:
                os.fchmod(fd, FILE_MODE)  # memory images hold the guests' secrets
                os.fsync(fd)
            finally:
                os.close(fd)
            write_json_atomic(os.path.join(self.partial_dir, MANIFEST), manifest)
            # the intent served while the VM was at risk (its memory is back by now): not part of the checkpoint
            try:
                os.unlink(os.path.join(self.partial_dir, INTENT))
            except FileNotFoundError:
                pass
            os.rename(self.partial_dir, self.final_dir)
            _fsync_dir(self.vm_dir)
        except OSError as exc:
            raise _store_error('committing checkpoint', self.final_dir, exc)
        self.committed = True
        return self.final_dir

    def abort(self):
        if not self.committed:
            shutil.rmtree(self.partial_dir, ignore_errors=True)

    def write_intent(self, intent):
        """Record, before touching the VM, what a later run needs to undo if this process dies (SIGKILL,
        host crash): the VM's identity and its original memory. Never part of a valid checkpoint."""
        write_json_atomic(os.path.join(self.partial_dir, INTENT), intent)


class CheckpointStore:
    def __init__(self, root, require_marker=True):
        if not isinstance(root, str) or not os.path.isabs(root):
            raise InvalidInput('store path must be an absolute path, got %r' % (root,))
        if '\x00' in root:
            raise InvalidInput('store path contains a NUL byte')
        self.root = os.path.normpath(root)
        self.require_marker = require_marker

    # --- store level -------------------------------------------------------------------------------
    def check(self, writable=True):
        """Raise StoreError unless the store is present (marker), a directory, and writable if asked."""
        if not os.path.isdir(self.root):
            raise StoreError('store %s does not exist or is not a directory' % self.root)
        if self.require_marker and not os.path.isfile(os.path.join(self.root, MARKER)):
            raise StoreError('store %s has no %s marker: is the shared store mounted? (create it with init_store)'
                             % (self.root, MARKER))
        if writable and not os.access(self.root, os.W_OK):
            raise StoreError('store %s is not writable' % self.root)
        if writable:
            try:
                stat = os.statvfs(self.root)
            except OSError as exc:
                raise _store_error('inspecting', self.root, exc)
            if stat.f_flag & os.ST_RDONLY:
                raise StoreError('store %s is mounted read-only' % self.root)
        return True

    def init(self):
        """Create the marker (and the root) if missing; returns True if anything was created."""
        created = False
        try:
            if not os.path.isdir(self.root):
                os.makedirs(self.root, 0o755)
                created = True
            marker = os.path.join(self.root, MARKER)
            if not os.path.isfile(marker):
                write_json_atomic(marker, {'schema_version': SCHEMA_VERSION, 'created_at': utc_iso(),
                                           'store_id': binascii.hexlify(os.urandom(8)).decode('ascii')})
                os.chmod(marker, 0o644)
                created = True
        except OSError as exc:
            raise _store_error('initialising store', self.root, exc)
        return created

    def marker(self):
        try:
            with open(os.path.join(self.root, MARKER)) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def free_bytes(self):
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    # --- VM level ----------------------------------------------------------------------------------
    def vm_dir(self, vm):
        return os.path.join(self.root, validate_vm_name(vm))

    def ensure_vm_dir(self, vm):
        path = self.vm_dir(vm)
        try:
            os.mkdir(path, DIR_MODE)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise _store_error('creating', path, exc)
        return path

    def lock(self, vm, timeout=0.0):
        self.ensure_vm_dir(vm)
        return VmLock(os.path.join(self.vm_dir(vm), '.lock'), timeout=timeout)

    def begin(self, vm, compression='none', now=None):
        self.ensure_vm_dir(vm)
        return PendingCheckpoint(self, vm, new_checkpoint_id(now), compression).create()

    def vms(self):
        try:
            names = sorted(os.listdir(self.root))
        except OSError as exc:
            raise _store_error('listing', self.root, exc)
        return [n for n in names if not n.startswith('.') and _NAME.fullmatch(n)
                and os.path.isdir(os.path.join(self.root, n))]

    def partials(self, vm):
        path = self.vm_dir(vm)
        try:
            return sorted(n for n in os.listdir(path) if n.startswith('.') and n.endswith('.partial'))
        except OSError:
            return []

    def interrupted(self, vm):
        """Intents of runs that died before finishing (partial dirs with an intent). Call with the lock held.
        Entries that cannot be read are returned as ``{'unreadable': reason}``."""
        found = []
        for name in self.partials(vm):
            path = os.path.join(self.vm_dir(vm), name, INTENT)
            try:
                with open(path) as handle:
                    data = json.loads(handle.read(65536))
                found.append(data if isinstance(data, dict) else {'unreadable': 'not an object'})
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                found.append({'unreadable': str(exc)})
        return found

    def record_placement(self, vm, host, event, checkpoint_id=None, now=None):
        """Record where ``vm`` was last put by this collection: ``checkpointed`` (it ran on ``host`` and still does),
        ``stopped`` (saved and stopped there) or ``restored`` (it now runs on ``host``). A DR evacuation reads it to find
        the VMs of a failed host that were restored there after their latest checkpoint (whose ``source_host`` names
        the host they came from). Written atomically; raises StoreError."""
        record = {'vm': validate_vm_name(vm), 'host': host, 'event': event,
                  'checkpoint': validate_checkpoint_id(checkpoint_id) if checkpoint_id else None, 'at': utc_iso(now)}
        if parse_placement(record, vm) is None:
            raise InvalidInput('invalid placement record %r' % (record,))
        path = os.path.join(self.ensure_vm_dir(vm), PLACEMENT)
        try:
            write_json_atomic(path, record)
        except OSError as exc:
            raise _store_error('writing', path, exc)
        return record

    def placement(self, vm):
        """The VM's placement record, or None when there is none or it is not a valid one (never trusted blindly:
        any host with the store mounted can write it)."""
        try:
            with open(os.path.join(self.vm_dir(vm), PLACEMENT)) as handle:
                return parse_placement(json.loads(handle.read(4096)), vm)
        except (OSError, ValueError):
            return None

    def remove_partials(self, vm):
        """Delete leftovers of interrupted runs. Call only while holding the VM's lock."""
        removed = []
        for name in self.partials(vm):
            shutil.rmtree(os.path.join(self.vm_dir(vm), name), ignore_errors=True)
            removed.append(name)
        return removed

    def checkpoint_dir(self, vm, ckpt_id):
        return os.path.join(self.vm_dir(vm), validate_checkpoint_id(ckpt_id))

    def inspect(self, vm, ckpt_id, verify_checksum=False, verify_disks=None):
        """Describe one checkpoint and say whether it is valid (and why not). ``verify_disks`` (default: as
        ``verify_checksum``): also read the disk copies for their sha256 (a restore that copies them checks it on
        the way instead)."""
        path = self.checkpoint_dir(vm, ckpt_id)
        entry = {'vm': vm, 'id': ckpt_id, 'path': path, 'valid': False, 'problems': [], 'manifest': None,
                 'created': utc_iso(id_time(ckpt_id)), 'checksum_verified': False}
        manifest_path = os.path.join(path, MANIFEST)
        try:
            with open(manifest_path) as handle:
                manifest = json.load(handle)
        except (OSError, ValueError) as exc:
            entry['problems'].append('manifest unreadable: %s' % exc)
            return entry
        if not isinstance(manifest, dict):
            entry['problems'].append('manifest is not a JSON object')
            return entry
        entry['manifest'] = manifest
        problems = entry['problems']
        if manifest.get('schema_version') not in READABLE_MANIFEST_SCHEMAS:
            problems.append('unsupported schema_version %r' % manifest.get('schema_version'))
        elif manifest.get('schema_version') >= 2 and not isinstance(manifest.get('disks'), list):
            problems.append('schema_version 2 manifest without its disks list')
        if manifest.get('state') != 'complete':
            problems.append('state is %r, not complete' % manifest.get('state'))
        if manifest.get('id') != ckpt_id or (manifest.get('vm') or {}).get('name') != vm:
            problems.append('manifest names another checkpoint')
        image = manifest.get('image') or {}
        image_file = image.get('file')
        if image_file not in ('image.xl', 'image.xl.zst'):
            problems.append('manifest image file %r is not allowed' % (image_file,))
        else:
            image_path = os.path.join(path, image_file)
            entry['image_path'] = image_path
            try:
                size = os.stat(image_path).st_size
            except OSError:
                problems.append('image %s is missing' % image_file)
            else:
                if size != image.get('size_bytes'):
                    problems.append('image size %d does not match manifest %r' % (size, image.get('size_bytes')))
                elif verify_checksum:
                    digest = sha256_file(image_path)
                    entry['checksum_verified'] = True
                    if digest != image.get('sha256'):
                        problems.append('image sha256 %s does not match manifest %s' % (digest, image.get('sha256')))
        if not problems and isinstance(manifest.get('disks'), list):
            deep = verify_checksum if verify_disks is None else verify_disks
            problems.extend(_disks.verify_snapshots(manifest['disks'], path, deep=deep, vm=vm, ckpt_id=ckpt_id))
            entry['disks_verified'] = deep
        entry['valid'] = not problems
        return entry

    def list(self, vm=None, verify_checksum=False):
        """All checkpoints (valid or not) of one VM or the whole store, newest first per VM."""
        names = [validate_vm_name(vm)] if vm else self.vms()
        entries = []
        for name in names:
            vm_path = os.path.join(self.root, name)
            try:
                ids = sorted((n for n in os.listdir(vm_path) if _ID.fullmatch(n)), reverse=True)
            except OSError:
                ids = []
            entries.extend(self.inspect(name, i, verify_checksum=verify_checksum) for i in ids)
        return entries

    def latest_valid(self, vm, verify_checksum=True, verify_disks=None):
        for entry in self.list(vm):
            if entry['valid']:
                if verify_checksum:
                    entry = self.inspect(vm, entry['id'], verify_checksum=True, verify_disks=verify_disks)
                    if not entry['valid']:
                        continue
                return entry
        return None

    def delete(self, vm, ckpt_id, env=None):
        """Delete a checkpoint, first its disk snapshots kept outside the store (clones beside the disks,
        snapshot LVs: its manifest is their only index). A snapshot this host cannot remove (it lives on
        another host) stops the deletion, so the index is not lost."""
        path = self.checkpoint_dir(vm, ckpt_id)
        if not os.path.isdir(path):
            return False
        try:
            with open(os.path.join(path, MANIFEST)) as handle:
                records = (json.load(handle) or {}).get('disks')
        except (OSError, ValueError, AttributeError):
            records = None
        if isinstance(records, list) and records:
            cleaned = _disks.cleanup_disks(records, path, env, vm=vm, ckpt_id=ckpt_id)
            if cleaned['errors']:
                raise StoreError('%s/%s not deleted: %s' % (vm, ckpt_id, '; '.join(cleaned['errors'])))
        # Rename first so a half-deleted checkpoint is never listed.
        doomed = os.path.join(self.vm_dir(vm), '.%s.deleting' % ckpt_id)
        try:
            os.rename(path, doomed)
        except OSError as exc:
            raise _store_error('deleting', path, exc)
        shutil.rmtree(doomed, ignore_errors=True)
        return True


def parse_placement(data, vm):
    """A placement record of ``vm`` with exactly the expected fields and types, or None."""
    if not isinstance(data, dict) or set(data) != {'vm', 'host', 'event', 'checkpoint', 'at'} or data['vm'] != vm:
        return None
    host, event, ckpt, at = data['host'], data['event'], data['checkpoint'], data['at']
    if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST or any(c.isspace() or c in '/\x00' for c in host):
        return None
    if event not in PLACEMENT_EVENTS or not isinstance(at, str) or len(at) > 64:
        return None
    if ckpt is not None and (not isinstance(ckpt, str) or not _ID.fullmatch(ckpt)):
        return None
    return dict(data)


def plan_retention(entries, keep_last=None, max_age_days=None, now=None, keep_one_valid=True):
    """Which checkpoints of ONE VM retention deletes. ``entries`` newest first (as ``list`` returns).

    A complete checkpoint is deleted when it is beyond ``keep_last`` or older than ``max_age_days``;
    invalid ones are deleted under the same rules. Unless ``keep_one_valid`` is False, the newest valid
    checkpoint is never deleted, so a VM never loses its only restorable checkpoint by retention.
    """
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise InvalidInput('keep_last must be an integer >= 1, got %r' % (keep_last,))
    if max_age_days is not None and (isinstance(max_age_days, bool) or not isinstance(max_age_days, (int, float))
                                     or max_age_days <= 0):
        raise InvalidInput('max_age_days must be a number > 0, got %r' % (max_age_days,))
    if keep_last is None and max_age_days is None:
        return []
    now = time.time() if now is None else now
    newest_valid = next((e['id'] for e in entries if e['valid']), None)
    doomed = []
    for index, entry in enumerate(entries):
        too_many = keep_last is not None and index >= keep_last
        too_old = max_age_days is not None and now - id_time(entry['id']) > max_age_days * 86400
        if not (too_many or too_old):
            continue
        if keep_one_valid and entry['id'] == newest_valid:
            continue
        doomed.append(entry['id'])
    return doomed
