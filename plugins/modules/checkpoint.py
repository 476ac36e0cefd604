#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: checkpoint
short_description: Checkpoint Xen VMs to a shared store with memory exclusion, or delete a checkpoint
version_added: 0.1.0
description:
  - Runs on a Xen host (dom0). For each selected VM, with O(mode=vmme) (memory exclusion) asks the guest agent for
    a fresh sample, balloons the VM down to the memory-policy target, waits until the balloon has really reached it,
    saves it with C(xl save) into the store, and gives the memory back. With O(mode=native) it only saves.
  - The memory is given back in a C(finally) block; a failure never leaves a running VM ballooned down.
  - The image is streamed through a pipe (optionally through C(zstd)) and hashed on the way; the checkpoint is
    written as C(<store>/<vm>/.<id>.partial/) and becomes visible as C(<store>/<vm>/<id>/) by one atomic rename once
    its manifest (schema in C(docs/manifest.md)) says complete. Images and manifests are created mode 0600.
  - A per-VM lock in the store keeps two runs from writing the same VM at once, across hosts; retention deletes
    under it too.
  - A save that fails (full store, timeout, error) is stopped so that C(xl) resumes the domain itself; if C(xl save)
    was killed, the module resumes the suspended domain (libxl C(domain_resume)) before giving the memory back.
  - SIGTERM and SIGHUP do not interrupt a VM in progress (its memory is given back as usual); VMs not started yet
    are reported as not started. Before ballooning, each run records the VM's original memory in its partial
    directory; a later run that finds such a record from a run that died gives the memory back first and says so
    in the entry's C(recovered) key.
  - With O(state=absent), deletes checkpoint O(checkpoint_id) of the single VM in O(name).
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
    details:
      - In check mode the agent is queried and the plan (mode, target) is returned; nothing is ballooned or saved.
  diff_mode:
    support: none
  idempotent:
    support: none
    details:
      - Every run with O(state=present) creates a new checkpoint. O(state=absent) is idempotent.
