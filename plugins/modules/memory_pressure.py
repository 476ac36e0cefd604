#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: memory_pressure
short_description: Report the memory each Xen VM really uses and how far it could be ballooned down
version_added: 0.1.0
description:
  - Runs on a Xen host (dom0). For each selected VM, reads C(xl list) / C(xl list -l) facts (current memory,
    static maximum, type), asks the fleetckpt guest agent for a fresh sample over XenStore, and computes the
    memory-exclusion target with the collection's memory policy, and the memory that could be reclaimed.
  - "The target is Committed_AS + SUnreclaim + PageTables + KernelStack + Mapped + the kernel's own memory + reserve,
    where the kernel's own memory is the domain's current memory minus the guest's MemTotal and
    reserve = max(O(reserve_mib), O(reserve_pct)% of static-max), rounded up to a MiB, never below O(floor_mib),
    never above the VM's current memory or static maximum."
  - Agent data is untrusted; a missing, stale or malformed report is returned as a status, never a failure.
  - VMs where ballooning is unsafe (PCI passthrough, vNUMA, HVM without populate-on-demand, paused) are reported
    with policy status V(refused) and the reason.
author:
  - fleetckpt.xen contributors (@fleetckpt)
extends_documentation_fragment:
  - fleetckpt.xen._attributes
  - fleetckpt.xen._attributes.INFO_MODULE
  - fleetckpt.xen._host
  - fleetckpt.xen._host.SELECTION
  - fleetckpt.xen._host.POLICY
options:
  refresh:
    description:
      - Ask each agent for a fresh sample (writes a nonce to the VM's C(data/fleetckpt/request) XenStore key)
        before reading. With V(false), read whatever the agent published last.
    type: bool
    default: true
'''

EXAMPLES = r'''
- name: Show what every VM on this host uses
  fleetckpt.xen.memory_pressure:
  register: pressure

- name: Only the web VMs bigger than 512 MiB
  fleetckpt.xen.memory_pressure:
    pattern: ['web-*']
    query: "[?mem_mib > `512`]"

- name: Total memory that memory exclusion would leave out of checkpoints
  ansible.builtin.debug:
    msg: "{{ (pressure.total_reclaimable_kb / 1024) | int }} MiB"
'''

RETURN = r'''
host:
  description: Facts about the Xen host.
  returned: success
  type: dict
  sample: {host: xen1, xen_version: "4.20.1", free_memory_kb: 2097152, total_memory_kb: 4194304, hw_caps: "..."}
vms:
  description: One entry per selected VM.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: Domain name.
      type: str
      sample: web1
    domid:
      description: Current domain id (changes on every restore).
      type: int
    current_kb:
      description: Memory the domain holds now, from C(xl list), in KiB.
      type: int
    static_max_kb:
      description: The domain's static maximum memory (maxmem), in KiB.
      type: int
    agent:
      description: The guest agent's report; its C(status) is one of V(ok), V(missing), V(incomplete), V(malformed), V(stale).
      type: dict
    policy:
      description: The policy decision; its C(status) is V(ok), V(refused) or V(no_agent), with the C(reason).
      type: dict
    target_mem_kb:
      description: Balloon target in KiB, or null when memory exclusion is not possible for this VM.
      type: int
    reclaimable_kb:
      description: Memory, in KiB, that ballooning to the target would take out of a checkpoint.
      type: int
  sample:
    - name: web1
      domid: 3
      current_kb: 524288
      static_max_kb: 524288
      agent: {status: ok, fresh: true, values: {committed_as_kb: 61234}}
      policy: {status: ok, target_kb: 196608, limited_by: formula}
      target_mem_kb: 196608
      reclaimable_kb: 327680
total_reclaimable_kb:
  description: Sum of RV(vms[].reclaimable_kb).
  returned: success
  type: int
  sample: 327680
'''

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import host_facts, vm_facts
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
from ansible_collections.fleetckpt.xen.plugins.module_utils._module import (
    host_argument_spec, make_xl, policy_argument_spec, policy_params, selection_args, selection_argument_spec)
from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import check_params, compute_target
from ansible_collections.fleetckpt.xen.plugins.module_utils._selection import select_vms
from ansible_collections.fleetckpt.xen.plugins.module_utils._xenstore import (
    HAS_PYXS, PYXS_IMPORT_ERROR, XenStore, parse_agent_report)


def main():
    argument_spec = host_argument_spec()
    argument_spec.update(selection_argument_spec())
    argument_spec.update(policy_argument_spec())
    argument_spec.update(refresh=dict(type='bool', default=True))
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if not HAS_PYXS:
        module.fail_json(msg=missing_required_lib('pyxs'), exception=PYXS_IMPORT_ERROR)
    params = module.params
    try:
        policy = check_params(policy_params(params))
        xl = make_xl(module)
        host = host_facts(xl)
        doms = xl.domains()
        selected = select_vms(list(doms.values()), **selection_args(params))
        vms = []
        with XenStore(params['xenstore_socket']) as xs:
            for dom in selected:
                if params['refresh']:
                    report = xs.query_agent(dom['domid'], dom.get('static_max_kb'), timeout=params['agent_timeout'],
                                            max_age_s=params['agent_max_age'])
                else:
                    report = parse_agent_report(xs.read_agent_raw(dom['domid']), dom.get('static_max_kb'),
                                                max_age_s=params['agent_max_age'])
                vms.append(vm_facts(dom, report, compute_target(dom, report, policy)))
    except FleetckptError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, host=host, vms=vms,
                     total_reclaimable_kb=sum(v.get('reclaimable_kb') or 0 for v in vms))


if __name__ == '__main__':
    main()
