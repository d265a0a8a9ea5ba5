#!/bin/bash
# luksext acceptance on a real XCP-ng 8.3 host: run as root on a host with the
# luksext RPM installed (and xe-toolstack-restart done) and a SPARE disk.
#
#   tests/host/acceptance.sh --disk /dev/disk/by-id/ata-SPARE --recovery-file FILE \
#       [--adopt-disk /dev/disk/by-id/ata-SPARE2]
#
# It drives only xe, the installed luksext command and dom0's own tools, the
# way an administrator would, and prints one PASS/FAIL line per step, the
# versions it ran against (cryptsetup, blktap, xapi, kernel), and a summary;
# exit status 0 only when every step passed. Each step mirrors a scenario of
# the VM tier, named after the "#" on its line, so a failure here points at a
# test that should have caught it:
#   sm-list, sr-create, attach, reboot-less attach  tests/e2e TestSRLifecycle
#   VDI write, live snapshot, read back              tests/e2e, tests/datapath
#   status, rebind                                   tests/e2e TestAdminCommand
#   the dom0 tool versions                           tests/e2e TestDom0Matrix
#   adopt a hand-made LUKS SR (--adopt-disk)         tests/e2e TestAdoptHandmadeSR
#
# With --adopt-disk, a second spare disk gets an SR built by hand as in the
# README's "Moving from a hand-made LUKS SR" (LUKS1 + `clevis luks bind tpm2
# '{}'` when clevis is installed in dom0, an `ext` SR on
# /dev/mapper/luks-<LUKS uuid>, a VDI with data and a snapshot, a VM using
# it), which then goes through that section's whole sequence.
#
# The recovery passphrase is read from FILE and never appears on a command
# line: it goes to xapi as a Secret through XenAPI on the local socket (dom0's
# python3 XenAPI module; `xe secret-create value=...` would put it in argv),
# and sr-create names the secret (device-config:recovery-password_secret),
# which luksext resolves and then removes from xapi.
#
# It ERASES the disk it is given, so it refuses one that holds anything
# blkid can see (a filesystem, RAID/LVM member, LUKS header, partition
# table), one with partitions, one that is mounted or used by an SR, and
# anything that is not a whole block device.
set -uo pipefail

usage() {
	cat <<'EOF'
usage: acceptance.sh --disk /dev/disk/by-id/SPARE --recovery-file FILE [--adopt-disk DISK2] [--keep]
  --disk           a blank spare disk (it is erased)
  --recovery-file  a file holding the recovery passphrase to use (>= 8 characters)
  --adopt-disk     a second blank spare disk (erased): a hand-made LUKS SR is built
                   on it, then taken over with `luksext adopt`
  --keep           leave the SR in place at the end (default: destroy it)
EOF
}

DISK="" RECOVERY_FILE="" KEEP=0 ADOPT_DISK=""
while [ $# -gt 0 ]; do
	case "$1" in
	--disk) DISK=${2:-}; shift 2 ;;
	--adopt-disk) ADOPT_DISK=${2:-}; shift 2 ;;
	--recovery-file) RECOVERY_FILE=${2:-}; shift 2 ;;
	--keep) KEEP=1; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
if [ -z "$DISK" ] || [ -z "$RECOVERY_FILE" ]; then
	usage >&2
	exit 2
fi

PASSED=0 FAILED=0
pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$*"; }
die() { printf 'acceptance: %s\n' "$*" >&2; exit 2; }

