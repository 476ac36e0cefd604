"""End-to-end tests against the real Xen lab (tests/lab): two nested Xen hosts, an NFS store, 4 PV guests.

The session fixture `lab` brings the lab up with tests/lab/labctl.py (or reuses a healthy running one)
and returns a `lablib.Lab`: `.state` (the lab state file), `.sh(name, cmd)` / `.try_sh(...)` on hosts
(xen1, xen2) and guests (g1..g4), `.locate_guest(name)`, `.inventory_path`, `.key_path`, `.store`.
If the lab cannot start, the tests FAIL with the reason (they are never skipped).
Set FLEETCKPT_LAB_DOWN_AFTER=1 to stop the lab when the session ends (default: leave it up for reuse).

`make e2e` brings the lab up first, then runs one pytest per Xen host at once (`--lab-host xen1|xen2`,
tests/e2e/run-per-host.sh), so the two emulated hosts (one CPU core each) work at the same time:
test_ci_snapshot.py, test_faults.py and test_local_disks.py use xen1 with g1/g2, every other file uses xen2 with g3/g4 (reading xen1, and moving VMs onto
it under `lablib.host_memory_lock`). With --lab-host the `lab` fixture only attaches to the running lab: it
never starts or repairs one, since a repair would restart a guest the other process stopped on purpose.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_E2E_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(_E2E_DIR.parent / "lab"))

import lablib  # noqa: E402
import labctl  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--lab-host", choices=[h.name for h in lablib.HOSTS], default=None,
                     help="run only the suites of this Xen host, against the running lab (make e2e runs one pytest "
                          "per host at once; see tests/e2e/run-per-host.sh)")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test against the real Xen lab (tests/lab); slow, needs root")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)
    # the lab's own health checks first: a product test should never be the first to meet a broken lab
    items.sort(key=lambda item: 0 if Path(str(item.fspath)).name == "test_lab_smoke.py" else 1)
    only = config.getoption("--lab-host")
    if only:
        keep = [item for item in items if suite_host(item) == only]
        config.hook.pytest_deselected(items=[item for item in items if suite_host(item) != only])
        items[:] = keep


# files of xen1's suite (g1, g2), in name order: the CI-snapshot and drill playbooks on g1's NFS disk, the faults, then
# the local reflink/LVM disks. The local disks come last: their test installs XFS and LVM tools in xen1's dom0
# (lablib.Lab.local_storage), so every test before it runs on the dom0 it always had.
XEN1_FILES = ("test_ci_snapshot.py", "test_faults.py", "test_live_move.py", "test_local_disks.py")
# Out of CI (collected only with FLEETCKPT_E2E_OUT_OF_CI=1), though it passed on the lab run alone:
# - test_local_disks.py (634 s): in the CI run at 846d32e its drill's `xl restore` (three disks: a copy on NFS, a
#   reflink clone, a thin snapshot) hit libxl's fixed 40-s block hotplug timeout ("killing execution of
#   /etc/xen/scripts/block add") with no other suite running. Under emulation that script takes 7-14 s per disk on an
#   idle host (docs/disk-strategies.md); why it took over 40 s there is open.
# - test_qcow2_disks.py (305-370 s, passed twice, 2026-12-03): it belongs to xen2's suite, but its restore on the
#   other host installs QEMU in xen1's dom0 and restores there while xen1's suite would still run (one emulated vCPU
#   per dom0: the contention that times block hotplug out above).
# test_live_move.py is in CI (xen1's suite, about 8 min) since it passed four runs in a row on the lab (2026-12-02/03,
# 280-477 s each): its PVH guest runs under QEMU's software emulation of AMD-V, where PVH guests crashed twice
# (double fault, garbage RFLAGS, after a cmpxchg16b) until labctl.PVH_CPUID hid that instruction from them.
OUT_OF_CI = ("test_local_disks.py", "test_qcow2_disks.py")
collect_ignore = [] if os.environ.get("FLEETCKPT_E2E_OUT_OF_CI") == "1" else list(OUT_OF_CI)


def suite_host(item) -> str:
    """The Xen host whose suite `item` belongs to: XEN1_FILES work on xen1 (g1, g2), the other files on xen2
    (g3, g4); the lab's smoke tests of one guest or host run with that host's suite, before it."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "guest" in params:
        return {g.name: g.host for g in lablib.GUESTS}.get(params["guest"], "xen2")
    if "host" in params:
        return params["host"]
    return "xen1" if Path(str(item.fspath)).name in XEN1_FILES else "xen2"


@pytest.fixture(scope="session")
def lab(request):
    if request.config.getoption("--lab-host"):
        # one of two pytest processes at once: attach only; starting or repairing the lab here could restart a
        # guest that the other process stopped on purpose
        if not lablib.state_path().exists():
            pytest.fail("no lab is running: with --lab-host, bring it up first (make lab-up; make e2e does)",
                        pytrace=False)
        handle = lablib.Lab(lablib.load_state())
        yield handle
        handle.drop()
        return
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        if capman is not None:
            with capman.global_and_fixture_disabled():  # show the lab's progress lines live
                state = labctl.up()
        else:
            state = labctl.up()
    except lablib.LabError as e:
        pytest.fail(f"the Xen test lab could not start: {e}", pytrace=False)
    handle = lablib.Lab(state)
    yield handle
    handle.drop()
    if os.environ.get("FLEETCKPT_LAB_DOWN_AFTER") == "1":
        labctl.down()
