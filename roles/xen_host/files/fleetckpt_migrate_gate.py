# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Forced command of the fleetckpt migration key (installed by the fleetckpt.xen.xen_host role).

The other Xen hosts' migration keys are authorized in root's authorized_keys with
``restrict,command="/usr/bin/python3 -I <this file>"``: a dom0 that holds such a key can run only these commands
here, never a shell.

* ``xl [-t] [-T] [-v...] migrate-receive [-e] [-d] [-p]``: what ``xl migrate`` on the sending host runs
  (the Remus/COLO options, one of which names a script to run, are refused);
* ``fleetckpt-probe [PATH...]``: one JSON line: this host's name, Xen version, free memory, its domains (name,
  domid, memory, state) and which of the given absolute paths exist here (a moving VM's disks must);
* ``fleetckpt-mem-set NAME KIB``: ``xl mem-set NAME KIBk``, only upwards (the migrated VM gets its memory back;
  the key cannot shrink a VM here).

Anything else is refused with exit status 126. Standalone (Python standard library only): no collection import.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys

XL = 'xl'
NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')
PATH_RE = re.compile(r'^/[A-Za-z0-9_./+@=:,-]{0,4095}$')
RECEIVE_GLOBAL = re.compile(r'^-(t|T|v+)$')
RECEIVE_FLAGS = ('-e', '-d', '-p')
MAX_KIB = 1 << 40
MAX_PATHS = 64


class Refused(Exception):
    pass


def parse(command):
    """The argv to run (or a tuple ('probe', paths)) for the command line the client asked for; Refused otherwise."""
    try:
        words = shlex.split(command or '')
    except ValueError as exc:
        raise Refused('cannot parse the command: %s' % exc)
    if not words:
        raise Refused('no command (this key only migrates VMs)')
    if words[0] == 'xl':
        i = 1
        while i < len(words) and RECEIVE_GLOBAL.match(words[i]):
            i += 1
        if i >= len(words) or words[i] != 'migrate-receive':
            raise Refused('only "xl migrate-receive" is allowed')
        flags = words[i + 1:]
        bad = [f for f in flags if f not in RECEIVE_FLAGS]
        if bad:
            raise Refused('migrate-receive option(s) not allowed: %s' % ' '.join(bad))
        return [XL] + words[1:]
    if words[0] == 'fleetckpt-probe':
        paths = words[1:]
        if len(paths) > MAX_PATHS:
            raise Refused('at most %d paths' % MAX_PATHS)
        for p in paths:
            if not PATH_RE.match(p) or '/../' in p + '/':
                raise Refused('not an absolute plain path: %r' % p)
        return ('probe', paths)
    if words[0] == 'fleetckpt-mem-set':
        if len(words) != 3 or not NAME_RE.match(words[1]) or not words[2].isdigit() or not 0 < int(words[2]) <= MAX_KIB:
            raise Refused('usage: fleetckpt-mem-set NAME KIB')
        return [XL, 'mem-set', words[1], '%dk' % int(words[2])]
    raise Refused('command not allowed: %s' % words[0])


def authorize(argv, xl=None):
    """Checks that need this host's state: a mem-set may only raise a domain's memory."""
    if argv[1:2] == ['mem-set']:
        name, want_kb = argv[2], int(argv[3][:-1])
        rows = [line.split() for line in (xl or _xl)('list', name).splitlines()[1:]]
        if len(rows) != 1 or len(rows[0]) < 3 or rows[0][0] != name or not rows[0][2].isdigit():
            raise Refused('no domain %s here' % name)
        if want_kb < int(rows[0][2]) * 1024:
            raise Refused('%s has %s MiB: this key only gives memory back, it never takes it' % (name, rows[0][2]))
    return argv


def _xl(*args):
    proc = subprocess.run([XL] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=60, check=False, universal_newlines=True)
    if proc.returncode != 0:
        raise RuntimeError('xl %s failed (rc=%d): %s' % (' '.join(args), proc.returncode, proc.stderr.strip()))
    return proc.stdout


def probe(paths, xl=_xl):
    info = {}
    for line in xl('info').splitlines():
        key, sep, value = line.partition(':')
        if sep:
            info[key.strip()] = value.strip()
    domains = {}
    for line in xl('list').splitlines()[1:]:
        f = line.split()
        if len(f) >= 5 and f[1].isdigit() and f[2].isdigit():
            domains[f[0]] = {'domid': int(f[1]), 'mem_kb': int(f[2]) * 1024, 'state': f[4]}
    return {
        'gate': 1,
        'host': info.get('host') or socket.gethostname(),
        'xen_version': info.get('xen_version', ''),
        'free_memory_kb': int(info.get('free_memory', '0') or 0) * 1024,
        'domains': domains,
        'exists': dict((p, os.path.exists(p)) for p in paths),
    }


def main():
    command = os.environ.get('SSH_ORIGINAL_COMMAND', '')
    try:
        what = parse(command)
    except Refused as exc:
        sys.stderr.write('fleetckpt-migrate-gate: refused: %s\n' % exc)
        return 126
    if isinstance(what, tuple):
        try:
            sys.stdout.write(json.dumps(probe(what[1]), sort_keys=True) + '\n')
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
            sys.stderr.write('fleetckpt-migrate-gate: probe failed: %s\n' % exc)
            return 1
        return 0
    try:
        authorize(what)
    except Refused as exc:
        sys.stderr.write('fleetckpt-migrate-gate: refused: %s\n' % exc)
        return 126
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write('fleetckpt-migrate-gate: %s\n' % exc)
        return 1
    sys.stdout.flush()
    os.execvp(what[0], what)
    return 127


if __name__ == '__main__':
    sys.exit(main())
