#!/bin/bash
# luksext acceptance on a real XCP-ng 8.3 host: run as root on a host with the
# luksext RPM installed (and xe-toolstack-restart done) and a SPARE disk.
#
#   tests/host/acceptance.sh --disk /dev/disk/by-id/ata-SPARE --recovery-file FILE
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
usage: acceptance.sh --disk /dev/disk/by-id/SPARE --recovery-file FILE [--keep]
  --disk           a blank spare disk (it is erased)
  --recovery-file  a file holding the recovery passphrase to use (>= 8 characters)
  --keep           leave the SR in place at the end (default: destroy it)
EOF
}

DISK="" RECOVERY_FILE="" KEEP=0
while [ $# -gt 0 ]; do
	case "$1" in
	--disk) DISK=${2:-}; shift 2 ;;
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
[ -b "$DISK" ] || die "$DISK is not a block device"
REAL=$(readlink -f "$DISK")
[ "$(lsblk -dno TYPE "$REAL" 2>/dev/null)" = disk ] || die "$DISK ($REAL) is not a whole disk"
if blkid -p "$REAL" >/dev/null 2>&1; then
	die "$DISK holds data ($(blkid -p -o export "$REAL" 2>/dev/null | grep -E '^(TYPE|PTTYPE|LABEL)=' | tr '\n' ' ')); refusing to erase it"
fi
[ "$(lsblk -no NAME "$REAL" | wc -l)" -eq 1 ] || die "$DISK has partitions; refusing"
grep -q "^$REAL " /proc/mounts && die "$DISK is mounted; refusing"
if xe pbd-list params=device-config 2>/dev/null | grep -qF -e "$DISK" -e "$REAL"; then
	die "$DISK is named in an existing PBD; refusing"
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
step() {
	local name=$1 out rc
	shift
	out=$("$@" 2>&1)
	rc=$?
	if [ $rc -eq 0 ]; then
		pass "$name"
	else
		fail "$name (exit $rc): $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
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
echo "== $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
