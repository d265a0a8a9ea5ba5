// Command tapctl is a stand-in for blktap's tap-ctl on machines without
// tapdisk (Debian, CI). It keeps tap-ctl's command-line contract and its
// output when stdout is not a tty (control/tap-ctl.c): `spawn` prints a
// pid, `allocate` prints /dev/xen/blktap-2/tapdevN, `list` prints
// "pid=N minor=N state=0xN args=type:path" lines, failures exit with an
// errno value and print strerror on stderr.
//
// Inside a VM (backend "nbd", the default) `open` serves the image as a
// real block device with `qemu-nbd --connect=/dev/nbdN` (vhd -> qemu's vpc
// driver, qcow2, aio -> raw) and tapdevN is a symlink to /dev/nbdN from
// allocate to free, so reads and writes through the tapdev reach the
// image file. With TAPCTL_FAKE_BACKEND=none (no nbd, no root: host tests)
// tapdevN is a symlink to the image file itself while it is open.
//
// "Tapdisks" are real long-lived processes (this binary re-executed as
// __tapdisk, in its own session, stdio on /dev/null): a caller that made
// them inherit its pipes would hang, as with the real tapdisk. Like
// tapdisk, one exits when its last device is detached.
//
// Environment: TAPCTL_FAKE_STATE (state directory, default
// /run/tap-ctl-fake), TAPCTL_FAKE_BACKEND (nbd|none), TAPCTL_FAKE_DEVDIR
// (default /dev/xen/blktap-2).
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type minor struct {
	PID      int    `json:"pid,omitempty"`
	Type     string `json:"type,omitempty"`
	Path     string `json:"path,omitempty"`
	ReadOnly bool   `json:"ro,omitempty"`
	NBDPID   int    `json:"nbd_pid,omitempty"`
}

type state struct {
	Tapdisks []int          `json:"tapdisks"`
	Minors   map[int]*minor `json:"minors"`
}

// errnoError makes the process exit with code, like tap-ctl's return of
// an errno.
type errnoError struct {
	code syscall.Errno
	msg  string
}

func (e errnoError) Error() string { return e.msg + ": " + e.code.Error() }

func fail(code syscall.Errno, format string, args ...any) error {
	return errnoError{code, fmt.Sprintf(format, args...)}
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
			os.Exit(int(en.code))
		}
		os.Exit(1)
	}
}

// tapdisk is the fake daemon: it only has to exist until told to stop.
func tapdisk() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
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
	case "attach", "open", "close", "detach":
	default:
		return "", fail(syscall.EINVAL, "invalid COMMAND %s", cmd)
	}
	if f.pid < 0 || f.minor < 0 {
		return "", fail(syscall.EINVAL, "usage: %s <-p pid> <-m minor>", cmd)
	}
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
		return "", closeImage(f.minor, m)
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

// running reports whether pid exists and is not a zombie: the servers
// qemu-nbd forks are reparented to init, which may reap them late.
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
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
	for i := 0; i < 100 && !alive(pid); i++ {
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

var qemuFormats = map[string]string{"vhd": "vpc", "qcow2": "qcow2", "aio": "raw"}

func (st *state) open(n int, m *minor, f flags) error {
	typ, path, ok := strings.Cut(f.args, ":")
	format := qemuFormats[typ]
	if !ok || format == "" {
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
		args := []string{"--connect=" + fmt.Sprintf("/dev/nbd%d", n), "-f", format}
		if f.readOnly {
			args = append(args, "--read-only")
		}
		args = append(args, path)
		log, err := os.OpenFile(filepath.Join(stateDir, fmt.Sprintf("nbd%d.log", n)), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return err
		}
		defer log.Close()
		c := exec.Command("qemu-nbd", args...)
		// qemu-nbd --connect forks its server; it must hold the log, not
		// our caller's pipes.
		c.Stdout, c.Stderr = log, log
		if err := c.Run(); err != nil {
			b, _ := os.ReadFile(log.Name())
			return fail(syscall.EIO, "qemu-nbd %s: %v: %s", strings.Join(args, " "), err, b)
		}
		pidFile := fmt.Sprintf("/sys/block/nbd%d/pid", n)
		for i := 0; i < 250; i++ {
			if b, err := os.ReadFile(pidFile); err == nil {
				m.NBDPID, _ = strconv.Atoi(strings.TrimSpace(string(b)))
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if m.NBDPID == 0 {
			return fail(syscall.EIO, "/dev/nbd%d did not connect", n)
		}
	}
	m.Type, m.Path, m.ReadOnly = typ, path, f.readOnly
	return nil
}

func closeImage(n int, m *minor) error {
	switch backend {
	case "none":
		_ = os.Remove(devPath(n))
	default:
		dev := fmt.Sprintf("/dev/nbd%d", n)
		if out, err := exec.Command("qemu-nbd", "--disconnect", dev).CombinedOutput(); err != nil {
			return fail(syscall.EIO, "qemu-nbd --disconnect %s: %v: %s", dev, err, out)
		}
		// The image is complete on disk only once the server has flushed
		// and exited: wait for it, as tapdisk's close returns after flush.
		for i := 0; i < 1500 && running(m.NBDPID); i++ {
			time.Sleep(20 * time.Millisecond)
		}
		if running(m.NBDPID) {
			return fail(syscall.EBUSY, "qemu-nbd %d serving %s did not exit", m.NBDPID, dev)
		}
		m.NBDPID = 0
	}
	m.Type, m.Path, m.ReadOnly = "", "", false
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
			lines = append(lines, fmt.Sprintf("pid=%d minor=%d state=0 args=%s:%s", m.PID, n, m.Type, m.Path))
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
