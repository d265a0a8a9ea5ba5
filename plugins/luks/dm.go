package luks

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// This file is the little of libdevmapper that opening a LUKS device
// needs: create, load, resume, remove and status ioctls on
// /dev/mapper/control, with the udev cookie handshake libdevmapper does
// (libdm/libdm-common.c: dm_udev_create_cookie, dm_udev_wait). The
// buffers are ours, so a table holding a key is wiped after the ioctl;
// anatol/devmapper.go builds its table in a Go string (unwipeable) and has
// no cookie.

// dmIoctlVersion is the oldest device-mapper ioctl interface these calls
// need (4.x: every kernel since 2.6).
var dmIoctlVersion = [3]uint32{4, 0, 0}

// udev flags carried in the high 16 bits of the cookie (event_nr), as
// libdm/libdevmapper.h defines them; 10-dm.rules / 55-dm.rules decode them
// with `dmsetup udevflags`.
const (
	dmUdevFlagsShift         = 16
	dmUdevPrimarySourceFlag  = 0x0040
	dmCookieMagic            = 0x0D4D
	dmUdevCookieWaitDeadline = 30 * time.Second
)

// dmInfo is what DM_DEV_STATUS says about a device.
type dmInfo struct {
	Name, UUID string
	Dev        uint64
	OpenCount  int32
	Flags      uint32
}

func (i dmInfo) live() bool      { return i.Flags&unix.DM_ACTIVE_PRESENT_FLAG != 0 }
func (i dmInfo) suspended() bool { return i.Flags&unix.DM_SUSPEND_FLAG != 0 }

// ensureDMControl makes /dev/mapper/control when it is missing, as
// libdevmapper does (libdm/ioctl/libdm-iface.c _create_control): before
// dm_mod is loaded nothing creates it (a TCG guest's first attach after
// boot fell back to cryptsetup for that reason). Opening it then loads
// dm_mod through its char-major-10-236 alias (drivers/char/misc.c
// misc_open → request_module), as on dom0, where systemd's
// kmod-static-nodes makes the same node at boot.
func ensureDMControl() error {
	const path = "/dev/mapper/control"
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	if err := os.MkdirAll("/dev/mapper", 0o755); err != nil {
		return err
	}
	const miscMajor, mapperCtrlMinor = 10, 236 // include/linux/miscdevice.h
	if err := unix.Mknod(path, unix.S_IFCHR|0o600, int(unix.Mkdev(miscMajor, mapperCtrlMinor))); err != nil && !errors.Is(err, unix.EEXIST) {
		return err
	}
	ctl, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return ctl.Close()
}

// dmCall runs one ioctl with buf (a DmIoctl header followed by payload).
func dmCall(cmd uintptr, buf []byte) error {
	ctl, err := os.OpenFile("/dev/mapper/control", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("device-mapper control: %w", err)
	}
	defer ctl.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), cmd, uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return errno
	}
	return nil
}

func dmHeader(buf []byte, name string) *unix.DmIoctl {
	h := (*unix.DmIoctl)(unsafe.Pointer(&buf[0]))
	h.Version = dmIoctlVersion
	h.Data_size = uint32(len(buf))
	h.Data_start = unix.SizeofDmIoctl
	copy(h.Name[:], name)
	return h
}

// dmStatus returns the device's info; ENXIO when no such device.
func dmStatus(name string) (dmInfo, error) {
	buf := make([]byte, unix.SizeofDmIoctl)
	h := dmHeader(buf, name)
	if err := dmCall(unix.DM_DEV_STATUS, buf); err != nil {
		return dmInfo{}, err
	}
	return dmInfo{Name: cstring(h.Name[:]), UUID: cstring(h.Uuid[:]), Dev: h.Dev, OpenCount: h.Open_count, Flags: h.Flags}, nil
}

func dmCreate(name, uuid string) (dmInfo, error) {
	buf := make([]byte, unix.SizeofDmIoctl)
	h := dmHeader(buf, name)
	copy(h.Uuid[:], uuid)
	if err := dmCall(unix.DM_DEV_CREATE, buf); err != nil {
		return dmInfo{}, err
	}
	return dmInfo{Name: name, UUID: uuid, Dev: h.Dev}, nil
}

