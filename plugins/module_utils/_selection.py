# -*- coding: utf-8 -*-
# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Select VMs by exact names, shell-style globs and a JMESPath expression over per-VM facts, minus exclusions."""

from __future__ import annotations

import fnmatch
import traceback

try:
    import jmespath
    HAS_JMESPATH = True
    JMESPATH_IMPORT_ERROR = None
except ImportError:  # pragma: no cover - depends on the host
    jmespath = None
    HAS_JMESPATH = False
    JMESPATH_IMPORT_ERROR = traceback.format_exc()

from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput

DOM0_NAME = 'Domain-0'


def select_vms(facts, names=None, patterns=None, query=None, include_dom0=False, exclude=None):
    """Return the selected subset of ``facts`` (list of dicts with a ``name``), sorted by name.

    With no criterion every domU is selected. ``names`` must all exist (an unknown name is an error,
    not a silent no-op); ``patterns`` are globs; ``query`` is a JMESPath expression evaluated on the
    list of facts that must return a list of fact dicts or of names. Criteria combine as a union.
    ``exclude`` (globs) then removes VMs from the result, whatever selected them; an exclusion that matches
    nothing is not an error (a fleet-wide "everything but the database VMs" applies to hosts without any).
    """
    pool = [f for f in facts if include_dom0 or (f.get('name') != DOM0_NAME and f.get('domid') != 0)]
    by_name = dict((f['name'], f) for f in pool)
    for pattern in exclude or []:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidInput('exclude: each entry must be a non-empty glob, got %r' % (pattern,))
    if not names and not patterns and not query:
        chosen = set(by_name)
    else:
        unknown = [n for n in (names or []) if n not in by_name]
        if unknown:
            raise InvalidInput('no such VM: %s (known: %s)' % (', '.join(sorted(unknown)), ', '.join(sorted(by_name)) or 'none'))
        chosen = set(names or [])
        for pattern in patterns or []:
            chosen.update(fnmatch.filter(by_name, pattern))
        if query:
            chosen.update(_query_names(pool, query))
    for pattern in exclude or []:
        chosen.difference_update(fnmatch.filter(chosen, pattern))
    return [by_name[n] for n in sorted(chosen)]


def _query_names(pool, query):
    if not HAS_JMESPATH:
        raise InvalidInput('the jmespath Python library is required on the Xen host for a VM query')
    try:
        result = jmespath.search(query, pool)
    except jmespath.exceptions.JMESPathError as exc:
        raise InvalidInput('invalid JMESPath query %r: %s' % (query, exc))
    if result is None:
        return []
    if not isinstance(result, list):
        raise InvalidInput('JMESPath query %r must return a list of VMs or names, got %s' % (query, type(result).__name__))
    names = []
    for item in result:
        if isinstance(item, dict) and isinstance(item.get('name'), str):
            names.append(item['name'])
        elif isinstance(item, str):
            names.append(item)
        else:
            raise InvalidInput('JMESPath query %r returned %r, not a VM or a name' % (query, item))
    known = set(f['name'] for f in pool)
    return [n for n in names if n in known]
