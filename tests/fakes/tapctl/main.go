// Command tapctl is a stand-in for blktap's tap-ctl on machines without
// tapdisk (Debian, CI). Which command is accepted in which state, with
// which errno, and what `list` prints is plugins/tapdisk/tapdiskfake.Model,
// the same model the unit tests' in-memory fake runs; this command keeps
// it in TAPCTL_FAKE_STATE/state.json (under a lock) between invocations
// and gives it real tapdisks. Output is tap-ctl's when stdout is not a tty
// (control/tap-ctl.c): `spawn` prints a pid, `allocate` prints
// /dev/xen/blktap-2/tapdevN, `list` prints "pid=N minor=N state=0xN
// args=type:path" lines; failures exit with an errno value and print it on
// stderr; `pause` and `unpause` exit with 256-errno.
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
	"strings"
	"syscall"
	"time"

	"github.com/luksext/luksext/plugins/tapdisk/tapdiskfake"
)

// fail is the errno a tap-ctl command or a tapdisk answers.
var fail = tapdiskfake.Fail

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
		var en *tapdiskfake.Errno
		if errors.As(err, &en) {
			os.Exit(en.ExitCode())
		}
		os.Exit(1)
	}
}

// run runs one command on the model kept in the state directory, under
// its lock (tap-ctl invocations may run concurrently).
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
	m, err := load()
	if err != nil {
		return "", err
	}
	// Forget tapdisks that died, as blktap does after a tapdisk crash.
	for _, pid := range append([]int(nil), m.Tapdisks...) {
		if !alive(pid) {
			m.TapdiskGone(pid)
		}
	}
	out, err := m.Do(cmd, args, processes{})
	if serr := save(m); serr != nil && err == nil {
		err = serr
	}
	return out, err
}

func load() (*tapdiskfake.Model, error) {
	m := &tapdiskfake.Model{}
	b, err := os.ReadFile(filepath.Join(stateDir, "state.json"))
	if errors.Is(err, os.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, err
	}
	return m, json.Unmarshal(b, m)
}

func save(m *tapdiskfake.Model) error {
	b, err := json.MarshalIndent(m, "", " ")
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

func devPath(n int) string { return fmt.Sprintf("%s/tapdev%d", devDir, n) }

// processes is the model's Backend: tapdisks are processes (this binary
// as __tapdisk) told what to do over their control sockets; device nodes
// are symlinks (to /dev/nbdN, the NBD socket, or the file itself).
type processes struct{}

func (processes) Spawn() (int, error) {
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	c := exec.Command(self, "__tapdisk")
	// nil stdio is /dev/null: the daemon holds none of our caller's pipes.
	c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := c.Start(); err != nil {
		return 0, fail(syscall.EIO, "spawning tapdisk: %v", err)
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
	return pid, nil
}

func (processes) Allocate(n int) (string, error) {
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
		if err := relink(nbd, n); err != nil {
			return "", err
		}
	}
	return devPath(n), nil
}

func (processes) Free(n int) { _ = os.Remove(devPath(n)) }

func relink(target string, n int) error {
	_ = os.Remove(devPath(n))
	return os.Symlink(target, devPath(n))
}

func (processes) Open(pid, n int, typ, path string, readOnly bool) error {
	if _, err := os.Stat(path); err != nil {
		return fail(syscall.ENOENT, "%s: %v", path, err)
	}
	switch backend {
	case "none":
		return relink(path, n)
	case "socket":
		if err := tell(pid, ctlRequest{Op: "open", Minor: n, Type: typ, Path: path, ReadOnly: readOnly}, 0); err != nil {
			return err
		}
		return relink(nbdSocket(n), n)
	}
	return tell(pid, ctlRequest{Op: "open", Minor: n, Type: typ, Path: path, ReadOnly: readOnly, Kernel: true}, 0)
}

func (processes) Close(pid, n int) error {
	if backend != "none" {
		// Returns once the kernel flushed, the clients are gone and the
		// image is flushed and closed, as tapdisk's close does.
		if err := tell(pid, ctlRequest{Op: "close", Minor: n}, 0); err != nil && !errors.Is(err, syscall.ENODEV) {
			return err
		}
	}
	if backend != "nbd" {
		_ = os.Remove(devPath(n))
	}
	return nil
}

func (processes) Pause(pid, n int, timeout time.Duration) error {
	if backend == "none" {
		return nil
	}
	return tell(pid, ctlRequest{Op: "pause", Minor: n}, timeout)
}

func (processes) Unpause(pid, n int, typ, path string, timeout time.Duration) error {
	if backend != "none" {
		return tell(pid, ctlRequest{Op: "unpause", Minor: n, Type: typ, Path: path}, timeout)
	}
	if path == "" {
		return nil
	}
	if _, err := os.Stat(path); err != nil {
		return fail(syscall.ENOENT, "%s: %v", path, err)
	}
	return relink(path, n)
}

func (processes) Exit(pid int) {
	_ = syscall.Kill(pid, syscall.SIGTERM)
	for i := 0; i < 100 && alive(pid); i++ {
		time.Sleep(20 * time.Millisecond)
	}
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
