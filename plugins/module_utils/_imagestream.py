# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Stream ``xl save`` / ``xl restore`` images through a FIFO.

Saving: ``xl save`` writes into a FIFO in a local temp dir; we read it, optionally pipe it through
``zstd``, hash what is stored (sha256) and write it to the destination, so the checksum costs no second
read of the image from the store. A pipe in between also avoids the EFAULT that ``xl save`` hits on
targets that pin pages (virtio-9p, O_DIRECT). Restoring a compressed image: ``zstd -d`` feeds a FIFO that
``xl restore`` reads.
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
    """Copy src (a path opened here, or a file object) to a sink callable; remember the error."""

    def __init__(self, src, sink, open_path=False):
        super().__init__(daemon=True)
        self.src = src
        self.sink = sink
        self.open_path = open_path
        self.error = None
        self.bytes = 0

    def run(self):
        try:
            src = open(self.src, 'rb') if self.open_path else self.src
            try:
                while True:
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


def _unblock_fifo_reader(fifo):
    """If the writer never opened the FIFO, the reader thread is blocked in open(): release it."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def save_stream(xl_argv_builder, dest, compress=None, zstd_level=3, zstd_threads=1, timeout=1800, zstd_path='zstd'):
    """Run ``xl save`` into a FIFO and store the stream at ``dest`` (created 0600).

    ``xl_argv_builder(fifo_path)`` returns the xl argv. Returns ``{'size_bytes', 'sha256', 'raw_bytes',
    'save_s'}``. On any failure the partial ``dest`` is removed and an error raised.
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
            reader = _Copier(fifo, zstd_proc.stdin.write, open_path=True)
            writer = _Copier(zstd_proc.stdout, store)
            writer.start()
        else:
            reader = _Copier(fifo, store, open_path=True)
            writer = None
        reader.start()
        xl_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=xl_err, stderr=subprocess.STDOUT)
        try:
            rc = xl_proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(xl_proc)
            _unblock_fifo_reader(fifo)
            raise XlError(argv, None, stderr=_read_tail(xl_err), timed_out=True, timeout=timeout)
        _unblock_fifo_reader(fifo)
        reader.join(timeout=max(30, timeout - (time.monotonic() - start)))
        if zstd_proc is not None:
            zstd_proc.stdin.close()
            zstd_rc = zstd_proc.wait(timeout=600)
            writer.join(timeout=600)
        if rc != 0:
            raise XlError(argv, rc, stderr=_read_tail(xl_err))
        for copier in (reader, writer):
            if copier is not None and copier.error is not None:
                err = copier.error
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    raise StoreError('store is full while writing %s' % dest)
                raise StoreError('writing image %s failed: %s' % (dest, err))
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


def restore_stream(xl_argv_builder, image, compressed, timeout=1800, zstd_path='zstd'):
    """Run ``xl restore`` on ``image``; a zstd image is decompressed into a FIFO that xl reads."""
    start = time.monotonic()
    if not compressed:
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
    try:
        with open(os.path.join(tmpdir, 'zstd.err'), 'w+b') as zerr, open(os.path.join(tmpdir, 'xl.out'), 'w+b') as xout:
            zstd_proc = subprocess.Popen([zstd_path, '-q', '-d', '-c', image], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=zerr)
            feeder = _Copier(zstd_proc.stdout, None)

            def feed():
                # opening the FIFO for writing blocks until xl opens it for reading
                with open(fifo, 'wb') as sink:
                    feeder.sink = sink.write
                    feeder.run()

            thread = threading.Thread(target=feed, daemon=True)
            thread.start()
            argv = xl_argv_builder(fifo)
            xl_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=xout, stderr=subprocess.STDOUT)
            try:
                rc = xl_proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise XlError(argv, None, stderr=_read_tail(xout), timed_out=True, timeout=timeout)
            if rc != 0:
                raise XlError(argv, rc, stderr=_read_tail(xout) + _read_tail(zerr))
            thread.join(timeout=60)
            zrc = zstd_proc.wait(timeout=60)
            if zrc != 0:
                raise FleetckptError('zstd -d failed (rc=%s): %s' % (zrc, _read_tail(zerr)))
        return {'restore_s': round(time.monotonic() - start, 3)}
    finally:
        _kill(xl_proc)
        _kill(zstd_proc)
        try:
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
        shutil.rmtree(tmpdir, ignore_errors=True)
