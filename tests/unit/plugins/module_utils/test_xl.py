# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
from __future__ import annotations

import json

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, XlError, one_line
from ansible_collections.fleetckpt.xen.plugins.module_utils._xl import (
    SubprocessRunner, Xl, destroy_confirmed, memory_arg, parse_xl_info, parse_xl_list, parse_xl_list_long)

LIST = """Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     1     r-----      35.4
web 1                                        3   512     1     -b----       5.2
db                                           4   256     2     --p---       1.0
"""


def test_parse_xl_list_names_with_spaces_and_flags():
    doms = parse_xl_list(LIST)
    assert doms['web 1'] == {'name': 'web 1', 'domid': 3, 'mem_mib': 512, 'vcpus': 1, 'state': '-b----', 'flags': ['blocked']}
    assert doms['db']['flags'] == ['paused']
    assert doms['Domain-0']['flags'] == ['running']


def test_parse_xl_list_rejects_garbage():
    with pytest.raises(XlError, match='unparseable'):
        parse_xl_list('Name ID\nthis is not a domain line\n')


def test_parse_xl_list_long_pv_and_old_style_type():
    text = json.dumps([
        {'domid': 0, 'config': {'c_info': {}, 'b_info': {}}},
        {'domid': 3, 'config': {'c_info': {'type': 'pv', 'name': 'web', 'uuid': 'u-1'},
                                'b_info': {'max_memkb': 524288, 'target_memkb': 262144}, 'pcidevs': [{'func': 0}]}},
        {'domid': 4, 'config': {'c_info': {'name': 'old', 'uuid': 'u-2'},
                                'b_info': {'type.hvm': {}, 'max_memkb': 1048576, 'target_memkb': 1048576,
                                           'vnuma_nodes': [{}]}}},
        'junk',
    ])
    doms = parse_xl_list_long(text)
    assert doms['Domain-0']['domid'] == 0
    assert doms['web']['static_max_kb'] == 524288 and doms['web']['target_kb'] == 262144
    assert doms['web']['pci_passthrough'] is True and doms['web']['type'] == 'pv'
    assert doms['old']['type'] == 'hvm' and doms['old']['vnuma'] is True


@pytest.mark.parametrize('text', ['{not json', '"a string"', '42'])
def test_parse_xl_list_long_invalid(text):
    with pytest.raises(XlError):
        parse_xl_list_long(text)


def test_parse_xl_info():
    info = parse_xl_info('host : xen1\nfree_memory            : 2048\nxen_version : 4.20.1\nbad line\n')
    assert info == {'host': 'xen1', 'free_memory': 2048, 'xen_version': '4.20.1'}


@pytest.mark.parametrize('kib,arg', [(1024, '1m'), (131072, '128m'), (1536, '1536k')])
def test_memory_arg(kib, arg):
    assert memory_arg(kib) == arg


@pytest.mark.parametrize('bad', [0, -1024, 1.5, '128m', True, None])
def test_memory_arg_rejects(bad):
    with pytest.raises(InvalidInput):
        memory_arg(bad)


class Runner:
    def __init__(self, rc=0, out='', err=''):
        self.calls = []
        self.rc, self.out, self.err = rc, out, err

    def run(self, argv, timeout):
        self.calls.append((argv, timeout))
        return self.rc, self.out, self.err


def test_xl_errors_name_command_and_stderr():
    xl = Xl(runner=Runner(rc=3, err='libxl: error: no such domain'), timeout=7)
    with pytest.raises(XlError) as exc:
        xl.mem_set('web', 131072)
    assert 'xl mem-set web 128m failed (rc=3): libxl: error: no such domain' in str(exc.value)
    assert exc.value.argv == ['xl', 'mem-set', 'web', '128m']


def test_xl_passes_timeouts():
    runner = Runner(out='')
    xl = Xl(runner=runner, timeout=7, save_timeout=99)
    xl.destroy('web')
    xl.restore('/s/img', paused=True)
    assert runner.calls == [(['xl', 'destroy', 'web'], 7), (['xl', 'restore', '-p', '/s/img'], 99)]


