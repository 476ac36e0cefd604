#!/bin/sh
# Run inside the domU root at image build time (chroot). Every lab guest boots a fresh copy of this image,
# which systemd would treat as a first boot (empty machine-id, no /etc/.updated) and follow with a full
# coldplug; under QEMU TCG a fork+exec costs ~0.1 s and two guests share one emulated CPU with dom0, so
# that boot took 7-8 minutes. Measured unit by unit (systemd-analyze blame), this trims what a lab PV
# guest never needs; what the tests rely on (sshd, journald, udev, tmpfiles, the xenstore tools) stays.
set -eu
# not a first boot: a machine-id (each guest gets its own with systemd.machine_id= on its command line)
# and the "update done" stamps, so ldconfig, the journal catalog and hwdb are not rebuilt at every boot
python3 -c "import uuid; print(uuid.uuid4().hex)" > /etc/machine-id
ldconfig
for f in /etc/.updated /var/.updated; do printf 'TIMESTAMP_NSEC=%s000000000\n' "$(date +%s)" > "$f"; done
for u in \
  ldconfig.service systemd-journal-catalog-update.service systemd-update-done.service systemd-hwdb-update.service \
  systemd-firstboot.service systemd-machine-id-commit.service systemd-sysusers.service \
  systemd-binfmt.service proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount \
  sys-fs-fuse-connections.mount sys-kernel-config.mount dev-hugepages.mount dev-mqueue.mount \
  modprobe@fuse.service modprobe@configfs.service modprobe@dm_mod.service modprobe@loop.service \
  modprobe@nvme_fabrics.service kmod-static-nodes.service \
  systemd-udev-load-credentials.service systemd-journal-flush.service systemd-random-seed.service \
  systemd-update-utmp.service systemd-update-utmp-runlevel.service systemd-pstore.service \
  systemd-remount-fs.service systemd-fsck-root.service e2scrub_reap.service getty@tty1.service \
  systemd-tpm2-setup-early.service systemd-tpm2-setup.service systemd-pcrmachine.service \
  systemd-pcrphase-sysinit.service systemd-pcrphase.service systemd-repart.service \
  systemd-confext.service systemd-sysext.service systemd-hibernate-clear.service \
  systemd-boot-random-seed.service sshd-keygen.service; do
  ln -sf /dev/null "/etc/systemd/system/$u"
done
# coldplug only what a PV guest has and uses (disk, NIC, xen devices, misc nodes, the console), not the
# ~80 tty/vc devices of the kernel's virtual terminals: the full trigger held sysinit.target for ~40 s
mkdir -p /etc/systemd/system/systemd-udev-trigger.service.d
cat > /etc/systemd/system/systemd-udev-trigger.service.d/fleetckpt-lab.conf <<'UNIT'
[Service]
ExecStart=
ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=block --subsystem-match=net --subsystem-match=xen --subsystem-match=xen-backend --subsystem-match=misc --subsystem-match=memory
ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=tty --sysname-match=hvc0
UNIT
# sshd's unit tests its configuration with a second sshd before starting the real one
mkdir -p /etc/systemd/system/ssh.service.d
printf '[Service]\nExecStartPre=\n' > /etc/systemd/system/ssh.service.d/fleetckpt-lab.conf
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\n# lab: keep the journal in memory, no flush to disk at boot\nStorage=volatile\n' \
  > /etc/systemd/journald.conf.d/fleetckpt-lab.conf
