// Command tapctl is a stand-in for blktap's tap-ctl on machines without
// tapdisk (Debian, CI). It keeps tap-ctl's command-line contract and its
// output when stdout is not a tty (control/tap-ctl.c): `spawn` prints a
// pid, `allocate` prints /dev/xen/blktap-2/tapdevN, `list` prints
// "pid=N minor=N state=0xN args=type:path" lines (state 0x20 while
// paused, 0x200 added after a failed resume: drivers/tapdisk-vbd.h),
// failures exit with an errno value and print it on stderr; `pause` and
// `unpause` return tap_ctl_pause's negative errno, so they exit with
// 256-errno (EINVAL, exit 22, only for a usage error).
//
// "Tapdisks" are real long-lived processes (this binary re-executed as
// __tapdisk, in its own session, stdio on /dev/null): a caller that made
// them inherit its pipes would hang, as with the real tapdisk. Like
// tapdisk, one exits when its last device is detached, and tap-ctl talks
// to it over a control socket (TAPCTL_FAKE_STATE/ctl<pid>).
//
// Like tapdisk, the fake tapdisk opens the image itself and keeps it open
// (a rename does not redirect its writes) and serves it as a block device:
//   - vhd: the chain read through plugins/vhd (each sector from the nearest
//     image holding it, partly written blocks right), writes to the leaf;
//   - qcow2: a private qemu-nbd (qemu follows qcow2 backing files) on a
//     unix socket, reached as an NBD client;
//   - aio: the raw file.
//
// `pause` waits for the request in flight, flushes and closes the image;
// requests arriving while paused wait (they are not failed) until
// `unpause`, which reopens the same image or the one given with
// `-a type:/path`, refusing another size (EMEDIUMTYPE, as
// tapdisk_vbd_resume) and then leaving the device paused. `pause -t SECS`
// bounds the wait for the tapdisk's answer (ETIMEDOUT).
//
// Backends (TAPCTL_FAKE_BACKEND):
//   - nbd (default, in a VM): tapdevN is a symlink to /dev/nbdN from
//     allocate to free; open binds /dev/nbdN to the fake tapdisk with the
//     kernel nbd driver's ioctls (NBD_SET_SOCK/NBD_DO_IT on a socketpair),
//     so the device's I/O is the tapdisk's.
//   - socket (host tests, no root): the same image drivers, served only
//     over NBD on TAPCTL_FAKE_STATE/nbd<minor>.sock (tapdevN links to it).
//   - none (no root, no image drivers: the datapath host tests open
//     files that are not images): tapdevN is a symlink to the image file
//     while it is open; pause and unpause only keep the bookkeeping.
//
// With nbd, an open device is also served on nbd<minor>.sock (qemu-io,
// qemu-img: nbd+unix:///?socket=...).
//
// What real tapdisk does differently: it is one process per VBD with a
// blkback/tapback ring (vbd3) instead of a kernel nbd device; it runs its
// requests asynchronously (aio), many in flight; it has its own VHD code
// (libvhd, with batmap, keyhash and the preallocation modes) and, in
// XCP-ng's builds, a qcow2 driver; pause also quiesces the ring and the
// NBD servers it offers; unpause supports -2 secondary and -c log layers
// (not here: EINVAL); it fails requests after TD_VBD_REQUEST_TIMEOUT
// (120 s) where the fake waits for ever; and its VHD reads of a corrupt
// chain fail where the fake reports EIO.
//
// Environment: TAPCTL_FAKE_STATE (state directory, default
// /run/tap-ctl-fake), TAPCTL_FAKE_BACKEND (nbd|socket|none),
// TAPCTL_FAKE_DEVDIR (default /dev/xen/blktap-2).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type minor struct {
	PID          int    `json:"pid,omitempty"`
	Type         string `json:"type,omitempty"`
	Path         string `json:"path,omitempty"`
	ReadOnly     bool   `json:"ro,omitempty"`
	Paused       bool   `json:"paused,omitempty"`
	ResumeFailed bool   `json:"resume_failed,omitempty"`
}