// dmLoad loads one target as the inactive table. params is wiped by the
// caller; the ioctl buffer holding a copy of it is wiped here.
func dmLoad(name, target string, lengthSectors uint64, params []byte) error {
	const align = 8
	specLen := (len(params) + 1 + align - 1) / align * align
	buf := make([]byte, unix.SizeofDmIoctl+unix.SizeofDmTargetSpec+specLen)
	defer clear(buf)
	h := dmHeader(buf, name)
	h.Target_count = 1
	spec := (*unix.DmTargetSpec)(unsafe.Pointer(&buf[unix.SizeofDmIoctl]))
	spec.Sector_start = 0
	spec.Length = lengthSectors
	spec.Next = uint32(unix.SizeofDmTargetSpec + specLen)
	copy(spec.Target_type[:], target)
	copy(buf[unix.SizeofDmIoctl+unix.SizeofDmTargetSpec:], params)
	return dmCall(unix.DM_TABLE_LOAD, buf)
}

// dmResume makes the inactive table live and lets I/O through. cookie is
// the udev cookie (0: none).
func dmResume(name string, cookie uint32) error {
	buf := make([]byte, unix.SizeofDmIoctl)
	h := dmHeader(buf, name)
	h.Event_nr = cookie | dmUdevPrimarySourceFlag<<dmUdevFlagsShift
	return dmCall(unix.DM_DEV_SUSPEND, buf)
}

// dmRemove removes the device and its tables.
func dmRemove(name string) error {
	buf := make([]byte, unix.SizeofDmIoctl)
	h := dmHeader(buf, name)
	h.Event_nr = dmUdevPrimarySourceFlag << dmUdevFlagsShift
	return dmCall(unix.DM_DEV_REMOVE, buf)
}

// dmTargetVersion returns the version of a loaded target ("crypt"); ok is
// false when the target's module is not loaded yet.
func dmTargetVersion(target string) (v [3]uint32, ok bool, err error) {
	buf := make([]byte, 16<<10)
	h := dmHeader(buf, "")
	if err := dmCall(unix.DM_LIST_VERSIONS, buf); err != nil {
		return v, false, err
	}
	if h.Flags&unix.DM_BUFFER_FULL_FLAG != 0 {
		return v, false, errors.New("device-mapper target list does not fit 16 KiB")
	}
	// struct dm_target_versions { u32 next; u32 version[3]; char name[]; }
	off := int(h.Data_start)
	for off+16 <= int(h.Data_size) && off+16 <= len(buf) {
		next := *(*uint32)(unsafe.Pointer(&buf[off]))
		name := buf[off+16:]
		if next != 0 && int(next) <= len(name)+16 {
			name = name[:next-16]
		}
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		if string(name) == target {
			for k := 0; k < 3; k++ {
				v[k] = *(*uint32)(unsafe.Pointer(&buf[off+4+4*k]))
			}
			return v, true, nil
		}
		if next == 0 {
			break
		}
		off += int(next)
	}
	return v, false, nil
}

// udevRunning is libdevmapper's test (libdm/libdm-common.c
// _check_udev_is_running → udev_queue_get_udev_is_active): udevd creates
// its control socket when it starts.
func udevRunning() bool {
	_, err := os.Stat("/run/udev/control")
	return err == nil
}

// udevCookie is libdevmapper's notification semaphore: a SysV semaphore
// keyed DM_COOKIE_MAGIC<<16 | base, set to 1; 95-dm-notify.rules runs
// `dmsetup udevcomplete <cookie>` after udev has processed the event
// (nodes and /dev/mapper symlinks are made before RUN programs), which
// decrements it; the waiter waits for zero and removes it.
type udevCookie struct {
	semid int
	value uint32 // base, without flags
}

