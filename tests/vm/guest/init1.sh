#!/bin/busybox sh
# Stage 1 (initramfs /init): reach the host root over virtio-9p and make it
# behave like a writable host disk, then hand over to stage 2 on the host
# root. Everything that can be done here is done here: busybox runs from
# RAM, while every exec of a host binary reads it over 9p, which under TCG
# costs whole seconds per boot.
/bin/busybox --install -s /bin
export PATH=/bin
R=/newroot
V=/run/luksext-vm
CTL=$V/ctl
OV=$V/overlay

log() { echo "luksext-vm: [$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() {
	log "stage 1 failed: $*"
	sleep 1
	poweroff -f
}
step() { "$@" || fail "$*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
	insmod "/lib/modules/$m.ko" || fail "insmod $m"
done

opts=msize=512000
for w in $(cat /proc/cmdline); do
	case "$w" in luksext.9p=*) opts=${w#luksext.9p=} ;; esac
done
step mount -t 9p -o "trans=virtio,version=9p2000.L,ro,$opts" hostroot $R
# /run is the only writable place until the overlays exist.
step mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs $R/run
mkdir -p $R$CTL $R$OV
step mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 luksextctl $R$CTL
. $R$CTL/boot.env # WORKDIR PERSIST_DIRS BOOT
log "stage 1 (boot $BOOT)"
# The host's tar (run chrooted below) needs /proc: gnulib's fchmodat goes
# through /proc/self/fd. Stage 1 keeps a /proc of its own.
step mount --move /proc $R/proc
step mount -t proc proc /proc

# Writable overlays over the read-only host directories. Upper layers of
# earlier boots come back from the control share (Reboot saved them with
# GNU tar, which keeps the overlay's whiteouts and trusted.* xattrs).
for d in $PERSIST_DIRS; do
	[ -d "$R/$d" ] || continue
	mkdir -p "$R$OV/$d/upper" "$R$OV/$d/work"
	if [ -f "$R$CTL/state/$d.tar" ]; then
		step chroot $R /usr/bin/tar -C "$OV/$d/upper" --xattrs --xattrs-include='trusted.*' --numeric-owner -xpf "$CTL/state/$d.tar"
	fi
	step mount -t overlay overlay -o "lowerdir=$R/$d,upperdir=$R$OV/$d/upper,workdir=$R$OV/$d/work" "$R/$d"
done
step mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/tmp
mkdir -p "$R$WORKDIR"
step mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 luksextwork "$R$WORKDIR"
log "overlays and shares mounted"
for d in sys dev; do
	step mount --move /$d $R/$d
done
mkdir -p $R/dev/pts $R/dev/shm $R/run/lock
step mount -t devpts -o gid=5,mode=620,ptmxmode=000 devpts $R/dev/pts
step mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs $R/dev/shm
ln -sfn /proc/self/fd $R/dev/fd
ln -sfn /proc/self/fd/0 $R/dev/stdin
ln -sfn /proc/self/fd/1 $R/dev/stdout
ln -sfn /proc/self/fd/2 $R/dev/stderr
[ -e $R/dev/ptmx ] || ln -sfn pts/ptmx $R/dev/ptmx
hostname luksext-vm
step ip link set lo up
log "stage 1 done"
exec switch_root $R /bin/bash $CTL/init2.sh
fail "switch_root"