def test_save_argv():
    xl = Xl(xl_path='/usr/sbin/xl')
    assert xl.save_argv('web', '/f') == ['/usr/sbin/xl', 'save', '-c', 'web', '/f']
    assert xl.save_argv('web', '/f', keep_running=False, paused=True) == ['/usr/sbin/xl', 'save', '-p', 'web', '/f']


def test_subprocess_runner_timeout_and_missing_binary(tmp_path):
    runner = SubprocessRunner()
    with pytest.raises(XlError, match='timed out after 0.2s'):
        runner.run(['sleep', '5'], 0.2)
    with pytest.raises(XlError, match='cannot run'):
        runner.run([str(tmp_path / 'nope')], 1)
    assert runner.run(['sh', '-c', 'echo out; echo err >&2; exit 4'], 5) == (4, 'out\n', 'err\n')


def test_domains_against_fake_xl(fake_xl):
    fake_xl.add('web', 512, max_mib=1024)
    xl = Xl(xl_path=fake_xl.path)
    dom = xl.domain('web')
    assert dom['current_kb'] == 512 * 1024 and dom['static_max_kb'] == 1024 * 1024
    assert dom['uuid'] and dom['type'] == 'pv' and dom['config']['disks']
    assert 'Domain-0' in xl.domains()
    with pytest.raises(XlError, match="no domain named 'nope'"):
        xl.domain('nope')
    assert xl.info()['free_memory'] == 2048 - 512


def test_xl_error_message_is_one_line_with_the_problem_first():
    err = ('Loading new save file /tmp/x/stream (new xl fmt info 0x3/0x0/1265)\n'
           ' Savefile contains xl domain config in JSON format\n'
           'Parsing config from <saved>\n'
           'libxl: error: libxl_device.c:1117:device_backend_callback: Domain 5:unable to add device\n'
           'libxl: error: libxl_create.c:1941:domcreate_attach_devices: Domain 5:unable to add disk devices\n')
    msg = str(XlError(['xl', 'restore', '/tmp/x/stream'], 1, stderr=err))
    assert '\n' not in msg
    assert msg.startswith('xl restore /tmp/x/stream failed (rc=1): libxl: error: libxl_device.c:1117')
    assert msg.index('unable to add disk devices') < msg.index('Loading new save file')
    assert msg.endswith('unable to add disk devices)')  # the whole output follows, in order
    # output without a problem word stays as it is, on one line; none at all adds nothing
    assert str(XlError(['xl', 'save'], 2, stderr='a\nb\n')) == 'xl save failed (rc=2): a | b'
    assert str(XlError(['xl', 'save'], 2)) == 'xl save failed (rc=2)'


def test_one_line_bounds_both_parts():
    text = '\n'.join(['progress %d' % i for i in range(500)] + ['error: %s' % ('x' * 3000)])
    out = one_line(text, limit=200)
    assert len(out) < 2 * 200 + 40 and out.startswith('error: xxx') and out.endswith('x)')


class _Domains:
    """list_plain/destroy over a set of names; ``undead``: names that xl destroy does not remove."""

    def __init__(self, names, undead=()):
        self.names, self.undead, self.destroyed = set(names), set(undead), []

    def list_plain(self):
        return {n: {'domid': i} for i, n in enumerate(sorted(self.names))}

    def destroy(self, name):
        self.destroyed.append(name)
        if name not in self.undead:
            self.names.discard(name)


def test_destroy_confirmed_destroys_only_what_exists_and_checks_it_is_gone():
    xl = _Domains({'g1', 'g1-drill'})
    assert destroy_confirmed(xl, 'g1-drill') is True and xl.names == {'g1'}
    assert destroy_confirmed(xl, 'g1-drill') is False and xl.destroyed == ['g1-drill']
    xl = _Domains({'g1'}, undead={'g1'})
    with pytest.raises(XlError, match='g1 still exists after xl destroy'):
        destroy_confirmed(xl, 'g1')
