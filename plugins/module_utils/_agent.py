# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import absolute_import, division, print_function
__metaclass__ = type

# fleetckpt guest agent: publishes the guest's memory facts to XenStore for dom0.
#
# This file is self-contained (Python 3 standard library only) because the ``guest_agent`` module
# copies it verbatim onto each guest as ``/usr/local/lib/fleetckpt/fleetckpt_agent.py`` and runs it
# with the systemd unit in ``SYSTEMD_UNIT``. Importing it has no side effects.
#
# Protocol (see docs/agent-protocol.md): the agent writes decimal strings under its own domain's
# ``data/fleetckpt/`` (relative XenStore paths, so it never needs to know its domid, which changes on
# restore), in one transaction with ``seq`` last. dom0 asks for a fresh sample by writing a hex nonce
# to ``data/fleetckpt/request``; the agent answers by publishing and setting ``reply`` to the nonce.
# Nothing read from XenStore is ever executed, interpreted beyond a strict regex, or logged in full.

import argparse
import errno
import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time

AGENT_VERSION = '1'

# --- installation layout -------------------------------------------------------------------------

INSTALL_DIR = '/usr/local/lib/fleetckpt'
INSTALL_PATH = INSTALL_DIR + '/fleetckpt_agent.py'
SERVICE_NAME = 'fleetckpt-agent.service'
UNIT_PATH = '/etc/systemd/system/' + SERVICE_NAME
DEFAULT_XENBUS_PATHS = ('/dev/xen/xenbus', '/proc/xen/xenbus')

SYSTEMD_UNIT = """\
# Installed by the fleetckpt.xen guest_agent module. Do not edit: it is overwritten on update.
[Unit]
Description=fleetckpt.xen guest agent (publishes memory facts to XenStore)
After=local-fs.target
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart=/usr/bin/python3 {install_path}
Restart=always
RestartSec=2
Environment=PYTHONDONTWRITEBYTECODE=1
# Runs as root only because /dev/xen/xenbus is root:root 0600; every capability is dropped.
User=root
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
PrivateNetwork=yes
RestrictAddressFamilies=AF_UNIX
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes
# /proc/meminfo and /proc/vmstat stay readable with these.
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
DevicePolicy=closed
DeviceAllow=/dev/xen/xenbus rw
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0077
MemoryMax=32M
TasksMax=8

[Install]
WantedBy=multi-user.target
""".format(install_path=INSTALL_PATH)

# --- protocol constants ----------------------------------------------------------------------------

KEY_PREFIX = 'data/fleetckpt'
REQUEST_KEY = 'request'
REPLY_KEY = 'reply'
SEQ_KEY = 'seq'
# Published keys, in the order they are written inside the transaction (``seq`` last).
SAMPLE_KEYS = ('committed_as_kb', 'mem_total_kb', 'mem_available_kb', 'sunreclaim_kb', 'page_tables_kb',
               'kernel_stack_kb', 'mapped_kb', 'oom_kill', 'ts', 'version', 'seq')
# /proc/meminfo field -> published key (values in kB).
MEMINFO_FIELDS = (
    ('Committed_AS', 'committed_as_kb'),
    ('MemTotal', 'mem_total_kb'),
    ('MemAvailable', 'mem_available_kb'),
    ('SUnreclaim', 'sunreclaim_kb'),
    ('PageTables', 'page_tables_kb'),
    ('KernelStack', 'kernel_stack_kb'),
    ('Mapped', 'mapped_kb'),
)
NONCE_RE = re.compile(br'\A[0-9a-f]{16,64}\Z')

DEFAULT_INTERVAL = 5.0
POLL_INTERVAL = 0.2
RESTORE_CHECK_INTERVAL = 1.0
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
TX_ATTEMPTS = 5
LOG_PERIOD = 60.0
MAX_U64 = 2 ** 64 - 1
MAX_PROC_BYTES = 1 << 20

# --- XenStore wire protocol ------------------------------------------------------------------------

