# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Moving VMs between the lab's hosts (the rebalance role): the migration keys' files, and what a move must keep in
the guest (test_playbooks.py's cold moves, test_live_move.py's live one)."""
from __future__ import annotations

import secrets

MIGRATION_FILES = ('/root/.ssh/fleetckpt_migrate', '/root/.ssh/fleetckpt_migrate.pub', '/etc/fleetckpt/migrate_known_hosts',
                   '/usr/local/lib/fleetckpt/migrate_gate.py')
HOSTS = ('xen1', 'xen2')


def remove_migration_setup(lab):
    for host in HOSTS:
        lab.sh(host, 'rm -f %s; sed -i "/ fleetckpt-migrate@/d" /root/.ssh/authorized_keys' % ' '.join(MIGRATION_FILES),
               check=False)


def keep_in_guest(lab, vm, via):
    """A process and a file in memory (/dev/shm) in the guest, which a move must keep; returns (token, pid)."""
    token = secrets.token_hex(8)
    lab.sh(vm, 'echo %s > /dev/shm/fleetckpt-move; setsid sleep 100000 > /dev/null 2>&1 < /dev/null & '
               'echo $! > /dev/shm/fleetckpt-move.pid' % token, via=via)
    return token, lab.sh(vm, 'cat /dev/shm/fleetckpt-move.pid', via=via).stdout.strip()


def kept_in_guest(lab, vm, via, kept):
    """Whether the guest still has what keep_in_guest gave it (``kept``): the file's token, the process alive."""
    lab.drop(vm)
    out = lab.sh(vm, 'cat /dev/shm/fleetckpt-move; kill -0 %s && echo alive' % kept[1], via=via, check=False).stdout
    return out.split() == [kept[0], 'alive']


def clean_guest(lab, vm):
    where = lab.locate_guest(vm)
    if where:
        lab.drop(vm)
        lab.sh(vm, 'kill $(cat /dev/shm/fleetckpt-move.pid); rm -f /dev/shm/fleetckpt-move*', via=where, check=False)
