# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""XenStore access from dom0 through pyxs, and the strict parser of what guest agents publish.

Everything a guest writes is untrusted: values are accepted only as short strings of ASCII digits,
memory figures are clamped to [0, static-max], and a missing, malformed or stale report becomes a
status string, never an exception. See docs/agent-protocol.md.
"""

from __future__ import annotations

import binascii
import errno
import os
import re
import time
import traceback

try:
    import pyxs
    HAS_PYXS = True
    PYXS_IMPORT_ERROR = None
except ImportError:  # pragma: no cover - depends on the host
    pyxs = None
    HAS_PYXS = False
    PYXS_IMPORT_ERROR = traceback.format_exc()

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import XenStoreError

DEFAULT_SOCKET = '/var/run/xenstored/socket'
AGENT_DIR = 'data/fleetckpt'
MEMORY_KEYS = ('committed_as_kb', 'mem_total_kb', 'mem_available_kb', 'sunreclaim_kb',
               'page_tables_kb', 'kernel_stack_kb', 'mapped_kb')
COUNTER_KEYS = ('oom_kill', 'seq', 'ts')
AGENT_KEYS = MEMORY_KEYS + COUNTER_KEYS + ('version', 'reply')
REQUIRED_KEYS = ('committed_as_kb', 'mem_total_kb', 'seq', 'ts')
MAX_VALUE_BYTES = 64
_DIGITS = re.compile(rb'[0-9]{1,20}')
_VERSION = re.compile(rb'[0-9A-Za-z._-]{1,32}')
MAX_COUNTER = 2 ** 53


def agent_path(domid, key=None):
    """Absolute XenStore path of a domain's agent directory (or one key in it)."""
    if not isinstance(domid, int) or isinstance(domid, bool) or domid < 0:
        raise ValueError('invalid domid %r' % (domid,))
    path = '/local/domain/%d/%s' % (domid, AGENT_DIR)
    return path if key is None else '%s/%s' % (path, key)


def new_nonce():
    return binascii.hexlify(os.urandom(16)).decode('ascii')


def _parse_int(raw):
    if raw is None:
        return None, 'missing'
    if not isinstance(raw, bytes):
        return None, 'not bytes'
    if len(raw) > MAX_VALUE_BYTES:
        return None, 'oversized (%d bytes)' % len(raw)
    if not _DIGITS.fullmatch(raw):
        return None, 'not a decimal integer'
    value = int(raw)
    if value > MAX_COUNTER:
        return None, 'out of range'
    return value, None


def parse_agent_report(raw, static_max_kb, now=None, max_age_s=60, nonce=None):
    """Turn raw agent bytes into a report dict.

    ``raw`` maps key -> bytes or None (absent). Returns ``{'status', 'problems', 'values', 'clamped',
    'age_s', 'fresh', 'version'}`` where status is one of ``ok``, ``missing`` (no agent data at all),
    ``incomplete``, ``malformed`` or ``stale``. ``fresh`` is True when the agent answered ``nonce``.
    """
    now = time.time() if now is None else now
    problems = []
    values = {}
    clamped = []
    present = [k for k in AGENT_KEYS if raw.get(k) is not None]
    if not present:
        return {'status': 'missing', 'problems': ['no agent data under %s' % AGENT_DIR], 'values': {},
                'clamped': [], 'age_s': None, 'fresh': False, 'version': None}
    cap = static_max_kb if isinstance(static_max_kb, int) and static_max_kb > 0 else None
    for key in MEMORY_KEYS + COUNTER_KEYS:
        value, problem = _parse_int(raw.get(key))
        if problem == 'missing':
            if key in REQUIRED_KEYS:
                problems.append('%s missing' % key)
            continue
        if problem:
            problems.append('%s %s' % (key, problem))
            continue
        if key in MEMORY_KEYS and cap is not None and value > cap:
            clamped.append(key)
            value = cap
        values[key] = value
    version = raw.get('version')
    if version is not None:
        if isinstance(version, bytes) and _VERSION.fullmatch(version):
            version = version.decode('ascii')
        else:
            problems.append('version malformed')
            version = None
    fresh = bool(nonce) and raw.get('reply') == nonce.encode('ascii')
    age = None
    if 'ts' in values:
        age = round(now - values['ts'], 3)
    status = 'ok'
    if any(('missing' in p) for p in problems):
        status = 'incomplete'
    if any(('missing' not in p) for p in problems):
        status = 'malformed'
    if status == 'ok' and not fresh:
        if age is None or age > max_age_s or age < -max_age_s:
            status = 'stale'
            problems.append('last sample is %ss old (limit %ss) and the agent did not answer a request' % (age, max_age_s))
    return {'status': status, 'problems': problems, 'values': values, 'clamped': clamped,
            'age_s': age, 'fresh': fresh, 'version': version}