XS_DIRECTORY = 1
XS_READ = 2
XS_GET_PERMS = 3
XS_WATCH = 4
XS_UNWATCH = 5
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_GET_DOMAIN_PATH = 10
XS_WRITE = 11
XS_MKDIR = 12
XS_RM = 13
XS_SET_PERMS = 14
XS_WATCH_EVENT = 15
XS_ERROR = 16

OP_NAMES = {
    XS_DIRECTORY: 'DIRECTORY', XS_READ: 'READ', XS_GET_PERMS: 'GET_PERMS', XS_WATCH: 'WATCH',
    XS_UNWATCH: 'UNWATCH', XS_TRANSACTION_START: 'TRANSACTION_START', XS_TRANSACTION_END: 'TRANSACTION_END',
    XS_GET_DOMAIN_PATH: 'GET_DOMAIN_PATH', XS_WRITE: 'WRITE', XS_MKDIR: 'MKDIR', XS_RM: 'RM',
    XS_SET_PERMS: 'SET_PERMS', XS_WATCH_EVENT: 'WATCH_EVENT', XS_ERROR: 'ERROR',
}

HEADER = struct.Struct('<IIII')
MAX_PAYLOAD = 4096
MAX_PATH = 3072
READ_CHUNK = 8192
DEFAULT_TIMEOUT = 10.0
_PATH_RE = re.compile(r'\A[A-Za-z0-9_@/-]+\Z')
_ERRNAME_RE = re.compile(br'\AE[A-Z0-9]{1,31}\Z')
_monotonic = getattr(time, 'monotonic', time.time)


class XenStoreError(Exception):
    """A XenStore operation failed. ``errno_name`` is the name xenstored replied with (e.g. ``'EACCES'``)."""

    def __init__(self, errno_name, op=None, path=None):
        super(XenStoreError, self).__init__(errno_name, op, path)
        self.errno_name = errno_name
        self.op = op
        self.path = path

    def __str__(self):
        where = ' %s' % self.path if self.path else ''
        return '%s%s: %s' % (self.op or 'xenstore', where, self.errno_name)


class NotFound(XenStoreError):
    """The node does not exist (ENOENT)."""


class XenStoreConnectionError(XenStoreError):
    """Transport failure (cannot connect, EOF, timeout, protocol violation); the client is closed."""


def _error(errno_name, op=None, path=None):
    if errno_name == 'ENOENT':
        return NotFound(errno_name, op, path)
    return XenStoreError(errno_name, op, path)


def _errno_name(exc):
    code = getattr(exc, 'errno', None)
    return errno.errorcode.get(code, 'EIO') if code else 'EIO'


def _wait_readable(fd, timeout):
    """Wait until ``fd`` is readable; False on timeout. Signals are retried by Python (PEP 475)."""
    if hasattr(select, 'poll'):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    readable = select.select([fd], [], [], max(0.0, timeout))[0]
    return bool(readable)


class _FdTransport:
    """XenBus character device (``/dev/xen/xenbus``): plain read()/write() on a file descriptor."""

    def __init__(self, fd, name='xenbus'):
        self.fd = fd
        self.name = name

    def write_all(self, data):
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]

    def read_some(self, timeout):
        if not _wait_readable(self.fd, timeout):
            raise socket.timeout('timed out')
        return os.read(self.fd, READ_CHUNK)

    def close(self):
        os.close(self.fd)


class _SocketTransport:
    """xenstored unix socket (dom0, tests)."""

    def __init__(self, path, timeout):
        self.name = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except Exception:
            self.sock.close()
            raise

    def write_all(self, data):
        self.sock.sendall(data)

    def read_some(self, timeout):
        if not _wait_readable(self.sock.fileno(), timeout):
            raise socket.timeout('timed out')
        return self.sock.recv(READ_CHUNK)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, socket.error):
            pass
        self.sock.close()


def _encode_path(path):
    if isinstance(path, bytes):
        path = path.decode('ascii')
    if (not _PATH_RE.match(path) or len(path) > MAX_PATH or '//' in path
            or (len(path) > 1 and path.endswith('/'))):
        raise ValueError('invalid XenStore path %r' % (path,))
    return path.encode('ascii') + b'\0'


def _encode_value(value):
    if isinstance(value, bytes):
        return value
    return str(value).encode('utf-8')