# --- preconditions: refuse rather than erase anything --------------------
[ "$(id -u)" -eq 0 ] || die "run as root"
command -v xe >/dev/null || die "xe not found: run this in dom0"
command -v luksext >/dev/null || die "luksext not found: install the RPM first"
[ -r "$RECOVERY_FILE" ] || die "cannot read $RECOVERY_FILE"
[ "$(wc -c <"$RECOVERY_FILE")" -ge 8 ] || die "$RECOVERY_FILE: the recovery passphrase needs at least 8 characters"
spare() { # DISK: refuse anything but a blank whole disk
	local disk=$1 real
	[ -b "$disk" ] || die "$disk is not a block device"
	real=$(readlink -f "$disk")
	[ "$(lsblk -dno TYPE "$real" 2>/dev/null)" = disk ] || die "$disk ($real) is not a whole disk"
	if blkid -p "$real" >/dev/null 2>&1; then
		die "$disk holds data ($(blkid -p -o export "$real" 2>/dev/null | grep -E '^(TYPE|PTTYPE|LABEL)=' | tr '\n' ' ')); refusing to erase it"
	fi
	[ "$(lsblk -no NAME "$real" | wc -l)" -eq 1 ] || die "$disk has partitions; refusing"
	grep -q "^$real " /proc/mounts && die "$disk is mounted; refusing"
	if xe pbd-list params=device-config 2>/dev/null | grep -qF -e "$disk" -e "$real"; then
		die "$disk is named in an existing PBD; refusing"
	fi
}
spare "$DISK"
REAL=$(readlink -f "$DISK")
if [ -n "$ADOPT_DISK" ]; then
	spare "$ADOPT_DISK"
	[ "$(readlink -f "$ADOPT_DISK")" != "$REAL" ] || die "--adopt-disk and --disk are the same disk"
fi

