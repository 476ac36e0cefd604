#!/usr/bin/env bash
# Build the fleetckpt lab images. Called by `labctl.py build`; the cache key is a hash of this folder,
# the distribution, the lab SSH public key and the dom0 wheels, so editing any file here rebuilds.
# usage: build-images.sh DIST OUTDIR SSH_PUBKEY WHEELDIR
# Output in OUTDIR: dom0.img (raw ext4, LABEL=dom0, root=/dev/vda), domu.img (raw ext4, root=/dev/xvda),
#                   boot/xen (gunzipped hypervisor, multiboot), boot/vmlinuz, boot/initrd.img, boot/versions
# No mirror is named: mmdebstrap's default Debian mirror is used.
set -euo pipefail
DIST=$1; OUT=$2; PUB=$3; WHEELS=$4
HERE=$(cd "$(dirname "$0")" && pwd)
B=$OUT/build
rm -rf "$B"; mkdir -p "$B" "$OUT/boot"
log() { echo "[build $(date +%T)] $*"; }

# EXTRA_DOM0: bookworm's minbase lacks netbase, whose /etc/protocols mount.nfs4 needs ("Failed to find 'tcp' protocol")
case "$DIST" in
  bookworm) XENUTILS=xen-utils-4.17; EXTRA_DOM0=,netbase ;;
  trixie)   XENUTILS=xen-utils; EXTRA_DOM0= ;;
  *) echo "unsupported distribution $DIST (bookworm or trixie)" >&2; exit 2 ;;
esac

COMMON_HOOKS=(
  --customize-hook='mkdir -p "$1/root/.ssh" && chmod 700 "$1/root/.ssh"'
  --customize-hook="upload $PUB /root/.ssh/authorized_keys"
  --customize-hook='chmod 600 "$1/root/.ssh/authorized_keys"'
  --customize-hook='echo "root:root" | chroot "$1" chpasswd'
  --customize-hook='mkdir -p "$1/etc/systemd/system/serial-getty@hvc0.service.d" && printf "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,38400,9600 %%I \$TERM\n" > "$1/etc/systemd/system/serial-getty@hvc0.service.d/autologin.conf"'
  --customize-hook='for u in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer systemd-tmpfiles-clean.timer getty-static.service systemd-networkd-wait-online.service modprobe@drm.service modprobe@efi_pstore.service sys-kernel-debug.mount sys-kernel-tracing.mount; do ln -sf /dev/null "$1/etc/systemd/system/$u"; done'
  --customize-hook='printf "# lab: no PAM, so no logind session/user manager per connection (costly under emulation)\nUsePAM no\nUseDNS no\nMaxStartups 50:30:100\nClientAliveInterval 15\n" > "$1/etc/ssh/sshd_config.d/fleetckpt-lab.conf"'
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*'
)

build_domu() {
  mmdebstrap --mode=root --variant=minbase --quiet \
    --include=systemd-sysv,udev,kmod,python3,procps,iproute2,openssh-server,xenstore-utils \
    "${COMMON_HOOKS[@]}" \
    --customize-hook='echo domu > "$1/etc/hostname"' \
    --customize-hook='printf "# / is mounted rw by the initrd (root= on the command line)\nxenfs /proc/xen xenfs defaults,nofail 0 0\n" > "$1/etc/fstab"' \
    --customize-hook="upload $HERE/domu/fleetckpt-lab-net /usr/local/sbin/fleetckpt-lab-net" \
    --customize-hook="upload $HERE/domu/fleetckpt-lab-net.service /etc/systemd/system/fleetckpt-lab-net.service" \
    --customize-hook='chmod 755 "$1/usr/local/sbin/fleetckpt-lab-net"; mkdir -p "$1/etc/systemd/system/multi-user.target.wants"; ln -sf /etc/systemd/system/fleetckpt-lab-net.service "$1/etc/systemd/system/multi-user.target.wants/"' \
    --customize-hook="upload $HERE/domu/trim-boot.sh /tmp/trim-boot.sh" \
    --customize-hook='chroot "$1" sh /tmp/trim-boot.sh; rm -f "$1/tmp/trim-boot.sh"' \
    "$DIST" "$B/domu-root"
}

