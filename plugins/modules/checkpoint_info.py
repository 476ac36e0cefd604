#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r'''
module: checkpoint_info
short_description: List and verify the checkpoints in a fleetckpt store
version_added: 0.1.0
description:
  - Lists the checkpoints in a store (any host that mounts it; no Xen needed), says which are valid and why the
    others are not, and optionally verifies every image's sha256 against its manifest.
  - A checkpoint is valid when its manifest is readable, of a known schema, says V(complete), names this
    checkpoint, and the image's size (and with O(verify_checksum), its sha256) matches. Interrupted checkpoints
    (C(.<id>.partial) directories) are counted in RV(partials) and never listed as checkpoints.
author:
  - fleetckpt.xen contributors (@fleetckpt)
extends_documentation_fragment:
  - fleetckpt.xen._attributes
  - fleetckpt.xen._attributes.INFO_MODULE
options:
  store:
    description: The checkpoint store.
    type: path
    required: true
  vm:
    description: Only these VMs.
    type: list
    elements: str
    default: []
  source_host:
    description: Only checkpoints written by this host (the manifest's C(source_host)).
    type: str
  valid:
    description: Only valid (V(true)) or only invalid (V(false)) checkpoints.
    type: bool
  older_than_days:
    description: Only checkpoints older than this.
    type: float
  newer_than_days:
    description: Only checkpoints newer than this.
    type: float
  verify_checksum:
    description: Read every image and disk copy and compare its sha256 with the manifest (reads the whole store).
    type: bool
    default: false
  include_manifest:
    description: Return each checkpoint's whole manifest (including the domain config) instead of a summary.
    type: bool
    default: false
'''

EXAMPLES = r'''
- name: Verify every checkpoint of web1
  fleetckpt.xen.checkpoint_info:
    store: /srv/fleetckpt
    vm: [web1]
    verify_checksum: true
  register: info

- name: Fail when any checkpoint is corrupt
  ansible.builtin.assert:
    that: info.checkpoints | rejectattr('valid') | list | length == 0
'''

RETURN = r'''
checkpoints:
  description: Matching checkpoints, newest first per VM.
  returned: success
  type: list
  elements: dict
  contains:
    disks:
      description:
        - Per disk of a valid checkpoint, how it was captured (C(strategy)), the bytes its snapshot takes and where
          (C(checkpoint), C(path) beside the disk, C(lv), C(origin) for memory-only), and for a memory-only disk
          C(changed_since) - why it is believed changed since the checkpoint, as seen from this host.
        - V(null) for checkpoints made before 0.2.0 (no disk records).
      type: list
      elements: dict
      version_added: 0.2.0
    disk_bytes:
      description: Bytes the checkpoint's disk snapshots take (in the checkpoint and outside it).
      type: int
      version_added: 0.2.0
    restorable:
      description: V(false) when a memory-only disk changed since the checkpoint - a restore is then refused.
      type: bool
      version_added: 0.2.0
    last_drill:
      description:
        - The last restore drill of this checkpoint (M(fleetckpt.xen.restore) O(fleetckpt.xen.restore#module:drill=true)),
          or V(null) when none is recorded. C(ok), C(at), C(host), C(checks) (restored, running, memory_restored,
          agent), C(problems), C(seconds).
      type: dict
      version_added: 0.2.0
  sample:
    - vm: web1
      id: 20261125T134501.123Z-1a2b3c4d
      valid: true
      problems: []
      checksum_verified: true
      created: "2026-11-25T13:45:01.000000Z"
      source_host: xen1
      mode: vmme
      compression: none
      size_bytes: 201326592
      original_kb: 524288
      saved_kb: 196608
      path: /srv/fleetckpt/web1/20261125T134501.123Z-1a2b3c4d
      disks:
        - {vdev: xvda, target: /srv/vm/web1.img, strategy: copy, bytes: 292552704, where: checkpoint,
           memory_only: false, changed_since: null}
      disk_bytes: 292552704
      restorable: true
      last_drill: {checkpoint: 20261125T134501.123Z-1a2b3c4d, host: xen2, at: "2026-11-25T15:02:11.000000Z",
                   name: web1-drill, ok: true, checks: {restored: true, running: true, memory_restored: true, agent: true},
                   problems: [], seconds: 41.3}
partials:
  description: Leftover directories of interrupted checkpoints, as C(<vm>/<directory>); never valid.
  returned: success
  type: list
  elements: str
  sample: []
placements:
  description:
    - Per VM of the listing, where this collection last put it (its C(placement.json)), or no entry when none is
      recorded. C(event) is V(checkpointed) (it ran on C(host) and kept running), V(stopped) (saved and stopped there)
      or V(restored) (restored onto C(host), which the checkpoints' C(source_host) cannot tell).
    - M(fleetckpt.xen.restore) writes it after a restore (not for a copy restored under another name), and
      M(fleetckpt.xen.checkpoint) after each checkpoint. The DR evacuation of the restore role uses it.
  returned: success
  type: dict
  version_added: 0.2.0
  sample:
    web1: {vm: web1, host: xen2, event: restored, checkpoint: 20261125T134501.123Z-1a2b3c4d,
           at: "2026-11-25T15:02:11.000000Z"}
store:
  description: The store's marker contents and free space.
  returned: success
  type: dict
  sample: {path: /srv/fleetckpt, marker: {store_id: 9f2c41d0aa6b7e13}, free_bytes: 53687091200}
'''

import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.fleetckpt.xen.plugins.module_utils import _disks
from ansible_collections.fleetckpt.xen.plugins.module_utils._drill import last_drill
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import FleetckptError
from ansible_collections.fleetckpt.xen.plugins.module_utils._store import CheckpointStore, id_time


def summarize(entry, include_manifest, store):
    manifest = entry.get('manifest') or {}
    out = dict((k, entry.get(k)) for k in ('vm', 'id', 'path', 'valid', 'problems', 'checksum_verified', 'created'))
    out['last_drill'] = last_drill(store, entry['vm'], entry['id'])
    if include_manifest:
        out['manifest'] = manifest
        return out
    memory = manifest.get('memory') or {}
    image = manifest.get('image') or {}
    out.update(source_host=manifest.get('source_host'), mode=manifest.get('mode'), compression=manifest.get('compression'),
               size_bytes=image.get('size_bytes'), original_kb=memory.get('original_kb'), saved_kb=memory.get('saved_kb'),
               xen_version=manifest.get('xen_version'), timings=manifest.get('timings'))
    if entry.get('valid'):
        out.update(_disks.describe(manifest.get('disks'), entry['path']) or {'disks': None, 'restorable': True})
    return out


def main():
    module = AnsibleModule(argument_spec=dict(
        store=dict(type='path', required=True),
        vm=dict(type='list', elements='str', default=[]),
        source_host=dict(type='str'),
        valid=dict(type='bool'),
        older_than_days=dict(type='float'),
        newer_than_days=dict(type='float'),
        verify_checksum=dict(type='bool', default=False),
        include_manifest=dict(type='bool', default=False),
    ), supports_check_mode=True)
    p = module.params
    now = time.time()
    try:
        store = CheckpointStore(p['store'])
        store.check(writable=False)
        entries = []
        names = p['vm'] or store.vms()
        partials = []
        placements = {}
        for vm in names:
            entries.extend(store.list(vm, verify_checksum=p['verify_checksum']))
            partials.extend('%s/%s' % (vm, d) for d in store.partials(vm))
            placement = store.placement(vm)
            if placement:
                placements[vm] = placement
    except FleetckptError as exc:
        module.fail_json(msg=str(exc))
    selected = []
    for entry in entries:
        manifest = entry.get('manifest') or {}
        age_days = (now - id_time(entry['id'])) / 86400.0
        if p['source_host'] is not None and manifest.get('source_host') != p['source_host']:
            continue
        if p['valid'] is not None and entry['valid'] != p['valid']:
            continue
        if p['older_than_days'] is not None and age_days <= p['older_than_days']:
            continue
        if p['newer_than_days'] is not None and age_days >= p['newer_than_days']:
            continue
        selected.append(summarize(entry, p['include_manifest'], store))
    module.exit_json(changed=False, checkpoints=selected, partials=partials, placements=placements,
                     store={'path': store.root, 'marker': store.marker(), 'free_bytes': store.free_bytes()})


if __name__ == '__main__':
    main()
