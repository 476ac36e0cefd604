#!/bin/sh
# Runs inside the dom0 root at image build time (chroot): kernel/initrd links for the PV domUs.
set -eu
K=$(ls /boot | sed -n 's/^vmlinuz-//p' | sort -V | tail -1)
mkdir -p /var/lib/fleetckpt-lab /srv/fleetckpt /var/log/xen/console
ln -sf /boot/vmlinuz-$K /var/lib/fleetckpt-lab/vmlinuz
fleetckpt-lab-mkinitrd-domu "$K" /var/lib/fleetckpt-lab/initrd-domu.img "$(command -v busybox)"
ls -l /var/lib/fleetckpt-lab/
