# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Stream ``xl save`` / ``xl restore`` images through a FIFO.

Saving: ``xl save`` writes into a FIFO in a local temp dir; we read it, optionally pipe it through
``zstd``, hash what is stored (sha256) and write it to the destination, so the checksum costs no second
read of the image from the store. A pipe in between also avoids the EFAULT that ``xl save`` hits on
targets that pin pages (virtio-9p, O_DIRECT). Restoring a compressed image: ``zstd -d`` feeds a FIFO that
``xl restore`` reads; with a config transform (``_xlimage``) the image header is rewritten on the way.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils import _xlimage
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError, StoreError, XlError

CHUNK = 1024 * 1024


def _read_tail(handle, limit=4000):
    try:
        handle.seek(0)
        return handle.read().decode('utf-8', 'replace')[-limit:]
    except (OSError, ValueError):
        return ''


def _kill(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


class _Copier(threading.Thread):
    """Copy src (a path opened here, or a file object) to a sink callable; remember the error.

    ``stop`` ends the copy after the current chunk: when src is the FIFO ``xl save`` writes, closing it
    makes xl's next write fail, and xl then resumes the domain itself ("Failed to save domain, resuming
    domain") instead of leaving it suspended, as killing xl would. ``on_error`` runs on a failure, so a
    pipeline stage blocked on this one is released (e.g. zstd stalled on a full store).
    """

    def __init__(self, src, sink, open_path=False, on_error=None):
        super().__init__(daemon=True)
        self.src = src
        self.sink = sink
        self.open_path = open_path
        self.on_error = on_error
        self.stop = threading.Event()
        self.error = None
        self.bytes = 0

    def run(self):
        try:
            src = open(self.src, 'rb') if self.open_path else self.src
            try:
                while not self.stop.is_set():
                    chunk = src.read(CHUNK)
                    if not chunk:
                        break
                    self.bytes += len(chunk)
                    self.sink(chunk)
            finally:
                if self.open_path:
                    src.close()
        except BaseException as exc:  # reported by the caller
            self.error = exc
            if self.on_error is not None:
                self.on_error()


def _unblock_fifo_reader(fifo):
    """If the writer never opened the FIFO, the reader thread is blocked in open(): release it."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def _abort_save(xl_proc, reader, zstd_proc, fifo, grace):
    """Stop a running save so that xl fails and resumes the domain itself; kill it only as a last resort.

    Returns True if xl had to be killed (the domain may then be left suspended: see Xl.resume)."""
    if reader is not None:
        reader.stop.set()
    _kill(zstd_proc)
    if xl_proc is None or xl_proc.poll() is not None:
        return False
    try:
        xl_proc.wait(timeout=grace)
        return False
    except subprocess.TimeoutExpired:
        _kill(xl_proc)
        return True
    finally:
        _unblock_fifo_reader(fifo)


def save_stream(xl_argv_builder, dest, compress=None, zstd_level=3, zstd_threads=1, timeout=1800, zstd_path='zstd',
                abort_grace=60):
    """Run ``xl save`` into a FIFO and store the stream at ``dest`` (created 0600).

    ``xl_argv_builder(fifo_path)`` returns the xl argv. Returns ``{'size_bytes', 'sha256', 'raw_bytes',
    'save_s'}``. On any failure (xl error, full store, timeout, an exception such as a signal raised in
    this thread) the save is aborted the way xl recovers from itself (see ``_abort_save``), the partial
    ``dest`` is removed and an error raised; ``XlError.killed`` tells whether xl had to be killed.
    """
    tmpdir = tempfile.mkdtemp(prefix='fleetckpt-save-')
    fifo = os.path.join(tmpdir, 'stream')
    os.mkfifo(fifo, 0o600)
    digest = hashlib.sha256()
    xl_proc = zstd_proc = None
    out_fd = None
    xl_err = tempfile.TemporaryFile(dir=tmpdir)
    zstd_err = tempfile.TemporaryFile(dir=tmpdir)
    start = time.monotonic()
    created = False
    out = reader = writer = None
    try:
        try:
            out_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise StoreError('cannot create image %s: %s' % (dest, exc))
        created = True
        out = os.fdopen(out_fd, 'wb', buffering=0)
        out_fd = None

        def store(chunk):
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                written = out.write(view)
                view = view[written:]

        argv = xl_argv_builder(fifo)
        if compress == 'zstd':
            zstd_proc = subprocess.Popen([zstd_path, '-q', '-c', '-%d' % zstd_level, '-T%d' % zstd_threads],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=zstd_err)
            stalled_zstd = zstd_proc
            # a failed store write must not leave zstd, then the FIFO reader, then xl blocked on full pipes
            writer = _Copier(zstd_proc.stdout, store, on_error=lambda: _kill(stalled_zstd))
            reader = _Copier(fifo, zstd_proc.stdin.write, open_path=True)
            writer.start()
        else:
            reader = _Copier(fifo, store, open_path=True)
            writer = None
        reader.start()
        xl_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=xl_err, stderr=subprocess.STDOUT)
        try:
            rc = xl_proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            killed = _abort_save(xl_proc, reader, zstd_proc, fifo, abort_grace)
            raise XlError(argv, None, stderr=_read_tail(xl_err), timed_out=True, timeout=timeout, killed=killed)
        except BaseException:  # e.g. the module's SIGTERM/SIGHUP handler: let xl resume the domain first
            _abort_save(xl_proc, reader, zstd_proc, fifo, abort_grace)
            raise
        _unblock_fifo_reader(fifo)
        reader.join(timeout=max(30, timeout - (time.monotonic() - start)))
        if zstd_proc is not None:
            try:
                zstd_proc.stdin.close()
            except OSError:  # zstd already killed after a failed store write
                pass
            zstd_rc = zstd_proc.wait(timeout=600)
            writer.join(timeout=600)
        # the store's error first: a full store also makes xl fail (its writes hit a closed FIFO)
        for copier in (writer, reader):
            if copier is not None and copier.error is not None:
                err = copier.error
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    raise StoreError('store is full while writing %s (xl: %s)' % (dest, _read_tail(xl_err, 300).strip()))
                if copier is reader and writer is not None and writer.error is None and isinstance(err, BrokenPipeError):
                    continue  # zstd died: reported below with its own message
                raise StoreError('writing image %s failed: %s' % (dest, err))
        if rc != 0:
            raise XlError(argv, rc, stderr=_read_tail(xl_err), killed=rc < 0)
        if zstd_proc is not None and zstd_rc != 0:
            raise FleetckptError('zstd failed (rc=%s): %s' % (zstd_rc, _read_tail(zstd_err)))
        if reader.bytes == 0:
            raise XlError(argv, rc, stderr='xl save produced an empty stream: ' + _read_tail(xl_err))
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise StoreError('flushing image %s failed: %s' % (dest, exc))
        out.close()
        return {'size_bytes': os.stat(dest).st_size, 'sha256': digest.hexdigest(), 'raw_bytes': reader.bytes,
                'save_s': round(time.monotonic() - start, 3), 'xl_output': _read_tail(xl_err, 1000)}
    except BaseException:
        _kill(xl_proc)
        _kill(zstd_proc)
        for copier in (reader, writer):
            if copier is not None:
                copier.stop.set()
                copier.join(timeout=10)
        if out is not None:
            # close before unlinking: on NFS an unlinked file still open is renamed to .nfsXXXX, and the
            # partial checkpoint directory holding it could not be removed
            try:
                out.close()
            except OSError:
                pass
        if created:
            try:
                os.unlink(dest)
            except OSError:
                pass
        raise
    finally:
        if out_fd is not None:
            os.close(out_fd)
        xl_err.close()
        zstd_err.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def restore_stream(xl_argv_builder, image, compressed, timeout=1800, zstd_path='zstd', config_transform=None):
    """Run ``xl restore`` on ``image``; a zstd image is decompressed into a FIFO that xl reads.

    ``config_transform(config) -> config`` (see ``_xlimage.make_transform``) rewrites the domain config in the
    image header on the way: the image then always goes through the FIFO, the header is read and transformed
    before xl starts (bad images or options fail without touching the host), and the result gains
    ``config_header`` (``name``, ``uuid``, header sizes). None keeps the image as it is.
    """
    start = time.monotonic()
    if not compressed and config_transform is None:
        argv = xl_argv_builder(image)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise XlError(argv, None, stderr=(exc.stdout or b'').decode('utf-8', 'replace'), timed_out=True, timeout=timeout)
        if proc.returncode != 0:
            raise XlError(argv, proc.returncode, stderr=proc.stdout.decode('utf-8', 'replace'))
        return {'restore_s': round(time.monotonic() - start, 3)}
    tmpdir = tempfile.mkdtemp(prefix='fleetckpt-restore-')
    fifo = os.path.join(tmpdir, 'stream')
    os.mkfifo(fifo, 0o600)
    zstd_proc = xl_proc = None
    plain_src = None
    result = {}
    try:
        with open(os.path.join(tmpdir, 'zstd.err'), 'w+b') as zerr, open(os.path.join(tmpdir, 'xl.out'), 'w+b') as xout:
            if compressed:
                zstd_proc = subprocess.Popen([zstd_path, '-q', '-d', '-c', image], stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=zerr)
                source = zstd_proc.stdout
            else:
                try:
                    plain_src = open(image, 'rb')
                except OSError as exc:
                    raise StoreError('cannot read image %s: %s' % (image, exc))
                source = plain_src
            prefix = b''
            if config_transform is not None:
                try:
                    header, prefix, new_config = _xlimage.rewrite_header(source, config_transform)
                except StoreError:
                    if zstd_proc is not None:
                        try:
                            zrc = zstd_proc.wait(timeout=5)
                        except subprocess.TimeoutExpired:
                            zrc = None
                        if zrc not in (0, None):
                            raise FleetckptError('zstd -d failed (rc=%s): %s' % (zrc, _read_tail(zerr)))
                    raise
                result['config_header'] = {'name': _xlimage.config_name(new_config),
                                           'uuid': new_config['c_info'].get('uuid'),
                                           'header_in': header.size, 'header_out': len(prefix)}
            feeder = _Copier(source, None)

            def feed():
                # opening the FIFO for writing blocks until xl opens it for reading
                try:
                    with open(fifo, 'wb') as sink:
                        if prefix:
                            sink.write(prefix)
                        feeder.sink = sink.write
                        feeder.run()
                except OSError as exc:  # xl went away: its exit status tells why
                    feeder.error = exc

            thread = threading.Thread(target=feed, daemon=True)
            thread.start()
            argv = xl_argv_builder(fifo)
            xl_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=xout, stderr=subprocess.STDOUT)
            try:
                rc = xl_proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise XlError(argv, None, stderr=_read_tail(xout), timed_out=True, timeout=timeout)
            if rc != 0:
                thread.join(timeout=5)
                fed = '\nfleetckpt: xl stopped after %d bytes of the stream' % (len(prefix) + feeder.bytes)
                if feeder.error is not None and not isinstance(feeder.error, BrokenPipeError):
                    fed += '; feeding it failed: %s' % feeder.error  # e.g. a read error on the store
                raise XlError(argv, rc, stderr=_read_tail(xout) + _read_tail(zerr) + fed)
            thread.join(timeout=60)
            if zstd_proc is not None:
                zrc = zstd_proc.wait(timeout=60)
                if zrc != 0:
                    raise FleetckptError('zstd -d failed (rc=%s): %s' % (zrc, _read_tail(zerr)))
        result['restore_s'] = round(time.monotonic() - start, 3)
        return result
    finally:
        _kill(xl_proc)
        _kill(zstd_proc)
        if plain_src is not None:
            plain_src.close()
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
        shutil.rmtree(tmpdir, ignore_errors=True)
