# Copyright (c) 2026, fleetckpt.xen contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""restore_preflight for a copy under a new name: disks of the image must be mapped to copies."""
from __future__ import annotations

import os
import shutil

import pytest

from ansible_collections.fleetckpt.xen.plugins.module_utils._checkpoint import image_disks, restore_preflight
from ansible_collections.fleetckpt.xen.plugins.module_utils._errors import InvalidInput, PolicyRefused

HEADER = os.path.join(os.path.dirname(__file__), 'data', 'xl-header-4.20.bin')  # g3, saved on the lab
DISK = '/srv/fleetckpt/lab/disks/g3.img'
HOST = {'host': 'xen1', 'xen_version': '4.20.1', 'hw_caps': 'x', 'free_memory_kb': 8 << 20}


@pytest.fixture
def entry(tmp_path):
    image = tmp_path / 'image.xl'
    shutil.copy(HEADER, str(image))
    return {'valid': True, 'id': 'x', 'image_path': str(image),
            'manifest': {'vm': {'name': 'g3'}, 'xen_version': '4.20.1', 'hw_caps': 'x',
                         'memory': {'original_kb': 262144, 'saved_kb': 131072}}}


def test_image_disks_come_from_the_image_header(entry):
    assert [d['pdev_path'] for d in image_disks(entry)] == [DISK]


def test_restore_as_needs_every_writable_disk_mapped(entry):
    with pytest.raises(PolicyRefused, match='share writable disk'):
        restore_preflight(entry, HOST, {'g3'}, restore_as='g3-drill')


def test_restore_as_with_a_mapped_disk_passes_even_beside_the_original(entry, tmp_path):
    copy = tmp_path / 'copy.img'
    copy.write_bytes(b'')
    assert restore_preflight(entry, HOST, {'g3'}, restore_as='g3-drill', disk_map={DISK: str(copy)}) == 'g3-drill'


@pytest.mark.parametrize('disk_map,msg', [
    ({'/nope.img': '/tmp'}, 'does not use'),
    ({DISK: 'relative.img'}, 'absolute path'),
    ({DISK: DISK}, 'a disk of the image itself'),
    ({DISK: '/does/not/exist.img'}, 'does not exist'),
])
def test_bad_disk_maps_are_rejected(entry, disk_map, msg):
    with pytest.raises(InvalidInput, match=msg):
        restore_preflight(entry, HOST, set(), restore_as='g3-drill', disk_map=disk_map)


def test_restore_as_name_already_running_is_refused(entry, tmp_path):
    with pytest.raises(PolicyRefused, match='g3-drill already runs'):
        restore_preflight(entry, HOST, {'g3-drill'}, restore_as='g3-drill', disk_map={DISK: str(tmp_path)})
