#!/bin/bash
# Stage 2: PID 1 of the guest, on the host root that stage 1 made writable.
# Starts udev, then becomes the agent that runs the host's scripts. bash as
# PID 1 also reaps orphaned processes (its SIGCHLD handler waits for any
# child).
set -u
CTL=/run/luksext-vm/ctl
OV=/run/luksext-vm/overlay
exec </dev/null >/dev/console 2>&1
# shellcheck source=/dev/null
. "$CTL/boot.env" # WORKDIR, PERSIST_DIRS, BOOT
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/go/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb

log() { echo "luksext-vm: [$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() {
	log "stage 2 failed: $*"
	sync
	echo o >/proc/sysrq-trigger
	sleep 60
}

# udev gives /dev/disk/by-uuid and by-id, which the plugin uses to find an
# SR's device after a reboot, and device-mapper's udev sync. The cold-plug
# is limited to the devices tests use: replaying every device's uevent
# makes udev load dozens of irrelevant modules, ~15 s under TCG.
log "stage 2"
/lib/systemd/systemd-udevd --daemon --resolve-names=never || fail "systemd-udevd"
log "udevd started"
udevadm trigger --action=add --subsystem-match=block --subsystem-match=tpm --subsystem-match=tpmrm \
	--subsystem-match=virtio-ports --subsystem-match=misc --subsystem-match=mem
log "udev triggered"
udevadm settle --timeout=120 || log "udevadm settle timed out"
log "udev settled"

port=
for n in /sys/class/virtio-ports/*/name; do
	[ "$(<"$n")" = luksext.agent ] && port=/dev/${n#/sys/class/virtio-ports/} && port=${port%/name}
done
[ -n "$port" ] && [ -e "$port" ] || fail "agent port not found"
[ -e /dev/tpmrm0 ] && export TPM2TOOLS_TCTI=device:/dev/tpmrm0

# The agent: one line per request from the host.
#   run ID   run $CTL/q/ID.sh with output to ID.out, answer "done ID RC"
#   save     save the overlay upper layers for the next boot, answer "saved RC"
#   off      sync, answer "synced", power off if there is ACPI (the host
#            stops QEMU otherwise)
save() {
	mkdir -p "$CTL/state" || return 1
	for d in $PERSIST_DIRS; do
		[ -d "$OV/$d/upper" ] || continue
		tar -C "$OV/$d/upper" --xattrs --xattrs-include='trusted.*' --numeric-owner -cf "$CTL/state/$d.tar.new" . &&
			mv "$CTL/state/$d.tar.new" "$CTL/state/$d.tar" || return 1
	done
}
exec 3<>"$port"
cd "$WORKDIR" || fail "cd $WORKDIR"
log "ready"
echo ready >&3
while IFS=' ' read -r verb id <&3; do
	case "$verb" in
	run)
		# The script runs in a forked subshell of this bash rather than a
		# new bash: exec'ing bash costs ~0.4 s under TCG, a fork 0.05 s.
		# The port can be open only once (EBUSY), so the answer goes
		# through the inherited fd 3, which the script itself does not get.
		(
			(
				exec 3>&- </dev/null >"$CTL/q/$id.out" 2>&1
				set +u
				script=$CTL/q/$id.sh
				unset verb id port n
				# shellcheck source=/dev/null
				. "$script"
			)
			echo "done $id $?" >&3
		) &
		;;
	save)
		save >>/dev/console 2>&1
		echo "saved $?" >&3
		;;
	off)
		log "power off"
		sync
		echo synced >&3
		echo o >/proc/sysrq-trigger
		;;
	esac
done
fail "agent port closed"
