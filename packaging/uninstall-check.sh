#!/bin/sh
# Run by the RPM's %preun before luksext is erased (installed as
# /usr/libexec/luksext/uninstall-check). Exit status:
#   0  no luksext SR anywhere we can see: removing the plugin is safe
#   1  a luksext SR is attached on this host: removal must be refused
#   2  xapi knows luksext SRs, none attached here: removal is allowed, but
#      those SRs cannot be plugged again until luksext is reinstalled
#
# Why refuse only case 1: an attached SR holds an open dm-crypt mapping and a
# mount under /var/run/sr-mount; without SR.detach/Datapath.* scripts xapi can
# no longer unplug it or stop its VBDs cleanly, and the host is left with a
# decrypted device nobody manages. In case 2 nothing is open: the encrypted
# data stays on disk intact (key in the LUKS header, TPM untouched), and the
# admin may be removing the plugin on purpose (decommissioning, or a host of
# the pool that never had a luksext SR) - a loud warning is enough.
#
# Test hooks: LUKSEXT_SR_MOUNT_ROOT (default /var/run/sr-mount) and
# LUKSEXT_XE (default: xe from PATH). Plain POSIX sh: it runs in %preun.
set -u
mount_root=${LUKSEXT_SR_MOUNT_ROOT:-/var/run/sr-mount}
xe=${LUKSEXT_XE:-$(command -v xe || true)}

# A mounted luksext SR has luksext-sr.json at its filesystem root: the file
# lives inside the encrypted filesystem, so it is only visible while mounted.
attached=""
for meta in "$mount_root"/*/luksext-sr.json; do
	[ -e "$meta" ] || continue
	attached="$attached $(basename "$(dirname "$meta")")"
done

known=""
if [ -n "$xe" ]; then
	if ! known=$(timeout 30 "$xe" sr-list type=luksext --minimal 2>/dev/null); then
		known=""
		echo "luksext: could not ask xapi for luksext SRs (is xapi running?); checked mounts only" >&2
	fi
fi

if [ -n "$attached" ]; then
	cat >&2 <<MSG
luksext: REFUSING to remove the plugin: luksext SR(s) attached on this host:
  $attached
Their disks are unlocked and mounted. Removing the plugin now would leave
xapi unable to detach them. First stop the VMs using them and unplug the SRs:
  xe pbd-list sr-uuid=<uuid> host-uuid=\$(xe host-list hostname=\$(hostname) --minimal) --minimal
  xe pbd-unplug uuid=<pbd uuid>
(or xe sr-forget / xe sr-destroy if you no longer need them), then retry.
To remove the plugin anyway: rpm -e --nopreun luksext
MSG
	exit 1
fi
if [ -n "$known" ]; then
	cat >&2 <<MSG
luksext: WARNING: xapi still knows luksext SR(s): $(echo "$known" | tr , ' ')
None is attached on this host, so the plugin is being removed. Those SRs
cannot be plugged again until luksext is reinstalled; their encrypted data
stays on disk untouched. If they are gone for good: xe sr-forget uuid=<uuid>
MSG
	exit 2
fi
exit 0