class XenBusClient:
    """Minimal synchronous XenStore client over ``/dev/xen/xenbus`` or a xenstored unix socket.

    Relative paths (no leading ``/``) resolve to the connection's own domain home
    ``/local/domain/<domid>/``. Unsolicited WATCH_EVENT messages are skipped. Every error is a
    ``XenStoreError`` (``NotFound`` for ENOENT, ``XenStoreConnectionError`` for transport trouble,
    after which the client is closed and reconnects on the next call).
    """

    def __init__(self, xenbus_path=None, unix_socket_path=None, timeout=DEFAULT_TIMEOUT):
        if xenbus_path and unix_socket_path:
            raise ValueError('give either xenbus_path or unix_socket_path, not both')
        self.xenbus_path = xenbus_path
        self.unix_socket_path = unix_socket_path
        self.timeout = timeout
        self._transport = None
        self._rbuf = bytearray()
        self._req_id = 0
        self._reconnectable = True
        self.skipped_events = 0

    @classmethod
    def from_fd(cls, fd, timeout=DEFAULT_TIMEOUT):
        """Wrap an already open XenBus-like file descriptor (the client owns and closes it)."""
        client = cls(timeout=timeout)
        client._transport = _FdTransport(fd, 'fd:%d' % fd)
        client._reconnectable = False
        return client

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def connected(self):
        return self._transport is not None

    def connect(self):
        if self._transport is not None:
            return
        if not self._reconnectable:
            raise XenStoreConnectionError('EBADF', 'CONNECT', None)
        if self.unix_socket_path:
            target = self.unix_socket_path
            try:
                self._transport = _SocketTransport(target, self.timeout)
            except (OSError, socket.error) as exc:
                raise XenStoreConnectionError(_errno_name(exc), 'CONNECT', target)
        else:
            target = self.xenbus_path or default_xenbus_path()
            try:
                fd = os.open(target, os.O_RDWR)
            except OSError as exc:
                raise XenStoreConnectionError(_errno_name(exc), 'CONNECT', target)
            self._transport = _FdTransport(fd, target)
        self._rbuf = bytearray()

    def close(self):
        transport, self._transport = self._transport, None
        self._rbuf = bytearray()
        if transport is not None:
            try:
                transport.close()
            except (OSError, socket.error):
                pass

    def _fail(self, errno_name, op, path):
        self.close()
        return XenStoreConnectionError(errno_name, op, path)

    def _read_message(self, deadline, opname, path):
        while True:
            if len(self._rbuf) >= HEADER.size:
                rop, rreq, rtx, size = HEADER.unpack_from(bytes(self._rbuf[:HEADER.size]))
                if size > MAX_PAYLOAD:
                    raise self._fail('EPROTO', opname, path)
                if len(self._rbuf) >= HEADER.size + size:
                    body = bytes(self._rbuf[HEADER.size:HEADER.size + size])
                    del self._rbuf[:HEADER.size + size]
                    return rop, rreq, rtx, body
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise self._fail('ETIMEDOUT', opname, path)
            try:
                chunk = self._transport.read_some(remaining)
            except socket.timeout:
                raise self._fail('ETIMEDOUT', opname, path)
            except (OSError, socket.error) as exc:
                raise self._fail(_errno_name(exc), opname, path)
            if not chunk:
                raise self._fail('ECONNRESET', opname, path)
            self._rbuf.extend(chunk)

    def request(self, op, payload, tx_id=0, path=None):
        """Send one request and return the reply payload (bytes); raise XenStoreError on ERROR replies."""
        opname = OP_NAMES.get(op, str(op))
        if len(payload) > MAX_PAYLOAD:
            raise XenStoreError('E2BIG', opname, path)
        self.connect()
        self._req_id = self._req_id % 0xFFFFFFFF + 1
        req_id = self._req_id
        try:
            self._transport.write_all(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)
        except socket.timeout:
            raise self._fail('ETIMEDOUT', opname, path)
        except (OSError, socket.error) as exc:
            raise self._fail(_errno_name(exc), opname, path)
        deadline = _monotonic() + self.timeout
        while True:
            rop, rreq, dummy, body = self._read_message(deadline, opname, path)
            if rop == XS_WATCH_EVENT:
                self.skipped_events += 1
                continue
            if rreq != req_id:
                raise self._fail('EPROTO', opname, path)
            if rop == XS_ERROR:
                name = body.split(b'\0', 1)[0]
                raise _error(name.decode('ascii') if _ERRNAME_RE.match(name) else 'EPROTO', opname, path)
            if rop != op:
                raise self._fail('EPROTO', opname, path)
            return body

    def read(self, path, tx_id=0):
        return self.request(XS_READ, _encode_path(path), tx_id, path)

    def write(self, path, value, tx_id=0):
        self.request(XS_WRITE, _encode_path(path) + _encode_value(value), tx_id, path)

    def mkdir(self, path, tx_id=0):
        self.request(XS_MKDIR, _encode_path(path), tx_id, path)

    def rm(self, path, tx_id=0):
        self.request(XS_RM, _encode_path(path), tx_id, path)

    def directory(self, path, tx_id=0):
        body = self.request(XS_DIRECTORY, _encode_path(path), tx_id, path)
        return [name.decode('ascii', 'replace') for name in body.split(b'\0') if name]

    def transaction_start(self):
        body = self.request(XS_TRANSACTION_START, b'\0').rstrip(b'\0')
        if not body.isdigit() or len(body) > 10 or int(body) == 0:
            raise self._fail('EPROTO', 'TRANSACTION_START', None)
        return int(body)

    def transaction_end(self, tx_id, commit=True):
        self.request(XS_TRANSACTION_END, b'T\0' if commit else b'F\0', tx_id)


