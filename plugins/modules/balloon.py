#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: balloon
short_description: Balloon Xen VMs to their policy target, their original memory, or an explicit size
version_added: 0.1.0
description:
  - Runs on a Xen host (dom0). Sets the memory target of each selected VM with C(xl mem-set) and waits until the
    guest's balloon driver has reached it, with a timeout and stall detection.
  - V(committed) balloons down to the memory-policy target computed from the guest agent's report (see
    M(fleetckpt.xen.memory_pressure)); V(original) gives a VM its memory back (from the latest valid checkpoint's
    manifest in O(store), or the VM's static maximum); V(size) sets O(memory_mib).
  - After ballooning down, the guest must still be healthy (its agent answers and its OOM-kill count did not grow);
    otherwise the memory is given back at once and the VM is reported failed.
  - A VM is never ballooned below O(floor_mib) or above its static maximum.
author:
  - fleetckpt.xen contributors (@fleetckpt)
extends_documentation_fragment:
  - fleetckpt.xen._attributes
  - fleetckpt.xen._host
  - fleetckpt.xen._host.SELECTION
  - fleetckpt.xen._host.POLICY
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
    details:
      - V(committed) recomputes the target from live agent data, so a guest whose usage changed gets a new target.
options:
  target:
    description: What to set each VM's memory to.
    type: str
    choices: [committed, original, size]
    default: committed
  memory_mib:
    description: Memory in MiB, with O(target=size).
    type: int
  store:
    description: Checkpoint store whose latest valid manifest gives a VM's original memory, with O(target=original).
    type: path
  wait:
    description: Wait until each balloon reaches its target.
    type: bool
    default: true
  timeout:
    description: Seconds to wait for one VM's balloon before giving up (the memory is then given back).
    type: int
    default: 180
  stall_timeout:
    description: Seconds without 1 MiB of progress after which a balloon counts as stuck.
    type: int
    default: 30
  settle_slack_mib:
    description:
      - When a balloon going down settles at most this many MiB above its target, the target is raised to what was
        reached (so a later save stays restorable) instead of failing.
      - Within this slack a balloon counts as settled once it has not moved for 5 seconds (or O(stall_timeout),
        when shorter), without waiting out O(stall_timeout).
    type: int
    default: 8
'''

EXAMPLES = r'''
- name: Reclaim memory from every VM on the host
  fleetckpt.xen.balloon:
    target: committed

- name: Give the web VMs their memory back
  fleetckpt.xen.balloon:
    pattern: ['web-*']
    target: original

- name: Pin a VM to 768 MiB
  fleetckpt.xen.balloon:
    name: [db1]
    target: size
    memory_mib: 768
'''

RETURN = r'''
vms:
  description: One entry per selected VM.
  returned: always
  type: list
  elements: dict
  sample:
    - {vm: web1, before_kb: 524288, target_kb: 196608, after_kb: 196608, reached: true, changed: true, elapsed_s: 4.2}
failed_vms:
  description: Names of the VMs whose balloon failed (their memory was given back).
  returned: always
  type: list
  elements: str
  sample: []
'''

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.fleetckpt.xen.plugins.module_utils._balloon import Balloon, KIB_PER_MIB, guest_health
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import BalloonError, FleetckptError, InvalidInput
from ansible_collections.fleetckpt.xen.plugins.module_utils._module import (
    host_argument_spec, make_xl, policy_argument_spec, policy_params, selection_args, selection_argument_spec)
from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import check_params, compute_target, unsafe_reason
from ansible_collections.fleetckpt.xen.plugins.module_utils._selection import select_vms
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import CheckpointStore
from ansible_collections.fleetckpt.xen.plugins.module_utils._xenstore import HAS_PYXS, PYXS_IMPORT_ERROR, XenStore


def desired_kb(dom, params, policy, xs, store):
    """Target memory of one VM for the requested mode, or raise InvalidInput/BalloonError with the reason."""
    static_max = dom.get('static_max_kb') or dom['current_kb']
    if params['target'] == 'size':
        want = params['memory_mib'] * KIB_PER_MIB
        if want > static_max:
            raise InvalidInput('%s: memory_mib %d exceeds the static maximum %d MiB'
                               % (dom['name'], params['memory_mib'], static_max // KIB_PER_MIB))
        if want < policy['floor_mib'] * KIB_PER_MIB:
            raise InvalidInput('%s: memory_mib %d is below floor_mib %d' % (dom['name'], params['memory_mib'], policy['floor_mib']))
        return want, None
    if params['target'] == 'original':
        if store is not None:
            entry = store.latest_valid(dom['name'], verify_checksum=False)
            if entry:
                return min(entry['manifest']['memory']['original_kb'], static_max), None
        return static_max, None
    report = xs.query_agent(dom['domid'], dom.get('static_max_kb'), timeout=params['agent_timeout'],
                            max_age_s=params['agent_max_age'])
    decision = compute_target(dom, report, policy)
    if decision['status'] != 'ok':
        raise BalloonError('%s: cannot compute a balloon target: %s' % (dom['name'], decision['reason']))
    return decision['target_kb'], report


def main():
    argument_spec = host_argument_spec()
    argument_spec.update(selection_argument_spec())
    argument_spec.update(policy_argument_spec())
    argument_spec.update(
        target=dict(type='str', default='committed', choices=['committed', 'original', 'size']),
        memory_mib=dict(type='int'),
        store=dict(type='path'),
        wait=dict(type='bool', default=True),
        timeout=dict(type='int', default=180),
        stall_timeout=dict(type='int', default=30),
        settle_slack_mib=dict(type='int', default=8),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[('target', 'size', ['memory_mib'])])
    if not HAS_PYXS:
        module.fail_json(msg=missing_required_lib('pyxs'), exception=PYXS_IMPORT_ERROR)
    params = module.params
    if params['timeout'] <= 0 or params['stall_timeout'] <= 0 or params['settle_slack_mib'] < 0:
        module.fail_json(msg='timeout and stall_timeout must be > 0 and settle_slack_mib >= 0')
    results, failed = [], []
    diff = {'before': {}, 'after': {}}
    try:
        policy = check_params(policy_params(params))
        store = CheckpointStore(params['store']) if params['store'] else None
        xl = make_xl(module)
        balloon = Balloon(xl)
        selected = select_vms(list(xl.domains().values()), **selection_args(params))
        with XenStore(params['xenstore_socket']) as xs:
            for dom in selected:
                name = dom['name']
                entry = {'vm': name, 'before_kb': dom['current_kb'], 'changed': False}
                results.append(entry)
                reason = unsafe_reason(dom)
                if reason and params['target'] != 'original':
                    entry.update(failed=True, msg='%s: %s' % (name, reason))
                    failed.append(name)
                    continue
                try:
                    want, report = desired_kb(dom, params, policy, xs, store)
                except (InvalidInput, BalloonError) as exc:
                    entry.update(failed=True, msg=str(exc))
                    failed.append(name)
                    continue
                entry['target_kb'] = want
                current_target = dom.get('target_kb') or dom['current_kb']
                settled = abs(dom['current_kb'] - want) <= 2 * KIB_PER_MIB if want >= dom['current_kb'] else dom['current_kb'] <= want
                if current_target == want and settled:
                    entry['after_kb'] = dom['current_kb']
                    continue
                entry['changed'] = True
                diff['before'][name] = '%d MiB' % (dom['current_kb'] // KIB_PER_MIB)
                diff['after'][name] = '%d MiB' % (want // KIB_PER_MIB)
                if module.check_mode:
                    continue
                try:
                    res = balloon.set_and_wait(name, want, timeout=params['timeout'], stall_s=params['stall_timeout'],
                                               settle_slack_kb=params['settle_slack_mib'] * KIB_PER_MIB, wait=params['wait'])
                    entry.update(after_kb=res['current_kb'], target_kb=res['target_kb'], reached=res['reached'],
                                 adjusted=res['adjusted'], elapsed_s=res['elapsed_s'])
                    if want < dom['current_kb'] and params['wait'] and params['target'] == 'committed':
                        problem = guest_health(xs, dom, report, timeout=params['agent_timeout'],
                                               max_age_s=params['agent_max_age'])
                        if problem:
                            raise BalloonError('%s: %s' % (name, problem))
                except BalloonError as exc:
                    back = balloon.restore_memory(name, current_target, timeout=params['timeout'])
                    entry.update(failed=True, msg='%s; memory given back to %d MiB (reached: %s)'
                                 % (exc, current_target // KIB_PER_MIB, back.get('reached')))
                    failed.append(name)
    except FleetckptError as exc:
        module.fail_json(msg=str(exc), vms=results, failed_vms=failed)
    changed = any(r['changed'] for r in results)
    out = dict(changed=changed, vms=results, failed_vms=failed)
    if module._diff:
        out['diff'] = diff
    if failed:
        module.fail_json(msg='balloon failed for %s: %s' % (', '.join(failed), '; '.join(r['msg'] for r in results if r.get('failed'))),
                         **out)
    module.exit_json(**out)


if __name__ == '__main__':
    main()