// VBD state bits tap-ctl list prints (blktap drivers/tapdisk-vbd.h).
const (
	vbdPaused       = 0x0020
	vbdResumeFailed = 0x0200
)

type state struct {
	Tapdisks []int          `json:"tapdisks"`
	Minors   map[int]*minor `json:"minors"`
}

// errnoError makes the process exit with code, like tap-ctl's return of
// an errno.
type errnoError struct {
	code syscall.Errno
	msg  string
	// negative: the command returns -errno, so the process exits with
	// 256-errno (tap-ctl pause/unpause return tap_ctl_pause's -err).
	negative bool
}

func (e errnoError) Error() string { return e.msg + ": " + e.code.Error() }

func fail(code syscall.Errno, format string, args ...any) error {
	return errnoError{code: code, msg: fmt.Sprintf(format, args...)}
}

func env(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

var (
	stateDir = env("TAPCTL_FAKE_STATE", "/run/tap-ctl-fake")
	backend  = env("TAPCTL_FAKE_BACKEND", "nbd")
	devDir   = env("TAPCTL_FAKE_DEVDIR", "/dev/xen/blktap-2")
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "__tapdisk" {
		tapdisk()
		return
	}
	if len(os.Args) < 2 {
		fmt.Println("usage: tap-ctl COMMAND [OPTIONS]")
		os.Exit(0)
	}
	out, err := run(os.Args[1], os.Args[2:])
	fmt.Print(out)
	if err != nil {
		fmt.Fprintln(os.Stderr, err.Error())
		var en errnoError
		if errors.As(err, &en) {
			if en.negative {
				os.Exit(256 - int(en.code))
			}
			os.Exit(int(en.code))
		}
		os.Exit(1)
	}
}

func run(cmd string, args []string) (string, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(stateDir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	st, err := load()
	if err != nil {
		return "", err
	}
	st.prune()
	f, err := parseFlags(args)
	if err != nil {
		return "", err
	}
	out, err := st.do(cmd, f)
	if serr := save(st); serr != nil && err == nil {
		err = serr
	}
	return out, err
}

type flags struct {
	pid, minor int
	args       string
	readOnly   bool
	timeout    time.Duration
}

func parseFlags(args []string) (flags, error) {
	f := flags{pid: -1, minor: -1}
	for i := 0; i < len(args); i++ {
		next := func() (string, error) {
			if i+1 >= len(args) {
				return "", fail(syscall.EINVAL, "option %s needs a value", args[i])
			}
			i++
			return args[i], nil
		}
		var err error
		var v string
		switch args[i] {
		case "-p":
			if v, err = next(); err == nil {
				f.pid, err = strconv.Atoi(v)
			}
		case "-m":
			if v, err = next(); err == nil {
				f.minor, err = strconv.Atoi(v)
			}
		case "-a":
			f.args, err = next()
		case "-R":
			f.readOnly = true
		case "-t":
			var secs int
			if v, err = next(); err == nil {
				secs, err = strconv.Atoi(v)
				f.timeout = time.Duration(secs) * time.Second
			}
		default:
			err = fail(syscall.EINVAL, "unsupported option %s", args[i])
		}
		if err != nil {
			return f, fail(syscall.EINVAL, "%v", err)
		}
	}
	return f, nil
}

func load() (*state, error) {
	st := &state{Minors: map[int]*minor{}}
	b, err := os.ReadFile(filepath.Join(stateDir, "state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, err
	}
	if st.Minors == nil {
		st.Minors = map[int]*minor{}
	}
	return st, nil
}

func save(st *state) error {
	b, err := json.MarshalIndent(st, "", " ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(stateDir, "state.json.tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(stateDir, "state.json"))
}

// alive reports whether pid is one of our fake tapdisks (not a reused pid,
// not a zombie).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), "__tapdisk")
}

// prune forgets tapdisks that died, and their attachments, as blktap
// would after a tapdisk crash.
func (st *state) prune() {
	var live []int
	for _, p := range st.Tapdisks {
		if alive(p) {
			live = append(live, p)
		}
	}
	st.Tapdisks = live
	for _, m := range st.Minors {
		if m.PID != 0 && !st.hasTapdisk(m.PID) {
			*m = minor{}
		}
	}
}

func (st *state) hasTapdisk(pid int) bool {
	for _, p := range st.Tapdisks {
		if p == pid {
			return true
		}
	}
	return false
}

func devPath(n int) string { return fmt.Sprintf("%s/tapdev%d", devDir, n) }

func (st *state) do(cmd string, f flags) (string, error) {
	switch cmd {
	case "spawn":
		return st.spawn()
	case "allocate":
		return st.allocate()
	case "list":
		return st.list(f), nil
	case "free":
		m := st.Minors[f.minor]
		if f.minor < 0 {
			return "", fail(syscall.EINVAL, "usage: free <-m minor>")
		}
		if m == nil {
			return "", fail(syscall.ENOENT, "minor %d is not allocated", f.minor)
		}
		if m.PID != 0 {
			return "", fail(syscall.EBUSY, "minor %d is attached to tapdisk %d", f.minor, m.PID)
		}
		_ = os.Remove(devPath(f.minor))
		delete(st.Minors, f.minor)
		return "", nil
	case "attach", "open", "close", "detach", "pause", "unpause":
	default:
		return "", fail(syscall.EINVAL, "invalid COMMAND %s", cmd)
	}
	if f.pid < 0 || f.minor < 0 {
		return "", fail(syscall.EINVAL, "usage: %s <-p pid> <-m minor>", cmd)
	}
	if cmd == "pause" || cmd == "unpause" {
		out, err := st.attached(cmd, f)
		var en errnoError
		if errors.As(err, &en) {
			en.negative = true
			en.msg = cmd + " failed: " + en.msg
			err = en
		}
		return out, err
	}
	return st.attached(cmd, f)
}

// attached runs the commands that address a tapdisk's minor.
func (st *state) attached(cmd string, f flags) (string, error) {
	if !st.hasTapdisk(f.pid) {
		return "", fail(syscall.ENOENT, "no tapdisk with pid %d", f.pid)
	}
	m := st.Minors[f.minor]
	if m == nil {
		return "", fail(syscall.ENODEV, "minor %d is not allocated", f.minor)
	}
	switch cmd {
	case "attach":
		if m.PID != 0 {
			return "", fail(syscall.EBUSY, "minor %d is attached to tapdisk %d", f.minor, m.PID)
		}
		m.PID = f.pid
	case "open":
		if m.PID != f.pid {
			return "", fail(syscall.EINVAL, "minor %d is not attached to tapdisk %d", f.minor, f.pid)
		}
		if m.Path != "" {
			return "", fail(syscall.EBUSY, "minor %d already has %s:%s open", f.minor, m.Type, m.Path)
		}
		return "", st.open(f.minor, m, f)
	case "close":
		if m.PID != f.pid || m.Path == "" {
			return "", fail(syscall.EINVAL, "minor %d has nothing open in tapdisk %d", f.minor, f.pid)
		}
		return "", closeImage(f.pid, f.minor, m)
	case "pause", "unpause":
		return "", pauseOrUnpause(cmd, m, f)
	case "detach":
		if m.PID != f.pid {
			return "", fail(syscall.EINVAL, "minor %d is not attached to tapdisk %d", f.minor, f.pid)
		}
		if m.Path != "" {
			return "", fail(syscall.EBUSY, "minor %d still has %s open", f.minor, m.Path)
		}
		m.PID = 0
		for _, other := range st.Minors {
			if other.PID == f.pid {
				return "", nil
			}
		}
		// Like tapdisk: no device left, exit.
		_ = syscall.Kill(f.pid, syscall.SIGTERM)
		st.waitGone(f.pid)
	}
	return "", nil
}

func (st *state) waitGone(pid int) {
	for i := 0; i < 100 && alive(pid); i++ {
		time.Sleep(20 * time.Millisecond)
	}
	var live []int
	for _, p := range st.Tapdisks {
		if p != pid {
			live = append(live, p)
		}
	}
	st.Tapdisks = live
}

func (st *state) spawn() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	c := exec.Command(self, "__tapdisk")
	// nil stdio is /dev/null: the daemon holds none of our caller's pipes.
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		return "", fail(syscall.EIO, "spawning tapdisk: %v", err)
	}
	pid := c.Process.Pid
	_ = c.Process.Release()
	// Ready when it answers on its control socket, as tap-ctl spawn
	// returns once tapdisk has created its control socket.
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(ctlSocket(pid)); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	st.Tapdisks = append(st.Tapdisks, pid)
	return fmt.Sprintf("%d\n", pid), nil
}

