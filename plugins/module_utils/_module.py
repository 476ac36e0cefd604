# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared argument specs for the modules, matching plugins/doc_fragments/_host.py (composition, not a base class)."""

from __future__ import annotations

import signal
import threading

from ansible_collections.fleetckpt.xen.plugins.module_utils._policy import DEFAULTS, check_params
from ansible_collections.fleetckpt.xen.plugins.module_utils._xl import Xl
from ansible_collections.fleetckpt.xen.plugins.module_utils._xenstore import DEFAULT_SOCKET


def host_argument_spec():
    return dict(
        xl_path=dict(type='path', default='xl'),
        xl_timeout=dict(type='int', default=60),
        xenstore_socket=dict(type='path', default=DEFAULT_SOCKET),
    )


def selection_argument_spec():
    return dict(
        name=dict(type='list', elements='str', default=[], aliases=['names']),
        pattern=dict(type='list', elements='str', default=[]),
        query=dict(type='str'),
        exclude=dict(type='list', elements='str', default=[]),
    )


def policy_argument_spec():
    return dict(
        reserve_mib=dict(type='int', default=DEFAULTS['reserve_mib']),
        reserve_pct=dict(type='int', default=DEFAULTS['reserve_pct']),
        floor_mib=dict(type='int', default=DEFAULTS['floor_mib']),
        agent_timeout=dict(type='float', default=2.0),
        agent_max_age=dict(type='int', default=60),
    )


def policy_params(params):
    return dict((k, params[k]) for k in ('reserve_mib', 'reserve_pct', 'floor_mib'))


def memory_options(params):
    """What _checkpoint.plan_memory and balloon_to_plan read, from the parameters of a module that balloons a VM
    down before it saves or moves it (checkpoint, migrate): mode, fallback, the policy, agent and balloon timeouts."""
    return {
        'mode': params['mode'], 'fallback': params['fallback'], 'policy': check_params(policy_params(params)),
        'agent_timeout_s': params['agent_timeout'], 'agent_max_age_s': params['agent_max_age'],
        'balloon_timeout_s': params['balloon_timeout'], 'stall_s': params['stall_timeout'],
        'settle_slack_mib': params['settle_slack_mib'],
    }


def make_xl(module, save_timeout=1800):
    if module.params['xl_timeout'] <= 0:
        module.fail_json(msg='xl_timeout must be > 0')
    return Xl(xl_path=module.params['xl_path'], timeout=module.params['xl_timeout'], save_timeout=save_timeout)


def selection_args(params):
    return dict(names=params['name'], patterns=params['pattern'], query=params['query'], exclude=params['exclude'])


def stop_on_signals(signals=(signal.SIGTERM, signal.SIGHUP)):
    """Turn SIGTERM/SIGHUP into a cancel Event instead of sudden death: work in progress (a save, a balloon)
    finishes and gives the memory back, nothing new starts. Python's default for these signals would kill
    the module between a balloon and its give-back. Returns the Event (its ``reason`` names the signal)."""
    cancel = threading.Event()
    cancel.reason = None

    def handler(signum, frame):
        cancel.reason = signal.Signals(signum).name
        cancel.set()

    for sig in signals:
        signal.signal(sig, handler)
    return cancel