class XenStore:
    """A pyxs client for dom0, with ENOENT turned into None and errors into XenStoreError."""

    def __init__(self, socket_path=DEFAULT_SOCKET, client=None):
        self.socket_path = socket_path
        self._client = client
        self._owns = client is None

    def __enter__(self):
        if self._client is None:
            if not HAS_PYXS:
                raise XenStoreError('the pyxs Python library is required on the Xen host')
            if not os.path.exists(self.socket_path):
                raise XenStoreError('xenstored socket %s does not exist: is this a Xen dom0 with xenstored running?'
                                    % self.socket_path)
            try:
                self._client = pyxs.Client(unix_socket_path=self.socket_path)
                self._client.connect()
            except Exception as exc:  # pyxs raises its own ConnectionError and socket errors
                self._client = None
                raise XenStoreError('cannot connect to xenstored at %s: %s' % (self.socket_path, exc))
        return self

    def __exit__(self, *exc_info):
        if self._owns and self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def _call(self, what, path, func, *args):
        try:
            return func(path.encode('ascii'), *args)
        except Exception as exc:
            code = exc.args[0] if getattr(exc, 'args', None) else None
            if code == errno.ENOENT:
                return None
            raise XenStoreError('xenstore %s %s failed: %s' % (what, path, exc))

    def read(self, path):
        return self._call('read', path, self._client.read)

    def write(self, path, value):
        if not isinstance(value, bytes):
            value = str(value).encode('ascii')
        self._call('write', path, self._client.write, value)

    def delete(self, path):
        self._call('delete', path, self._client.delete)

    def list(self, path):
        names = self._call('list', path, self._client.list)
        return [n.decode('ascii', 'replace') for n in (names or [])]

    def read_agent_raw(self, domid):
        return dict((key, self.read(agent_path(domid, key))) for key in AGENT_KEYS)

    def request_sample(self, domid, timeout=2.0, poll=0.05, clock=time.monotonic, sleep=time.sleep):
        """Ask the agent of ``domid`` for a fresh sample; return (raw, nonce, round-trip seconds or None)."""
        nonce = new_nonce()
        start = clock()
        self.write(agent_path(domid, 'request'), nonce)
        reply_path = agent_path(domid, 'reply')
        expected = nonce.encode('ascii')
        rtt = None
        while True:
            if self.read(reply_path) == expected:
                rtt = round(clock() - start, 3)
                break
            if clock() - start >= timeout:
                break
            sleep(poll)
        return self.read_agent_raw(domid), nonce, rtt

    def query_agent(self, domid, static_max_kb, timeout=2.0, max_age_s=60):
        """Request a fresh sample and parse it; never raises for bad guest data."""
        raw, nonce, rtt = self.request_sample(domid, timeout=timeout)
        report = parse_agent_report(raw, static_max_kb, max_age_s=max_age_s, nonce=nonce)
        report['query_s'] = rtt if rtt is not None else timeout
        report['answered'] = rtt is not None
        return report