def default_xenbus_path():
    for path in DEFAULT_XENBUS_PATHS:
        if os.path.exists(path):
            return path
    return DEFAULT_XENBUS_PATHS[0]


# --- sampling ----------------------------------------------------------------------------------------

_MEMINFO_LINE = re.compile(r'\A([A-Za-z0-9_()]+):[ \t]+([0-9]{1,20})(?:[ \t]+(kB))?[ \t]*\Z')
_VMSTAT_LINE = re.compile(r'\A([a-z0-9_]+) ([0-9]{1,20})\Z')


class SampleError(ValueError):
    """/proc data is unusable (missing or ambiguous fields)."""


def _parse_fields(text, pattern, what):
    """``{name: int}`` from lines matching ``pattern``; malformed lines and values above 2**64-1 are skipped,
    a duplicated field raises SampleError."""
    result = {}
    for line in text.splitlines():
        match = pattern.match(line.rstrip())
        if not match:
            continue
        name, value = match.group(1), int(match.group(2))
        if value > MAX_U64:
            continue
        if name in result:
            raise SampleError('duplicate %s field %s' % (what, name))
        result[name] = value
    return result


def parse_meminfo(text):
    """Parse /proc/meminfo text into ``{field: int}`` (kB for ``kB`` lines)."""
    return _parse_fields(text, _MEMINFO_LINE, 'meminfo')


def parse_vmstat(text):
    """Parse /proc/vmstat text into ``{name: int}``."""
    return _parse_fields(text, _VMSTAT_LINE, 'vmstat')


def build_sample(meminfo, vmstat, seq, ts):
    """Build the published key -> decimal string dict (``seq`` is the last key). Raises SampleError."""
    missing = [field for field, dummy in MEMINFO_FIELDS if field not in meminfo]
    if missing:
        raise SampleError('meminfo lacks %s' % ', '.join(missing))
    sample = {}
    for field, key in MEMINFO_FIELDS:
        sample[key] = str(int(meminfo[field]))
    sample['oom_kill'] = str(int(vmstat.get('oom_kill', 0)))
    sample['ts'] = str(int(ts))
    sample['version'] = AGENT_VERSION
    sample['seq'] = str(int(seq))
    return dict((key, sample[key]) for key in SAMPLE_KEYS)


def _read_text(path):
    with open(path, 'rb') as handle:
        return handle.read(MAX_PROC_BYTES).decode('ascii', 'replace')