# LOCAL_STORAGE_DEBS: the packages of dom0-local storage (XFS with reflink, LVM with thin pools) for the tests of the
# reflink and LVM disk strategies. They are downloaded into the image, not installed: Lab.local_storage installs them
# in the one dom0 that needs them, when it needs them, so every other test runs on the dom0 it always had.
LOCAL_STORAGE_DEBS=/opt/fleetckpt-lab/local-storage
# QEMU_DEBS: Xen's qdisk backend (qemu-system-xen: QEMU built for Xen, the device model that serves qcow2 disks) and
# qemu-img, for the qcow2 disk strategy's tests; like the storage tools, installed by Lab.install_qemu where needed.
QEMU_DEBS=/opt/fleetckpt-lab/qemu
build_dom0() {
  mmdebstrap --mode=root --variant=minbase --quiet \
    --include=linux-image-amd64,initramfs-tools,xen-system-amd64,$XENUTILS,xenstore-utils,openssh-server,python3,zstd,nfs-common,busybox-static,procps,iproute2,kmod,udev,systemd-sysv,e2fsprogs,bridge-utils,less$EXTRA_DOM0 \
    --customize-hook='chroot "$1" apt-get clean && chroot "$1" apt-get install --download-only -y -q --no-install-recommends xfsprogs lvm2 thin-provisioning-tools' \
    --customize-hook="mkdir -p \"\$1$LOCAL_STORAGE_DEBS\" && mv \"\$1\"/var/cache/apt/archives/*.deb \"\$1$LOCAL_STORAGE_DEBS/\"" \
    --customize-hook='chroot "$1" apt-get install --download-only -y -q --no-install-recommends qemu-system-xen qemu-utils' \
    --customize-hook="mkdir -p \"\$1$QEMU_DEBS\" && mv \"\$1\"/var/cache/apt/archives/*.deb \"\$1$QEMU_DEBS/\"" \
    "${COMMON_HOOKS[@]}" \
    --customize-hook='echo dom0 > "$1/etc/hostname"' \
    --customize-hook='printf "LABEL=dom0 / ext4 rw,errors=remount-ro 0 1\n" > "$1/etc/fstab"' \
    --customize-hook="sync-in $HERE/dom0/network /etc/systemd/network" \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd' \
    --customize-hook='printf "xen-evtchn\nxen-gntdev\nxen-gntalloc\nxen-blkback\nxen-netback\nxenfs\nloop\nbridge\n" > "$1/etc/modules-load.d/xen.conf"' \
    --customize-hook='printf "XENCONSOLED_TRACE=guest\nXENCONSOLED_ARGS=\"--log=guest --log-dir=/var/log/xen/console\"\n" >> "$1/etc/default/xen"; mkdir -p "$1/var/log/xen/console"' \
    --customize-hook="upload $HERE/dom0/mkinitrd-domu.sh /usr/local/sbin/fleetckpt-lab-mkinitrd-domu" \
    --customize-hook='chmod 755 "$1/usr/local/sbin/fleetckpt-lab-mkinitrd-domu"' \
    --customize-hook="upload $HERE/dom0/setup-dom0.sh /tmp/setup-dom0.sh" \
    --customize-hook='chroot "$1" sh /tmp/setup-dom0.sh; rm -f "$1/tmp/setup-dom0.sh"' \
    "$DIST" "$B/dom0-root"
}

log "mmdebstrap $DIST domU and dom0 (in parallel)"
build_domu > "$B/domu.log" 2>&1 & DP=$!
if ! build_dom0 > "$B/dom0.log" 2>&1; then wait $DP || true; tail -30 "$B/dom0.log" >&2; echo "dom0 mmdebstrap failed" >&2; exit 1; fi
if ! wait $DP; then tail -30 "$B/domu.log" >&2; echo "domU mmdebstrap failed" >&2; exit 1; fi
log "root filesystems done"

R0=$B/dom0-root; RU=$B/domu-root
KVER=$(ls "$R0/boot" | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)
[ -n "$KVER" ] && [ -f "$R0/boot/initrd.img-$KVER" ] || { echo "dom0 kernel/initrd missing" >&2; exit 1; }
[ -s "$R0/var/lib/fleetckpt-lab/initrd-domu.img" ] || { echo "domU initrd was not built" >&2; exit 1; }
XENGZ=$(ls "$R0"/boot/xen-4.*-amd64.gz 2>/dev/null | sort -V | tail -1)
[ -n "$XENGZ" ] || { echo "Xen hypervisor not found in dom0 /boot" >&2; exit 1; }
XENVER=$(basename "$XENGZ" | sed -E 's/^xen-([0-9]+\.[0-9]+).*/\1/')

# pyxs (and any other wheel) for dom0, installed system-wide from wheels downloaded on the controller
for w in "$WHEELS"/*.whl; do
  [ -e "$w" ] || continue
  python3 -m zipfile -e "$w" "$R0/usr/lib/python3/dist-packages/"
done
chroot "$R0" python3 -c "import pyxs" || { echo "pyxs not importable in dom0 root" >&2; exit 1; }

# the domU boots dom0's kernel: give it dom0's modules (minus hardware it never has)
mkdir -p "$RU/lib/modules"
rm -rf "$RU/lib/modules/$KVER"
cp -a "$R0/lib/modules/$KVER" "$RU/lib/modules/"
for d in drivers/gpu drivers/net/wireless drivers/media sound drivers/infiniband drivers/staging drivers/bluetooth drivers/net/ethernet drivers/scsi drivers/usb drivers/iio drivers/hid; do
  rm -rf "$RU/lib/modules/$KVER/kernel/$d"
done
chroot "$RU" depmod -a "$KVER"

cp "$R0/boot/vmlinuz-$KVER" "$OUT/boot/vmlinuz"
cp "$R0/boot/initrd.img-$KVER" "$OUT/boot/initrd.img"
zcat "$XENGZ" > "$OUT/boot/xen"
printf '{"dist": "%s", "xen": "%s", "kernel": "%s"}\n' "$DIST" "$XENVER" "$KVER" > "$OUT/boot/versions.json"

log "packing domu.img"
rm -f "$OUT/domu.img.tmp"; truncate -s 2G "$OUT/domu.img.tmp"
mkfs.ext4 -q -F -L domu -d "$RU" "$OUT/domu.img.tmp"
log "packing dom0.img"
rm -f "$OUT/dom0.img.tmp"; truncate -s 8G "$OUT/dom0.img.tmp"
mkfs.ext4 -q -F -L dom0 -d "$R0" "$OUT/dom0.img.tmp"
mv "$OUT/domu.img.tmp" "$OUT/domu.img"; mv "$OUT/dom0.img.tmp" "$OUT/dom0.img"
chmod 444 "$OUT/domu.img" "$OUT/dom0.img"
rm -rf "$B"
log "done: xen $XENVER kernel $KVER; $(du -sh --apparent-size "$OUT/dom0.img" | cut -f1) dom0.img ($(du -sh "$OUT/dom0.img" | cut -f1) used), $(du -sh "$OUT/domu.img" | cut -f1) used in domu.img"
