# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The ``xl`` toolstack wrapper.

Pure core: parsers for ``xl list``, ``xl list -l`` (JSON) and ``xl info`` output, and the argv builders.
Side effects go through a runner object (``run(argv, timeout) -> (rc, stdout, stderr)``) so tests can
substitute a fake; every call has a timeout and failures raise :class:`XlError` naming the command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, XlError
from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import KIB_PER_MIB


# Xen 4.x: name, id, mem (MiB), vcpus, state, cpu time. The state is r b p s <reason> d: running, blocked,
# paused, shutdown, then the shutdown reason's letter (xl_list.c: "-rscwS" = poweroff, reboot, suspend,
# crash, watchdog, soft_reset; '?' unknown), then dying. A domain an interrupted save left suspended is
# "---ss-".
_LIST_LINE = re.compile(
    r'^(?P<name>\S.*?)\s+(?P<domid>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+'
    r'(?P<state>[-r][-b][-p][-s][-rscwS?][-d])\s+(?P<time>[\d.]+)\s*$')
_STATE_FLAGS = (('r', 'running'), ('b', 'blocked'), ('p', 'paused'), ('s', 'shutdown'), ('c', 'crashed'), ('d', 'dying'))
_SHUTDOWN_REASONS = {'-': 'poweroff', 'r': 'reboot', 's': 'suspend', 'c': 'crash', 'w': 'watchdog', 'S': 'soft_reset',
                     '?': 'unknown'}


def parse_xl_list(text):
    """Parse plain ``xl list`` output into {name: {domid, mem_mib, vcpus, state, flags}}."""
    domains = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith('Name '):
            continue
        m = _LIST_LINE.match(line)
        if not m:
            raise XlError(['xl', 'list'], 0, stdout=text, stderr='unparseable line: %r' % line)
        state = m.group('state')
        flags = [word for (letter, word), ch in zip(_STATE_FLAGS, state) if ch == letter]
        if state[3] == 's':
            flags.append('suspended' if state[4] == 's' else 'shutdown_' + _SHUTDOWN_REASONS[state[4]])
        domains[m.group('name')] = {
            'name': m.group('name'),
            'domid': int(m.group('domid')),
            'mem_mib': int(m.group('mem')),
            'vcpus': int(m.group('vcpus')),
            'state': state,
            'flags': flags,
        }
    return domains


def _dig(data, *keys, default=None):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def _domain_type(c_info, b_info):
    dtype = c_info.get('type')
    if isinstance(dtype, str) and dtype:
        return dtype.lower()
    # Older libxl JSON keeps the type only as a key of b_info ("type.pv" / "type.hvm").
    for key in b_info:
        if key.startswith('type.'):
            return key.split('.', 1)[1].lower()
    return 'unknown'


def parse_xl_list_long(text):
    """Parse ``xl list -l`` JSON into {name: facts}. Keeps the raw libxl config for the manifest."""
    try:
        data = json.loads(text) if text.strip() else []
    except ValueError as exc:
        raise XlError(['xl', 'list', '-l'], 0, stdout=text[:500], stderr='invalid JSON: %s' % exc)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise XlError(['xl', 'list', '-l'], 0, stderr='expected a JSON list, got %s' % type(data).__name__)
    result = {}
    for entry in data:
        if not isinstance(entry, dict):
            continue
        config = entry.get('config') or {}
        c_info = config.get('c_info') or {}
        b_info = config.get('b_info') or {}
        name = c_info.get('name')
        domid = entry.get('domid')
        if name is None and domid == 0:
            name = 'Domain-0'
        if not isinstance(name, str):
            continue
        max_kb = b_info.get('max_memkb')
        target_kb = b_info.get('target_memkb')
        result[name] = {
            'name': name,
            'domid': domid if isinstance(domid, int) else None,
            'uuid': c_info.get('uuid'),
            'type': _domain_type(c_info, b_info),
            'static_max_kb': max_kb if isinstance(max_kb, int) else None,
            'target_kb': target_kb if isinstance(target_kb, int) else None,
            'pci_passthrough': bool(config.get('pcidevs')),
            'vnuma': bool(b_info.get('vnuma_nodes')),
            'config': config,
        }
    return result