func newUdevCookie() (*udevCookie, error) {
	for range 32 {
		base := uint32(rand.IntN(0xffff) + 1)
		key := dmCookieMagic<<16 | base
		id, _, errno := unix.Syscall(unix.SYS_SEMGET, uintptr(key), 1, 0o600|unix.IPC_CREAT|unix.IPC_EXCL)
		if errno == unix.EEXIST {
			continue
		}
		if errno != 0 {
			return nil, fmt.Errorf("udev cookie semaphore: %w", errno)
		}
		const setval = 16 // SETVAL, include/uapi/linux/sem.h
		if _, _, errno := unix.Syscall6(unix.SYS_SEMCTL, id, 0, setval, 1, 0, 0); errno != 0 {
			unix.Syscall(unix.SYS_SEMCTL, id, 0, unix.IPC_RMID)
			return nil, fmt.Errorf("udev cookie semaphore: %w", errno)
		}
		return &udevCookie{semid: int(id), value: base}, nil
	}
	return nil, errors.New("udev cookie semaphore: no free key")
}

// wait waits until udev completed the cookie or the deadline passed
// (udev without device-mapper rules never completes it); it reports
// whether udev completed it, and always removes the semaphore.
func (c *udevCookie) wait(d time.Duration) bool {
	defer unix.Syscall(unix.SYS_SEMCTL, uintptr(c.semid), 0, unix.IPC_RMID)
	type sembuf struct {
		num uint16
		op  int16
		flg int16
	}
	op := sembuf{num: 0, op: 0} // wait for zero
	ts := unix.NsecToTimespec(d.Nanoseconds())
	for {
		_, _, errno := unix.Syscall6(unix.SYS_SEMTIMEDOP, uintptr(c.semid), uintptr(unsafe.Pointer(&op)), 1, uintptr(unsafe.Pointer(&ts)), 0, 0)
		switch errno {
		case 0:
			return true
		case unix.EINTR:
			continue
		default: // EAGAIN: timed out
			return false
		}
	}
}

// reapOrphanCookies removes the udev cookie semaphores that an open killed
// between making its cookie and the resume ioctl left behind: nobody waits
// for them and udev never completes them, so they would stay until
// reboot. libdevmapper leaves such a cookie of a killed dmsetup or
// cryptsetup too (libdm/libdm-common.c never reclaims one; `dmsetup
// udevcomplete_all` is the administrator's tool); this removes only what
// is provably orphaned, where udevcomplete_all would also remove cookies
// that live processes wait for. An orphan: DM_COOKIE_MAGIC key, one
// semaphore, never operated on (otime 0: libdevmapper increments its
// cookie with semop before any ioctl, dmsetup udevcomplete decrements it),
// still at the initial 1, and the process that set that value (SETVAL
// records its pid, ipc/sem.c semctl_setval) is gone.
func reapOrphanCookies(log logrus.FieldLogger) {
	for _, semid := range orphanCookies() {
		if _, _, errno := unix.Syscall(unix.SYS_SEMCTL, uintptr(semid), 0, unix.IPC_RMID); errno == 0 {
			log.WithField("semid", semid).Info("removed the udev cookie of an interrupted open")
		}
	}
}

// orphanCookies lists the semids of orphaned udev cookies (reapOrphanCookies).
func orphanCookies() []int {
	b, err := os.ReadFile("/proc/sysvipc/sem")
	if err != nil {
		return nil
	}
	const getpid, getval = 11, 12 // include/uapi/linux/sem.h
	var ids []int
	lines := strings.Split(string(b), "\n")
	for _, l := range lines[min(1, len(lines)):] {
		// key semid perms nsems uid gid cuid cgid otime ctime
		f := strings.Fields(l)
		if len(f) < 10 {
			continue
		}
		key, err1 := strconv.ParseInt(f[0], 10, 64)
		semid, err2 := strconv.Atoi(f[1])
		if err1 != nil || err2 != nil || uint32(key)>>16 != dmCookieMagic || f[3] != "1" || f[8] != "0" {
			continue
		}
		val, _, errno := unix.Syscall(unix.SYS_SEMCTL, uintptr(semid), 0, getval)
		if errno != 0 || val != 1 {
			continue
		}
		pid, _, errno := unix.Syscall(unix.SYS_SEMCTL, uintptr(semid), 0, getpid)
		if errno != 0 || int(pid) <= 0 {
			continue
		}
		if unix.Kill(int(pid), 0) == unix.ESRCH {
			ids = append(ids, semid)
		}
	}
	return ids
}
