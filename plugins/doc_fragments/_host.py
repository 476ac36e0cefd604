# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:

    # Options of every module that runs on a Xen host (dom0).
    DOCUMENTATION = r'''
options:
  xl_path:
    description: Path or name of the C(xl) toolstack command.
    type: path
    default: xl
  xl_timeout:
    description: Seconds after which an ordinary C(xl) call (list, info, mem-set) is abandoned with an error.
    type: int
    default: 60
  xenstore_socket:
    description: Unix socket of C(xenstored) on the Xen host.
    type: path
    default: /var/run/xenstored/socket
requirements:
  - Runs on a Xen host (dom0) with the C(xl) toolstack, as root.
  - The Python library C(pyxs) on the Xen host.
notes:
  - XAPI-managed pools (XCP-ng, XenServer) are out of scope; this targets hosts managed with C(xl).
'''

    # VM selection options.
    SELECTION = r'''
options:
  name:
    description:
      - Exact VM (domain) names. An unknown name is an error.
      - With none of O(name), O(pattern) and O(query), every domU on the host is selected.
    type: list
    elements: str
    default: []
    aliases: [names]
  pattern:
    description: Shell-style globs matched against domain names (for example V(web-*)).
    type: list
    elements: str
    default: []
  query:
    description:
      - A JMESPath expression evaluated on the list of per-VM facts (as returned by M(fleetckpt.xen.memory_pressure)
        in RV(fleetckpt.xen.memory_pressure#module:vms), without agent data); it must return a list of VMs or names.
      - For example V([?mem_mib > `512`]).
    type: str
  exclude:
    description:
      - Shell-style globs of domain names to leave out, whatever selected them (also when every domU is selected).
      - An exclusion that matches no VM is not an error.
    type: list
    elements: str
    default: []
    version_added: 0.2.0
'''

    # The memory policy.
    POLICY = r'''
options:
  reserve_mib:
    description:
      - Minimum reserve added on top of Committed_AS, kernel memory and the kernel's own memory, in MiB.
      - The default is measured (docs/benchmarks.md, reserve calibration) on a 512 MB guest holding 70 % of its RAM
        in anonymous memory. With 16 MiB or more, the balloon reached its target in about a second. With 8 MiB or
        none, it stopped a few MiB short and only settled after 13 to 19 s. 32 MiB leaves twice the knee.
    type: int
    default: 32
  reserve_pct:
    description:
      - Reserve as a percentage of the VM's static maximum; the larger of the two reserves is used.
      - At the default, O(reserve_mib) decides up to about 1 GiB of static maximum and the percentage above it.
    type: int
    default: 3
  floor_mib:
    description: Never balloon a VM below this many MiB (measured on the lab, see the README).
    type: int
    default: 128
  agent_timeout:
    description: Seconds to wait for the guest agent to answer a fresh-sample request.
    type: float
    default: 2.0
  agent_max_age:
    description: Seconds after which unrefreshed agent data counts as stale when the agent did not answer.
    type: int
    default: 60
'''