def parse_xl_info(text):
    """Parse ``xl info`` ``key : value`` lines into a dict; integers where a value is an integer."""
    info = {}
    for line in text.splitlines():
        if ':' not in line:
            continue
        key, value = line.split(':', 1)
        key = key.strip()
        value = value.strip()
        if not key:
            continue
        info[key] = int(value) if re.fullmatch(r'\d+', value) else value
    return info


def memory_arg(kib):
    """An ``xl mem-set`` size argument. Whole MiB are passed as ``<n>m``, anything else as ``<n>k``."""
    if not isinstance(kib, int) or isinstance(kib, bool) or kib <= 0:
        raise InvalidInput('memory must be a positive number of KiB, got %r' % (kib,))
    if kib % KIB_PER_MIB == 0:
        return '%dm' % (kib // KIB_PER_MIB)
    return '%dk' % kib


# ``xl`` has no command to resume a domain that an interrupted ``xl save`` left suspended (xl does it
# itself when the save fails, but not when it is killed). This does what xl's save_domain() does then:
# libxl_domain_resume(ctx, domid, suspend_cancel=1) -- the guest sees its suspend cancelled and runs on
# with its memory intact. It runs in a child process: libxl owns SIGCHLD while it works, and an ABI
# surprise must crash a throwaway process, not the module.
RESUME_SCRIPT = r"""
import ctypes, ctypes.util, glob, sys
def lib(stem):
    names = [ctypes.util.find_library(stem)] + sorted(glob.glob('/usr/lib/*/lib%s.so*' % stem)
                                                      + glob.glob('/lib/*/lib%s.so*' % stem))
    for name in names:
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                pass
    sys.exit('cannot load lib%s' % stem)
domid = int(sys.argv[1])
tl, xl = lib('xentoollog'), lib('xenlight')
tl.xtl_createlogger_stdiostream.restype = ctypes.c_void_p
tl.xtl_createlogger_stdiostream.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
logger = tl.xtl_createlogger_stdiostream(ctypes.c_void_p.in_dll(ctypes.CDLL(None), 'stderr'), 7, 0)
ctx = ctypes.c_void_p()
xl.libxl_ctx_alloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
if xl.libxl_ctx_alloc(ctypes.byref(ctx), 0, 0, logger) != 0:
    sys.exit('libxl_ctx_alloc failed')
xl.libxl_domain_resume.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p]
rc = xl.libxl_domain_resume(ctx, domid, 1, None)
sys.exit('libxl_domain_resume(%d) failed: %d' % (domid, rc) if rc else 0)
"""


def destroy_confirmed(xl, name):
    """``xl destroy`` of domain ``name`` if it exists, then a check that it is gone. Returns whether it existed;
    raises XlError if it is still listed after the destroy."""
    if name not in xl.list_plain():
        return False
    xl.destroy(name)
    if name in xl.list_plain():
        raise XlError(['xl', 'destroy', name], 0, stderr='%s still exists after xl destroy' % name)
    return True


class SubprocessRunner:
    """Run argv with a timeout, capturing output. Never uses a shell. ``env`` adds environment variables."""

    def __init__(self, env=None):
        self.env = dict(os.environ, **env) if env else None

    def run(self, argv, timeout):
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=timeout, check=False, env=self.env)
        except subprocess.TimeoutExpired as exc:
            raise XlError(argv, None, _text(exc.stdout), _text(exc.stderr), timed_out=True, timeout=timeout)
        except OSError as exc:
            raise XlError(argv, None, stderr='cannot run: %s' % exc)
        return proc.returncode, _text(proc.stdout), _text(proc.stderr)


