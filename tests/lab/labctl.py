#!/usr/bin/env python
"""fleetckpt Xen test lab: two nested Xen hosts under QEMU, an NFS store, four PV guests.

usage: python tests/lab/labctl.py {build|up|down|status|inventory|ssh NAME [CMD...]}

Environment: LAB_DIST=trixie (Xen 4.20, default) | bookworm (Xen 4.17)
             FLEETCKPT_LAB_CACHE (images, default ~/.cache/fleetckpt/lab)
             FLEETCKPT_LAB_RUN   (run dir, default ~/.cache/fleetckpt/lab/run)
See tests/lab/README.md.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lablib  # noqa: E402
from lablib import (DOM0_STORE, GUESTS, HOSTS, NFS_GUEST_ADDR, NFS_PORT, SLIRP_NET,  # noqa: E402
                    STORE_LAB_SUBDIR, GuestSpec, HostSpec, Lab, LabError, log, wait_for)

PYXS_WHEEL_REQ = "pyxs==0.4.1"
HOST_BOOT_TIMEOUT = 480      # QEMU start -> dom0 SSH, per attempt
HOST_BOOT_TRIES = 2
GUEST_BOOT_TIMEOUT = 900     # xl create -> guest SSH, per attempt (two guests per host boot at once: ~4 min here)
GUEST_BOOT_TRIES = 2
GUEST_DISK_MB = 640         # each guest's root disk (the image's filesystem shrunk; ~350 MiB used, see make_guest_disk)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise LabError(f"{what} needs root (mmdebstrap --mode=root, mkfs, ganesha); run as root")


def need_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)}; run `bash tests/lab/install-deps.sh` as root")


def pids_dir() -> Path:
    return lablib.run_dir() / "pids"


def logs_dir() -> Path:
    return lablib.run_dir() / "logs"


def store_dir() -> Path:
    return lablib.run_dir() / "store"


def known_hosts() -> Path:
    return lablib.run_dir() / "known_hosts"


def inventory_file() -> Path:
    return lablib.run_dir() / "inventory.yml"


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


def kvm_usable() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M)) and os.access("/dev/kvm", os.R_OK | os.W_OK)


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
def ensure_key() -> Path:
    k = lablib.key_path()
    if not k.exists():
        need_tools("ssh-keygen")
        k.parent.mkdir(parents=True, exist_ok=True)
        lablib.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetckpt-lab", "-f", str(k)])
    return k


def ensure_wheels() -> Path:
    d = lablib.cache_root() / "wheels"
    if not list(d.glob("pyxs-0.4.1-*.whl")):
        d.mkdir(parents=True, exist_ok=True)
        log(f"downloading the {PYXS_WHEEL_REQ} wheel for dom0 (pip)")
        # any Python with pip will do (`pip download` installs nothing); Debian's python3-pip is the fallback
        pythons = [sys.executable, "/usr/bin/python3"]
        py = next((p for p in pythons if Path(p).exists()
                   and lablib.run([p, "-m", "pip", "--version"], check=False, timeout=60).ok), None)
        if py is None:
            raise LabError("no Python with pip found to download the dom0 wheel; run tests/lab/install-deps.sh")
        lablib.run([py, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(d), PYXS_WHEEL_REQ], timeout=300)
    return d


def image_key(dist: str, pub: Path, wheels: Path) -> str:
    h = hashlib.sha256()
    h.update(f"dist={dist}\n".encode())
    for f in sorted(p for p in lablib.RECIPE_DIR.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(lablib.RECIPE_DIR)}\n".encode())
        h.update(f.read_bytes())
    h.update(pub.read_bytes())
    for w in sorted(wheels.glob("*.whl")):
        h.update(w.name.encode())
        h.update(w.read_bytes())
    return f"{dist}-{h.hexdigest()[:16]}"


def image_dir(dist: str) -> Path:
    return lablib.cache_root() / image_key(dist, ensure_key().with_suffix(".pub"), ensure_wheels())


def build(dist: str | None = None) -> Path:
    """Build (or reuse) the cached dom0/domU images; return their folder."""
    dist = dist or lablib.dist()
    key = ensure_key()
    wheels = ensure_wheels()
    out = lablib.cache_root() / image_key(dist, key.with_suffix(".pub"), wheels)
    done = out / "complete.json"
    if done.exists():
        log(f"images for {dist} cached in {out}")
        return out
    need_root("building the lab images")
    need_tools("mmdebstrap", "mkfs.ext4", "zcat", "python3")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if done.exists():
            return out
        log(f"building {dist} images into {out} (a few minutes; log: {out / 'build.log'})")
        t0 = time.monotonic()
        with open(out / "build.log", "w") as bl:
            p = subprocess.Popen(["bash", str(lablib.RECIPE_DIR / "build-images.sh"), dist, str(out),
                                  str(key.with_suffix(".pub")), str(wheels)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in p.stdout:
                bl.write(line)
                bl.flush()
                if line.startswith("[build"):
                    log(line.rstrip())
            rc = p.wait()
        if rc != 0:
            raise LabError(f"image build failed (rc={rc}); last lines of {out / 'build.log'}:\n{tail(out / 'build.log', 40)}")
        versions = json.loads((out / "boot" / "versions.json").read_text())
        versions["build_seconds"] = round(time.monotonic() - t0, 1)
        done.write_text(json.dumps(versions, indent=2) + "\n")
        log(f"images built in {versions['build_seconds']}s: Xen {versions['xen']}, kernel {versions['kernel']}")
        # drop older builds of the same distribution (they are several hundred MB each)
        for old in lablib.cache_root().glob(f"{dist}-*"):
            if old != out and old.is_dir() and (old / "complete.json").exists():
                shutil.rmtree(old, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# process management (pidfiles in run/pids: "<pid> <match>")
# ---------------------------------------------------------------------------------------------
def write_pidfile(name: str, pid: int, match: str) -> None:
    pids_dir().mkdir(parents=True, exist_ok=True)
    (pids_dir() / f"{name}.pid").write_text(f"{pid} {match}\n")


def read_pid(name: str) -> tuple[int | None, str]:
    try:
        pid, match = (pids_dir() / f"{name}.pid").read_text().split(maxsplit=1)
        return int(pid), match.strip()
    except (OSError, ValueError):
        return None, ""


def running(name: str) -> int | None:
    pid, match = read_pid(name)
    return pid if lablib.pid_alive(pid, match) else None


def children_of(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def stop(name: str, grace: float = 10.0) -> bool:
    """Stop the process recorded in pids/<name>.pid (and its direct children, e.g. NFS relays)."""
    pid, match = read_pid(name)
    stopped = False
    if pid and lablib.pid_alive(pid, match):
        kids = children_of(pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            t_end = time.monotonic() + grace
            while time.monotonic() < t_end and lablib.pid_alive(pid, match):
                time.sleep(0.2)
            if not lablib.pid_alive(pid, match):
                break
        for k in kids:
            try:
                os.kill(k, signal.SIGTERM)
            except ProcessLookupError:
                pass
        t_end = time.monotonic() + 5  # let init reap it, so nothing is listed any more when we return
        while time.monotonic() < t_end and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        stopped = True
    (pids_dir() / f"{name}.pid").unlink(missing_ok=True)
    return stopped


# ---------------------------------------------------------------------------------------------
# NFS store (nfs-ganesha, NFSv4.1 on 127.0.0.1:NFS_PORT, VFS export of run/store)
# ---------------------------------------------------------------------------------------------
def ganesha_major() -> int:
    r = lablib.run(["ganesha.nfsd", "-v"], check=False, timeout=30)
    m = re.search(r"Release\s*=\s*V?(\d+)", r.stdout + r.stderr)
    return int(m.group(1)) if m else 0


def start_nfs() -> None:
    if running("ganesha") and lablib.port_open(NFS_PORT):
        log(f"NFS server already running on 127.0.0.1:{NFS_PORT}")
        return
    stop("ganesha")
    if lablib.port_open(NFS_PORT):
        raise LabError(f"127.0.0.1:{NFS_PORT} is taken by another program; set FLEETCKPT_LAB_NFS_PORT")
    need_tools("ganesha.nfsd", "socat")
    gdir = lablib.run_dir() / "ganesha"
    (gdir / "recov").mkdir(parents=True, exist_ok=True)
    store = store_dir()
    (store / STORE_LAB_SUBDIR).mkdir(parents=True, exist_ok=True)
    for d in ("/var/lib/nfs/ganesha", "/var/run/ganesha"):
        Path(d).mkdir(parents=True, exist_ok=True)
    if not Path("/etc/mtab").exists():
        os.symlink("/proc/self/mounts", "/etc/mtab")
    flusher = "    allow_set_io_flusher_fail = true;\n" if ganesha_major() >= 5 else ""
    conf = gdir / "ganesha.conf"
    conf.write_text(f"""# generated by tests/lab/labctl.py: NFSv4.1 only, loopback only, no rpcbind/NLM