HOST=$(xe host-list hostname="$(hostname)" --minimal)
[ -n "$HOST" ] || HOST=$(xe host-list --minimal | cut -d, -f1)
DOM0=$(xe vm-list is-control-domain=true resident-on="$HOST" --minimal | cut -d, -f1)
WORK=$(mktemp -d /tmp/luksext-acceptance.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# --- versions --------------------------------------------------------------
echo "== versions"
echo "cryptsetup: $(cryptsetup --version 2>&1)"
echo "blktap:     $(rpm -q blktap 2>&1)"
echo "xapi:       $(xe host-param-get uuid="$HOST" param-name=software-version param-key=xapi 2>&1) ($(rpm -q xapi-core 2>&1))"
echo "kernel:     $(uname -r)"
echo "luksext:    $(rpm -q luksext 2>&1)"
echo "disk:       $DISK -> $REAL ($(lsblk -dno SIZE "$REAL"))"
echo "== steps"

# step NAME COMMAND...: run, print PASS/FAIL with the command's last line.
# The command runs in this shell (not in $(...)), so the variables a step
# function sets (SECRET, SR, ...) are seen by the steps after it.
step() {
	local name=$1 rc
	shift
	"$@" >"$WORK/step.out" 2>&1
	rc=$?
	if [ $rc -eq 0 ]; then
		pass "$name"
	else
		fail "$name (exit $rc): $(tail -n 3 "$WORK/step.out" | tr '\n' ' ')"
	fi
	return $rc
}

# The SR type is registered (xapi-storage-script found the plugins).
sm_listed() { [ -n "$(xe sm-list type=luksext --minimal)" ]; }
step "sm-list shows luksext" sm_listed

# The recovery passphrase becomes a xapi Secret without touching argv.
SECRET=""
make_secret() {
	SECRET=$(python3 - "$RECOVERY_FILE" <<'PY'
import sys
import XenAPI
with open(sys.argv[1]) as f:
    value = f.read().rstrip("\n")
s = XenAPI.xapi_local()
s.xenapi.login_with_password("root", "", "1.0", "luksext-acceptance")
try:
    ref = s.xenapi.secret.create({"value": value})
    print(s.xenapi.secret.get_uuid(ref))
finally:
    s.xenapi.session.logout()
PY
	) && [ -n "$SECRET" ]
}
step "recovery passphrase stored as a xapi secret (from a file)" make_secret

SR=""
sr_create() {
	SR=$(xe sr-create host-uuid="$HOST" type=luksext shared=false name-label="luksext acceptance" \
		device-config:device="$DISK" device-config:recovery-password_secret="$SECRET") && [ -n "$SR" ]
}
# e2e TestSRLifecycle/create
if ! step "sr-create type=luksext with a recovery passphrase" sr_create; then
	echo "== $PASSED passed, $FAILED failed (no SR: stopping)"
	exit 1
fi
PBD=$(xe pbd-list sr-uuid="$SR" host-uuid="$HOST" --minimal)
step "the secret is gone from xapi after sr-create" bash -c "! xe secret-list uuid=$SECRET --minimal | grep -q ."
step "the PBD holds no recovery secret" bash -c "! xe pbd-param-get uuid=$PBD param-name=device-config | grep -q recovery-password"

# dom0 VBD helpers: plug a VDI into dom0 and print its /dev node.
VBDS=()
plug_dom0() { # VDI MODE
	local vbd dev
	vbd=$(xe vbd-create vm-uuid="$DOM0" vdi-uuid="$1" device=autodetect type=Disk mode="$2") || return 1
	VBDS+=("$vbd")
	xe vbd-plug uuid="$vbd" || return 1
	dev=$(xe vbd-param-get uuid="$vbd" param-name=device) || return 1
	udevadm settle
	echo "$vbd /dev/$dev"
}
unplug_dom0() { # VBD
	xe vbd-unplug uuid="$1" && xe vbd-destroy uuid="$1"
}

VDI="" SNAP=""
# e2e TestSRLifecycle/attach-use-detach (datapath: tapdisk serves a VHD)
step "vdi-create (64 MiB)" bash -c "xe vdi-create sr-uuid=$SR name-label=acceptance type=user virtual-size=64MiB > $WORK/vdi" &&
	VDI=$(cat "$WORK/vdi")
head -c $((4 << 20)) /dev/urandom >"$WORK/pattern"
SUM=$(sha256sum <"$WORK/pattern" | cut -d' ' -f1)
write_read() {
	local vbd dev
	read -r vbd dev < <(plug_dom0 "$VDI" RW) || return 1
	dd if="$WORK/pattern" of="$dev" bs=1M oflag=direct status=none || return 1
	sync
	# Live snapshot while the VDI is plugged and written.
	SNAP=$(xe vdi-snapshot uuid="$VDI") || return 1
	[ "$(head -c $((4 << 20)) "$dev" | sha256sum | cut -d' ' -f1)" = "$SUM" ] || { echo "read back differs"; return 1; }
	unplug_dom0 "$vbd"
}
[ -n "$VDI" ] && step "VDI plugged into dom0, written, snapshotted live, read back" write_read
read_snapshot() {
	local vbd dev
	read -r vbd dev < <(plug_dom0 "$SNAP" RO) || return 1
	[ "$(head -c $((4 << 20)) "$dev" | sha256sum | cut -d' ' -f1)" = "$SUM" ] || { echo "snapshot differs"; return 1; }
	unplug_dom0 "$vbd"
}
[ -n "$SNAP" ] && step "the snapshot holds what was written" read_snapshot

# e2e TestSRLifecycle "after reboot: attach with no secret" (here: unplug/plug)
step "pbd-unplug" xe pbd-unplug uuid="$PBD"
step "no mapping left after unplug" bash -c "! ls /dev/mapper | grep -q luksext-$SR"
step "pbd-plug (unlocked by the TPM, no passphrase)" xe pbd-plug uuid="$PBD"
read_again() {
	local vbd dev
	read -r vbd dev < <(plug_dom0 "$VDI" RO) || return 1
	[ "$(head -c $((4 << 20)) "$dev" | sha256sum | cut -d' ' -f1)" = "$SUM" ] || { echo "data differs after replug"; return 1; }
	unplug_dom0 "$vbd"
}
[ -n "$VDI" ] && step "data intact after unplug/plug" read_again

# e2e TestAdminCommand
step "luksext status (unlocks automatically)" luksext status "$SR"
tpm_slot() {
	luksext status "$SR" --json | python3 -c '
import json, sys
for sr in json.load(sys.stdin)["srs"]:
    for k in sr["keyslots"]:
        if k["kind"] == "binding" and (k.get("policy") or {}).get("pin") == "tpm2":
            print(k["keyslot"]); sys.exit(0)
sys.exit(1)'
}
rebind() {
	local slot
	slot=$(tpm_slot) || { echo "no tpm2 binding"; return 1; }
	luksext rebind "$SR" "$slot" --key-file "$RECOVERY_FILE" && luksext status "$SR"
}
step "luksext rebind of the TPM binding, then status" rebind
step "the recovery passphrase opens the disk (cryptsetup --test-passphrase)" \
	cryptsetup open --test-passphrase --key-file "$RECOVERY_FILE" "$DISK"
step "pbd-unplug, pbd-plug after the rebind" bash -c "xe pbd-unplug uuid=$PBD && xe pbd-plug uuid=$PBD"

# Clean up: VBDs left by a failed step, then the VDIs and the SR.
for vbd in "${VBDS[@]}"; do
	xe vbd-unplug uuid="$vbd" >/dev/null 2>&1
	xe vbd-destroy uuid="$vbd" >/dev/null 2>&1
done
if [ $KEEP -eq 0 ]; then
	for v in $SNAP $VDI; do xe vdi-destroy uuid="$v" >/dev/null 2>&1; done
	step "sr-destroy" bash -c "xe pbd-unplug uuid=$PBD && xe sr-destroy uuid=$SR"
	step "no LUKS header left on the disk" bash -c "! cryptsetup isLuks $REAL"
fi

# --- adopt: a hand-made LUKS SR taken over in place (README "Moving from a
# hand-made LUKS SR"; e2e TestAdoptHandmadeSR) -------------------------------
adopt_sequence() {
	local real luks_uuid map old_sr="" vdi="" snap="" vm="" pbd="" vsum
	real=$(readlink -f "$ADOPT_DISK")
	echo "== adopt: a hand-made LUKS SR on $ADOPT_DISK"
	# The recipe (seeds/01): LUKS1 sha512 512-bit, passphrase in keyslot 0,
	# clevis tpm2 in keyslot 1, opened as luks-<LUKS uuid>, an ext SR on it.
	handmade() {
		cryptsetup luksFormat -q --type luks1 -s 512 -h sha512 --key-file "$RECOVERY_FILE" "$real" || return 1
		if command -v clevis >/dev/null; then
			clevis luks bind -y -d "$real" -k "$RECOVERY_FILE" tpm2 '{}' || return 1
		else
			echo "clevis is not installed in dom0: passphrase only (adopt will use --key-file)"
		fi
		luks_uuid=$(cryptsetup luksUUID "$real") && map=luks-$luks_uuid &&
			cryptsetup open --key-file "$RECOVERY_FILE" "$real" "$map" || return 1
		old_sr=$(xe sr-create host-uuid="$HOST" type=ext content-type=user shared=false \
			name-label="luksext adopt acceptance" device-config:device="/dev/mapper/$map") && [ -n "$old_sr" ]
	}
	step "adopt: hand-made LUKS1 + clevis + ext SR" handmade || return 1
	with_data() {
		local vbd dev
		vdi=$(xe vdi-create sr-uuid="$old_sr" name-label="adopt acceptance disk" type=user virtual-size=64MiB) || return 1
		xe vdi-param-set uuid="$vdi" name-description="written before the adoption" || return 1
		read -r vbd dev < <(plug_dom0 "$vdi" RW) || return 1
		dd if="$WORK/pattern" of="$dev" bs=1M oflag=direct status=none || return 1
		xe vbd-unplug uuid="$vbd" && xe vbd-destroy uuid="$vbd" || return 1
		snap=$(xe vdi-snapshot uuid="$vdi") || return 1
		vm=$(xe vm-install template="Other install media" new-name-label="luksext adopt acceptance") || return 1
		xe vbd-create vm-uuid="$vm" vdi-uuid="$vdi" device=0 type=Disk mode=RW bootable=true >/dev/null
	}
	step "adopt: a VDI with data, a snapshot, a VM using it" with_data || return 1
	vsum=$(sha256sum <"$WORK/pattern" | cut -d' ' -f1)
	# README steps 3-6: GC done, metadata saved, unplug, forget, close.
	save_forget_close() {
		xe sr-scan uuid="$old_sr" && /opt/xensource/sm/cleanup.py -u "$old_sr" -g || return 1
		xe vdi-list sr-uuid="$old_sr" params=all >"$WORK/vdi-list.txt" || return 1
		xe vm-export vm="$vm" filename="$WORK/vm.xva" metadata=true include-snapshots=true || return 1
		pbd=$(xe pbd-list sr-uuid="$old_sr" --minimal) && xe pbd-unplug uuid="$pbd" && xe sr-forget uuid="$old_sr" || return 1
		vgchange -an "XSLocalEXT-$old_sr" && cryptsetup close "$map"
	}
	step "adopt: SMAPIv1 GC, vdi-list and vm-export metadata saved, unplug, forget, close" save_forget_close || return 1
	adopt() {
		local key=()
		command -v clevis >/dev/null || key=(--key-file "$RECOVERY_FILE")
		luksext adopt "$ADOPT_DISK" --names "$WORK/vdi-list.txt" --json ${key[@]+"${key[@]}"} >"$WORK/adopt.json"
	}
	step "adopt: luksext adopt" adopt || return 1
	introduce() {
		local cfg
		cfg=$(python3 -c '
import json, sys
a = json.load(open(sys.argv[1]))
print(" ".join("device-config:%s=%s" % kv for kv in sorted(a["device_config"].items())))' "$WORK/adopt.json") || return 1
		xe sr-introduce uuid="$old_sr" type=luksext content-type=user shared=false name-label="luksext adopt acceptance" >/dev/null || return 1
		# shellcheck disable=SC2086 # one word per device-config key
		pbd=$(xe pbd-create host-uuid="$HOST" sr-uuid="$old_sr" $cfg) && xe pbd-plug uuid="$pbd" && xe sr-scan uuid="$old_sr"
	}
	step "adopt: sr-introduce type=luksext, pbd-create, pbd-plug, sr-scan" introduce || return 1
	same_vdis() {
		[ "$(xe vdi-param-get uuid="$vdi" param-name=name-label)" = "adopt acceptance disk" ] &&
			[ "$(xe vdi-param-get uuid="$vdi" param-name=name-description)" = "written before the adoption" ] &&
			[ "$(xe vdi-param-get uuid="$vdi" param-name=sr-uuid)" = "$old_sr" ] &&
			[ "$(xe vdi-param-get uuid="$snap" param-name=sr-uuid)" = "$old_sr" ]
	}
	step "adopt: the VDI and its snapshot are back with their uuids and names" same_vdis
	same_data() {
		local vbd dev
		read -r vbd dev < <(plug_dom0 "$vdi" RO) || return 1
		[ "$(head -c $((4 << 20)) "$dev" | sha256sum | cut -d' ' -f1)" = "$vsum" ] || { echo "data differs after adopt"; return 1; }
		xe vbd-unplug uuid="$vbd" && xe vbd-destroy uuid="$vbd"
	}
	step "adopt: the VDI's data read back through tapdisk" same_data
	restore_vbds() {
		xe vm-import filename="$WORK/vm.xva" metadata=true preserve=true force=true >/dev/null &&
			[ -n "$(xe vbd-list vm-uuid="$vm" vdi-uuid="$vdi" --minimal)" ]
	}
	step "adopt: vm-import metadata=true preserve=true restores the VM's VBD" restore_vbds
	step "adopt: pbd-unplug, pbd-plug (unlocked by the TPM binding clevis made)" \
		bash -c "xe pbd-unplug uuid=$pbd && xe pbd-plug uuid=$pbd"
	step "adopt: luksext status of the adopted SR" luksext status "$old_sr"
	if [ $KEEP -eq 0 ]; then
		xe vm-destroy uuid="$vm" >/dev/null 2>&1
		for v in $snap $vdi; do xe vdi-destroy uuid="$v" >/dev/null 2>&1; done
		step "adopt: sr-destroy of the adopted SR" bash -c "xe pbd-unplug uuid=$pbd && xe sr-destroy uuid=$old_sr"
		step "adopt: no LUKS header left on the disk" bash -c "! cryptsetup isLuks $real"
	fi
}
[ -n "$ADOPT_DISK" ] && adopt_sequence
echo "== $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