options:
  store:
    description: The checkpoint store, a directory shared by the Xen hosts (normally an NFS mount).
    type: path
    required: true
  init_store:
    description:
      - Create the store's C(.fleetckpt-store) marker when it is missing. Without the marker the module refuses to
        write, which catches an NFS store that is not mounted (an empty mount point).
    type: bool
    default: false
  state:
    description: V(present) creates checkpoints; V(absent) deletes O(checkpoint_id).
    type: str
    choices: [present, absent]
    default: present
  checkpoint_id:
    description: With O(state=absent), the id of the checkpoint to delete.
    type: str
  mode:
    description: V(vmme) balloons down before saving (memory exclusion); V(native) is a plain C(xl save).
    type: str
    choices: [vmme, native]
    default: vmme
  fallback:
    description:
      - What to do with O(mode=vmme) when memory exclusion is impossible for a VM (agent missing, stale or lying,
        ballooning unsafe). V(native) saves it natively and says why; V(fail) fails that VM.
    type: str
    choices: [native, fail]
    default: native
  keep_running:
    description:
      - Keep the VM running after the checkpoint. With V(false) the VM is stopped by the save (host maintenance,
        a cold move).
      - A running VM whose disks are captured (O(disks)) is saved with C(xl save -p), stays paused while its disks
        are snapshotted, then is unpaused; otherwise C(xl save -c).
    type: bool
    default: true
  disks:
    description:
      - How each writable disk is captured with the memory, so that a restore never pairs the memory with a disk
        that moved on. Read-only disks and cdroms are never copied (their identity is recorded).
      - V(auto) picks per disk, before anything is touched - V(qcow2) for qcow2 disks; V(reflink), then V(copy)
        for file disks; V(lvm), then V(copy) for LVs (only V(copy) with O(portable)); refused with the reasons
        when none can work.
      - V(copy) is a sparse copy into the checkpoint (works everywhere, costs the disk's data in pause time and
        space); V(reflink) an instant clone (XFS, btrfs); V(lvm) an LVM snapshot; V(qcow2) an internal snapshot
        C(fleetckpt-<id>) inside a qcow2 disk served by Xen's qdisk backend, taken by the domain's device model
        (QMP) while it is paused; it needs C(qemu-img) on the host (Debian - qemu-utils) for restores and checks.
      - V(none) records only the disk's identity (memory-only checkpoint). For a VM that keeps running it needs
        O(force_memory_only); a restore then refuses once the disk has changed.
      - See the collection's docs/disk-strategies.md for the cost of each.
    type: str
    choices: [auto, copy, reflink, lvm, qcow2, none]
    default: auto
    version_added: 0.2.0
  disk_strategies:
    description: Per-disk strategy by virtual device name (for example V(none) for C(xvdb)); overrides O(disks) for those disks.
    type: dict
    default: {}
    version_added: 0.2.0
  force_memory_only:
    description: Allow O(disks=none) (or V(auto) finding no way to capture a disk) for a VM that keeps running.
    type: bool
    default: false
    version_added: 0.2.0
  portable:
    description:
      - The checkpoint must restore on any host that sees the store - V(auto) then only uses snapshots that land
        in the store (copies, clones on the store's filesystem), not clones or LVs local to this host.
    type: bool
    default: true
    version_added: 0.2.0
  disk_digest:
    description:
      - When the sha256 of disk copies is computed - V(deferred) after the VM is unpaused (shorter pause, the copy is
        read again), V(inline) while copying (in the pause), V(none) not at all.
    type: str
    choices: [deferred, inline, none]
    default: deferred
    version_added: 0.2.0
  lvm_snapshot_size:
    description: Size of a classic LVM snapshot's COW area, in bytes (default 20% of the origin, at least 64 MiB).
    type: int
    version_added: 0.2.0
  compression:
    description: Compress the image with C(zstd) on the fly (the guest stays paused while it is compressed).
    type: str
    choices: [none, zstd]
    default: none
  zstd_level:
    description: zstd compression level.
    type: int
    default: 3
  zstd_threads:
    description: zstd worker threads.
    type: int
    default: 1
  parallel:
    description: How many VMs of this host are checkpointed at once.
    type: int
    default: 1
  keep_last:
    description: Retention, after a successful checkpoint of a VM, keep only its newest N checkpoints.
    type: int
  max_age_days:
    description: Retention, after a successful checkpoint of a VM, delete its checkpoints older than this.
    type: float
  keep_one_valid:
    description: Retention never deletes a VM's newest valid checkpoint unless this is V(false).
    type: bool
    default: true
  lock_timeout:
    description: Seconds to wait for another run's lock on the same VM before failing that VM.
    type: int
    default: 0
  balloon_timeout:
    description: Seconds to wait for a balloon to reach its target.
    type: int
    default: 180
  stall_timeout:
    description: Seconds without 1 MiB of balloon progress after which the balloon counts as stuck.
    type: int
    default: 30
  settle_slack_mib:
    description:
      - A balloon settling above its target by at most this many MiB, or by 25 % of the target when that is more,
        has its target raised to what it reached, and the VM is saved there. Further above, the balloon is stuck
        (O(fallback)).
      - Within this slack a balloon counts as settled once it has not moved for 5 seconds (or O(stall_timeout),
        when shorter), without waiting out O(stall_timeout).
      - A big guest's kernel keeps memory the balloon never takes (60 MiB of an idle 1 GiB PV guest on the lab), so
        such a guest can stop a little above the policy's floor.
    type: int
    default: 8
  save_timeout:
    description: Seconds after which C(xl save) is abandoned (the partial checkpoint is removed).
    type: int
    default: 1800
'''

EXAMPLES = r'''
- name: Checkpoint every VM of this host with memory exclusion, keep 3 per VM
  fleetckpt.xen.checkpoint:
    store: /srv/fleetckpt
    keep_last: 3
  register: ckpt

- name: Native, compressed checkpoint of two VMs, stopping them (host maintenance)
  fleetckpt.xen.checkpoint:
    store: /srv/fleetckpt
    name: [db1, db2]
    mode: native
    compression: zstd
    keep_running: false

- name: Checkpoint a running test VM with its disks (paused while they are copied), for a later revert
  fleetckpt.xen.checkpoint:
    store: /srv/fleetckpt
    name: [ci-runner1]
    disks: copy

- name: Memory-only checkpoint of a running VM (restore refuses once its disk has changed)
  fleetckpt.xen.checkpoint:
    store: /srv/fleetckpt
    name: [web1]
    disks: none
    force_memory_only: true

- name: Delete one checkpoint
  fleetckpt.xen.checkpoint:
    store: /srv/fleetckpt
    name: [web1]
    state: absent
    checkpoint_id: 20261125T134501.123Z-1a2b3c4d
'''

RETURN = r'''
checkpoints:
  description:
    - One entry per selected VM (in check mode, the plan).
    - C(balloon), for a VM ballooned down before its save, says where the balloon started, what the policy asked
      (C(requested_kb)) and the target it was saved at (C(target_kb)); C(adjusted) when it settled above the
      request (O(settle_slack_mib)).
  returned: always
  type: list
  elements: dict
  sample:
    - vm: web1
      host: xen1
      id: 20261125T134501.123Z-1a2b3c4d
      path: /srv/fleetckpt/web1/20261125T134501.123Z-1a2b3c4d
      mode: vmme
      requested_mode: vmme
      fallback_reason: null
      original_kb: 524288
      saved_kb: 196608
      balloon: {start_kb: 524288, requested_kb: 196608, target_kb: 196608, current_kb: 195584, reached: true,
                adjusted: false, elapsed_s: 3.9}
      size_bytes: 201326592
      sha256: 3b0c...
      timings: {query_s: 0.21, balloon_s: 3.9, save_s: 3.1, quiesce_s: 0.05, pause_s: 4.2, disks_s: 4.2,
                disks_finalize_s: 2.0, deflate_s: 1.4, total_s: 15.0}
      still_running: true
      disks:
        - {vdev: xvda, target: /srv/vm/web1.img, strategy: copy, reason: "auto: copy (reflink: ...)",
           size_bytes: 2147483648, allocated_bytes: 292552704, seconds: 4.1, memory_only: false}
      memory_restored: true
      recovered: null
      placement: {vm: web1, host: xen1, event: checkpointed, checkpoint: 20261125T134501.123Z-1a2b3c4d,
                  at: "2026-11-25T13:45:09.000000Z"}
failures:
  description: Entries of RV(checkpoints) that failed, each with C(msg).
  returned: always
  type: list
  elements: dict
  sample: []
deleted:
  description: Checkpoints deleted by retention or by O(state=absent), as C(<vm>/<id>).
  returned: always
  type: list
  elements: str
  sample: [web1/20261120T010000.000Z-0badc0de]
store_initialized:
  description: Whether O(init_store) created the store's marker (in check mode, whether it would).
  returned: always
  type: bool
  sample: false
  version_added: 0.2.0
'''

import os

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import (
    Checkpointer, checkpoint_many, host_facts, planned_disk)
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError, InvalidInput, LockBusy
from ansible_collections.fleetckpt.xen.plugins.module_utils._module import (
    host_argument_spec, make_xl, memory_options, policy_argument_spec, selection_args, selection_argument_spec,
    stop_on_signals)
from ansible_collections.fleetckpt.xen.plugins.module_utils._selection import select_vms
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import (
    MARKER, CheckpointStore, plan_retention, validate_checkpoint_id, validate_vm_name)
from ansible_collections.fleetckpt.xen.plugins.module_utils._xenstore import HAS_PYXS, PYXS_IMPORT_ERROR, XenStore


def _options(params):
    return dict(
        memory_options(params), keep_running=params['keep_running'],
        compression=params['compression'], zstd_level=params['zstd_level'], zstd_threads=params['zstd_threads'],
        lock_timeout_s=params['lock_timeout'], save_timeout_s=params['save_timeout'],
        disks=params['disks'], disk_strategies=_disk_strategies(params['disk_strategies']),
        force_memory_only=params['force_memory_only'], portable=params['portable'],
        disk_digest=params['disk_digest'], lvm_snapshot_size=params['lvm_snapshot_size'],
    )


def _disk_strategies(value):
    choices = ('auto', 'copy', 'reflink', 'lvm', 'qcow2', 'none')
    bad = ['%s=%r' % (k, v) for k, v in sorted(value.items()) if v not in choices]
    if bad:
        raise InvalidInput('disk_strategies: %s (each one of %s)' % (', '.join(bad), ', '.join(choices)))
    return dict(value)


def _check_numbers(module):
    p = module.params
    bad = [k for k in ('parallel', 'balloon_timeout', 'stall_timeout', 'save_timeout', 'zstd_threads') if p[k] < 1]
    bad += [k for k in ('lock_timeout', 'settle_slack_mib') if p[k] < 0]
    if not 1 <= p['zstd_level'] <= 19:
        bad.append('zstd_level (1..19)')
    if bad:
        module.fail_json(msg='out of range: %s' % ', '.join(bad))


def delete_one(module, store):
    names = module.params['name']
    if len(names) != 1 or not module.params['checkpoint_id']:
        module.fail_json(msg='state=absent needs exactly one name and a checkpoint_id')
    vm = validate_vm_name(names[0])
    ckpt_id = validate_checkpoint_id(module.params['checkpoint_id'])
    store.check(writable=not module.check_mode)
    exists = any(e['id'] == ckpt_id for e in store.list(vm))
    if exists and not module.check_mode:
        with store.lock(vm, timeout=module.params['lock_timeout']):
            store.delete(vm, ckpt_id)
    module.exit_json(changed=exists, checkpoints=[], failures=[], deleted=['%s/%s' % (vm, ckpt_id)] if exists else [])


def main():
    argument_spec = host_argument_spec()
    argument_spec.update(selection_argument_spec())
    argument_spec.update(policy_argument_spec())
    argument_spec.update(
        store=dict(type='path', required=True),
        init_store=dict(type='bool', default=False),
        state=dict(type='str', default='present', choices=['present', 'absent']),
        checkpoint_id=dict(type='str'),
        mode=dict(type='str', default='vmme', choices=['vmme', 'native']),
        fallback=dict(type='str', default='native', choices=['native', 'fail']),
        keep_running=dict(type='bool', default=True),
        compression=dict(type='str', default='none', choices=['none', 'zstd']),
        zstd_level=dict(type='int', default=3),
        zstd_threads=dict(type='int', default=1),
        parallel=dict(type='int', default=1),
        keep_last=dict(type='int'),
        max_age_days=dict(type='float'),
        keep_one_valid=dict(type='bool', default=True),
        lock_timeout=dict(type='int', default=0),
        balloon_timeout=dict(type='int', default=180),
        stall_timeout=dict(type='int', default=30),
        settle_slack_mib=dict(type='int', default=8),
        save_timeout=dict(type='int', default=1800),
        disks=dict(type='str', default='auto', choices=['auto', 'copy', 'reflink', 'lvm', 'qcow2', 'none']),
        disk_strategies=dict(type='dict', default={}),
        force_memory_only=dict(type='bool', default=False),
        portable=dict(type='bool', default=True),
        disk_digest=dict(type='str', default='deferred', choices=['deferred', 'inline', 'none']),
        lvm_snapshot_size=dict(type='int'),
    )
    module = AnsibleModule(argument_spec=argument_spec, supports_check_mode=True,
                           required_if=[('state', 'absent', ['checkpoint_id', 'name'])])
    if not HAS_PYXS:
        module.fail_json(msg=missing_required_lib('pyxs'), exception=PYXS_IMPORT_ERROR)
    _check_numbers(module)
    cancel = stop_on_signals()
    params = module.params
    results = []
    deleted = []
    store_initialized = False
    try:
        store = CheckpointStore(params['store'])
        plan_retention([], keep_last=params['keep_last'], max_age_days=params['max_age_days'])  # validates
        if params['init_store']:
            if module.check_mode:
                store_initialized = not os.path.isfile(os.path.join(store.root, MARKER))
            else:
                store_initialized = store.init()
        if params['state'] == 'absent':
            delete_one(module, store)
        options = _options(params)
        xl = make_xl(module, save_timeout=params['save_timeout'])
        host = host_facts(xl)
        selected = select_vms(list(xl.domains().values()), **selection_args(params))
        if module.check_mode and params['init_store']:
            store.require_marker = False  # the real run would create the marker
        if not (module.check_mode and params['init_store'] and not os.path.isdir(store.root)):
            store.check(writable=not module.check_mode)

        def worker(dom):
            # one XenStore connection per worker thread
            with XenStore(params['xenstore_socket']) as xs:
                ckpt = Checkpointer(xl, xs, store, options)
                plan = ckpt.plan(dom)
                if module.check_mode:
                    disk_plans = ckpt.plan_disks(dom, store.root)  # refuses here as the real run would
                    return {'vm': dom['name'], 'host': host['host'], 'mode': plan['mode'],
                            'requested_mode': plan['requested_mode'], 'fallback_reason': plan['reason'],
                            'original_kb': dom['current_kb'], 'saved_kb': plan['target_kb'] or dom['current_kb'],
                            'disks': [planned_disk(d) for d in disk_plans],
                            'changed': True}
                return ckpt.run(dom, host, plan)

        results = checkpoint_many(selected, worker, params['parallel'], cancel=cancel)
        if not module.check_mode:
            for res in results:
                if res.get('failed'):
                    continue
                try:
                    # under the VM's lock: a concurrent run must not see its checkpoints vanish mid-way
                    with store.lock(res['vm'], timeout=params['lock_timeout']):
                        entries = store.list(res['vm'])
                        for ckpt_id in plan_retention(entries, keep_last=params['keep_last'],
                                                      max_age_days=params['max_age_days'],
                                                      keep_one_valid=params['keep_one_valid']):
                            if store.delete(res['vm'], ckpt_id):
                                deleted.append('%s/%s' % (res['vm'], ckpt_id))
                except LockBusy as exc:
                    res['retention_skipped'] = str(exc)
    except FleetckptError as exc:
        module.fail_json(msg=str(exc), checkpoints=results, failures=[r for r in results if r.get('failed')], deleted=deleted)
    failed = [r for r in results if r.get('failed')]
    out = dict(changed=any(r.get('changed') for r in results) or bool(deleted) or store_initialized, checkpoints=results,
               failures=failed, deleted=deleted, store_initialized=store_initialized)
    if failed:
        module.fail_json(msg='checkpoint failed for %s' % '; '.join(r['msg'] for r in failed), **out)
    module.exit_json(**out)


if __name__ == '__main__':
    main()
