"""fleetckpt Xen test lab: shared library for labctl.py and the e2e tests.

Paths, topology, the lab state file, paramiko SSH to the Xen hosts (dom0s, forwarded to 127.0.0.1)
and to the guests (a `direct-tcpip` channel through a dom0), local commands with timeouts, and
polling helpers (no fixed sleeps).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import logging

import paramiko

# paramiko's transport thread logs every refused/closed connection while a VM boots; keep that quiet
if not os.environ.get("FLEETCKPT_LAB_DEBUG"):
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
LAB_DIR = Path(__file__).resolve().parent
RECIPE_DIR = LAB_DIR / "recipe"
SUPPORTED_DISTS = {"trixie": "4.20", "bookworm": "4.17"}  # dist -> Xen major.minor

DOM0_STORE = "/srv/fleetckpt"      # NFS store mount point in every dom0
STORE_LAB_SUBDIR = "lab"           # lab-owned files in the store: lab/disks, lab/guests, lab/marker-*
NFS_GUEST_ADDR = "169.254.78.100"  # what dom0 mounts (QEMU guestfwd -> relay -> ganesha on loopback)
SLIRP_NET = "169.254.78"           # QEMU user network of each dom0 (link-local)
BRIDGE_NET = "169.254.100"         # xenbr0 in every dom0: xen1 .1, xen2 .2, guests .11...
LOCAL_DIR = "/var/lib/fleetckpt-local"  # dom0-local storage (Lab.local_storage): loop files
LOCAL_XFS = "/srv/local-xfs"            # ... an XFS with reflink
LOCAL_VG = "fleetckpt_lab"              # ... an LVM volume group with a thin pool
LOCAL_DEBS = "/opt/fleetckpt-lab/local-storage"  # ... its tools' packages, in the image (recipe/build-images.sh)
# Installs them unless they are there: no service started (policy-rc.d), no initramfs rebuilt (the lab boots the
# kernel and initrd extracted at build time; rebuilding took minutes under emulation).
INSTALL_LOCAL_TOOLS = f"""missing=
for tool in mkfs.xfs lvcreate thin_check; do command -v $tool >/dev/null || missing="$missing $tool"; done
if test -n "$missing"; then
  printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
  sed -i 's/^update_initramfs=.*/update_initramfs=no/' /etc/initramfs-tools/update-initramfs.conf
  DEBIAN_FRONTEND=noninteractive dpkg -i {LOCAL_DEBS}/*.deb > /var/log/fleetckpt-local-tools.log 2>&1; rc=$?
  rm -f /usr/sbin/policy-rc.d
  if test $rc != 0; then tail -20 /var/log/fleetckpt-local-tools.log; exit $rc; fi
fi"""


QEMU_DEBS = "/opt/fleetckpt-lab/qemu"  # Xen's qdisk QEMU and qemu-img, in the image (recipe/build-images.sh)
# Installs them unless they are there, as INSTALL_LOCAL_TOOLS does; xencommons would start a dom0 QEMU only at boot,
# and libxl starts a domain's own device model when it creates a domain with a qdisk disk.
INSTALL_QEMU = f"""if ! command -v qemu-img >/dev/null || ! test -x /usr/libexec/xen-qemu-system-i386 -o -x /usr/bin/qemu-system-i386; then
  printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
  sed -i 's/^update_initramfs=.*/update_initramfs=no/' /etc/initramfs-tools/update-initramfs.conf
  DEBIAN_FRONTEND=noninteractive dpkg -i {QEMU_DEBS}/*.deb > /var/log/fleetckpt-qemu.log 2>&1; rc=$?
  rm -f /usr/sbin/policy-rc.d
  if test $rc != 0; then tail -20 /var/log/fleetckpt-qemu.log; exit $rc; fi
fi"""


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


HOST_MEM_MB = _env_int("FLEETCKPT_LAB_HOST_MEM", 4096)
DOM0_MEM_MB = 1024
SSH_PORT_BASE = _env_int("FLEETCKPT_LAB_SSH_PORT_BASE", 22200)   # xen1 -> 22201, xen2 -> 22202
LINK_PORT_BASE = _env_int("FLEETCKPT_LAB_LINK_PORT_BASE", 22210)  # UDP dom0<->dom0 link
NFS_PORT = _env_int("FLEETCKPT_LAB_NFS_PORT", 20490)             # ganesha on 127.0.0.1


@dataclass(frozen=True)
class HostSpec:
    name: str
    index: int

    @property
    def ssh_port(self) -> int:
        return SSH_PORT_BASE + self.index

    @property
    def bridge_ip(self) -> str:
        return f"{BRIDGE_NET}.{self.index}"


@dataclass(frozen=True)
class GuestSpec:
    name: str
    host: str
    index: int
    memory_mb: int
    xl_type: str = "pv"  # or "pvh" (tests/e2e/test_live_move.py's guest)
    disk_format: str = "raw"  # or "qcow2": its root disk served by Xen's qdisk backend (Lab.install_qemu first)

    @property
    def ip(self) -> str:
        return f"{BRIDGE_NET}.{10 + self.index}"

    @property
    def mac(self) -> str:
        return f"00:16:3e:fc:00:{10 + self.index:02x}"


HOSTS = [HostSpec("xen1", 1), HostSpec("xen2", 2)]
# booted only by what uses it (tests/e2e/test_qcow2_disks.py, the benchmark's disk study), after Lab.install_qemu:
# a guest whose root disk is a qcow2 image on the store, served by Xen's qdisk backend
QCOW2_GUEST = GuestSpec("q1", "xen2", 9, 256, disk_format="qcow2")
GUESTS = [
    GuestSpec("g1", "xen1", 1, 256),
    GuestSpec("g2", "xen1", 2, 512),
    GuestSpec("g3", "xen2", 3, 256),
    GuestSpec("g4", "xen2", 4, 512),
]


def dist() -> str:
    d = os.environ.get("LAB_DIST", "trixie")
    if d not in SUPPORTED_DISTS:
        raise LabError(f"LAB_DIST={d!r} is not supported (choose one of {sorted(SUPPORTED_DISTS)})")
    return d


def cache_root() -> Path:
    return Path(os.environ.get("FLEETCKPT_LAB_CACHE") or Path.home() / ".cache/fleetckpt/lab")


def run_dir() -> Path:
    return Path(os.environ.get("FLEETCKPT_LAB_RUN") or Path.home() / ".cache/fleetckpt/lab/run")


def key_path() -> Path:
    return cache_root() / "ssh" / "id_ed25519"


def state_path() -> Path:
    return run_dir() / "state.json"


# ---------------------------------------------------------------------------------------------
# errors, logging, polling, local commands
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def host_memory_lock(host: str):
    """Hold the lab-wide lock on `host`'s free memory (an flock in the run dir).

    The e2e suites run in two processes at once (one per host, tests/e2e/run-per-host.sh); a test that fills a host's memory on purpose, or
    that moves VMs onto a host, holds this so the other process's moves and fills never interleave with it.
    """
    path = run_dir() / f"{host}-memory.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LabError(Exception):
    """The lab cannot do what was asked; the message says why."""


class LabTimeout(LabError):
    pass


class CommandError(LabError):
    def __init__(self, where: str, cmd: str, result: "CmdResult"):
        self.result = result
        super().__init__(
            f"{where}: command failed (rc={result.rc}): {cmd}\n"
            f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}")


_T0 = time.monotonic()
_log_lock = threading.Lock()


def reset_clock() -> None:
    global _T0
    _T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - _T0


def log(msg: str) -> None:
    with _log_lock:
        print(f"[lab {elapsed():6.1f}s] {msg}", flush=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 2.0,
             abort: Callable[[], str | None] | None = None) -> Any:
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` seconds pass.

    Exceptions from the predicate count as "not yet" (the last one is reported on timeout).
    `abort()` may return a reason string to stop waiting at once (e.g. the VM process died).
    """
    deadline = time.monotonic() + timeout
    last: str = ""
    while True:
        if abort is not None:
            reason = abort()
            if reason:
                raise LabError(f"gave up waiting for {what}: {reason}")
        try:
            v = predicate()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - polled, reported on timeout
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise LabTimeout(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)


@dataclass
class CmdResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def run(cmd: list[str], timeout: float = 600, check: bool = True, **kw) -> CmdResult:
    """Run a local command with a timeout; raise CommandError on failure when `check`."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    except subprocess.TimeoutExpired as e:
        raise LabTimeout(f"local command timed out after {timeout}s: {' '.join(cmd)}") from e
    except FileNotFoundError as e:
        raise LabError(f"command not found: {cmd[0]} (run tests/lab/install-deps.sh)") from e
    r = CmdResult(p.returncode, p.stdout, p.stderr)
    if check and r.rc != 0:
        raise CommandError("controller", " ".join(cmd), r)
    return r


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ssh_banner(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> bool:
    """True if an SSH server answers with its banner (QEMU's hostfwd accepts even while the VM boots)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def pid_alive(pid: int | None, must_contain: str | None = None) -> bool:
    """True if process `pid` exists (and its command line contains `must_contain`)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return must_contain is None or must_contain in cmdline


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# SSH (paramiko)
# ---------------------------------------------------------------------------------------------
class _AcceptAny(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client, hostname, key):  # lab VMs: throwaway host keys
        return


def load_key(path: Path | str | None = None) -> paramiko.PKey:
    p = Path(path) if path else key_path()
    if not p.exists():
        raise LabError(f"lab SSH key {p} is missing (run `labctl.py build`)")
    return paramiko.Ed25519Key.from_private_key_file(str(p))


# Connect timeout for lab SSH. Under TCG a dom0 shares its one emulated CPU with the guests it runs,
# and sshd forks and re-executes itself per connection: a key exchange that takes 0.3 s on an idle
# lab took more than 10 s in CI while guests were still starting services (paramiko then fails with
# the misleading "No existing session"). This bounds readiness, not a test's assertion.
CONNECT_TIMEOUT = 60.0


def _connect(c: paramiko.SSHClient, what: str, timeout: float, **kw) -> None:
    try:
        c.connect(username="root", timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                  allow_agent=False, look_for_keys=False, **kw)
    except paramiko.SSHException as e:
        c.close()
        if "No existing session" in str(e):  # start_client() gave up waiting for the key exchange
            raise LabError(f"SSH to {what}: key exchange did not complete within {timeout:.0f} s") from e
        raise


def connect_host(port: int, key: paramiko.PKey, timeout: float = CONNECT_TIMEOUT) -> paramiko.SSHClient:
    """SSH to a dom0 through its forwarded port on 127.0.0.1."""
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(_AcceptAny())
    _connect(c, f"127.0.0.1:{port}", timeout, hostname="127.0.0.1", port=port, pkey=key)
    c.get_transport().set_keepalive(15)
    return c


def connect_guest(via: paramiko.SSHClient, ip: str, key: paramiko.PKey,
                  timeout: float = CONNECT_TIMEOUT) -> paramiko.SSHClient:
    """SSH to a guest through a `direct-tcpip` channel of an open dom0 connection."""
    chan = via.get_transport().open_channel("direct-tcpip", (ip, 22), ("127.0.0.1", 0), timeout=timeout)
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(_AcceptAny())
    try:
        _connect(c, f"guest {ip}", timeout, hostname=ip, port=22, pkey=key, sock=chan)
    except Exception:
        chan.close()
        raise
    return c


def exec_on(client: paramiko.SSHClient, cmd: str, timeout: float = 120.0, stdin: str | bytes | None = None) -> CmdResult:
    """Run `cmd` over SSH; raise LabTimeout if it has not finished within `timeout` seconds."""
    chan = client.get_transport().open_session(timeout=min(timeout, 30))
    chan.settimeout(1.0)
    chan.exec_command(cmd)
    if stdin is not None:
        chan.sendall(stdin.encode() if isinstance(stdin, str) else stdin)
    chan.shutdown_write()
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            got = False
            while chan.recv_ready():
                out += chan.recv(65536)
                got = True
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                got = True
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                break
            if time.monotonic() > deadline:
                raise LabTimeout(f"remote command timed out after {timeout}s: {cmd}")
            if chan.closed and not got:
                break
            if not got:
                time.sleep(0.05)
        rc = chan.recv_exit_status()
    finally:
        chan.close()
    return CmdResult(rc, out.decode(errors="replace"), err.decode(errors="replace"))


# ---------------------------------------------------------------------------------------------
# state + the Lab object
# ---------------------------------------------------------------------------------------------
def load_state(path: Path | None = None) -> dict:
    p = path or state_path()
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as e:
        raise LabError(f"no lab state at {p}: the lab is not up (run `labctl.py up`)") from e
    except ValueError as e:
        raise LabError(f"lab state {p} is corrupt: {e}") from e


def save_state(state: dict, path: Path | None = None) -> Path:
    p = path or state_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(p)
    return p


@dataclass
class Lab:
    """A running lab, as described by the state file, with cached SSH connections.

    lab.sh("xen1", "xl list")            -> CmdResult   (check=True raises CommandError on rc != 0)
    lab.sh("g1", "cat /proc/meminfo")    -> CmdResult   (guests go through a dom0)
    lab.locate_guest("g1")               -> "xen1" | "xen2" | None   (where the domain runs now)
    """
    state: dict
    _key: paramiko.PKey | None = field(default=None, repr=False)
    _clients: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path | None = None) -> "Lab":
        return cls(load_state(path))

    # -- topology ---------------------------------------------------------------------------
    @property
    def hosts(self) -> list[dict]:
        return self.state["hosts"]

    @property
    def guests(self) -> list[dict]:
        return self.state["guests"]

    @property
    def inventory_path(self) -> str:
        return self.state["inventory"]

    @property
    def key_path(self) -> str:
        return self.state["key"]

    @property
    def store(self) -> dict:
        return self.state["store"]

    def host(self, name: str) -> dict:
        for h in self.hosts:
            if h["name"] == name:
                return h
        raise LabError(f"no lab host named {name!r}")

    def guest(self, name: str) -> dict:
        for g in self.guests:
            if g["name"] == name:
                return g
        raise LabError(f"no lab guest named {name!r}")

    def is_host(self, name: str) -> bool:
        return any(h["name"] == name for h in self.hosts)

    # -- connections --------------------------------------------------------------------------
    @property
    def key(self) -> paramiko.PKey:
        if self._key is None:
            self._key = load_key(self.key_path)
        return self._key

    def _alive(self, c: paramiko.SSHClient | None) -> bool:
        t = c.get_transport() if c else None
        return bool(t and t.is_active())

    def client(self, name: str, timeout: float = CONNECT_TIMEOUT, via: str | None = None) -> paramiko.SSHClient:
        """Connected paramiko client for a host or guest (cached; reconnects when dropped)."""
        cache_key = (name, via)
        with self._lock:
            c = self._clients.get(cache_key)
        if self._alive(c):
            return c
        if self.is_host(name):
            c = connect_host(self.host(name)["ssh_port"], self.key, timeout)
        else:
            g = self.guest(name)
            c = connect_guest(self.client(via or g["host"], timeout), g["ip"], self.key, timeout)
        with self._lock:
            old = self._clients.get(cache_key)
            self._clients[cache_key] = c
        if old is not None and old is not c:
            old.close()
        return c

    def sh(self, name: str, cmd: str, timeout: float = 120.0, check: bool = True, via: str | None = None,
           connect_timeout: float = CONNECT_TIMEOUT, stdin: str | bytes | None = None) -> CmdResult:
        """Run a shell command on a host (xen1, xen2) or a guest (g1..g4)."""
        r = exec_on(self.client(name, connect_timeout, via), cmd, timeout, stdin)
        if check and r.rc != 0:
            raise CommandError(name, cmd, r)
        return r

    def try_sh(self, name: str, cmd: str = "true", timeout: float = 20.0, via: str | None = None) -> bool:
        try:
            return self.sh(name, cmd, timeout=timeout, check=False, via=via, connect_timeout=timeout).rc == 0
        except Exception:  # noqa: BLE001 - a probe
            self.drop(name)
            return False

    def put_file(self, name: str, path: str, data: str | bytes, mode: int = 0o644) -> None:
        self.sh(name, f"cat > {path}.tmp && chmod {mode:o} {path}.tmp && mv {path}.tmp {path}", stdin=data)

    def drop(self, name: str | None = None) -> None:
        """Forget cached connections (all, or those of one target)."""
        with self._lock:
            keys = [k for k in self._clients if name is None or k[0] == name]
            cs = [self._clients.pop(k) for k in keys]
        for c in cs:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass

    close = drop

    # -- Xen helpers ----------------------------------------------------------------------------
    def domain_row(self, host: str, name: str) -> tuple[int, str] | None:
        """(memory MiB, state) of domain `name` per `xl list` on `host`, or None when it does not exist there."""
        res = self.sh(host, f"xl list {name} 2>/dev/null | tail -n +2", check=False)
        if res.rc != 0 or not res.stdout.strip():
            return None
        fields = res.stdout.split()
        return int(fields[2]), fields[4]

    def local_storage(self, host: str, files: dict | None = None, thin: dict | None = None,
                      classic: dict | None = None) -> dict:
        """Storage local to one dom0, for the reflink and LVM disk strategies: an XFS filesystem with reflink
        (LOCAL_XFS) and an LVM volume group (LOCAL_VG) with a thin pool, each on a loop file under LOCAL_DIR. Their
        tools are installed first if they are missing (INSTALL_LOCAL_TOOLS).
        ``files``: {name: size} raw files on the XFS; ``thin`` / ``classic``: {name: size} LVs (sizes as
        truncate/lvcreate take them, e.g. "256M"). Leftovers of an earlier run are removed first.
        Returns {name: path} of what it made."""
        self.sh(host, INSTALL_LOCAL_TOOLS, timeout=900)
        self.local_storage_remove(host)
        made = {}
        cmds = ["set -e", f"mkdir -p {LOCAL_DIR} {LOCAL_XFS}",
                f"truncate -s 1G {LOCAL_DIR}/xfs.img && mkfs.xfs -q -f -m reflink=1 {LOCAL_DIR}/xfs.img",
                f"mount -o loop {LOCAL_DIR}/xfs.img {LOCAL_XFS}",
                f"truncate -s 2G {LOCAL_DIR}/pv.img && dev=$(losetup -f --show {LOCAL_DIR}/pv.img) && "
                f"echo $dev > {LOCAL_DIR}/pv.loop",
                f"pvcreate -q $dev && vgcreate -q {LOCAL_VG} $dev && lvcreate -q -L 768M -T {LOCAL_VG}/pool"]
        for name, size in (files or {}).items():
            made[name] = f"{LOCAL_XFS}/{name}"
            cmds.append(f"truncate -s {size} {made[name]}")
        for name, size in (thin or {}).items():
            made[name] = f"/dev/{LOCAL_VG}/{name}"
            cmds.append(f"lvcreate -q -V {size} -T {LOCAL_VG}/pool -n {name}")
        for name, size in (classic or {}).items():
            made[name] = f"/dev/{LOCAL_VG}/{name}"
            cmds.append(f"lvcreate -q -L {size} -n {name} {LOCAL_VG}")
        self.sh(host, "\n".join(cmds), timeout=600)
        return made

    def install_qemu(self, host: str) -> None:
        """Install Xen's qdisk QEMU (qemu-system-xen) and qemu-img in ``host``'s dom0 from the packages in its image,
        unless they are there (a few minutes under emulation; nothing is started)."""
        self.sh(host, INSTALL_QEMU, timeout=1200)

    def local_storage_remove(self, host: str) -> None:
        """Undo :meth:`local_storage` (whatever part of it exists); the disks on it must be detached first."""
        self.sh(host, f"vgremove -q -f {LOCAL_VG} 2>/dev/null; if test -s {LOCAL_DIR}/pv.loop; then "
                      f"pvremove -q -f $(cat {LOCAL_DIR}/pv.loop); losetup -d $(cat {LOCAL_DIR}/pv.loop); fi; "
                      f"umount {LOCAL_XFS} 2>/dev/null; rm -rf {LOCAL_DIR} {LOCAL_XFS}", check=False, timeout=300)

    def locate_guest(self, name: str) -> str | None:
        """Name of the host where domain `name` currently runs, or None."""
        for h in self.hosts:
            r = self.sh(h["name"], f"xl domid {name}", check=False, timeout=60)
            if r.rc == 0 and r.stdout.strip().isdigit():
                return h["name"]
        return None

    def wait_ssh(self, name: str, timeout: float, abort: Callable[[], str | None] | None = None,
                 via: str | None = None) -> float:
        t0 = time.monotonic()

        def probe() -> bool:
            if self.is_host(name) and not ssh_banner(self.host(name)["ssh_port"]):
                return False
            return self.try_sh(name, "true", timeout=15, via=via)
        wait_for(probe, timeout, f"SSH on {name}", interval=3, abort=abort)
        return time.monotonic() - t0