def read_proc(root='/'):
    """Read and parse ``<root>/proc/meminfo`` and ``<root>/proc/vmstat``."""
    meminfo = parse_meminfo(_read_text(os.path.join(root, 'proc', 'meminfo')))
    vmstat = parse_vmstat(_read_text(os.path.join(root, 'proc', 'vmstat')))
    return meminfo, vmstat


def is_valid_nonce(value):
    if not isinstance(value, bytes):
        value = str(value).encode('utf-8', 'replace')
    return bool(NONCE_RE.match(value))


def write_sample(client, sample, reply=None, attempts=TX_ATTEMPTS, prefix=KEY_PREFIX, sleep=time.sleep):
    """Write ``sample`` (and ``reply`` after ``seq``) under ``prefix`` in one transaction.

    Retries the whole transaction on EAGAIN up to ``attempts`` times; returns the attempt count.
    """
    items = [(key, value) for key, value in sample.items() if key != SEQ_KEY]
    if SEQ_KEY in sample:
        items.append((SEQ_KEY, sample[SEQ_KEY]))
    if reply is not None:
        items.append((REPLY_KEY, reply))
    attempt = 0
    while True:
        attempt += 1
        tx_id = None
        try:
            tx_id = client.transaction_start()
            for key, value in items:
                client.write('%s/%s' % (prefix, key), value, tx_id=tx_id)
            pending, tx_id = tx_id, None
            client.transaction_end(pending, commit=True)
            return attempt
        except XenStoreError as exc:
            if tx_id is not None and not isinstance(exc, XenStoreConnectionError):
                try:
                    client.transaction_end(tx_id, commit=False)
                except XenStoreError:
                    pass
            if exc.errno_name != 'EAGAIN' or attempt >= attempts:
                raise
            sleep(0.005 * attempt)


# --- the agent ---------------------------------------------------------------------------------------

def _stderr_log(message):
    try:
        sys.stderr.write('fleetckpt-agent: %s\n' % message)
        sys.stderr.flush()
    except (OSError, IOError, ValueError):
        pass


class _RateLimiter:
    def __init__(self, period, clock):
        self.period = period
        self.clock = clock
        self.last = {}

    def allow(self, key):
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.period:
            return False
        if len(self.last) > 256:
            self.last.clear()
        self.last[key] = now
        return True


