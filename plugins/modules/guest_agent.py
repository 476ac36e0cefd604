#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: guest_agent
short_description: Install, upgrade, remove and verify the fleetckpt guest agent inside a Xen guest
version_added: 0.1.0
description:
  - Runs inside a Xen PV or PVH Linux guest. Installs the fleetckpt guest agent, one standard-library Python 3 file
    shipped inside this module (C(/usr/local/lib/fleetckpt/fleetckpt_agent.py)), and its hardened systemd unit
    (C(fleetckpt-agent.service)), then enables and (re)starts it. Nothing is downloaded, so it works on air-gapped guests.
  - The agent publishes the guest's Committed_AS, MemTotal, MemAvailable, unreclaimable kernel memory, mapped file
    pages and OOM-kill count under the domain's own XenStore C(data/fleetckpt/) keys, and answers dom0's
    fresh-sample requests (protocol in C(docs/agent-protocol.md)). It never executes anything it reads.
  - With O(verify=true), the module itself asks the agent for a fresh sample through XenStore and fails if no answer
    comes within O(verify_timeout) seconds.
author:
  - fleetckpt.xen contributors (@fleetckpt)
extends_documentation_fragment:
  - fleetckpt.xen._attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The diff lists the files that would be created, updated or removed.
  idempotent:
    support: full
requirements:
  - A Linux guest with systemd, C(/usr/bin/python3) and the xenbus device (C(/dev/xen/xenbus)).
options:
  state:
    description: V(present) installs or upgrades the agent and keeps it running; V(absent) stops and removes it.
    type: str
    choices: [present, absent]
    default: present
  verify:
    description: After installing, check that the agent answers a fresh-sample request (ignored in check mode).
    type: bool
    default: true
  verify_timeout:
    description: Seconds to wait for the agent's answer.
    type: int
    default: 30
'''

EXAMPLES = r'''
- name: Install the agent on every guest
  fleetckpt.xen.guest_agent:
  become: true

- name: Remove it
  fleetckpt.xen.guest_agent:
    state: absent
'''

RETURN = r'''
files:
  description: Files created, updated or removed, with the action.
  returned: always
  type: dict
  sample: {/usr/local/lib/fleetckpt/fleetckpt_agent.py: create, /etc/systemd/system/fleetckpt-agent.service: create}
version:
  description: Version of the agent this module installs.
  returned: always
  type: str
  sample: "1"
published:
  description: What the agent published in answer to the verification request (decimal strings, kB).
  returned: when O(verify=true) and O(state=present), outside check mode
  type: dict
  sample: {committed_as_kb: "61234", mem_total_kb: "474000", seq: "12", ts: "1764078301", version: "1", reply_s: 0.3}
'''

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fleetckpt.xen.plugins.module_utils import _agent
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
from ansible_collections.fleetckpt.xen.plugins.module_utils._guest import apply, plan, verify


def systemctl(module, *args, check=True):
    rc, out, err = module.run_command(['systemctl'] + list(args))
    if check and rc != 0:
        module.fail_json(msg='systemctl %s failed (rc=%d): %s' % (' '.join(args), rc, (err or out).strip()))
    return rc, out.strip()


def main():
    module = AnsibleModule(argument_spec=dict(
        state=dict(type='str', default='present', choices=['present', 'absent']),
        verify=dict(type='bool', default=True),
        verify_timeout=dict(type='int', default=30),
    ), supports_check_mode=True)
    p = module.params
    if p['verify_timeout'] < 1:
        module.fail_json(msg='verify_timeout must be >= 1')
    if not module.get_bin_path('systemctl'):
        module.fail_json(msg='systemctl not found: the agent needs a systemd guest')
    if p['state'] == 'present' and not os.path.exists('/usr/bin/python3'):
        module.fail_json(msg='/usr/bin/python3 not found in the guest: the agent needs Python 3')
    service = _agent.SERVICE_NAME
    try:
        changes = plan(p['state'])
    except (OSError, FleetckptError) as exc:
        module.fail_json(msg='cannot inspect the installed agent: %s' % exc)
    active = systemctl(module, 'is-active', service, check=False)[0] == 0
    enabled = systemctl(module, 'is-enabled', service, check=False)[0] == 0
    if p['state'] == 'present':
        changed = bool(changes) or not active or not enabled
    else:
        changed = bool(changes) or active or enabled
    result = dict(changed=changed, files=changes, version=_agent.AGENT_VERSION)
    if module._diff:
        result['diff'] = {'before': {'files': dict((f, 'present') for f, a in changes.items() if a != 'create'),
                                     'active': active, 'enabled': enabled},
                          'after': {'files': dict((f, 'present') for f, a in changes.items() if a != 'remove'),
                                    'active': p['state'] == 'present', 'enabled': p['state'] == 'present'}}
    if module.check_mode:
        module.exit_json(**result)
    try:
        if p['state'] == 'present':
            apply(changes)
            if changes:
                systemctl(module, 'daemon-reload')
            systemctl(module, 'enable', service)
            systemctl(module, 'restart' if (changes or not active) else 'start', service)
            if p['verify']:
                result['published'] = verify(timeout=p['verify_timeout'])
        else:
            if active or enabled:
                systemctl(module, 'disable', '--now', service, check=False)
            apply(changes)
            if changes:
                systemctl(module, 'daemon-reload')
    except (OSError, FleetckptError) as exc:
        module.fail_json(msg=str(exc), **result)
    module.exit_json(**result)


if __name__ == '__main__':
    main()
