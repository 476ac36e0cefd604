#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: restore
short_description: Restore a Xen VM from a checkpoint in the shared store and give its memory back
version_added: 0.1.0
description:
  - Runs on any Xen host (dom0) that sees the store. Picks checkpoint O(checkpoint_id) of VM O(vm), or its latest
    valid one, and before touching the host verifies the image's sha256 against the manifest, that no domain of that
    name runs here, that this host's Xen is not older than the saving host's and its CPU features match, and that the
    host has enough free memory for the VM with its memory given back.
  - Then runs C(xl restore) (decompressing zstd images through a pipe), sets the VM's memory back to the original
    recorded in the manifest and waits for the balloon, and waits for the guest agent to publish again (a restored
    domain has a new domid and empty agent keys).
  - Never restore a VM that still runs on another host on the same shared disk; this module can only check the
    local host (the C(dr_restore) playbook checks every host).
  - With O(restore_as) the checkpoint comes back as a copy under another name and a new uuid, beside the original
    (restore drills, forensics). The domain config stored in the image is rewritten on the way to C(xl restore);
    every writable disk must then be mapped to a copy with O(disk_map), because two running domains on one disk
    corrupt it.
author:
  - fleetckpt.xen contributors (@fleetckpt)
extends_documentation_fragment:
  - fleetckpt.xen._attributes
  - fleetckpt.xen._host
attributes:
  check_mode:
    support: full
    details:
      - Check mode runs every preflight check, including the checksum, and restores nothing.
  diff_mode:
    support: none
  idempotent:
    support: partial
    details:
      - With O(if_running=skip), a rerun finds the VM running and changes nothing.
options:
  vm:
    description: Name of the VM to restore.
    type: str
    required: true
  store:
    description: The checkpoint store.
    type: path
    required: true
  checkpoint_id:
    description: Checkpoint to restore; by default the VM's newest valid checkpoint.
    type: str
  paused:
    description: Leave the restored domain paused (C(xl restore -p)); its memory target is set, the guest fills it once unpaused.
    type: bool
    default: false
  if_running:
    description:
      - What to do when a domain named O(vm) (or O(restore_as)) already runs on this host.
      - V(fail) refuses before anything is read; V(skip) changes nothing.
      - V(replace) reverts it (a CI job putting its test VM back to a snapshot). Every check passes first,
        counting the memory the running domain frees. Then that domain is destroyed, and the checkpoint is
        restored in its place. Its state since the checkpoint is discarded, which is what was asked.
        If the restore then fails, the VM is down, and the error says so.
    type: str
    choices: [fail, skip, replace]
    default: fail
    version_added: 0.2.0
  ignore_cpu_mismatch:
    description: Restore even when this host's CPU features (C(xl info) hw_caps) differ from the saving host's.
    type: bool
    default: false
  restore_timeout:
    description: Seconds after which C(xl restore) is abandoned.
    type: int
    default: 1800
  balloon_timeout:
    description: Seconds to wait for the memory to be given back.
    type: int
    default: 180
  wait_agent:
    description: Seconds to wait for the guest agent to publish after the restore; V(0) does not wait.
    type: int
    default: 60
  restore_as:
    description:
      - Restore under this name instead of the VM's own, with a new uuid. Same rules as VM names (letters, digits,
        C(._+-), at most 64 characters).
      - Every writable disk must get its own copy - from the checkpoint's disk snapshots (O(disk_mode=clone), the
        default then) or from O(disk_map).
    type: str
    version_added: 0.2.0
  disk_map:
    description:
      - Disks to use instead of the ones recorded in the image, mapping each image disk path to the path to use. Each target must
        exist and must not be one of the image's own disks.
      - Disks named here are left out of O(disk_mode).
    type: dict
    default: {}
    version_added: 0.2.0
  disk_mode:
    description:
      - What the restore does with the disk snapshots the checkpoint holds (see the collection's docs/disk-strategies.md).
      - V(revert) (default when restoring the VM under its own name) puts the checkpoint's content back onto the
        VM's own disk paths; the checkpoint keeps its snapshots.
      - V(clone) (default with O(restore_as)) gives the restored VM new working disks made from the snapshots, in
        O(disk_work_dir) or beside the original disks, named C(<name>.<vdev>.<time>.img).
      - V(consume) runs the restored VM on the snapshots themselves (no copy); the checkpoint is then marked
        consumed and is no longer valid.
      - A memory-only disk (strategy V(none)) is used where it is; the restore is refused when that disk changed
        since the checkpoint, unless O(force_changed_disks).
      - Checkpoints made before version 0.2.0 have no disk records; their disks are used where they are.
    type: str
    choices: [revert, clone, consume]
    version_added: 0.2.0
  disk_work_dir:
    description: Where O(disk_mode=clone) puts the working disks (default - beside each original disk).
    type: path
    version_added: 0.2.0
  force_changed_disks:
    description: Restore a memory-only checkpoint even though its disk changed since (the guest may then find its
      filesystem inconsistent with its memory).
    type: bool
    default: false
    version_added: 0.2.0
  drill:
    description:
      - A restore drill, which proves the checkpoint restores without touching the VM it was taken of. It restores
        the checkpoint as a copy named O(restore_as) (default C(<vm>-drill)), with a new uuid, on working copies of
        its disks (O(disk_mode=clone)), without network and not paused. It then checks that the copy runs, got
        its memory back and that its guest agent publishes within O(wait_agent) seconds.
      - The copy is then destroyed and its working disks are removed, whatever happened. The verdict is recorded
        beside the checkpoint's manifest (C(drill.json)), and M(fleetckpt.xen.checkpoint_info) reports it as
        C(last_drill). The module fails when the drill fails, with the record in RV(drill).
    type: bool
    default: false
    version_added: 0.2.0
  network:
    description: V(false) restores the domain without its network interfaces (an isolated copy).
    type: bool
    default: true
    version_added: 0.2.0
'''

EXAMPLES = r'''
- name: Restore the newest valid checkpoint of web1 on this host
  fleetckpt.xen.restore:
    vm: web1
    store: /srv/fleetckpt

- name: Restore one given checkpoint, paused
  fleetckpt.xen.restore:
    vm: web1
    store: /srv/fleetckpt
    checkpoint_id: 20261125T134501.123Z-1a2b3c4d
    paused: true

- name: Revert a running test VM to its latest checkpoint, memory and disk (its state since is discarded)
  fleetckpt.xen.restore:
    vm: ci-runner1
    store: /srv/fleetckpt
    disk_mode: revert
    if_running: replace

- name: Drill the newest checkpoint of web1 (a copy comes up without network, is checked and destroyed)
  fleetckpt.xen.restore:
    vm: web1
    store: /srv/fleetckpt
    drill: true
  register: drill

- name: Restore a copy of web1 beside the running original, on a copy of its disk, without network
  fleetckpt.xen.restore:
    vm: web1
    store: /srv/fleetckpt
    restore_as: web1-drill
    disk_map:
      /srv/vm/web1.img: /srv/scratch/web1-drill.img
    network: false
'''

RETURN = r'''
restored:
  description: What was restored (in check mode, what would be).
  returned: success
  type: dict
  sample:
    vm: web1
    checkpoint: 20261125T134501.123Z-1a2b3c4d
    domid: 7
    memory_kb: 524288
    memory_restored: true
    agent: ok
    source_vm: web1
    network: true
    timings: {verify_s: 3.2, restore_s: 4.7, deflate_s: 2.5, total_s: 9.1}
    replaced: null
    placement: {vm: web1, host: xen2, event: restored, checkpoint: 20261125T134501.123Z-1a2b3c4d,
                at: "2026-11-25T15:02:11.000000Z"}
drill:
  description: With O(drill=true), the drill's record (also written beside the checkpoint's manifest).
  returned: when O(drill=true), outside check mode
  type: dict
  version_added: 0.2.0
  sample:
    checkpoint: 20261125T134501.123Z-1a2b3c4d
    host: xen1
    at: "2026-11-25T15:02:11.000000Z"
    name: web1-drill
    ok: true
    checks: {restored: true, running: true, memory_restored: true, agent: true}
    problems: []
    seconds: 41.3