class Agent:
    """The publishing loop. ``client_factory()`` returns an unconnected or connected XenBusClient."""

    def __init__(self, client_factory, root='/', interval=DEFAULT_INTERVAL, poll_interval=POLL_INTERVAL,
                 restore_check_interval=RESTORE_CHECK_INTERVAL, log=None, waiter=None, clock=None, monotonic=None,
                 log_period=LOG_PERIOD):
        self.client_factory = client_factory
        self.root = root
        self.interval = interval
        self.poll_interval = poll_interval
        self.restore_check_interval = restore_check_interval
        self._log_fn = log or _stderr_log
        self._stop = threading.Event()
        self._waiter = waiter or self._stop.wait
        self._clock = clock or time.time
        self._mono = monotonic or _monotonic
        self._limiter = _RateLimiter(log_period, self._mono)
        self._client = None
        self.seq = 0
        self.backoff = 0.0
        self._next_publish = 0.0
        self._next_restore_check = 0.0
        self._answered = None
        self._last_invalid = None
        self._request_present = False
        self.stats = {'published': 0, 'replies': 0, 'restores': 0, 'errors': 0, 'invalid_requests': 0}

    def log(self, message, key=None):
        if self._limiter.allow(key or message):
            self._log_fn(message)

    def stop(self, *_args):
        self._stop.set()

    @property
    def stopping(self):
        return self._stop.is_set()

    def _get_client(self):
        if self._client is None:
            client = self.client_factory()
            client.connect()
            self._client = client
        return self._client

    def close(self):
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def publish(self, nonce=None):
        """Take a fresh sample and publish it (plus ``reply`` = nonce); returns the sample dict."""
        meminfo, vmstat = read_proc(self.root)
        sample = build_sample(meminfo, vmstat, self.seq + 1, self._clock())
        write_sample(self._get_client(), sample, reply=nonce)
        self.seq += 1
        self.stats['published'] += 1
        self._next_publish = self._mono() + self.interval
        if nonce is not None:
            self._answered = nonce.encode('ascii')
            self.stats['replies'] += 1
        return sample

    def _check_request(self, raw):
        if raw is None or raw == self._answered:
            return None
        if NONCE_RE.match(raw):
            return raw.decode('ascii')
        if raw != self._last_invalid:
            self._last_invalid = raw
            self.stats['invalid_requests'] += 1
            self.log('ignoring malformed request (%d bytes; expected 16-64 lowercase hex digits)' % len(raw),
                     key='invalid-request')
        return None

    def tick(self):
        """One poll: a READ of ``request``; sometimes a READ of ``seq``; publish when due."""
        client = self._get_client()
        now = self._mono()
        try:
            raw = client.read('%s/%s' % (KEY_PREFIX, REQUEST_KEY))
        except NotFound:
            raw = None
        nonce = self._check_request(raw)
        if nonce is not None:
            self._request_present = True
            self.publish(nonce)
            return
        vanished = raw is None and self._request_present
        self._request_present = raw is not None
        if vanished or now >= self._next_restore_check:
            self._next_restore_check = now + self.restore_check_interval
            try:
                client.read('%s/%s' % (KEY_PREFIX, SEQ_KEY))
            except NotFound:
                if self.seq:
                    self.stats['restores'] += 1
                    self.log('published keys vanished (domain restored?); republishing', key='restore')
                self._answered = None
                self.publish()
                return
        if now >= self._next_publish:
            self.publish()

    def step(self):
        """Run one tick, handling errors; return the delay before the next one."""
        try:
            self.tick()
        except XenStoreError as exc:
            self.close()
            return self._failed('xenstore error: %s' % exc)
        except (OSError, IOError, ValueError) as exc:
            return self._failed('sampling error: %s' % exc)
        self.backoff = 0.0
        return self.poll_interval

    def _failed(self, message):
        self.stats['errors'] += 1
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
        self.log('%s (retrying in %.1fs)' % (message, self.backoff), key=message)
        return self.backoff

    def run(self):
        """Loop until stop() (SIGTERM); returns 0."""
        try:
            while not self._stop.is_set():
                delay = self.step()
                if self._stop.is_set():
                    break
                self._waiter(delay)
        finally:
            self.close()
        return 0


# --- command line -------------------------------------------------------------------------------------

def _interval(text):
    value = float(text)
    if not 0.05 <= value <= 86400:
        raise argparse.ArgumentTypeError('must be between 0.05 and 86400 seconds')
    return value


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog='fleetckpt_agent.py',
                                     description='Publish guest memory facts to XenStore for fleetckpt.xen.')
    parser.add_argument('--interval', type=_interval, default=DEFAULT_INTERVAL,
                        help='seconds between periodic samples (default %(default)s)')
    parser.add_argument('--poll-interval', type=_interval, default=POLL_INTERVAL,
                        help='seconds between request polls (default %(default)s)')
    target = parser.add_mutually_exclusive_group()
    target.add_argument('--xenbus', metavar='PATH', help='XenBus device (default /dev/xen/xenbus)')
    target.add_argument('--unix-socket', metavar='PATH', help='xenstored unix socket instead of the XenBus device')
    parser.add_argument('--once', action='store_true', help='publish one sample and exit')
    parser.add_argument('--root', default='/', help='root directory holding proc/ (default /)')
    parser.add_argument('--version', action='version', version='%(prog)s ' + AGENT_VERSION)
    return parser.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)

    def factory():
        return XenBusClient(xenbus_path=args.xenbus, unix_socket_path=args.unix_socket)

    agent = Agent(factory, root=args.root, interval=args.interval, poll_interval=args.poll_interval)
    if args.once:
        try:
            agent.publish()
        except (XenStoreError, OSError, IOError, ValueError) as exc:
            _stderr_log('publish failed: %s' % exc)
            return 1
        finally:
            agent.close()
        return 0
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, agent.stop)
    try:
        _stderr_log('started (version %s, interval %.1fs)' % (AGENT_VERSION, args.interval))
        return agent.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == '__main__':
    raise SystemExit(main())
