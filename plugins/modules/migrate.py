#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: migrate
short_description: Move a running Xen VM live to another host with C(xl migrate), ballooned down on the way
version_added: 0.2.0
description:
  - Runs on the VM's current Xen host (dom0). With O(mode=vmme) (the default) the VM is first ballooned down to its
    memory-policy target (its Committed_AS from the guest agent plus a reserve), so C(xl migrate) sends only the
    memory the guest uses; on the destination the VM then gets its original memory back.
  - The destination dom0 is reached over SSH with the fleetckpt migration key (O(ssh_key)), whose forced command
    there allows only C(xl migrate-receive), a probe of the host and C(xl mem-set); the C(fleetckpt.xen.xen_host)
    role sets it up (C(xen_host_migration=true)).
  - Before anything changes the destination is probed; the move is refused when it has a domain of that name, less
    free memory than the VM's original memory plus O(margin_mib), a Xen older than this host's, or does not see the
    VM's disks at the same paths (a live move needs shared storage, for example the checkpoint store's NFS). It is
    refused as well when this host's Xen cannot track the VM's dirty pages, that is when the C(virt_caps) of
    C(xl info) lack C(shadow) for a PV guest, or both C(hap) and C(shadow) for an HVM or PVH guest. Debian builds
    Xen without C(CONFIG_SHADOW_PAGING), so on Debian's Xen PV guests can be moved only cold; PVH and HVM guests
    move live where the CPU has hardware-assisted paging (Intel EPT, AMD NPT), which C(virt_caps) shows as C(hap).
  - A failed migration leaves the VM running on this host with its memory given back. If C(xl migrate) fails after
    its point of no return (the source domain renamed C(<name>--migratedaway)), the module reports that undefined
    state and resumes nothing.
  - The guest keeps running during the copy; it stands paused only for the last round (xl's own live migration).
author:
  - fleetckpt.xen contributors (@fleetckpt)
extends_documentation_fragment:
  - fleetckpt.xen._attributes
  - fleetckpt.xen._host
  - fleetckpt.xen._host.POLICY
attributes:
  check_mode:
    support: full
    details:
      - Probes the destination and computes the memory plan; the VM is neither ballooned nor moved.
  diff_mode:
    support: none
  idempotent:
    support: full
    details:
      - A VM that already runs on the destination (and not here) is reported unchanged.
options:
  name:
    description: The VM (domain) to move.
    type: str
    required: true
  dest:
    description:
      - Address (host name or IP) of the destination dom0 for SSH, as the destination's C(xen_host_migration_address)
        (the inventory variable C(fleetckpt_migration_address)).
    type: str
    required: true
  mode:
    description:
      - V(vmme) balloons the VM to its policy target before the move and gives the memory back after it; V(native)
        moves it as it is.
    type: str
    choices: [vmme, native]
    default: vmme
  fallback:
    description: What to do when the policy refuses memory exclusion (no fresh agent report, unsafe VM).
    type: str
    choices: [native, fail]
    default: native
  ssh_user:
    description: User on the destination.
    type: str
    default: root
  ssh_port:
    description: SSH port of the destination.
    type: int
    default: 22
  ssh_key:
    description: Private key of this host's migration identity.
    type: path
    default: /root/.ssh/fleetckpt_migrate
  known_hosts:
    description: The known_hosts file holding the destinations' host keys (checked strictly).
    type: path
    default: /etc/fleetckpt/migrate_known_hosts
  margin_mib:
    description: Free memory, in MiB, the destination must keep on top of the VM's original memory.
    type: int
    default: 64
  migrate_timeout:
    description:
      - Seconds for C(xl migrate). When it runs out, xl is killed; the VM is resumed here if the destination does
        not have it.
    type: int
    default: 1800
  balloon_timeout:
    description: Seconds for each balloon (down before the move, up after it).
    type: int
    default: 180
  stall_timeout:
    description: Seconds without 1 MiB of balloon progress after which a balloon counts as stuck.
    type: int
    default: 30
  settle_slack_mib:
    description:
      - A balloon going down that settles above its target by at most this many MiB, or by 25 % of the target when
        that is more, counts as reached (at what it reached).
      - Within this slack a balloon counts as settled once it has not moved for 5 seconds (or O(stall_timeout),
        when shorter), without waiting out O(stall_timeout).
    type: int
    default: 8
notes:
  - Both hosts must run the same CPU model family and a compatible Xen (the destination not older), as for any
    C(xl migrate).
  - The VM's disks must be at the same paths on both hosts (shared storage). Disks local to one host need a cold
    move (M(fleetckpt.xen.checkpoint) then M(fleetckpt.xen.restore)), which the C(fleetckpt.xen.rebalance) role does
    when a live move is not possible.
seealso:
  - module: fleetckpt.xen.checkpoint
  - module: fleetckpt.xen.restore
'''

EXAMPLES = r'''
- name: Move web1 live to xen2, with only the memory it uses on the wire
  fleetckpt.xen.migrate:
    name: web1
    dest: "{{ hostvars['xen2'].fleetckpt_migration_address }}"

- name: Would db1 fit on xen3? (nothing changes)
  fleetckpt.xen.migrate:
    name: db1
    dest: xen3.example.org
  check_mode: true
  register: fits
'''

RETURN = r'''
where:
  description:
    - On failure, where the VM runs now. V(source) - this host, with its memory back (nothing moved, or the move failed
      and xl resumed it); V(destination) - it moved but did not get its memory back there; V(undefined) - xl failed
      after its point of no return, check both hosts (the message says what each holds).
  returned: failure
  type: str
  sample: source
migrated:
  description: What was done (or, in check mode, planned).
  returned: success
  type: dict
  contains:
    vm:
      description: The VM.
      type: str
      returned: always
    to:
      description: The destination address.
      type: str
      returned: always
    dest_host:
      description: The destination's host name, from C(xl info) there.
      type: str
      returned: when the destination answered
    mode:
      description: V(vmme) or V(native), after any fallback.
      type: str
      returned: when the destination answered
    original_kb:
      description: The VM's memory before the move; it gets it back on the destination.
      type: int
      returned: when the destination answered
    moved_kb:
      description: The VM's memory while it moved.
      type: int
      returned: when the destination answered
    dest_domid:
      description: Its domain ID on the destination.
      type: int
      returned: when moved, or when it already ran there
    memory_restored:
      description: The balloon on the destination reached the original memory.
      type: bool
      returned: when ballooned
    timings:
      description: Seconds for the agent query, the balloon down, the migration and the give-back, and in all.
      type: dict
      returned: when moved
      sample: {query_s: 0.4, balloon_s: 5.1, migrate_s: 31.2, give_back_s: 3.0, total_s: 40.1}
    problems:
      description: Why the move cannot be made; in check mode only (a real run fails with them).
      type: list
      elements: str
      returned: check mode
    already_there:
      description: The VM already runs on the destination and not here; nothing was done.
      type: bool
      returned: when it already ran there
  sample:
    vm: web1
    to: 169.254.100.2
    dest_host: xen2
    mode: vmme
    original_kb: 524288
    moved_kb: 180224
    dest_domid: 7
    memory_restored: true
'''

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.fleetckpt.xen.plugins.module_utils._balloon import KIB_PER_MIB
from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import host_facts, plan_memory
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
from ansible_collections.fleetckpt.xen.plugins.module_utils._migrate import (
    MigrateError, Migrator, Peer, check_dest, ssh_argv)
from ansible_collections.fleetckpt.xen.plugins.module_utils._module import (
    host_argument_spec, make_xl, memory_options, policy_argument_spec, stop_on_signals)
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import validate_vm_name
from ansible_collections.fleetckpt.xen.plugins.module_utils._xl import SubprocessRunner
from ansible_collections.fleetckpt.xen.plugins.module_utils._xenstore import HAS_PYXS, PYXS_IMPORT_ERROR, XenStore


def _options(params):
    return dict(memory_options(params), migrate_timeout_s=params['migrate_timeout'],
                margin_kb=params['margin_mib'] * KIB_PER_MIB)


def main():
    argument_spec = host_argument_spec()
    argument_spec.update(policy_argument_spec())
    argument_spec.update(
        name=dict(type='str', required=True),
        dest=dict(type='str', required=True),
        mode=dict(type='str', default='vmme', choices=['vmme', 'native']),
        fallback=dict(type='str', default='native', choices=['native', 'fail']),
        ssh_user=dict(type='str', default='root'),
        ssh_port=dict(type='int', default=22),
        ssh_key=dict(type='path', default='/root/.ssh/fleetckpt_migrate'),
        known_hosts=dict(type='path', default='/etc/fleetckpt/migrate_known_hosts'),
        margin_mib=dict(type='int', default=64),
        migrate_timeout=dict(type='int', default=1800),
        balloon_timeout=dict(type='int', default=180),
        stall_timeout=dict(type='int', default=30),
        settle_slack_mib=dict(type='int', default=8),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if not HAS_PYXS:
        module.fail_json(msg=missing_required_lib('pyxs'), exception=PYXS_IMPORT_ERROR)
    params = module.params
    bad = [k for k in ('migrate_timeout', 'balloon_timeout', 'stall_timeout') if params[k] < 1]
    bad += [k for k in ('margin_mib', 'settle_slack_mib') if params[k] < 0]
    if bad:
        module.fail_json(msg='out of range: %s' % ', '.join(bad))
    stop_on_signals()  # a SIGTERM must not end the module between the balloon and its give-back
    try:
        name = validate_vm_name(params['name'])
        options = _options(params)
        peer = Peer(check_dest(params['dest']), SubprocessRunner(),
                    ssh_argv(params['ssh_user'], params['ssh_port'], params['ssh_key'], params['known_hosts']),
                    timeout=max(60, params['xl_timeout']))
        xl = make_xl(module, save_timeout=params['migrate_timeout'])
        doms = xl.domains()
        if name not in doms:
            there = peer.probe()['domains']
            if name in there:
                module.exit_json(changed=False, migrated={'vm': name, 'to': params['dest'], 'already_there': True,
                                                          'dest_domid': there[name]['domid']})
            module.fail_json(msg='%s runs neither on this host nor on %s' % (name, params['dest']))
        dom = doms[name]
        source = host_facts(xl)
        with XenStore(params['xenstore_socket']) as xs:
            plan = plan_memory(xs, dom, options)
            result = _move(module, Migrator(xl, xs, peer, options), dom, plan, source)
    except MigrateError as exc:
        module.fail_json(msg=str(exc), where=exc.where)
    except FleetckptError as exc:
        module.fail_json(msg=str(exc), where='source')
    if result.get('memory_restored') is False:
        module.fail_json(msg='%s moved to %s but did not get its memory back there (%d MiB of %d MiB): %s' % (
            name, params['dest'], result.get('dest_kb', 0) // KIB_PER_MIB, result['original_kb'] // KIB_PER_MIB,
            result.get('give_back_error', 'balloon not reached')), where='destination', migrated=result)
    module.exit_json(changed=not result.get('problems'), migrated=result)


def _move(module, migrator, dom, plan, source):
    full = migrator.plan(dom, plan, source)
    if module.check_mode:
        return {'vm': dom['name'], 'to': module.params['dest'], 'dest_host': full['dest_host'], 'mode': full['mode'],
                'requested_mode': full['requested_mode'], 'fallback_reason': full['reason'],
                'original_kb': full['original_kb'], 'moved_kb': full['moving_kb'], 'problems': full['problems']}
    if full['problems']:
        raise MigrateError('%s cannot move live to %s: %s'
                           % (dom['name'], module.params['dest'], '; '.join(full['problems'])))
    return migrator.run(dom, full)


if __name__ == '__main__':
    main()