NFS_CORE_PARAM {{
    Protocols = 4;
    Bind_addr = 127.0.0.1;
    NFS_Port = {NFS_PORT};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
{flusher}}}
NFSV4 {{
    Graceless = true;
    Lease_Lifetime = 30;
    Only_Numeric_Owners = true;
    Delegations = false;
    RecoveryBackend = fs;
    RecoveryRoot = {gdir / 'recov'};
}}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 1;
    Path = {store};
    Pseudo = /store;
    Protocols = 4;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
""")
    logs_dir().mkdir(parents=True, exist_ok=True)
    glog = logs_dir() / "ganesha.log"
    with open(logs_dir() / "ganesha-stdout.log", "w") as out:
        p = subprocess.Popen(["ganesha.nfsd", "-F", "-f", str(conf), "-L", str(glog), "-N", "NIV_EVENT",
                              "-p", str(gdir / "ganesha.pid")],
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=str(gdir))
    write_pidfile("ganesha", p.pid, "ganesha.nfsd")
    wait_for(lambda: lablib.port_open(NFS_PORT), 60, f"nfs-ganesha on 127.0.0.1:{NFS_PORT}", interval=0.5,
             abort=lambda: None if p.poll() is None else f"ganesha exited rc={p.returncode}:\n{tail(glog)}")
    log(f"NFS server (nfs-ganesha) up on 127.0.0.1:{NFS_PORT}, export {store}")


def _disk_file(g: GuestSpec) -> str:
    return f"{g.name}.qcow2" if g.disk_format == "qcow2" else f"{g.name}.img"


def guest_disk_controller(g: GuestSpec) -> Path:
    return store_dir() / STORE_LAB_SUBDIR / "disks" / _disk_file(g)


def guest_disk_dom0(g: GuestSpec) -> str:
    return f"{DOM0_STORE}/{STORE_LAB_SUBDIR}/disks/{_disk_file(g)}"


def guest_cfg_dom0(g: GuestSpec) -> str:
    return f"{DOM0_STORE}/{STORE_LAB_SUBDIR}/guests/{g.name}.cfg"


def make_guest_disk(g: GuestSpec, images: Path) -> None:
    d = guest_disk_controller(g)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.with_suffix(".tmp")
    lablib.run(["cp", "--sparse=always", str(images / "domu.img"), str(tmp)], timeout=300)
    tmp.chmod(0o644)
    # The image's 2 GiB filesystem holds ~350 MiB. Over the lab's NFS 4.1 a disk copy (the checkpoint's `copy`
    # strategy) reads the whole file, zeros included, at ~11-43 MB/s, so each guest gets a smaller disk.
    # (NFS 4.2 would skip holes with SEEK_DATA, but nfs-ganesha 4.3's READ_PLUS returns zeros to the Linux client:
    # a 6-byte file written on xen1 read back as 6 NUL bytes on xen2.)
    lablib.run(["e2fsck", "-fy", str(tmp)], timeout=300, check=False)
    lablib.run(["resize2fs", str(tmp), f"{GUEST_DISK_MB}M"], timeout=300)
    os.truncate(tmp, GUEST_DISK_MB << 20)
    if g.disk_format == "qcow2":  # the same filesystem in a qcow2 image (only its data: about 350 MiB)
        raw, tmp = tmp, d.with_suffix(".tmp.qcow2")
        try:
            lablib.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tmp)], timeout=600)
        finally:
            raw.unlink(missing_ok=True)
        tmp.chmod(0o644)
    tmp.replace(d)


def machine_id(g: GuestSpec) -> str:
    """Each guest's own systemd machine-id (the image carries one, so a boot is not a first boot)."""
    return hashlib.sha256(f"fleetckpt-lab-guest-{g.name}".encode()).hexdigest()[:32]


