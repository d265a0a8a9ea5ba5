// Package vm is the VM test tier: it boots the installed Debian kernel in
// QEMU (TCG; nested KVM hangs on the CI machines) with a busybox initramfs
// built at test time, shares the host filesystem read-only over 9p so every
// host binary (the plugins, `go test -c` binaries, clevis, cryptsetup) runs
// in the guest unchanged, and attaches sparse raw disks and an swtpm vTPM.
// It exists because the development and CI machines have no device-mapper,
// no TPM driver and no udev-managed disks.
//
// In the guest:
//   - the host root is mounted read-only at /, with writable overlays on
//     tmpfs for /usr, /etc, /var, /opt, /root, /home, /srv, /mnt and
//     /media; their upper layers are
//     saved on the host on Reboot and restored on the next boot, so an
//     installed plugin and its state in /etc and /var/lib survive a reboot
//     like on a real host, while /run and /tmp start empty;
//   - WorkDir is shared read-write at the same path as on the host, and is
//     the working directory of every script. Files the host creates under
//     its own /tmp are NOT visible in the guest (the guest's /tmp is a fresh
//     tmpfs): put test binaries built at run time in WorkDir;
//   - disks are /dev/vda, /dev/vdb, ... with serials luksext-disk0, ...
//     (/dev/disk/by-id/virtio-luksext-disk0), udev runs, loopback is up,
//     modules load with modprobe, and with Config.TPM the vTPM is
//     /dev/tpm0 and /dev/tpmrm0 (TPM2TOOLS_TCTI points tpm2-tools at it).
//
// Caveats: the host root is mounted with cache=loose (execs over 9p are
// what boots and clevis spend their time on), so a file the host replaces
// under / during a boot may be seen stale in the guest until
// `echo 3 > /proc/sys/vm/drop_caches`; WorkDir is not cached. The guest
// boots an unpacked PVH kernel without ACPI (see pvhCmdline): one CPU, the
// TPM found at its fixed TIS address, no TPM event log.
//
// Scripts run through a small agent (bash, PID 1 of the guest) that reads
// command ids from a virtio-serial port and runs the scripts the host left
// in a control share, so a test boots once and runs many commands.
package vm