func (st *state) allocate() (string, error) {
	n := 0
	for st.Minors[n] != nil {
		n++
	}
	if err := os.MkdirAll(devDir, 0o755); err != nil {
		return "", err
	}
	if backend == "nbd" {
		if _, err := os.Stat("/sys/module/nbd"); err != nil {
			if out, err := exec.Command("modprobe", "nbd").CombinedOutput(); err != nil {
				return "", fail(syscall.ENODEV, "modprobe nbd: %v: %s", err, out)
			}
		}
		nbd := fmt.Sprintf("/dev/nbd%d", n)
		for i := 0; i < 100; i++ {
			if _, err := os.Stat(nbd); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if _, err := os.Stat(nbd); err != nil {
			return "", fail(syscall.ENOSPC, "no %s for minor %d", nbd, n)
		}
		_ = os.Remove(devPath(n))
		if err := os.Symlink(nbd, devPath(n)); err != nil {
			return "", err
		}
	}
	st.Minors[n] = &minor{}
	return devPath(n) + "\n", nil
}

var diskTypes = map[string]bool{"vhd": true, "qcow2": true, "aio": true}

func (st *state) open(n int, m *minor, f flags) error {
	typ, path, ok := strings.Cut(f.args, ":")
	if !ok || !diskTypes[typ] {
		return fail(syscall.ENOENT, "unknown disk type in %q", f.args)
	}
	if _, err := os.Stat(path); err != nil {
		return fail(syscall.ENOENT, "%s: %v", path, err)
	}
	switch backend {
	case "none":
		_ = os.Remove(devPath(n))
		if err := os.Symlink(path, devPath(n)); err != nil {
			return err
		}
	default:
		req := ctlRequest{Op: "open", Minor: n, Type: typ, Path: path, ReadOnly: f.readOnly, Kernel: backend == "nbd"}
		if err := tell(f.pid, req, 0); err != nil {
			return err
		}
		if backend == "socket" {
			_ = os.Remove(devPath(n))
			if err := os.Symlink(nbdSocket(n), devPath(n)); err != nil {
				return err
			}
		}
	}
	m.Type, m.Path, m.ReadOnly = typ, path, f.readOnly
	m.Paused, m.ResumeFailed = false, false
	return nil
}

// tell sends req to tapdisk pid and returns its answer as an errno error.
func tell(pid int, req ctlRequest, timeout time.Duration) error {
	c, err := net.Dial("unix", ctlSocket(pid))
	if err != nil {
		return fail(syscall.ECONNREFUSED, "tapdisk %d: %v", pid, err)
	}
	defer c.Close()
	if timeout > 0 {
		_ = c.SetDeadline(time.Now().Add(timeout))
	}
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return fail(syscall.EIO, "tapdisk %d: %v", pid, err)
	}
	var resp ctlResponse
	if err := json.NewDecoder(c).Decode(&resp); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fail(syscall.ETIMEDOUT, "tapdisk %d did not answer %s in %s", pid, req.Op, timeout)
		}
		return fail(syscall.EIO, "tapdisk %d: %v", pid, err)
	}
	if resp.Errno != 0 {
		return fail(syscall.Errno(resp.Errno), "%s", resp.Msg)
	}
	return nil
}