def guest_cmdline(g: GuestSpec) -> str:
    return " ".join([
        "root=/dev/xvda rw console=hvc0 quiet systemd.show_status=0",
        # eth0 exists before udev runs (the initrd loads xen-netfront): no rename race with fleetckpt-lab-net
        "net.ifnames=0",
        f"systemd.machine_id={machine_id(g)} systemd.hostname={g.name} fleetckpt_lab.ip={g.ip}/24",
    ])


# A PVH guest runs under QEMU's software emulation of AMD-V here; two crashed (double fault, RFLAGS garbage) right
# after a `cmpxchg16b` in SLUB's fast path. Without the instruction Linux takes SLUB's slower path.
PVH_CPUID = 'cpuid = "host,cmpxchg16b=0"\n'


def write_guest_cfg(g: GuestSpec) -> None:
    cfg = store_dir() / STORE_LAB_SUBDIR / "guests" / f"{g.name}.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"""# fleetckpt lab guest {g.name} (generated by tests/lab/labctl.py; home host {g.host})
name = "{g.name}"
type = "{g.xl_type}"
kernel = "/var/lib/fleetckpt-lab/vmlinuz"
ramdisk = "/var/lib/fleetckpt-lab/initrd-domu.img"
extra = "{guest_cmdline(g)}"
memory = {g.memory_mb}
maxmem = {g.memory_mb}
vcpus = 1
disk = [ 'format={g.disk_format}, vdev=xvda, access=rw, {"backendtype=qdisk, " if g.disk_format != "raw" else ""}target={guest_disk_dom0(g)}' ]
vif = [ 'mac={g.mac}, bridge=xenbr0' ]
on_crash = "preserve"
{PVH_CPUID if g.xl_type == "pvh" else ""}""")


# ---------------------------------------------------------------------------------------------
# Xen hosts (QEMU)
# ---------------------------------------------------------------------------------------------
def qemu_cmd(h: HostSpec, images: Path, overlay: Path, accel: str) -> list[str]:
    peer = 2 if h.index == 1 else 1
    boot = images / "boot"
    for p in (boot, overlay, lablib.run_dir()):
        if "," in str(p) or " " in str(p):
            raise LabError(f"path {p} contains a comma or space, which QEMU's option syntax cannot take")
    relay = f"socat STDIO TCP:127.0.0.1:{NFS_PORT}"
    # +npt: the emulated CPU offers nested paging, so Xen has HAP (virt_caps "hap") and runs PVH guests, which xl
    # migrate moves live by HAP's dirty tracking (Debian's Xen lacks the shadow paging a PV guest's needs)
    cpu = "qemu64,+npt"
    acc = ["-accel", "kvm"] if accel == "kvm" else ["-accel", "tcg,thread=multi,tb-size=512"]
    return [
        "qemu-system-x86_64", "-name", h.name, "-machine", "pc", *acc, "-cpu", cpu,
        "-m", str(lablib.HOST_MEM_MB), "-smp", "1",
        "-display", "none", "-vga", "none", "-no-reboot",
        "-serial", f"file:{logs_dir() / (h.name + '-serial.log')}",
        "-monitor", f"unix:{lablib.run_dir() / (h.name + '-monitor.sock')},server,nowait",
        "-kernel", str(boot / "xen"),
        "-append", (f"dom0_mem={lablib.DOM0_MEM_MB}M,max:{lablib.DOM0_MEM_MB}M dom0_max_vcpus=1 "
                    "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all noreboot console_timestamps=boot "
                    # lab only: no XPTI/L1TF shadowing for PV guests (qemu64 reports no CPU bug info, so Xen
                    # would enable them; under TCG their TLB flushing slows every PV guest severalfold)
                    "xpti=false pv-l1tf=false "
                    # eager FPU switching: with -cpu max, TCG + Xen's lazy switching (CR0.TS, #NM) corrupted guest
                    # memory in most boots, and eager-fpu alone cured it; qemu64 made it rare but not gone here (a
                    # dom0 oops in filemap_read in a CI run, a domU GPF right after a restore)
                    "spec-ctrl=eager-fpu"),
        "-initrd", (f"{boot / 'vmlinuz'} root=/dev/vda rw console=hvc0 systemd.hostname={h.name} "
                    f"nfs.nfs4_unique_id=fleetckpt-lab-{h.name},{boot / 'initrd.img'}"),
        "-drive", f"file={overlay},format=qcow2,if=virtio,cache=unsafe",
        "-netdev", (f"user,id=n0,net={SLIRP_NET}.0/24,host={SLIRP_NET}.2,dns={SLIRP_NET}.3,restrict=on,"
                    f"hostfwd=tcp:127.0.0.1:{h.ssh_port}-:22,guestfwd=tcp:{NFS_GUEST_ADDR}:2049-cmd:{relay}"),
        "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:fc:01:{h.index:02x}",
        "-netdev", (f"socket,id=n1,udp=127.0.0.1:{lablib.LINK_PORT_BASE + peer},"
                    f"localaddr=127.0.0.1:{lablib.LINK_PORT_BASE + h.index}"),
        "-device", f"virtio-net-pci,netdev=n1,mac=52:54:00:fc:02:{h.index:02x}",
    ]


def boot_host_once(lab: Lab, h: HostSpec, images: Path, accel: str, attempt: int) -> None:
    stop(h.name)
    overlay = lablib.run_dir() / f"{h.name}.qcow2"
    overlay.unlink(missing_ok=True)
    lablib.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(images / "dom0.img"), "-F", "raw",
                str(overlay)], timeout=60)
    serial = logs_dir() / f"{h.name}-serial.log"
    qlog = logs_dir() / f"{h.name}-qemu.log"
    serial.unlink(missing_ok=True)
    with open(qlog, "w") as out:
        p = subprocess.Popen(qemu_cmd(h, images, overlay, accel), stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
    write_pidfile(h.name, p.pid, f"-name {h.name}")
    log(f"{h.name}: QEMU started (pid {p.pid}, {accel}, attempt {attempt}), waiting for dom0 SSH on 127.0.0.1:{h.ssh_port}")

    def abort() -> str | None:
        if p.poll() is not None:
            return f"QEMU exited rc={p.returncode}: {tail(qlog, 10)}\n--- serial ---\n{tail(serial)}"
        s = serial.read_text(errors="replace") if serial.exists() else ""
        if "Kernel panic" in s or "Panic on CPU" in s or "FATAL TRAP" in s:
            return f"crash on the serial console:\n{tail(serial)}"
        return None

    lab.drop(h.name)
    took = lab.wait_ssh(h.name, HOST_BOOT_TIMEOUT, abort=abort)
    log(f"{h.name}: dom0 SSH up ({took:.0f}s after QEMU start)")


def boot_host(lab: Lab, h: HostSpec, images: Path, accel: str) -> None:
    for attempt in range(1, HOST_BOOT_TRIES + 1):
        try:
            boot_host_once(lab, h, images, accel, attempt)
            return
        except LabError as e:
            log(f"{h.name}: boot attempt {attempt} failed: {e}")
            stop(h.name)
            if attempt == HOST_BOOT_TRIES:
                raise LabError(f"{h.name} did not boot in {HOST_BOOT_TRIES} attempts; last error: {e}") from e


HOST_SETUP = f"""set -e
i=0; until xl info >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 180 ] || {{ echo 'xl info never worked' >&2; xl info; exit 1; }}; sleep 1; done
i=0; until ip -4 addr show dev xenbr0 2>/dev/null | grep -q 'inet '; do
  i=$((i+1)); [ $i -lt 120 ] || {{ echo 'xenbr0 has no address' >&2; ip addr; exit 1; }}; sleep 1
