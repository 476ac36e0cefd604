# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A minimal QMP client for the QEMU that libxl runs as a domain's device model (Xen's qdisk backend).

libxl gives each such QEMU a QMP socket, ``/run/xen/qmp-libxl-<domid>``. The protocol: QEMU greets with
``{"QMP": {...}}``; the client sends ``qmp_capabilities``; then each ``{"execute": ..., "arguments": ...}``
gets one ``{"return": ...}`` or ``{"error": {"class", "desc"}}``, with asynchronous ``{"event": ...}``
messages possibly in between (skipped here). Every read has a deadline; QEMU's answers are parsed strictly
(one JSON object per line) and an error names the command and QEMU's description.

The pure parts (:func:`parse_messages`, :func:`find_node`) are unit-tested without QEMU.
"""

from __future__ import annotations

import json
import os
import socket
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError

QMP_SOCKET = '/run/xen/qmp-libxl-%d'
MAX_MESSAGE = 4 * 1024 * 1024  # a QMP answer larger than this is not one we asked for


class QmpError(FleetckptError):
    """QMP failed: no socket, a timeout, a malformed message, or QEMU answered with an error."""


def socket_path(domid):
    if not isinstance(domid, int) or isinstance(domid, bool) or domid < 1:
        raise QmpError('no device model QMP socket for domid %r' % (domid,))
    return QMP_SOCKET % domid


def parse_messages(buffer):
    """Split ``buffer`` (bytes) into complete JSON messages (one per line); returns ``(messages, rest)``.
    Raises QmpError on a line that is not a JSON object."""
    messages = []
    while b'\n' in buffer:
        line, buffer = buffer.split(b'\n', 1)
        line = line.strip()
        if not line:
            continue
        try:
            msg = json.loads(line.decode('utf-8'))
        except (UnicodeDecodeError, ValueError) as exc:
            raise QmpError('QMP sent a line that is not JSON (%s): %r' % (exc, line[:200]))
        if not isinstance(msg, dict):
            raise QmpError('QMP sent a JSON value that is not an object: %r' % (line[:200],))
        messages.append(msg)
    if len(buffer) > MAX_MESSAGE:
        raise QmpError('QMP message longer than %d bytes' % MAX_MESSAGE)
    return messages, buffer


def _filenames(name):
    """The file names a node's ``file`` field gives: a path, or QEMU's ``json:{...}`` pseudo-filename (used when
    the node has options a plain name cannot carry, as Xen's backend sets) with every ``filename`` inside it."""
    if not isinstance(name, str):
        return []
    if not name.startswith('json:'):
        return [name]
    try:
        tree = json.loads(name[5:])
    except ValueError:
        return []
    found, todo = [], [tree]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            found += [v for k, v in item.items() if k == 'filename' and isinstance(v, str)]
            todo += list(item.values())
    return found


def find_node(nodes, filename, driver='qcow2', vdev=None):
    """The node name of the ``driver`` node whose image is ``filename`` in ``query-named-block-nodes``'s
    answer, or None. Paths are compared after normalisation; only nodes with a node-name count. Failing that,
    the node Xen's backend names ``<vdev>-<driver>`` (QEMU's hw/block/xen-block.c), when ``vdev`` is given."""
    want = os.path.normpath(filename)
    if not isinstance(nodes, list):
        return None
    named = [n for n in nodes if isinstance(n, dict) and n.get('drv') == driver and isinstance(n.get('node-name'), str)]
    names = {}
    for node in named:
        image = node.get('image') if isinstance(node.get('image'), dict) else {}
        names[node['node-name']] = [os.path.normpath(n) for n in _filenames(node.get('file')) + _filenames(image.get('filename'))]
        if want in names[node['node-name']]:
            return node['node-name']
    # by name only where the node's file cannot be read: a node that shows another file is another disk
    if vdev and names.get('%s-%s' % (vdev, driver)) == []:
        return '%s-%s' % (vdev, driver)
    return None


class Qmp:
    """One QMP session (a context manager). ``connect`` is injectable for tests (returns a socket-like object
    with ``settimeout``, ``sendall``, ``recv``, ``close``)."""

    def __init__(self, path, timeout=30.0, connect=None):
        self.path = path
        self.timeout = timeout
        self._connect = connect or self._unix
        self.sock = None
        self.buffer = b''
        self.pending = []

    @staticmethod
    def _unix(path, timeout):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock

    def __enter__(self):
        try:
            self.sock = self._connect(self.path, self.timeout)
        except OSError as exc:
            raise QmpError('cannot connect to QMP socket %s: %s' % (self.path, exc.strerror or exc))
        try:
            greeting = self._read(time.monotonic() + self.timeout, 'the greeting')
            if 'QMP' not in greeting:
                raise QmpError('%s did not greet as QMP: %r' % (self.path, greeting))
            self.execute('qmp_capabilities')
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _read(self, deadline, what):
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError('QMP %s: no answer for %s within %.0f s' % (self.path, what, self.timeout))
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise QmpError('QMP %s: reading %s failed: %s' % (self.path, what, exc.strerror or exc))
            if not data:
                raise QmpError('QMP %s closed the connection while waiting for %s' % (self.path, what))
            messages, self.buffer = parse_messages(self.buffer + data)
            self.pending.extend(messages)
        return self.pending.pop(0)

    def execute(self, command, arguments=None, timeout=None):
        """Run ``command``; returns its ``return`` value or raises QmpError with QEMU's error description."""
        msg = {'execute': command}
        if arguments:
            msg['arguments'] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode('utf-8') + b'\n')
        except OSError as exc:
            raise QmpError('QMP %s: sending %s failed: %s' % (self.path, command, exc.strerror or exc))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            answer = self._read(deadline, command)
            if 'event' in answer:
                continue
            if 'error' in answer:
                err = answer['error'] if isinstance(answer['error'], dict) else {}
                raise QmpError('QMP %s failed: %s (%s)' % (command, err.get('desc', answer['error']), err.get('class', '?')))
            if 'return' in answer:
                return answer['return']
            raise QmpError('QMP %s: unexpected answer %r' % (command, answer))
