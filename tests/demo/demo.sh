#!/bin/bash
# The luksext story in one guest: a blank disk and a (software) TPM become an
# encrypted SR, used and detached, then unlocked again with nobody typing
# anything. Runs as root inside the VM started by `make demo`; the working
# directory holds the installed plugin tree (make install DESTDIR=./root).
# Every plugin call is made exactly as xapi-storage-script makes it: the
# method's executable, "--json", the parameters on stdin.
set -euo pipefail
W=$PWD
V=$W/root/usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.luksext
ADMIN=$W/root/usr/sbin/luksext
DISK=${DISK:-/dev/vda}
SR=$(cat /proc/sys/kernel/random/uuid)

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# call METHOD JSON: print the call and its reply; the reply also goes to $W/reply
call() {
	printf "$ echo '%s' | %s --json\n" "$2" "$1"
	local rc=0
	printf '%s' "$2" | "$V/$1" --json >"$W/reply" 2>>"$W/plugin.log" || rc=$?
	python3 -m json.tool <"$W/reply" | head -40
	return $rc
}
field() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(v if isinstance(v,str) else json.dumps(v))' "$W/reply"; }

say "This host: a TPM 2.0 and a blank disk"
ls -l /dev/tpmrm0
lsblk -o NAME,SIZE,TYPE,FSTYPE $DISK

say "Plugin.Query: what xapi learns about the luksext SR type"
call Plugin.Query '{"dbg":"demo"}' >/dev/null && python3 -c 'import json; q=json.load(open("'"$W"'/reply")); print("plugin:", q["plugin"], "api:", q["required_api_version"]); print("device-config keys:", ", ".join(sorted(q["configuration"])))'

say "xe sr-create type=luksext device-config:device=$DISK  (SR.create)"
echo "(a recovery passphrase is given too; on a host xapi passes it as a Secret uuid)"
call SR.create '{"dbg":"demo","uuid":"'"$SR"'","configuration":{"device":"'"$DISK"'","recovery-password":"demo recovery passphrase"},"name":"Encrypted local SR","description":"made by make demo"}'
CONFIG=$(cat "$W/reply")
echo "^ this replaces the PBD's device-config: a stable path, the uuids, and no secret"

say "The LUKS2 header: 512-byte sectors, a TPM keyslot bound in the clevis format, a recovery keyslot"
cryptsetup luksDump $DISK | grep -E 'Version|Label|sector|^  [0-9]: luks2|PBKDF|clevis|Keyslot:' || true
clevis luks list -d $DISK || true

say "SR.attach: unseal the key from the TPM, open dm-crypt, mount"
call SR.attach '{"dbg":"demo","configuration":'"$CONFIG"'}'
MNT=$(field)
call SR.stat '{"dbg":"demo","sr":"'"$MNT"'"}' >/dev/null && python3 -c 'import json; s=json.load(open("'"$W"'/reply")); print("SR.stat:", s["name"], "size", s["total_space"], "free", s["free_space"], "health", s["health"])'

say "Use it: a volume (VHD) for a VM, and a file"
call Volume.create '{"dbg":"demo","sr":"'"$MNT"'","name":"disk0","description":"","size":8388608,"sharable":false}' | grep -E '"(key|uri|virtual_size)"|luksext://' || true
echo "SECRET-PAYLOAD-written-by-make-demo" > "$MNT/hello.txt"; sync
ls -l "$MNT"
echo "plaintext occurrences on the raw disk: $(grep -c -a SECRET-PAYLOAD $DISK || true)"

say "SR.detach: unmount and close"
call SR.detach '{"dbg":"demo","sr":"'"$MNT"'"}'
ls /dev/mapper

say "SR.attach again (as at host boot): no passphrase typed, the TPM unlocks it"
call SR.attach '{"dbg":"demo","configuration":'"$CONFIG"'}'
cat "$MNT/hello.txt"
if [ -x "$ADMIN" ]; then
	say "The operator command: luksext status"
	"$ADMIN" status "$SR" || true
fi
call SR.detach '{"dbg":"demo","sr":"'"$MNT"'"}'

say "The recovery passphrase opens it with plain cryptsetup, as a last resort"
printf 'demo recovery passphrase' | cryptsetup open --test-passphrase --key-file - $DISK && echo "recovery passphrase: OK"

say "Done. The plugin log (stderr) is in $W/plugin.log"
