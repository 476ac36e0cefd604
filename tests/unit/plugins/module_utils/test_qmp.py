# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The QMP client of the qcow2 disk strategy, against scripted sockets (a real QEMU: test_disks.py)."""
from __future__ import annotations

import json
import socket

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils import _qmp as qmp

GREETING = {'QMP': {'version': {'qemu': {'major': 9, 'minor': 1, 'micro': 2}}, 'capabilities': ['oob']}}
# query-named-block-nodes as QEMU's xen-block backend shows a qcow2 disk (abridged): the format node and its file
NODES = [{'node-name': 'xvda-qcow2', 'drv': 'qcow2', 'file': '/srv/fleetckpt/lab/disks/q1.qcow2',
          'image': {'filename': '/srv/fleetckpt/lab/disks/q1.qcow2', 'format': 'qcow2'}},
         {'node-name': 'xvda-file', 'drv': 'file', 'file': '/srv/fleetckpt/lab/disks/q1.qcow2',
          'image': {'filename': '/srv/fleetckpt/lab/disks/q1.qcow2', 'format': 'file'}}]


class ScriptedSocket:
    """Answers each command sent with the next scripted chunks (bytes); records what was sent."""

    def __init__(self, greeting, answers):
        self.chunks = [greeting]
        self.answers = list(answers)
        self.sent = []
        self.closed = False

    def settimeout(self, _t):
        pass

    def sendall(self, data):
        self.sent.append(json.loads(data))
        if self.answers:
            self.chunks.extend(self.answers.pop(0))

    def recv(self, _n):
        if not self.chunks:
            raise socket.timeout()
        return self.chunks.pop(0)

    def close(self):
        self.closed = True


def line(obj):
    return json.dumps(obj).encode() + b'\n'


def session(answers, greeting=None, timeout=0.2):
    sock = ScriptedSocket(line(GREETING) if greeting is None else greeting, [[line({'return': {}})]] + answers)
    return sock, qmp.Qmp('/run/xen/qmp-libxl-7', timeout=timeout, connect=lambda path, t: sock)


def test_parse_messages_splits_lines_and_keeps_the_rest():
    msgs, rest = qmp.parse_messages(b'{"return": {}}\n\n{"event": "STOP"}\n{"retu')
    assert msgs == [{'return': {}}, {'event': 'STOP'}] and rest == b'{"retu'
    for bad in (b'not json\n', b'[1, 2]\n', b'\xff\xfe\n'):
        with pytest.raises(qmp.QmpError):
            qmp.parse_messages(bad)
    with pytest.raises(qmp.QmpError, match='longer than'):
        qmp.parse_messages(b'x' * (qmp.MAX_MESSAGE + 1))


def test_find_node_matches_the_format_node_of_the_image():
    assert qmp.find_node(NODES, '/srv/fleetckpt/lab/disks/q1.qcow2') == 'xvda-qcow2'
    assert qmp.find_node(NODES, '/srv/fleetckpt/lab/disks/../disks/q1.qcow2') == 'xvda-qcow2'
    assert qmp.find_node(NODES, '/srv/fleetckpt/lab/disks/q1.qcow2', driver='file') == 'xvda-file'
    assert qmp.find_node(NODES, '/srv/other.qcow2') is None
    assert qmp.find_node({'not': 'a list'}, '/x') is None
    assert qmp.find_node([{'drv': 'qcow2', 'file': '/x'}, 'junk'], '/x') is None  # no node-name
    # QEMU's json: pseudo-filename, for a node opened with options a plain name cannot carry
    pseudo = [{'node-name': 'xvdb-qcow2', 'drv': 'qcow2', 'file': 'json:' + json.dumps(
        {'driver': 'qcow2', 'file': {'driver': 'file', 'filename': '/srv/d/b.qcow2', 'locking': 'off'}})}]
    assert qmp.find_node(pseudo, '/srv/d/b.qcow2') == 'xvdb-qcow2'
    assert qmp.find_node([{'node-name': 'n', 'drv': 'qcow2', 'file': 'json:{not json'}], '/x') is None
    # by Xen's naming (the vdev comes from the domain's own config) only when the node shows no file name
    assert qmp.find_node(pseudo, '/srv/d/other.qcow2', vdev='xvdb') is None  # it shows another file
    nameless = [{'node-name': 'xvdb-qcow2', 'drv': 'qcow2', 'file': 'json:{"driver": "qcow2"}'}]
    assert qmp.find_node(nameless, '/srv/d/b.qcow2') is None
    assert qmp.find_node(nameless, '/srv/d/b.qcow2', vdev='xvdb') == 'xvdb-qcow2'
    assert qmp.find_node(nameless, '/srv/d/b.qcow2', vdev='xvdc') is None


def test_socket_path_takes_only_a_domid():
    assert qmp.socket_path(7) == '/run/xen/qmp-libxl-7'
    for bad in (0, -1, '7', None, True, '../x'):
        with pytest.raises(qmp.QmpError):
            qmp.socket_path(bad)


def test_a_session_negotiates_then_skips_events_and_returns_answers():
    sock, q = session([[line({'event': 'RESUME'}), line({'return': NODES})[:10], line({'return': NODES})[10:]]])
    with q:
        assert q.execute('query-named-block-nodes') == NODES
    assert [m['execute'] for m in sock.sent] == ['qmp_capabilities', 'query-named-block-nodes'] and sock.closed


def test_errors_name_the_command_and_qemus_description():
    sock, q = session([[line({'error': {'class': 'GenericError', 'desc': "Device 'xvdz' not found"}})]])
    with q:
        with pytest.raises(qmp.QmpError, match="blockdev-snapshot-internal-sync failed: Device 'xvdz' not found"):
            q.execute('blockdev-snapshot-internal-sync', {'device': 'xvdz', 'name': 'fleetckpt-x'})
    assert sock.sent[-1]['arguments'] == {'device': 'xvdz', 'name': 'fleetckpt-x'}


def test_no_answer_a_closed_socket_or_no_greeting_fail_clearly():
    _sock, q = session([[]])
    with q:
        with pytest.raises(qmp.QmpError, match='no answer for query-status within'):
            q.execute('query-status')
    _sock, q = session([], greeting=b'')
    with pytest.raises(qmp.QmpError, match='closed the connection while waiting for the greeting'):
        q.__enter__()
    _sock, q = session([], greeting=line({'hello': 1}))
    with pytest.raises(qmp.QmpError, match='did not greet as QMP'):
        q.__enter__()

    def refuse(path, timeout):
        raise FileNotFoundError(2, 'No such file or directory')
    with pytest.raises(qmp.QmpError, match='cannot connect to QMP socket /run/xen/qmp-libxl-9: No such file'):
        qmp.Qmp('/run/xen/qmp-libxl-9', connect=refuse).__enter__()
