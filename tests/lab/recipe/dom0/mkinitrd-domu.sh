#!/bin/sh
# Build the lab domUs' initramfs: a static busybox, the few modules a PV guest needs to reach its root
# (decompressed, loaded in dependency order), and a 20-line /init. No udev: initramfs-tools' udev
# coldplug cost ~50 s of every guest boot under QEMU TCG, this one takes a couple of seconds.
# usage: mkinitrd-domu.sh KERNEL_VERSION OUTPUT [BUSYBOX]   (run in the dom0 root, or on a dom0)
set -eu
K=$1; OUT=$2; BB=${3:-/bin/busybox}
MODS="xen-blkfront ext4 xen-netfront"
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
mkdir -p "$W/bin" "$W/dev" "$W/proc" "$W/sys" "$W/root" "$W/lib/modules"
cp "$BB" "$W/bin/busybox"
"$W/bin/busybox" --help >/dev/null 2>&1 || { echo "$BB is not a working busybox" >&2; exit 1; }
: > "$W/lib/modules/order"
for m in $MODS; do
  # `insmod PATH` per dependency, dependencies first; builtin modules print nothing
  modprobe -S "$K" --show-depends "$m" | sed -n 's/^insmod \([^ ]*\).*/\1/p' | while read -r p; do
    b=$(basename "$p"); b=${b%.xz}; b=${b%.zst}; b=${b%.gz}
    grep -qx "$b" "$W/lib/modules/order" && continue
    case "$p" in
      *.xz) "$W/bin/busybox" xzcat "$p" > "$W/lib/modules/$b" ;;
      *.zst) zstd -qdc "$p" > "$W/lib/modules/$b" ;;
      *.gz) "$W/bin/busybox" zcat "$p" > "$W/lib/modules/$b" ;;
      *) cp "$p" "$W/lib/modules/$b" ;;
    esac
    echo "$b" >> "$W/lib/modules/order"
  done
done
cat > "$W/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m 2>/dev/null || echo "initrd: insmod $m failed"; done
root=/dev/xvda; for a in $(cat /proc/cmdline); do case $a in root=*) root=${a#root=} ;; esac; done
n=0; while [ ! -b "$root" ]; do n=$((n+1)); [ $n -gt 600 ] && { echo "initrd: $root never appeared"; exec sh; }; sleep 0.1; done
mount -o rw "$root" /root || { echo "initrd: cannot mount $root"; exec sh; }
umount /proc /sys; mount --move /dev /root/dev 2>/dev/null || umount /dev
exec switch_root /root /sbin/init
EOF
chmod 755 "$W/init" "$W/bin/busybox"
(cd "$W" && find . | cpio -o -H newc --quiet) | gzip -1 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$OUT: $(wc -c < "$OUT") bytes, modules: $(tr '\n' ' ' < "$W/lib/modules/order")"
