#!/usr/bin/env bash
# Install what the fleetckpt Xen test lab needs on a Debian 12 (bookworm) controller. Run as root.
# Idempotent: when every package is already installed it only checks and returns (no apt-get update).
set -euo pipefail
PKGS=(
  qemu-system-x86   # the two nested Xen hosts (TCG)
  qemu-utils        # qemu-img overlays
  mmdebstrap        # dom0/domU root filesystems
  debian-archive-keyring
  e2fsprogs         # mkfs.ext4 -d
  nfs-ganesha nfs-ganesha-vfs   # userspace NFSv4.1 server for the shared store (no kernel nfsd needed)
  socat             # per-connection relay from QEMU guestfwd to the NFS server
  openssh-client    # ssh/ssh-keygen (labctl ssh, Ansible)
  python3-pip       # pip download of the dom0 wheel (pyxs)
  ca-certificates
)
if [ "$(id -u)" != 0 ]; then echo "install-deps.sh: must run as root" >&2; exit 1; fi
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all lab packages already installed"
else
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# ganesha's packaged service must not grab the lab's port: the lab runs its own instance.
for s in nfs-ganesha nfs-ganesha-lock; do
  if systemctl is-enabled "$s" >/dev/null 2>&1; then systemctl disable --now "$s" >/dev/null 2>&1 || true; fi
done
mkdir -p /var/lib/nfs/ganesha /var/run/ganesha
[ -e /etc/mtab ] || ln -s /proc/self/mounts /etc/mtab
command -v qemu-system-x86_64 >/dev/null && command -v mmdebstrap >/dev/null && command -v ganesha.nfsd >/dev/null \
  && command -v socat >/dev/null || { echo "install-deps: a required tool is still missing" >&2; exit 1; }
echo "install-deps: ok ($(qemu-system-x86_64 --version | head -1); mmdebstrap $(mmdebstrap --version | awk '{print $2}'))"
