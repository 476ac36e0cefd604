# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""An in-process fake xenstored for unit tests: a threaded unix-socket server speaking the XenStore wire protocol.

Both pyxs 0.4.1 (``pyxs.Client(unix_socket_path=...)``) and the agent's ``XenBusClient`` talk to it.

Domain binding: one listening socket per domid. ``socket_path(domid)`` returns (creating on first use) the
socket whose connections act as that domain: relative paths resolve to ``/local/domain/<domid>/``. dom0's
socket (domid 0) always exists. ``rebind_domain(old, new)`` simulates ``xl restore``: the domain gets a new
domid and an empty home; existing connections (and the same socket path) now act as the new domid.

Store model: ``store`` maps absolute path (str) -> value (bytes); every node is explicit and parents are
created with ``b''``. Permissions are stored and reported but NOT enforced. Transactions work on a copy of
the store and are committed if none of the nodes they touched changed meanwhile (else EAGAIN).
Watches fire an initial event on registration and then on every change at or below the watched path.

Fault injection: ``fail_next(op, errno_name)`` makes the next matching request get an ERROR reply.
``op_log`` records ``(domid, op_name, tx_id, path)`` for each request handled.
"""

from __future__ import annotations

import os
import posixpath
import re
import selectors
import shutil
import socket
import struct
import tempfile
import threading

HEADER = struct.Struct('<IIII')
MAX_PAYLOAD = 4096

OPS = {
    'DEBUG': 0, 'DIRECTORY': 1, 'READ': 2, 'GET_PERMS': 3, 'WATCH': 4, 'UNWATCH': 5,
    'TRANSACTION_START': 6, 'TRANSACTION_END': 7, 'INTRODUCE': 8, 'RELEASE': 9, 'GET_DOMAIN_PATH': 10,
    'WRITE': 11, 'MKDIR': 12, 'RM': 13, 'SET_PERMS': 14, 'WATCH_EVENT': 15, 'ERROR': 16,
}
OP_NAMES = dict((v, k) for k, v in OPS.items())

_PATH_RE = re.compile(r'\A[A-Za-z0-9/_@-]+\Z')
_PERM_RE = re.compile(r'\A[wrbn][0-9]+\Z')
_MISSING = object()


class XsError(Exception):
    """Internal: becomes an ERROR reply carrying ``errno_name``."""

    def __init__(self, errno_name):
        super().__init__(errno_name)
        self.errno_name = errno_name


class _Binding:
    def __init__(self, domid, path, listener):
        self.domid = domid
        self.path = path
        self.listener = listener


class _Transaction:
    def __init__(self, conn, store):
        self.conn = conn
        self.snapshot = dict(store)
        self.working = dict(store)
        self.accessed = set()
        self.targets = set()  # nodes explicitly written/removed: the ones that fire watches on commit


class _Conn:
    def __init__(self, server, sock, binding):
        self.server = server
        self.sock = sock
        self.binding = binding
        self.send_lock = threading.Lock()
        self.watches = []  # (given path, absolute path, token)
        self.closed = False
        self.thread = threading.Thread(target=self._serve, name='fake-xenstored-conn', daemon=True)

    @property
    def domid(self):
        return self.binding.domid

    def _recv_exact(self, size):
        chunks = []
        while size:
            data = self.sock.recv(size)
            if not data:
                raise EOFError()
            chunks.append(data)
            size -= len(data)
        return b''.join(chunks)

    def send(self, op, req_id, tx_id, payload):
        with self.send_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)
            except OSError:
                self.closed = True

    def _serve(self):
        try:
            while not self.closed:
                op, req_id, tx_id, size = HEADER.unpack(self._recv_exact(HEADER.size))
                if size > MAX_PAYLOAD:
                    break
                payload = self._recv_exact(size) if size else b''
                self.server._handle(self, op, req_id, tx_id, payload)
        except (EOFError, OSError):
            pass
        finally:
            self.close()

    def close(self):
        with self.send_lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.server._forget(self)


class FakeXenstored:
    """See the module docstring. Usable as a context manager (start/stop)."""

    def __init__(self, tmpdir=None, max_payload=MAX_PAYLOAD):
        self._own_dir = None
        base = str(tmpdir) if tmpdir is not None else None
        if base is None or len(os.path.join(base, 'xs-4294967295.sock')) > 100:
            # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
            base = self._own_dir = tempfile.mkdtemp(prefix='fxs-')
        self.dir = base
        self.max_payload = max_payload
        self.lock = threading.RLock()
        self.store = {'/': b'', '/local': b'', '/local/domain': b''}
        self.perms = {'/': ['n0']}
        self.op_log = []
        self._faults = []
        self._bindings = {}
        self._conns = set()
        self._transactions = {}
        self._next_tx = 1
        self._selector = None
        self._wake_r = self._wake_w = None
        self._thread = None
        self._running = False
        self.socket_path(0)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self):
        if self._running:
            return self
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        with self.lock:
            for binding in self._bindings.values():
                self._selector.register(binding.listener, selectors.EVENT_READ, binding)
        self._running = True
        self._thread = threading.Thread(target=self._accept_loop, name='fake-xenstored', daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._running:
            self._running = False
            self._wake_w.send(b'x')
            self._thread.join(5)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
        self.drop_connections()
        with self.lock:
            bindings = list(self._bindings.values())
            self._bindings.clear()
        for binding in bindings:
            binding.listener.close()
            try:
                os.unlink(binding.path)
            except OSError:
                pass
        if self._own_dir:
            shutil.rmtree(self._own_dir, True)
            self._own_dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _accept_loop(self):
        while self._running:
            for key, dummy in self._selector.select(1.0):
                if key.data is None:
                    self._wake_r.recv(64)
                    continue
                try:
                    sock, dummy = key.fileobj.accept()
                except OSError:
                    continue
                self._attach(sock, key.data)

    def attach(self, sock, domid=0):
        """Serve an already connected socket (e.g. one end of a socketpair) as a connection of ``domid``."""
        return self._attach(sock, self._binding_for(domid))

    def _attach(self, sock, binding):
        conn = _Conn(self, sock, binding)
        with self.lock:
            self._conns.add(conn)
        conn.thread.start()
        return conn

    def _forget(self, conn):
        with self.lock:
            self._conns.discard(conn)
            for tx_id in [t for t, tx in self._transactions.items() if tx.conn is conn]:
                del self._transactions[tx_id]

    def drop_connections(self, domid=None):
        """Close client connections (all, or those of ``domid``), like a xenstored restart."""
        with self.lock:
            conns = [c for c in self._conns if domid is None or c.domid == domid]
        for conn in conns:
            conn.close()
            if conn.thread is not threading.current_thread():
                conn.thread.join(2)

    @property
    def connections(self):
        with self.lock:
            return len(self._conns)

    # -- domains --------------------------------------------------------------------------------------

    @staticmethod
    def home(domid):
        return '/local/domain/%d' % domid

    def _binding_for(self, domid):
        with self.lock:
            for binding in self._bindings.values():
                if binding.domid == domid:
                    return binding
        self.socket_path(domid)
        return self._binding_for(domid)

    def socket_path(self, domid=0):
        """Path of the unix socket whose connections act as ``domid`` (created on first use)."""
        with self.lock:
            for binding in self._bindings.values():
                if binding.domid == domid:
                    return binding.path
            path = os.path.join(self.dir, 'xs-%d.sock' % domid)
            if os.path.exists(path):
                os.unlink(path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(16)
            binding = _Binding(domid, path, listener)
            self._bindings[path] = binding
            self._create_home(domid)
            if self._running:
                self._selector.register(listener, selectors.EVENT_READ, binding)
                self._wake_w.send(b'x')
            return path

    def _create_home(self, domid):
        home = self.home(domid)
        self._set(self.store, None, home, self.store.get(home, b''))
        self.perms[home] = ['n0', 'r%d' % domid] if domid else ['n0']
        if domid:
            self._set(self.store, None, home + '/data', self.store.get(home + '/data', b''))
            self.perms[home + '/data'] = ['b%d' % domid]

    def rebind_domain(self, old_domid, new_domid):
        """Simulate ``xl restore``: the domain's home moves to a new, empty ``/local/domain/<new>``."""
        with self.lock:
            binding = self._binding_for(old_domid)
            self._delete(self.store, None, self.home(old_domid))
            binding.domid = new_domid
            self._create_home(new_domid)
        return binding.path

    # -- direct store helpers (absolute paths, or relative to ``domid``'s home) -----------------------

    def _abs(self, path, domid=0):
        return path if path.startswith('/') else '%s/%s' % (self.home(domid), path)

    def read(self, path, domid=0):
        """Value as str; KeyError when absent."""
        with self.lock:
            return self.store[self._abs(path, domid)].decode('utf-8')

    def get(self, path, default=None, domid=0):
        try:
            return self.read(path, domid)
        except KeyError:
            return default

    def exists(self, path, domid=0):
        with self.lock:
            return self._abs(path, domid) in self.store

    def write(self, path, value, domid=0):
        if isinstance(value, str):
            value = value.encode('utf-8')
        with self.lock:
            changed = []
            self._set(self.store, None, self._abs(path, domid), value, changed)
        self._fire(changed, [])

    def rm(self, path, domid=0):
        with self.lock:
            removed = self._delete(self.store, None, self._abs(path, domid))
        self._fire([], removed)

    def list(self, path, domid=0):
        with self.lock:
            return self._children(self.store, self._abs(path, domid))

    def broadcast_event(self, path, token):
        """Send an unsolicited WATCH_EVENT to every connection (tests that clients skip them)."""
        with self.lock:
            conns = list(self._conns)
        payload = path.encode('ascii') + b'\0' + token.encode('ascii') + b'\0'
        for conn in conns:
            conn.send(OPS['WATCH_EVENT'], 0, 0, payload)

    def fail_next(self, op, errno_name='EIO', count=1, domid=None):
        """The next ``count`` requests of ``op`` (name or number), optionally only from ``domid``, get ERROR."""
        opnum = OPS[op] if isinstance(op, str) else int(op)
        with self.lock:
            self._faults.append([opnum, errno_name, count, domid])

    def ops(self, op=None, domid=None):
        """Entries of ``op_log`` filtered by op name and domid."""
        return [e for e in list(self.op_log) if (op is None or e[1] == op) and (domid is None or e[0] == domid)]

    # -- store primitives (caller holds the lock) ----------------------------------------------------

    @staticmethod
    def _children(view, path):
        if path not in view:
            raise KeyError(path)
        prefix = path.rstrip('/') + '/'
        return sorted(p[len(prefix):] for p in view if p.startswith(prefix) and p != prefix and '/' not in p[len(prefix):])

    @staticmethod
    def _touch(tx, path):
        if tx is not None:
            tx.accessed.add(path)

    def _set(self, view, tx, path, value, changed=None, implicit=False):
        if path != '/':
            parent = posixpath.dirname(path)
            if parent not in view:
                self._set(view, tx, parent, b'', implicit=True)  # implicit parents fire no watch of their own
        self._touch(tx, path)
        if tx is not None and not implicit:
            tx.targets.add(path)
        view[path] = value
        if changed is not None:
            changed.append(path)

    def _delete(self, view, tx, path):
        if path == '/':
            raise XsError('EINVAL')
        if path not in view:
            if posixpath.dirname(path) in view:
                return []
            raise XsError('ENOENT')
        prefix = path + '/'
        doomed = [p for p in view if p == path or p.startswith(prefix)]
        if tx is not None:
            tx.targets.add(path)
        for p in doomed:
            self._touch(tx, p)
            del view[p]
            if tx is None:
                self.perms.pop(p, None)
        self._touch(tx, posixpath.dirname(path))
        return [path]

    def _get_perms(self, path):
        node = path
        while True:
            if node in self.perms:
                return self.perms[node]
            if node == '/':
                return ['n0']
            node = posixpath.dirname(node)

    # -- watches --------------------------------------------------------------------------------------

    def _fire(self, changed, removed):
        if not changed and not removed:
            return
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            for given, wpath, token in list(conn.watches):
                hits = []
                wprefix = wpath.rstrip('/') + '/'
                for path in changed + removed:
                    if path == wpath or path.startswith(wprefix):
                        hits.append(path)
                for path in removed:
                    if wpath.startswith(path + '/'):
                        hits.append(wpath)
                for path in hits:
                    self._send_event(conn, given, path, token)

    def _send_event(self, conn, given, path, token):
        home = self.home(conn.domid) + '/'
        if not given.startswith('/') and path.startswith(home):
            path = path[len(home):]
        conn.send(OPS['WATCH_EVENT'], 0, 0, path.encode('ascii') + b'\0' + token.encode('ascii') + b'\0')

    # -- request handling ------------------------------------------------------------------------------

    def _resolve(self, conn, raw):
        try:
            path = raw.decode('ascii')
        except UnicodeDecodeError:
            raise XsError('EINVAL')
        if (not _PATH_RE.match(path) or '//' in path or (len(path) > 1 and path.endswith('/'))
                or path.startswith('@')):
            raise XsError('EINVAL')
        return path if path.startswith('/') else '%s/%s' % (self.home(conn.domid), path)

    @staticmethod
    def _one_arg(payload):
        # Like xenstored's onearg(): exactly one NUL-terminated string.
        if not payload.endswith(b'\0') or payload.count(b'\0') != 1:
            raise XsError('EINVAL')
        return payload[:-1]

    @staticmethod
    def _strings(payload, count):
        parts = payload.split(b'\0')
        if len(parts) != count + 1 or parts[-1] != b'':
            raise XsError('EINVAL')
        return parts[:-1]

    def _take_fault(self, conn, op):
        with self.lock:
            for fault in self._faults:
                if fault[0] == op and (fault[3] is None or fault[3] == conn.domid):
                    fault[2] -= 1
                    if fault[2] <= 0:
                        self._faults.remove(fault)
                    return fault[1]
        return None

    def _log_op(self, conn, op, tx_id, payload):
        path = None
        if op in (OPS['READ'], OPS['WRITE'], OPS['MKDIR'], OPS['RM'], OPS['DIRECTORY'], OPS['GET_PERMS'],
                  OPS['SET_PERMS'], OPS['WATCH'], OPS['UNWATCH']):
            path = payload.split(b'\0', 1)[0].decode('ascii', 'replace')
        self.op_log.append((conn.domid, OP_NAMES.get(op, str(op)), tx_id, path))

    def _handle(self, conn, op, req_id, tx_id, payload):
        self._log_op(conn, op, tx_id, payload)
        events = []
        try:
            fault = self._take_fault(conn, op)
            if fault is not None:
                if op == OPS['TRANSACTION_END']:
                    with self.lock:
                        self._transactions.pop(tx_id, None)
                raise XsError(fault)
            handler = self._handlers().get(op)
            if handler is None:
                raise XsError('EINVAL')
            reply = handler(conn, tx_id, payload, events)
        except XsError as exc:
            conn.send(OPS['ERROR'], req_id, tx_id, exc.errno_name.encode('ascii') + b'\0')
            return
        conn.send(op, req_id, tx_id, reply)
        for kind, args in events:
            if kind == 'fire':
                self._fire(*args)
            else:
                self._send_event(*args)

    def _handlers(self):
        return {
            OPS['READ']: self._op_read, OPS['WRITE']: self._op_write, OPS['MKDIR']: self._op_mkdir,
            OPS['RM']: self._op_rm, OPS['DIRECTORY']: self._op_directory, OPS['GET_PERMS']: self._op_get_perms,
            OPS['SET_PERMS']: self._op_set_perms, OPS['GET_DOMAIN_PATH']: self._op_get_domain_path,
            OPS['TRANSACTION_START']: self._op_tx_start, OPS['TRANSACTION_END']: self._op_tx_end,
            OPS['WATCH']: self._op_watch, OPS['UNWATCH']: self._op_unwatch,
        }

    def _view(self, conn, tx_id):
        if not tx_id:
            return self.store, None
        tx = self._transactions.get(tx_id)
        if tx is None or tx.conn is not conn:
            raise XsError('ENOENT')
        return tx.working, tx

    def _op_read(self, conn, tx_id, payload, events):
        path = self._resolve(conn, self._one_arg(payload))
        with self.lock:
            view, tx = self._view(conn, tx_id)
            self._touch(tx, path)
            if path not in view:
                raise XsError('ENOENT')
            return view[path]

    def _op_write(self, conn, tx_id, payload, events):
        if b'\0' not in payload:
            raise XsError('EINVAL')
        raw_path, value = payload.split(b'\0', 1)
        path = self._resolve(conn, raw_path)
        with self.lock:
            view, tx = self._view(conn, tx_id)
            changed = []
            self._set(view, tx, path, value, changed)
        if tx is None:
            events.append(('fire', (changed, [])))
        return b'OK\0'

    def _op_mkdir(self, conn, tx_id, payload, events):
        path = self._resolve(conn, self._one_arg(payload))
        with self.lock:
            view, tx = self._view(conn, tx_id)
            self._touch(tx, path)
            if path in view:
                return b'OK\0'
            changed = []
            self._set(view, tx, path, b'', changed)
        if tx is None:
            events.append(('fire', (changed, [])))
        return b'OK\0'

    def _op_rm(self, conn, tx_id, payload, events):
        path = self._resolve(conn, self._one_arg(payload))
        with self.lock:
            view, tx = self._view(conn, tx_id)
            removed = self._delete(view, tx, path)
        if tx is None:
            events.append(('fire', ([], removed)))
        return b'OK\0'

    def _op_directory(self, conn, tx_id, payload, events):
        path = self._resolve(conn, self._one_arg(payload))
        with self.lock:
            view, tx = self._view(conn, tx_id)
            self._touch(tx, path)
            try:
                names = self._children(view, path)
            except KeyError:
                raise XsError('ENOENT')
        return b''.join(n.encode('ascii') + b'\0' for n in names)

    def _op_get_perms(self, conn, tx_id, payload, events):
        path = self._resolve(conn, self._one_arg(payload))
        with self.lock:
            view, dummy = self._view(conn, tx_id)
            if path not in view:
                raise XsError('ENOENT')
            return b''.join(p.encode('ascii') + b'\0' for p in self._get_perms(path))

    def _op_set_perms(self, conn, tx_id, payload, events):
        parts = payload.split(b'\0')
        if len(parts) < 3 or parts[-1] != b'':
            raise XsError('EINVAL')
        path = self._resolve(conn, parts[0])
        perms = [p.decode('ascii', 'replace') for p in parts[1:-1]]
        if not all(_PERM_RE.match(p) for p in perms):
            raise XsError('EINVAL')
        with self.lock:
            view, dummy = self._view(conn, tx_id)
            if path not in view:
                raise XsError('ENOENT')
            self.perms[path] = perms
        events.append(('fire', ([path], [])))
        return b'OK\0'

    def _op_get_domain_path(self, conn, tx_id, payload, events):
        arg = self._one_arg(payload)
        if not arg.isdigit():
            raise XsError('EINVAL')
        return self.home(int(arg)).encode('ascii') + b'\0'

    def _op_tx_start(self, conn, tx_id, payload, events):
        if self._one_arg(payload) != b'':
            raise XsError('EINVAL')
        if tx_id:
            raise XsError('EBUSY')
        with self.lock:
            new_id = self._next_tx
            self._next_tx += 1
            self._transactions[new_id] = _Transaction(conn, self.store)
        return str(new_id).encode('ascii') + b'\0'

    def _op_tx_end(self, conn, tx_id, payload, events):
        if payload not in (b'T\0', b'F\0'):
            raise XsError('EINVAL')
        with self.lock:
            tx = self._transactions.get(tx_id)
            if not tx_id or tx is None or tx.conn is not conn:
                raise XsError('ENOENT')
            del self._transactions[tx_id]
            if payload == b'F\0':
                return b'OK\0'
            for path in tx.accessed:
                if self.store.get(path, _MISSING) != tx.snapshot.get(path, _MISSING):
                    raise XsError('EAGAIN')
            changed, removed = [], []
            for path in sorted(set(tx.working) | set(tx.snapshot)):
                new = tx.working.get(path, _MISSING)
                if new == tx.snapshot.get(path, _MISSING):
                    continue
                if new is _MISSING:
                    self.store.pop(path, None)
                    self.perms.pop(path, None)
                else:
                    self.store[path] = new
                if path in tx.targets:
                    (removed if new is _MISSING else changed).append(path)
        events.append(('fire', (changed, removed)))
        return b'OK\0'

    def _op_watch(self, conn, tx_id, payload, events):
        raw_path, raw_token = self._strings(payload, 2)
        given = raw_path.decode('ascii', 'replace')
        if given in ('@introduceDomain', '@releaseDomain'):
            wpath = given
        else:
            wpath = self._resolve(conn, raw_path)
        token = raw_token.decode('ascii', 'replace')
        with self.lock:
            conn.watches.append((given, wpath, token))
        events.append(('event', (conn, given, wpath, token)))
        return b'OK\0'

    def _op_unwatch(self, conn, tx_id, payload, events):
        raw_path, raw_token = self._strings(payload, 2)
        given, token = raw_path.decode('ascii', 'replace'), raw_token.decode('ascii', 'replace')
        with self.lock:
            for watch in conn.watches:
                if watch[0] == given and watch[2] == token:
                    conn.watches.remove(watch)
                    return b'OK\0'
        raise XsError('ENOENT')
