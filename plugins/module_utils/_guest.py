# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Install, update, remove and verify the guest agent inside a guest (used by the guest_agent module).

The agent is one stdlib-only Python file (module_utils/_agent.py, shipped inside the module's payload) plus a
systemd unit: nothing is downloaded, so it installs on air-gapped guests.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time

from ansible_collections.fleetckpt.xen.plugins.module_utils import _agent
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import write_atomic


def agent_source():
    """The agent's source as bytes, read through its module's loader (a file, or AnsiballZ's zip)."""
    data = None
    loader = getattr(getattr(_agent, '__spec__', None), 'loader', None)
    try:
        data = loader.get_data(_agent.__file__) if loader is not None and hasattr(loader, 'get_data') else None
    except OSError:
        data = None
    if not data:
        try:
            data = inspect.getsource(_agent).encode('utf-8')
        except (OSError, TypeError):
            data = None
    if not data or b'AGENT_VERSION' not in data:
        raise FleetckptError('cannot read the agent source from the collection payload')
    return data


def desired_files():
    return {
        _agent.INSTALL_PATH: (agent_source(), 0o644),
        _agent.UNIT_PATH: (_agent.SYSTEMD_UNIT.encode('utf-8'), 0o644),
    }


def _digest(data):
    return hashlib.sha256(data).hexdigest()


def current_digest(path, root='/'):
    full = os.path.join(root, path.lstrip('/'))
    try:
        with open(full, 'rb') as handle:
            return _digest(handle.read())
    except OSError:
        return None


def plan(state, root='/'):
    """Which files differ from what ``state`` wants: {path: 'create'|'update'|'remove'}."""
    changes = {}
    for path, (data, _mode) in desired_files().items():
        have = current_digest(path, root)
        if state == 'present' and have != _digest(data):
            changes[path] = 'create' if have is None else 'update'
        elif state == 'absent' and have is not None:
            changes[path] = 'remove'
    return changes


def write_file(path, data, mode, root='/'):
    full = os.path.join(root, path.lstrip('/'))
    os.makedirs(os.path.dirname(full), 0o755, exist_ok=True)
    write_atomic(full, data, mode)


def apply(changes, root='/'):
    files = desired_files()
    for path, action in sorted(changes.items()):
        if action == 'remove':
            try:
                os.unlink(os.path.join(root, path.lstrip('/')))
            except FileNotFoundError:
                pass
        else:
            data, mode = files[path]
            write_file(path, data, mode, root)


def verify(timeout=15.0, xenbus_path=None, unix_socket_path=None, poll=0.2, clock=time.monotonic, sleep=time.sleep):
    """Ask our own agent for a fresh sample through XenStore (request/reply) and return what it published."""
    path = None
    if unix_socket_path is None:
        path = xenbus_path or _agent.default_xenbus_path()
        if not os.path.exists(path):
            raise FleetckptError('%s does not exist: is this a Xen PV/PVH guest with xenbus?' % path)
    nonce = hashlib.sha256(os.urandom(16)).hexdigest()[:32]
    prefix = _agent.KEY_PREFIX + '/'
    start = clock()
    last_error = None
    while clock() - start < timeout:
        try:
            with _agent.XenBusClient(xenbus_path=path, unix_socket_path=unix_socket_path, timeout=5.0) as client:
                client.write(prefix + _agent.REQUEST_KEY, nonce.encode('ascii'))
                while clock() - start < timeout:
                    try:
                        reply = client.read(prefix + _agent.REPLY_KEY)
                    except _agent.NotFound:
                        reply = None
                    if reply == nonce.encode('ascii'):
                        published = {}
                        for key in _agent.SAMPLE_KEYS:
                            try:
                                published[key] = client.read(prefix + key).decode('ascii', 'replace')
                            except _agent.NotFound:
                                published[key] = None
                        published['reply_s'] = round(clock() - start, 3)
                        return published
                    sleep(poll)
        except _agent.XenStoreError as exc:
            last_error = exc
            sleep(poll)
    raise FleetckptError('the agent did not answer a fresh-sample request within %ss%s'
                         % (timeout, (' (last error: %s)' % last_error) if last_error else ''))