done
mkdir -p {DOM0_STORE}
mountpoint -q {DOM0_STORE} || mount -t nfs4 -o vers=4.1,proto=tcp,port=2049,hard,timeo=600,lookupcache=positive {NFS_GUEST_ADDR}:/store {DOM0_STORE}
mountpoint -q {DOM0_STORE}
xl info | awk '/^xen_version/{{print $3}}'
"""


def setup_host(lab: Lab, h: HostSpec) -> str:
    r = lab.sh(h.name, HOST_SETUP, timeout=300)
    ver = r.stdout.strip().splitlines()[-1]
    log(f"{h.name}: Xen {ver} ready, NFS store mounted at {DOM0_STORE}")
    return ver


def check_shared_store(lab: Lab) -> None:
    name = f"marker-{uuid.uuid4().hex[:12]}"
    path = f"{DOM0_STORE}/{STORE_LAB_SUBDIR}/{name}"
    token = uuid.uuid4().hex
    lab.sh("xen1", f"echo {token} > {path}.tmp && mv {path}.tmp {path} && sync")
    wait_for(lambda: lab.sh("xen2", f"cat {path}", check=False).stdout.strip() == token, 30,
             "xen1's marker file to be visible on xen2 through NFS", interval=1)
    ctl = store_dir() / STORE_LAB_SUBDIR / name
    if ctl.read_text().strip() != token:
        raise LabError(f"marker {ctl} on the controller does not match what xen1 wrote")
    ctl.unlink()
    log("shared store: a file written by xen1 is visible on xen2 and on the controller")


# ---------------------------------------------------------------------------------------------
# guests
# ---------------------------------------------------------------------------------------------
def start_guest(lab: Lab, g: GuestSpec, images: Path) -> None:
    for attempt in range(1, GUEST_BOOT_TRIES + 1):
        t0 = time.monotonic()
        r = lab.sh(g.host, f"xl create {guest_cfg_dom0(g)}", check=False, timeout=180)
        if r.rc != 0:
            err = f"xl create failed: {r.stderr.strip()[-1500:]}"
        else:
            log(f"{g.name}: created on {g.host} ({g.memory_mb} MB, {g.ip}), waiting for SSH")
            try:
                lab.wait_ssh(g.name, GUEST_BOOT_TIMEOUT, abort=_every(30, lambda: _guest_gone(lab, g)))
                log(f"{g.name}: SSH up ({time.monotonic() - t0:.0f}s after xl create)")
                return
            except LabError as e:
                con = lab.sh(g.host, f"tail -n 30 /var/log/xen/console/guest-{g.name}.log", check=False).stdout
                err = f"{e}\n--- console of {g.name} ---\n{con}"
        log(f"{g.name}: boot attempt {attempt} failed: {err}")
        lab.sh(g.host, f"xl destroy {g.name}", check=False, timeout=120)
        if attempt == GUEST_BOOT_TRIES:
            raise LabError(f"guest {g.name} did not come up in {GUEST_BOOT_TRIES} attempts: {err}")
        make_guest_disk(g, images)  # fresh disk for the retry


def start_extra_guests(lab: Lab, specs: list[GuestSpec]) -> None:
    """Boot guests beyond the lab's four (the benchmark's, a test's own), each on a fresh disk on the store. They are
    added to ``lab.state`` (this process only), so ``lab.sh`` reaches them; stop_extra_guests removes them."""
    images = Path(lab.state["images"])
    for g in specs:
        if not any(e["name"] == g.name for e in lab.state["guests"]):
            lab.state["guests"].append(guest_entry(g))
    todo = []
    for g in specs:
        if lab.locate_guest(g.name):
            log(f"{g.name}: already running")
            continue
        make_guest_disk(g, images)
        write_guest_cfg(g)
        todo.append(g)
    if todo:  # booted side by side, as `up` boots the lab's own guests
        with ThreadPoolExecutor(len(todo)) as ex:
            for fut in [ex.submit(start_guest, lab, g, images) for g in todo]:
                fut.result()


def stop_extra_guests(lab: Lab, specs: list[GuestSpec]) -> None:
    for g in specs:
        lab.drop(g.name)
        where = lab.locate_guest(g.name)
        if where:
            lab.sh(where, f"xl destroy {g.name}", check=False, timeout=120)
        guest_disk_controller(g).unlink(missing_ok=True)
        lab.state["guests"] = [e for e in lab.state["guests"] if e["name"] != g.name]
        log(f"{g.name}: destroyed")


def _every(seconds: float, check):
    """Rate-limit an abort check (each `xl` call costs dom0 a lot of emulated CPU)."""
    last = [time.monotonic()]

    def f():
        if time.monotonic() - last[0] < seconds:
            return None
        last[0] = time.monotonic()
        return check()
    return f


def crashed(xl_state: str) -> bool:
    """Whether an `xl list` state column (e.g. '---sc-') is a crashed domain: the lab's guests have
    on_crash="preserve", so a guest kernel panic leaves the domain in place with state 'c'."""
    return "c" in xl_state


def _guest_gone(lab: Lab, g: GuestSpec) -> str | None:
    try:
        r = lab.sh(g.host, f"xl list {g.name}", check=False, timeout=30)
    except Exception:  # noqa: BLE001 - the host may be slow; keep waiting
        return None
    if r.rc != 0:
        return f"domain {g.name} is no longer running on {g.host}"
    rows = r.stdout.strip().splitlines()
    fields = rows[-1].split() if len(rows) > 1 else []
    if len(fields) >= 5 and crashed(fields[4]):
        return f"domain {g.name} crashed on {g.host} (state {fields[4]})"
    return None


# ---------------------------------------------------------------------------------------------
# state, inventory, health
# ---------------------------------------------------------------------------------------------
def make_state(dist: str, images: Path, xen_version: str, accel: str) -> dict:
    versions = json.loads((images / "complete.json").read_text())
    return {
        "version": 1,
        "dist": dist,
        "xen_version": xen_version,
        "xen_version_expected": lablib.SUPPORTED_DISTS[dist],
        "kernel": versions.get("kernel"),
        "accel": accel,
        "images": str(images),
        "run_dir": str(lablib.run_dir()),
        "key": str(lablib.key_path()),
        "known_hosts": str(known_hosts()),
        "inventory": str(inventory_file()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "store": {
            "controller_path": str(store_dir()),
            "dom0_path": DOM0_STORE,
            "lab_subdir": STORE_LAB_SUBDIR,
            "nfs_server": f"127.0.0.1:{NFS_PORT}",
            "dom0_mount_source": f"{NFS_GUEST_ADDR}:/store",
            "ganesha_pid": read_pid("ganesha")[0],
        },
        "hosts": [{
            "name": h.name, "ssh_host": "127.0.0.1", "ssh_port": h.ssh_port, "pid": read_pid(h.name)[0],
            "bridge_ip": h.bridge_ip, "overlay": str(lablib.run_dir() / f"{h.name}.qcow2"),
            "serial_log": str(logs_dir() / f"{h.name}-serial.log"),
        } for h in HOSTS],
        "guests": [guest_entry(g) for g in GUESTS],
    }


def guest_entry(g: GuestSpec) -> dict:
    """A guest as the state file records it."""
    return {"name": g.name, "host": g.host, "ip": g.ip, "mac": g.mac, "memory_mb": g.memory_mb,
            "xl_type": g.xl_type, "disk": guest_disk_dom0(g), "disk_controller": str(guest_disk_controller(g)), "config": guest_cfg_dom0(g)}


def _q(s: object) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML scalar


def write_inventory(state: dict) -> Path:
    key, kh = state["key"], state["known_hosts"]
    common = f"-o StrictHostKeyChecking=no -o UserKnownHostsFile={kh} -o LogLevel=ERROR"
    lines = [
        "# fleetckpt Xen test lab inventory, generated by tests/lab/labctl.py (do not edit)",
        "all:",
        "  vars:",
        "    ansible_user: root",
        f"    ansible_ssh_private_key_file: {_q(key)}",
        "    ansible_python_interpreter: /usr/bin/python3",
        "    ansible_timeout: 60  # emulated hosts: SSH handshakes can take >10 s while guests boot",
        f"    fleetckpt_lab_store: {_q(state['store']['dom0_path'])}",
        f"    fleetckpt_lab_store_controller: {_q(state['store']['controller_path'])}",
        f"    fleetckpt_lab_dist: {_q(state['dist'])}",
        f"    fleetckpt_lab_xen_version: {_q(state['xen_version'])}",
        "  children:",
        "    xen_hosts:",
        "      hosts:",
    ]
    ports = {}
    for h in state["hosts"]:
        ports[h["name"]] = h["ssh_port"]
        lines += [f"        {h['name']}:",
                  "          ansible_host: 127.0.0.1",
                  f"          ansible_port: {h['ssh_port']}",
                  f"          ansible_ssh_common_args: {_q(common)}",
                  # where the other dom0 reaches it (xenbr0, over the lab's dom0-to-dom0 link): live migrations
                  f"          fleetckpt_migration_address: {h['bridge_ip']}"]
    lines += ["    xen_guests:", "      hosts:"]
    for g in state["guests"]:
        proxy = (f"ssh -i {key} {common} -o BatchMode=yes -p {ports[g['host']]} -W %h:%p root@127.0.0.1")
        lines += [f"        {g['name']}:",
                  f"          ansible_host: {g['ip']}",
                  "          ansible_port: 22",
                  f"          ansible_ssh_common_args: {_q(common + ' -o ProxyCommand=' + shlex.quote(proxy))}",
                  f"          xen_host: {g['host']}",
                  f"          xen_domain: {g['name']}",
                  f"          fleetckpt_lab_memory_mb: {g['memory_mb']}",
                  f"          fleetckpt_lab_disk: {_q(g['disk'])}"]
    p = Path(state["inventory"])
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n")
    return p


def health(state: dict | None = None, lab: Lab | None = None, quick: bool = False) -> dict:
    """Health of every lab part: {"nfs": bool, "hosts": {name: {...}}, "guests": {name: {...}}, "healthy": bool}."""
    state = state or lablib.load_state()
    lab = lab or Lab(state)
    res: dict = {"nfs": bool(running("ganesha")) and lablib.port_open(NFS_PORT), "hosts": {}, "guests": {}}
    for h in state["hosts"]:
        name = h["name"]
        info = {"qemu": bool(running(name)), "ssh": False, "store_mounted": False, "domains": []}
        if info["qemu"] and lab.try_sh(name, "true", timeout=15):
            info["ssh"] = True
            info["store_mounted"] = lab.try_sh(name, f"mountpoint -q {DOM0_STORE} && timeout 20 stat -t {DOM0_STORE}/{STORE_LAB_SUBDIR} >/dev/null", timeout=30)
            r = lab.sh(name, "xl list | awk 'NR>2{print $1}'", check=False, timeout=60)
            info["domains"] = r.stdout.split() if r.rc == 0 else []
        res["hosts"][name] = info
    for g in state["guests"]:
        where = [n for n, i in res["hosts"].items() if g["name"] in i["domains"]]
        info = {"running_on": where[0] if where else None, "ssh": False}
        if where and not quick:
            info["ssh"] = lab.try_sh(g["name"], "true", timeout=20, via=where[0])
        res["guests"][g["name"]] = info
    res["healthy"] = (res["nfs"] and all(i["ssh"] and i["store_mounted"] for i in res["hosts"].values())
                      and all(i["running_on"] and (quick or i["ssh"]) for i in res["guests"].values()))
    return res


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def preflight() -> str:
    need_tools("qemu-system-x86_64", "qemu-img", "socat", "ganesha.nfsd")
    need_root("running the lab (nfs-ganesha, /etc/mtab, /var/lib/nfs)")
    need_mb = len(HOSTS) * lablib.HOST_MEM_MB + 1024
    avail = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) // 1024
    if avail < need_mb:
        raise LabError(f"not enough memory: the lab needs {need_mb} MB available, this machine has {avail} MB")
    for h in HOSTS:
        if lablib.port_open(h.ssh_port):
            raise LabError(f"127.0.0.1:{h.ssh_port} (SSH of {h.name}) is taken; set FLEETCKPT_LAB_SSH_PORT_BASE")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", lablib.LINK_PORT_BASE + h.index))
        except OSError as e:
            raise LabError(f"UDP 127.0.0.1:{lablib.LINK_PORT_BASE + h.index} is taken ({e}); set FLEETCKPT_LAB_LINK_PORT_BASE") from e
    return "kvm" if kvm_usable() else "tcg"


def up(dist: str | None = None) -> dict:
    """Bring the lab up (or reuse a healthy one); return the state dict."""
    lablib.reset_clock()
    dist = dist or lablib.dist()
    if lablib.state_path().exists():
        st = lablib.load_state()
        if st.get("dist") == dist:
            log("a lab is recorded as running: checking its health")
            hl = health(st)
            if hl["healthy"]:
                write_inventory(st)
                log(f"lab already up and healthy; inventory {st['inventory']}")
                return st
            if hl["nfs"] and all(i["ssh"] and i["store_mounted"] for i in hl["hosts"].values()):
                return _repair_guests(st, hl)
            log(f"lab unhealthy ({json.dumps(hl)}); restarting it from scratch")
        else:
            log(f"a {st.get('dist')} lab is running; replacing it with {dist}")
        down()
    images = build(dist)
    accel = preflight()
    log(f"starting the {dist} lab in {lablib.run_dir()} ({accel}, {lablib.HOST_MEM_MB} MB per host)")
    rd = lablib.run_dir()
    for d in (rd, logs_dir(), pids_dir()):
        d.mkdir(parents=True, exist_ok=True)
    known_hosts().unlink(missing_ok=True)
    lab_store = store_dir() / STORE_LAB_SUBDIR
    if lab_store.exists():
        shutil.rmtree(lab_store)
    start_nfs()
    for g in GUESTS:
        make_guest_disk(g, images)
        write_guest_cfg(g)
    log(f"guest disks and configs written to {lab_store}")
    # a provisional state now, so that `down` finds everything even if `up` fails half way
    state = make_state(dist, images, "?", accel)
    lablib.save_state(state)
    lab = Lab(state)
    try:
        with ThreadPoolExecutor(len(HOSTS)) as ex:
            list(ex.map(lambda h: boot_host(lab, h, images, accel), HOSTS))
        state = make_state(dist, images, "?", accel)
        lablib.save_state(state)
        with ThreadPoolExecutor(len(HOSTS)) as ex:
            vers = list(ex.map(lambda h: setup_host(lab, h), HOSTS))
        if len(set(vers)) != 1:
            raise LabError(f"the hosts run different Xen versions: {vers}")
        if not vers[0].startswith(lablib.SUPPORTED_DISTS[dist] + "."):
            raise LabError(f"Xen {vers[0]} found, {lablib.SUPPORTED_DISTS[dist]}.x expected for {dist}")
        state["xen_version"] = vers[0]
        lablib.save_state(state)
        lab.state = state
        check_shared_store(lab)

        def host_guests(h: HostSpec) -> None:
            mine = [g for g in GUESTS if g.host == h.name]
            with ThreadPoolExecutor(len(mine)) as ex2:
                futs = []
                for g in mine:  # xl create one after the other, then wait for both in parallel
                    futs.append(ex2.submit(start_guest, lab, g, images))
                    time.sleep(0.5)
                for f in futs:
                    f.result()

        with ThreadPoolExecutor(len(HOSTS)) as ex:
            list(ex.map(host_guests, HOSTS))
    except BaseException:
        log(f"lab start FAILED; logs in {logs_dir()}; run `labctl.py down` to clean up")
        raise
    finally:
        lab.drop()
    inv = write_inventory(state)
    log(f"lab up: {', '.join(h.name for h in HOSTS)} (Xen {state['xen_version']}), guests "
        f"{', '.join(g.name + '@' + g.host for g in GUESTS)}; inventory {inv}")
    return state


def _repair_guests(state: dict, hl: dict) -> dict:
    images = Path(state["images"])
    lab = Lab(state)
    try:
        for g in GUESTS:
            gi = hl["guests"][g.name]
            if gi["running_on"] is None:
                log(f"{g.name}: not running anywhere; starting it on {g.host}")
                start_guest(lab, g, images)
            elif not gi["ssh"]:
                where = gi["running_on"]
                row = lab.domain_row(where, g.name)
                if row is not None and crashed(row[1]):  # its kernel panicked: SSH never comes
                    keep = logs_dir() / f"{g.name}-crash-{time.strftime('%Y%m%dT%H%M%S')}.log"
                    keep.write_text(lab.sh(where, f"cat /var/log/xen/console/guest-{g.name}.log", check=False).stdout)
                    log(f"{g.name}: crashed on {where} (state {row[1]}; its console is kept in {keep}); "
                        f"destroying it and starting it again on {g.host}")
                    lab.sh(where, f"xl destroy {g.name}", check=False, timeout=120)
                    start_guest(lab, g, images)
                else:
                    log(f"{g.name}: running on {where}, waiting for SSH")
                    lab.wait_ssh(g.name, GUEST_BOOT_TIMEOUT, via=where)
    finally:
        lab.drop()
    write_inventory(state)
    log("lab repaired and healthy")
    return state


def down() -> None:
    lablib.reset_clock()
    any_stopped = False
    for h in HOSTS:
        if stop(h.name):
            log(f"{h.name}: QEMU stopped")
            any_stopped = True
        (lablib.run_dir() / f"{h.name}.qcow2").unlink(missing_ok=True)
        (lablib.run_dir() / f"{h.name}-monitor.sock").unlink(missing_ok=True)
    if stop("ganesha"):
        log("NFS server stopped")
        any_stopped = True
    lablib.state_path().unlink(missing_ok=True)
    # leftover pidfiles of anything else this lab started
    if pids_dir().exists():
        for pf in pids_dir().glob("*.pid"):
            if stop(pf.stem):
                log(f"{pf.stem}: stopped")
    log("lab down" if any_stopped else "lab was not running (nothing to stop)")


def status() -> int:
    try:
        state = lablib.load_state()
    except LabError as e:
        print(f"lab: DOWN ({e})")
        return 1
    hl = health(state)
    print(f"lab: {'HEALTHY' if hl['healthy'] else 'UNHEALTHY'}  dist={state['dist']} xen={state['xen_version']} "
          f"accel={state['accel']} run_dir={state['run_dir']}")
    print(f"  nfs store: {'up' if hl['nfs'] else 'DOWN'}  {state['store']['nfs_server']} -> "
          f"{state['store']['controller_path']} (dom0: {state['store']['dom0_path']})")
    for h in state["hosts"]:
        i = hl["hosts"][h["name"]]
        print(f"  host {h['name']}: qemu={'pid ' + str(running(h['name'])) if i['qemu'] else 'DOWN'} "
              f"ssh={'ok' if i['ssh'] else 'FAIL'} (127.0.0.1:{h['ssh_port']}) "
              f"store={'mounted' if i['store_mounted'] else 'NOT mounted'} domains={','.join(i['domains']) or '-'}")
    for g in state["guests"]:
        i = hl["guests"][g["name"]]
        print(f"  guest {g['name']}: on={i['running_on'] or 'NOT RUNNING'} (home {g['host']}) ip={g['ip']} "
              f"mem={g['memory_mb']}MB ssh={'ok' if i['ssh'] else 'FAIL'}")
    print(f"  inventory: {state['inventory']}")
    return 0 if hl["healthy"] else 1


def ssh_cmd(target: str, cmd: list[str]) -> None:
    state = lablib.load_state()
    lab = Lab(state)
    kh = state["known_hosts"]
    base = ["ssh", "-i", state["key"], "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={kh}",
            "-o", "LogLevel=ERROR"]
    if lab.is_host(target):
        argv = base + ["-p", str(lab.host(target)["ssh_port"]), "root@127.0.0.1"]
    else:
        g = lab.guest(target)
        port = lab.host(g["host"])["ssh_port"]
        hop = base + ["-o", "BatchMode=yes", "-p", str(port), "-W", "%h:%p", "root@127.0.0.1"]
        proxy = " ".join(shlex.quote(a) for a in hop)
        argv = base + ["-o", f"ProxyCommand={proxy}", f"root@{g['ip']}"]
    if not cmd:
        argv.insert(1, "-t")
    os.execvp("ssh", argv + cmd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labctl.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or reuse) the cached images")
    sub.add_parser("up", help="boot the lab (reuses a healthy running one)")
    sub.add_parser("down", help="stop everything the lab started")
    sub.add_parser("status", help="health of hosts, guests and the NFS store (exit 1 if unhealthy)")
    sub.add_parser("inventory", help="(re)write the Ansible inventory and print its path")
    sp = sub.add_parser("ssh", help="shell into a host (xen1, xen2) or a guest (g1..g4)")
    sp.add_argument("target")
    sp.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            print(build())
        elif a.cmd == "up":
            up()
        elif a.cmd == "down":
            down()
        elif a.cmd == "status":
            return status()
        elif a.cmd == "inventory":
            print(write_inventory(lablib.load_state()))
        elif a.cmd == "ssh":
            ssh_cmd(a.target, a.command)
    except LabError as e:
        print(f"labctl {a.cmd}: ERROR: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"labctl {a.cmd}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