func closeImage(pid, n int, m *minor) error {
	switch backend {
	case "none":
		_ = os.Remove(devPath(n))
	default:
		// Returns once the kernel flushed, the clients are gone and the
		// image is flushed and closed, as tapdisk's close does.
		if err := tell(pid, ctlRequest{Op: "close", Minor: n}, 0); err != nil && !errors.Is(err, syscall.ENODEV) {
			return err
		}
		if backend == "socket" {
			_ = os.Remove(devPath(n))
		}
	}
	m.Type, m.Path, m.ReadOnly, m.Paused, m.ResumeFailed = "", "", false, false, false
	return nil
}

// pauseOrUnpause: pause drains, flushes and closes the image and holds
// later I/O; unpause reopens the same image or the -a one.
func pauseOrUnpause(cmd string, m *minor, f flags) error {
	if m.PID != f.pid {
		return fail(syscall.ENODEV, "minor %d is not attached to tapdisk %d", f.minor, f.pid)
	}
	if m.Path == "" {
		return fail(syscall.ENODEV, "minor %d has no image open", f.minor)
	}
	req := ctlRequest{Op: cmd, Minor: f.minor}
	if cmd == "unpause" {
		if !m.Paused {
			return fail(syscall.EINVAL, "minor %d is not paused", f.minor)
		}
		if f.args != "" {
			typ, path, ok := strings.Cut(f.args, ":")
			if !ok || !diskTypes[typ] {
				return fail(syscall.EINVAL, "unknown disk type in %q", f.args)
			}
			req.Type, req.Path = typ, path
		}
	}
	if backend != "none" {
		if err := tell(f.pid, req, f.timeout); err != nil {
			if cmd == "unpause" && !errors.Is(err, syscall.EINVAL) {
				m.ResumeFailed = true
			}
			return err
		}
	} else if req.Path != "" {
		if _, err := os.Stat(req.Path); err != nil {
			m.ResumeFailed = true
			return fail(syscall.ENOENT, "%s: %v", req.Path, err)
		}
	}
	m.Paused = cmd == "pause"
	m.ResumeFailed = false
	if req.Path != "" {
		m.Type, m.Path = req.Type, req.Path
		if backend == "none" {
			_ = os.Remove(devPath(f.minor))
			_ = os.Symlink(m.Path, devPath(f.minor))
		}
	}
	return nil
}

