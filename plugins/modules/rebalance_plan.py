#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: rebalance_plan
short_description: Plan balloon targets and VM moves across Xen hosts so that none runs short of memory
version_added: 0.2.0
description:
  - Computes, without touching any host, which VMs to balloon down to their memory-policy target and which VMs to
    move to another host, from the hosts' free memory and the VMs' memory (typically the results of
    M(fleetckpt.xen.memory_pressure) on every host). Runs anywhere, usually on the controller.
  - "Rules: every VM with a policy target below its current memory is ballooned to it. Every VM of an evacuated
    host moves; on the other hosts, while free memory stays below O(headroom_mib), the largest VMs move first.
    A moved VM needs its original memory plus O(headroom_mib) on the destination, which is the non-evacuated host
    with the most free memory that fits it; a VM that fits nowhere is reported in RV(unplaced), never forced.
    No host is planned below O(headroom_mib) free."
  - The plan is deterministic (ties broken by name). The P(fleetckpt.xen.rebalance#role) role executes it.
author:
  - fleetckpt.xen contributors (@fleetckpt)
extends_documentation_fragment:
  - fleetckpt.xen._attributes
  - fleetckpt.xen._attributes.INFO_MODULE
options:
  hosts:
    description:
      - The Xen hosts, each with C(name) and C(free_kb) (free memory in KiB, as C(xl info) reports it).
      - C(evacuate=true) marks a host to drain (see also O(evacuate)).
    type: list
    elements: dict
    required: true
  vms:
    description:
      - The VMs to consider, each with C(name), C(host) (one of O(hosts)), C(current_kb), and C(target_kb) (its
        policy target in KiB, or null when it cannot be ballooned). VMs not listed are neither ballooned nor moved.
    type: list
    elements: dict
    required: true
  evacuate:
    description: Names of hosts to drain (every listed VM on them moves elsewhere).
    type: list
    elements: str
    default: []
  headroom_mib:
    description: Free memory, in MiB, every host keeps after the plan.
    type: int
    default: 256
  reclaim:
    description: Include the balloon steps. With V(false) only moves are planned and every VM keeps its current memory.
    type: bool
    default: true
'''

EXAMPLES = r'''
# The fleetckpt.xen.rebalance role builds both lists from fleetckpt.xen.memory_pressure run on every host
# (host.free_memory_kb; each VM's current_kb and target_mem_kb) and carries the plan out.
- name: Plan the draining of xen2
  fleetckpt.xen.rebalance_plan:
    hosts:
      - {name: xen1, free_kb: 2097152}
      - {name: xen2, free_kb: 524288}
    vms:
      - {name: db1, host: xen2, current_kb: 1048576, target_kb: 393216}
      - {name: web1, host: xen1, current_kb: 524288, target_kb: 196608}
    evacuate: [xen2]
    headroom_mib: 256
  delegate_to: localhost
  register: plan

- name: Print it
  ansible.builtin.debug:
    var: plan.summary
'''

RETURN = r'''
balloons:
  description: VMs to balloon down where they run.
  returned: success
  type: list
  elements: dict
  sample: [{vm: web1, host: xen1, from_kb: 1048576, to_kb: 262144, reclaim_kb: 786432}]
moves:
  description: VMs to move, in the order to move them, with why.
  returned: success
  type: list
  elements: dict
  sample: [{vm: db1, from: xen2, to: xen1, memory_kb: 1048576, reason: host xen2 is evacuated}]
unplaced:
  description: VMs that should move but fit on no host; they stay where they are.
  returned: success
  type: list
  elements: dict
  sample: [{vm: big1, host: xen2, needs_kb: 8388608, reason: "host xen2 is evacuated; no other host has ... KiB free"}]
free_after_kb:
  description: Each host's free memory, in KiB, once the plan is carried out.
  returned: success
  type: dict
  sample: {xen1: 1048576, xen2: 3145728}
notes:
  description: Hosts that stay below the headroom even after the plan.
  returned: success
  type: list
  elements: str
  sample: []
summary:
  description: The plan in one readable line per step.
  returned: success
  type: list
  elements: str
  sample: ["move db1 xen2 -> xen1 (1024 MiB): host xen2 is evacuated", "balloon web1 on xen1 1024 -> 256 MiB"]
'''

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError, InvalidInput
from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import KIB_PER_MIB
from ansible_collections.fleetckpt.xen.plugins.module_utils._planner import plan_rebalance, summarize_plan


def main():
    module = AnsibleModule(argument_spec=dict(
        hosts=dict(type='list', elements='dict', required=True),
        vms=dict(type='list', elements='dict', required=True),
        evacuate=dict(type='list', elements='str', default=[]),
        headroom_mib=dict(type='int', default=256),
        reclaim=dict(type='bool', default=True),
    ), supports_check_mode=True)
    p = module.params
    try:
        if p['headroom_mib'] < 0:
            raise InvalidInput('headroom_mib must be >= 0')
        names = set(h.get('name') for h in p['hosts'])
        unknown = sorted(set(p['evacuate']) - names)
        if unknown:
            raise InvalidInput('evacuate names unknown host(s) %s (hosts: %s)' % (
                ', '.join(unknown), ', '.join(sorted(str(n) for n in names))))
        hosts = [dict(h, evacuate=bool(h.get('evacuate')) or h.get('name') in p['evacuate']) for h in p['hosts']]
        vms = [dict(v, target_kb=v.get('target_kb') if p['reclaim'] else None) for v in p['vms']]
        plan = plan_rebalance(hosts, vms, headroom_kb=p['headroom_mib'] * KIB_PER_MIB)
    except FleetckptError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, summary=summarize_plan(plan), **plan)


if __name__ == '__main__':
    main()