def _text(data):
    if data is None:
        return ''
    if isinstance(data, bytes):
        return data.decode('utf-8', 'replace')
    return data


class Xl:
    """Thin typed interface to the ``xl`` command."""

    def __init__(self, runner=None, xl_path='xl', timeout=60, save_timeout=1800):
        self.runner = runner or SubprocessRunner()
        self.xl_path = xl_path
        self.timeout = timeout
        self.save_timeout = save_timeout

    def _run(self, args, timeout=None):
        argv = [self.xl_path] + list(args)
        rc, out, err = self.runner.run(argv, timeout or self.timeout)
        if rc != 0:
            raise XlError(argv, rc, out, err)
        return out

    def list_plain(self):
        return parse_xl_list(self._run(['list']))

    def list_long(self):
        return parse_xl_list_long(self._run(['list', '-l']))

    def domains(self):
        """Per-domain facts merged from ``xl list`` (current memory, state) and ``xl list -l`` (config)."""
        plain = self.list_plain()
        long_ = self.list_long()
        merged = {}
        for name, row in plain.items():
            facts = dict(long_.get(name) or {'uuid': None, 'type': 'unknown', 'static_max_kb': None,
                                             'target_kb': None, 'pci_passthrough': False, 'vnuma': False,
                                             'config': {}})
            facts.update(row)
            facts['current_kb'] = row['mem_mib'] * KIB_PER_MIB
            merged[name] = facts
        return merged

    def domain(self, name):
        doms = self.domains()
        if name not in doms:
            raise XlError([self.xl_path, 'list', name], 1, stderr='no domain named %r' % name)
        return doms[name]

    def info(self):
        return parse_xl_info(self._run(['info']))

    def mem_set(self, name, kib):
        self._run(['mem-set', name, memory_arg(kib)])

    def mem_max(self, name, kib):
        self._run(['mem-max', name, memory_arg(kib)])

    def save_argv(self, name, path, keep_running=True, paused=False):
        args = ['save']
        if keep_running:
            args.append('-c')
        if paused:
            args.append('-p')
        return [self.xl_path] + args + [name, path]

    def restore(self, path, paused=False, config_file=None):
        args = ['restore']
        if paused:
            args.append('-p')
        if config_file:
            args.append(config_file)
        args.append(path)
        self._run(args, timeout=self.save_timeout)

    def destroy(self, name):
        self._run(['destroy', name])

    def migrate(self, name, dest, ssh_command, timeout=None):
        """Live migration: ``xl migrate -s <ssh_command> <name> <dest>``; xl runs ``<ssh_command> <dest> xl
        migrate-receive`` through ``sh -c``, so both must be shell-safe (see _migrate.Peer)."""
        self._run(['migrate', '-s', ssh_command, name, dest], timeout=timeout or self.save_timeout)

    def pause(self, name):
        self._run(['pause', name])

    def unpause(self, name):
        self._run(['unpause', name])

    def resume(self, domid, python=None, timeout=60):
        """Resume a domain left suspended by a killed ``xl save`` (see RESUME_SCRIPT)."""
        argv = [python or sys.executable, '-c', RESUME_SCRIPT, str(int(domid))]
        rc, out, err = self.runner.run(argv, timeout)
        if rc != 0:
            raise XlError(['libxl_domain_resume', str(domid)], rc, out, err)

    def recover_suspended(self, name):
        """After a failed save: if ``name`` is left shut down for suspend, resume it. Returns what was done."""
        dom = self.list_plain().get(name)
        if dom is None:
            return 'gone'
        if 'suspended' not in dom['flags']:
            return None
        self.resume(dom['domid'])
        after = self.list_plain().get(name) or {}
        if 'suspended' in after.get('flags', ()):
            raise XlError(['libxl_domain_resume', str(dom['domid'])], 0,
                          stderr='%s is still shut down (state %s) after resume' % (name, after.get('state')))
        return 'resumed'