func (st *state) list(f flags) string {
	var lines []string
	seen := map[int]bool{}
	var ns []int
	for n := range st.Minors {
		ns = append(ns, n)
	}
	sort.Ints(ns)
	for _, n := range ns {
		m := st.Minors[n]
		if f.minor >= 0 && n != f.minor || f.pid >= 0 && m.PID != f.pid {
			continue
		}
		switch {
		case m.PID == 0:
			lines = append(lines, fmt.Sprintf("minor=%d", n))
		case m.Path == "":
			lines = append(lines, fmt.Sprintf("pid=%d minor=%d state=0", m.PID, n))
		default:
			lines = append(lines, fmt.Sprintf("pid=%d minor=%d state=%s args=%s:%s", m.PID, n, m.state(), m.Type, m.Path))
		}
		seen[m.PID] = true
	}
	for _, p := range st.Tapdisks {
		if !seen[p] && f.minor < 0 && (f.pid < 0 || f.pid == p) {
			lines = append(lines, fmt.Sprintf("pid=%d", p))
		}
	}
	if len(lines) == 0 {
		return ""
	}
	return strings.Join(lines, "\n") + "\n"
}

// state is the VBD state as tap-ctl prints it (printf "%#x").
func (m *minor) state() string {
	v := 0
	if m.Paused {
		v |= vbdPaused
	}
	if m.ResumeFailed {
		v |= vbdResumeFailed
	}
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}
