#!/usr/bin/env python
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A fake ``xl`` for unit tests: a real executable whose domains live in a JSON state file ($FAKE_XL_STATE).

State: {"host": ..., "xen_version": ..., "hw_caps": ..., "free_mib": N, "next_domid": N,
        "domains": {name: {"domid", "uuid", "type", "max_mib", "target_mib", "mem_mib", "stuck_at_mib" (optional),
                           "state", "pcidevs" (optional)}},
        "fail": {"<subcommand>": "message"}, "log": [argv...]}
Balloons move instantly to the target unless ``stuck_at_mib`` holds them. ``save`` writes a small image
(a JSON header + ``mem_mib`` KiB of filler) so sizes scale with memory; ``restore`` reads it back.
"""
import json
import os
import sys
import time


def load():
    with open(os.environ['FAKE_XL_STATE']) as handle:
        return json.load(handle)


def dump(state):
    tmp = os.environ['FAKE_XL_STATE'] + '.tmp'
    with open(tmp, 'w') as handle:
        json.dump(state, handle)
    os.rename(tmp, os.environ['FAKE_XL_STATE'])


def settle(dom):
    want = dom['target_mib']
    stuck = dom.get('stuck_at_mib')
    if stuck is not None and want < stuck:
        dom['mem_mib'] = stuck
    else:
        dom['mem_mib'] = want


def parse_mem(arg):
    if arg.endswith('m'):
        return int(arg[:-1])
    if arg.endswith('k'):
        return -(-int(arg[:-1]) // 1024)
    return int(arg)


def main(argv):
    state = load()
    state.setdefault('log', []).append(argv)
    cmd = argv[0] if argv else ''
    if cmd in state.get('fail', {}):
        dump(state)
        sys.stderr.write(state['fail'][cmd] + '\n')
        return 1
    doms = state['domains']
    if cmd == 'list' and argv[1:] == ['-l']:
        out = [{'domid': 0, 'config': {'c_info': {'type': 'pv', 'name': 'Domain-0'}, 'b_info': {}}}]
        for name, dom in sorted(doms.items()):
            config = {'c_info': {'type': dom['type'], 'name': name, 'uuid': dom['uuid']},
                      'b_info': {'max_memkb': dom['max_mib'] * 1024, 'target_memkb': dom['target_mib'] * 1024},
                      'disks': [{'pdev_path': '/srv/disks/%s.img' % name, 'vdev': 'xvda'}]}
            if dom.get('pcidevs'):
                config['pcidevs'] = dom['pcidevs']
            out.append({'domid': dom['domid'], 'config': config})
        print(json.dumps(out, indent=4))
    elif cmd == 'list':
        print('Name                                        ID   Mem VCPUs\tState\tTime(s)')
        print('%-40s %5d %5d %5d     %s %10.1f' % ('Domain-0', 0, 1024, 1, 'r-----', 10.0))
        for name, dom in sorted(doms.items()):
            print('%-40s %5d %5d %5d     %s %10.1f' % (name, dom['domid'], dom['mem_mib'], 1, dom.get('state', '-b----'), 1.5))
    elif cmd == 'info':
        used = sum(d['mem_mib'] for d in doms.values())
        print('host                   : %s' % state.get('host', 'fakehost'))
        print('total_memory           : %d' % (state['free_mib'] + used + 1024))
        print('free_memory            : %d' % state['free_mib'])
        print('xen_version            : %s' % state.get('xen_version', '4.20.1'))
        print('hw_caps                : %s' % state.get('hw_caps', '0000:0001'))
    elif cmd == 'mem-set':
        dom = doms[argv[1]]
        want = parse_mem(argv[2])
        if want > dom['max_mib']:
            sys.stderr.write('memory_dynamic_max must be less than or equal to memory_static_max\n')
            dump(state)
            return 1
        state['free_mib'] += dom['mem_mib']
        dom['target_mib'] = want
        settle(dom)
        state['free_mib'] -= dom['mem_mib']
    elif cmd == 'mem-max':
        doms[argv[1]]['max_mib'] = parse_mem(argv[2])
    elif cmd == 'save':
        args = argv[1:]
        keep = '-c' in args
        args = [a for a in args if not a.startswith('-')]
        name, path = args[0], args[1]
        if name not in doms:
            sys.stderr.write('no domain %s\n' % name)
            dump(state)
            return 1
        dom = doms[name]
        if os.environ.get('FAKE_XL_SAVE_SLEEP'):
            time.sleep(float(os.environ['FAKE_XL_SAVE_SLEEP']))
        header = json.dumps({'name': name, 'dom': dom}).encode()
        with open(path, 'wb') as handle:
            handle.write(b'FAKEXL\n' + header + b'\n')
            handle.write(b'\x5a' * (dom['mem_mib'] * 1024))
        if not keep:
            state['free_mib'] += dom['mem_mib']
            del doms[name]
    elif cmd == 'restore':
        args = [a for a in argv[1:] if not a.startswith('-')]
        with open(args[-1], 'rb') as handle:
            magic = handle.readline()
            header = json.loads(handle.readline())
            handle.read()
        if magic != b'FAKEXL\n':
            sys.stderr.write('not a xl save image\n')
            dump(state)
            return 1
        name = header['name']
        if name in doms:
            sys.stderr.write('domain with name "%s" already exists.\n' % name)
            dump(state)
            return 1
        dom = header['dom']
        dom['domid'] = state['next_domid']
        state['next_domid'] += 1
        dom['state'] = '--p---' if '-p' in argv else '-b----'
        doms[name] = dom
        state['free_mib'] -= dom['mem_mib']
    elif cmd == 'destroy':
        dom = doms.pop(argv[1])
        state['free_mib'] += dom['mem_mib']
    else:
        sys.stderr.write('fake xl: unsupported %r\n' % argv)
        dump(state)
        return 2
    dump(state)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