'''

import time

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import (
    destroy_replaced, host_facts, plan_restore_disks, record_placement, refuse_if_running, replaced_facts, replacing,
    restore_checkpoint, restore_preflight)
from ansible_collections.fleetckpt.xen.plugins.module_utils._drill import drill_name, drill_options, record_drill, run_drill
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
from ansible_collections.fleetckpt.xen.plugins.module_utils._module import host_argument_spec, make_xl
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import (
    CheckpointStore, validate_checkpoint_id, validate_vm_name)
from ansible_collections.fleetckpt.xen.plugins.module_utils._xenstore import HAS_PYXS, PYXS_IMPORT_ERROR, XenStore


def main():
    argument_spec = host_argument_spec()
    argument_spec.update(
        vm=dict(type='str', required=True),
        store=dict(type='path', required=True),
        checkpoint_id=dict(type='str'),
        paused=dict(type='bool', default=False),
        if_running=dict(type='str', default='fail', choices=['fail', 'skip', 'replace']),
        ignore_cpu_mismatch=dict(type='bool', default=False),
        restore_timeout=dict(type='int', default=1800),
        balloon_timeout=dict(type='int', default=180),
        wait_agent=dict(type='int', default=60),
        restore_as=dict(type='str'),
        disk_map=dict(type='dict', default={}),
        disk_mode=dict(type='str', choices=['revert', 'clone', 'consume']),
        disk_work_dir=dict(type='path'),
        force_changed_disks=dict(type='bool', default=False),
        network=dict(type='bool', default=True),
        drill=dict(type='bool', default=False),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True)
    if not HAS_PYXS:
        module.fail_json(msg=missing_required_lib('pyxs'), exception=PYXS_IMPORT_ERROR)
    p = module.params
    if p['restore_timeout'] < 1 or p['balloon_timeout'] < 1 or p['wait_agent'] < 0:
        module.fail_json(msg='restore_timeout and balloon_timeout must be >= 1, wait_agent >= 0')
    if p['drill'] and p['if_running'] == 'replace':
        module.fail_json(msg='a drill restores a copy beside the VM: if_running=replace does not apply')
    try:
        vm = validate_vm_name(p['vm'])
        restore_as = validate_vm_name(p['restore_as']) if p['restore_as'] is not None else None
        if p['drill']:
            restore_as = validate_vm_name(drill_name(vm, restore_as))
        target = restore_as or vm
        store = CheckpointStore(p['store'])
        store.check(writable=False)
        xl = make_xl(module, save_timeout=p['restore_timeout'])
        running = xl.list_plain()
        if target in running and p['if_running'] == 'skip':
            module.exit_json(changed=False, restored={'vm': target, 'skipped': 'a domain named %s already runs here' % target,
                                                      'domid': running[target]['domid']})
        # the domain a replace destroys once every check passed (None: nothing to replace)
        replaces = running.get(target) if p['if_running'] == 'replace' else None
        if replaces is None:
            refuse_if_running(target, running)  # before reading the whole image and disk copies for their checksums
        # disk copies are verified while the restore copies them (read once), unless it runs on them (consume)
        deep_disks = p['disk_mode'] == 'consume'
        verify_t0 = time.monotonic()
        if p['checkpoint_id']:
            entry = store.inspect(vm, validate_checkpoint_id(p['checkpoint_id']), verify_checksum=True,
                                  verify_disks=deep_disks)
        else:
            entry = store.latest_valid(vm, verify_checksum=True, verify_disks=deep_disks)
            if entry is None:
                invalid = store.list(vm, verify_checksum=True)
                module.fail_json(msg='no valid checkpoint of %s in %s%s' % (
                    vm, store.root, (' (%d invalid: %s)' % (len(invalid), '; '.join(
                        '%s: %s' % (e['id'], ', '.join(e['problems'])) for e in invalid[:5]))) if invalid else ''))
        verify_s = round(time.monotonic() - verify_t0, 3)  # reading the whole image (and disk copies) for checksums
        host = host_facts(xl)
        if replaces is not None:
            host = replacing(host, replaces)
            running = dict((name, dom) for name, dom in running.items() if name != target)
        options = {'paused': p['paused'], 'restore_timeout_s': p['restore_timeout'],
                   'balloon_timeout_s': p['balloon_timeout'], 'wait_agent_s': p['wait_agent'],
                   'restore_as': restore_as, 'disk_map': p['disk_map'], 'network': p['network'],
                   'disk_mode': p['disk_mode'], 'disk_work_dir': p['disk_work_dir'],
                   'force_changed_disks': p['force_changed_disks']}
        if p['drill']:
            options = drill_options(options)
        if entry and entry.get('valid'):
            options['disk_plan'] = plan_restore_disks(entry, options, host['host'])
        restore_preflight(entry, host, set(running), ignore_cpu_mismatch=p['ignore_cpu_mismatch'], restore_as=restore_as,
                          disk_map=p['disk_map'], disk_plan=options.get('disk_plan'))
        if module.check_mode:
            plan = options.get('disk_plan')
            module.exit_json(changed=True, restored={'vm': target, 'source_vm': vm, 'checkpoint': entry['id'],
                                                     'checksum_verified': True, 'replaced': replaced_facts(replaces),
                                                     'disks': {'mode': plan['mode'], 'actions': plan['actions'],
                                                               'disk_map': plan['disk_map']} if plan else None})
        if p['drill']:
            with XenStore(p['xenstore_socket']) as xs:
                record = run_drill(xl, entry, options, lambda x, e, o: restore_checkpoint(x, e, o, xs=xs), host['host'])
            record_drill(store, vm, record)
            if not record['ok']:
                module.fail_json(msg='drill of %s/%s FAILED: %s' % (vm, entry['id'], '; '.join(record['problems'])),
                                 drill=record, changed=True)
            module.exit_json(changed=True, drill=record)
        if replaces is not None:
            destroy_replaced(xl, target, replaces)
        try:
            with XenStore(p['xenstore_socket']) as xs:
                result = restore_checkpoint(xl, entry, options, xs=xs)
        except FleetckptError as exc:
            if replaces is None:
                raise
            raise FleetckptError('%s (%s, domid %d, was destroyed to be replaced, as if_running=replace asks: it is '
                                 'DOWN now; restore it again once the cause is mended)' % (exc, target, replaces['domid']))
        result['replaced'] = replaced_facts(replaces)
        result['timings']['verify_s'] = verify_s
        if not restore_as:  # a copy under another name leaves the original's placement alone
            result['placement'] = record_placement(store, vm, host['host'], 'restored', entry['id'])
            if result['placement'] is None:
                module.warn('the VM is restored, but its placement could not be recorded in %s (read-only store?): '
                            'a later dr_restore of this host will not know it runs here' % store.root)
    except FleetckptError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=True, restored=result)


if __name__ == '__main__':
    main()
