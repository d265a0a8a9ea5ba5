package tapdiskfake

import (
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/luksext/luksext/plugins/tapdisk"
)

// Model is blktap's state as tap-ctl sees it — tapdisk processes and
// allocated minors — and the one copy of tap-ctl's command semantics
// (control/tap-ctl.c and drivers/tapdisk-control.c of blktap 3.55): which
// command is accepted in which state, with which errno, and what `list`
// prints. Both fakes run their commands through Model.Do: Blktap (in
// memory, for unit tests through runfake) and tests/fakes/tapctl (a real
// process per tapdisk serving images, for the VM tier). What a command
// does besides the bookkeeping (starting a process, serving an image,
// draining I/O) is the Backend's.
//
// It is JSON-serialisable, so the process fake keeps it in a file between
// tap-ctl invocations and unit tests can hand it to a child process.
type Model struct {
	Tapdisks []int          `json:"tapdisks"`
	Minors   map[int]*Minor `json:"minors"`
}

// Minor is one allocated blktap minor.
type Minor struct {
	PID      int    `json:"pid,omitempty"` // 0: not attached
	Type     string `json:"type,omitempty"`
	Path     string `json:"path,omitempty"` // "": no image open
	ReadOnly bool   `json:"ro,omitempty"`
	// Paused: tap-ctl pause succeeded and no unpause yet. Like tapdisk,
	// the image is closed (Path is what unpause will reopen) and I/O is
	// held until unpause.
	Paused bool `json:"paused,omitempty"`
	// ResumeFailed: the last unpause failed; the device stays paused
	// (TD_VBD_RESUME_FAILED).
	ResumeFailed bool `json:"resume_failed,omitempty"`
	// Opens counts the times the image was (re)opened: open and unpause.
	Opens int `json:"opens,omitempty"`
	// Writes counts guest writes per image path they landed in (Blktap.Write).
	Writes map[string]int `json:"writes,omitempty"`
}

// StateResumeFailed is TD_VBD_RESUME_FAILED (drivers/tapdisk-vbd.h), as
// `tap-ctl list` prints it next to tapdisk.StatePaused.
const StateResumeFailed = 0x200

// Backend does what a command means outside the bookkeeping. Model.Do
// calls it only for a command it accepts, before changing the model, so a
// Backend error leaves the model as it was (unpause excepted: a failed
// resume is recorded, as tapdisk records it).
type Backend interface {
	// Spawn starts a tapdisk and returns its pid.
	Spawn() (int, error)
	// Allocate makes minor's device node and returns its path.
	Allocate(minor int) (string, error)
	Free(minor int)
	Open(pid, minor int, typ, path string, readOnly bool) error
	Close(pid, minor int) error
	// Pause drains and closes the image; timeout 0 means no bound.
	Pause(pid, minor int, timeout time.Duration) error
	// Unpause reopens typ:path (the image it had when path is "").
	Unpause(pid, minor int, typ, path string, timeout time.Duration) error
	// Exit: the tapdisk's last device was detached; it exits.
	Exit(pid int)
}

// Errno is a command's failure as tap-ctl reports it.
type Errno struct {
	Code syscall.Errno
	Msg  string
	// Negative: the command returns -errno (pause, unpause), so tap-ctl
	// exits with 256-errno.
	Negative bool
}

func (e *Errno) Error() string { return e.Msg + ": " + e.Code.Error() }

// ExitCode is tap-ctl's exit status for the failure.
func (e *Errno) ExitCode() int {
	if e.Negative {
		return 256 - int(e.Code)
	}
	return int(e.Code)
}

// Fail returns an *Errno with a formatted message.
func Fail(code syscall.Errno, format string, args ...any) error {
	return &Errno{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// Flags are the options tap-ctl takes.
type Flags struct {
	PID, Minor int // -1: not given
	Args       string
	ReadOnly   bool
	Timeout    time.Duration
}

// ParseFlags parses -p PID -m MINOR -a TYPE:PATH -R -t SECS; anything else
// is a usage error (EINVAL), as tap-ctl's getopt loops answer.
func ParseFlags(args []string) (Flags, error) {
	f := Flags{PID: -1, Minor: -1}
	for i := 0; i < len(args); i++ {
		next := func() (string, error) {
			if i+1 >= len(args) {
				return "", fmt.Errorf("option %s needs a value", args[i])
			}
			i++
			return args[i], nil
		}
		var err error
		var v string
		switch args[i] {
		case "-p":
			if v, err = next(); err == nil {
				f.PID, err = strconv.Atoi(v)
			}
		case "-m":
			if v, err = next(); err == nil {
				f.Minor, err = strconv.Atoi(v)
			}
		case "-a":
			f.Args, err = next()
		case "-R":
			f.ReadOnly = true
		case "-t":
			var secs int
			if v, err = next(); err == nil {
				secs, err = strconv.Atoi(v)
				f.Timeout = time.Duration(secs) * time.Second
			}
		default:
			err = fmt.Errorf("unsupported option %s", args[i])
		}
		if err != nil {
			return f, Fail(syscall.EINVAL, "%v", err)
		}
	}
	return f, nil
}

// DiskTypes are the image drivers the fakes serve.
var DiskTypes = map[string]bool{"vhd": true, "qcow2": true, "aio": true}

func (m *Model) init() {
	if m.Minors == nil {
		m.Minors = map[int]*Minor{}
	}
}

// HasTapdisk reports whether pid is a running tapdisk.
func (m *Model) HasTapdisk(pid int) bool {
	for _, p := range m.Tapdisks {
		if p == pid {
			return true
		}
	}
	return false
}

// TapdiskGone forgets a tapdisk that died and its attachments; the minors
// stay allocated, as with the kernel driver after a tapdisk crash.
func (m *Model) TapdiskGone(pid int) {
	var live []int
	for _, p := range m.Tapdisks {
		if p != pid {
			live = append(live, p)
		}
	}
	m.Tapdisks = live
	for _, mi := range m.Minors {
		if mi.PID == pid {
			*mi = Minor{}
		}
	}
}

// Do runs one tap-ctl command: its stdout, or an *Errno (or the
// Backend's own error).
func (m *Model) Do(cmd string, args []string, b Backend) (string, error) {
	m.init()
	f, err := ParseFlags(args)
	if err != nil {
		return "", err
	}
	switch cmd {
	case "spawn":
		pid, err := b.Spawn()
		if err != nil {
			return "", err
		}
		m.Tapdisks = append(m.Tapdisks, pid)
		return fmt.Sprintf("%d\n", pid), nil
	case "allocate":
		n := 0
		for m.Minors[n] != nil {
			n++
		}
		dev, err := b.Allocate(n)
		if err != nil {
			return "", err
		}
		m.Minors[n] = &Minor{}
		return dev + "\n", nil
	case "list":
		return m.list(f), nil
	case "free":
		if f.Minor < 0 {
			return "", Fail(syscall.EINVAL, "usage: free <-m minor>")
		}
		mi := m.Minors[f.Minor]
		if mi == nil {
			return "", Fail(syscall.ENOENT, "minor %d is not allocated", f.Minor)
		}
		if mi.PID != 0 {
			return "", Fail(syscall.EBUSY, "minor %d is attached to tapdisk %d", f.Minor, mi.PID)
		}
		b.Free(f.Minor)
		delete(m.Minors, f.Minor)
		return "", nil
	case "attach", "open", "close", "detach":
		return "", m.vbdCommand(cmd, f, b)
	case "pause", "unpause":
		err := m.vbdCommand(cmd, f, b)
		var en *Errno
		if errors.As(err, &en) {
			return "", &Errno{Code: en.Code, Msg: cmd + " failed: " + en.Msg, Negative: true}
		}
		return "", err
	}
	return "", Fail(syscall.EINVAL, "invalid COMMAND %s", cmd)
}

// vbdCommand runs a command tap-ctl sends to tapdisk pid's control socket
// about minor; the tapdisk answers from its own VBD of that minor.
func (m *Model) vbdCommand(cmd string, f Flags, b Backend) error {
	if f.PID < 0 || f.Minor < 0 {
		return Fail(syscall.EINVAL, "usage: %s <-p pid> <-m minor>", cmd)
	}
	if !m.HasTapdisk(f.PID) {
		// tap-ctl cannot connect to the tapdisk's control socket.
		return Fail(syscall.ENOENT, "no tapdisk with pid %d", f.PID)
	}
	mi := m.Minors[f.Minor]
	if mi == nil {
		return Fail(syscall.ENODEV, "minor %d is not allocated", f.Minor)
	}
	mine := mi.PID == f.PID // the tapdisk has a VBD for this minor
	switch cmd {
	case "attach":
		if mine {
			return Fail(syscall.EEXIST, "minor %d is attached to tapdisk %d", f.Minor, f.PID)
		}
		if mi.PID != 0 {
			return Fail(syscall.EBUSY, "minor %d is attached to tapdisk %d", f.Minor, mi.PID)
		}
		mi.PID = f.PID
	case "open":
		if !mine {
			return Fail(syscall.EINVAL, "minor %d is not attached to tapdisk %d", f.Minor, f.PID)
		}
		if mi.Path != "" {
			return Fail(syscall.EALREADY, "minor %d already has %s:%s open", f.Minor, mi.Type, mi.Path)
		}
		typ, path, ok := strings.Cut(f.Args, ":")
		if !ok || !DiskTypes[typ] {
			return Fail(syscall.ENOENT, "unknown disk type in %q", f.Args)
		}
		if err := b.Open(f.PID, f.Minor, typ, path, f.ReadOnly); err != nil {
			return err
		}
		mi.Type, mi.Path, mi.ReadOnly = typ, path, f.ReadOnly
		mi.Paused, mi.ResumeFailed = false, false
		mi.Opens++
	case "close":
		// tapdisk closes a paused VBD too (it logs "closing paused VBD").
		if !mine || mi.Path == "" {
			return Fail(syscall.ENODEV, "minor %d has nothing open in tapdisk %d", f.Minor, f.PID)
		}
		if err := b.Close(f.PID, f.Minor); err != nil {
			return err
		}
		mi.Type, mi.Path, mi.ReadOnly, mi.Paused, mi.ResumeFailed = "", "", false, false, false
	case "detach":
		if !mine {
			return Fail(syscall.ENODEV, "minor %d is not attached to tapdisk %d", f.Minor, f.PID)
		}
		if mi.Path != "" {
			return Fail(syscall.EBUSY, "minor %d still has %s open", f.Minor, mi.Path)
		}
		mi.PID = 0
		for _, other := range m.Minors {
			if other.PID == f.PID {
				return nil
			}
		}
		// Like tapdisk: no device left, exit.
		b.Exit(f.PID)
		m.TapdiskGone(f.PID)
	case "pause":
		if !mine || mi.Path == "" {
			return Fail(syscall.ENODEV, "minor %d has no image open in tapdisk %d", f.Minor, f.PID)
		}
		if err := b.Pause(f.PID, f.Minor, f.Timeout); err != nil {
			return err
		}
		mi.Paused = true // pausing a paused VBD is a no-op (tapdisk_vbd_pause)
	case "unpause":
		if !mine || mi.Path == "" {
			return Fail(syscall.ENODEV, "minor %d has no image open in tapdisk %d", f.Minor, f.PID)
		}
		if !mi.Paused {
			return Fail(syscall.EINVAL, "resume request for unpaused vbd %d", f.Minor)
		}
		var typ, path string
		if f.Args != "" {
			var ok bool
			if typ, path, ok = strings.Cut(f.Args, ":"); !ok || !DiskTypes[typ] {
				return Fail(syscall.EINVAL, "unknown disk type in %q", f.Args)
			}
		}
		if err := b.Unpause(f.PID, f.Minor, typ, path, f.Timeout); err != nil {
			mi.ResumeFailed = true
			return err
		}
		if path != "" {
			mi.Type, mi.Path = typ, path
		}
		mi.Paused, mi.ResumeFailed = false, false
		mi.Opens++
	}
	return nil
}

// list prints tap-ctl list's non-tty lines (tap_cli_list_dict), filtered
// by -p and -m.
func (m *Model) list(f Flags) string {
	var lines []string
	seen := map[int]bool{}
	var ns []int
	for n := range m.Minors {
		ns = append(ns, n)
	}
	sort.Ints(ns)
	for _, n := range ns {
		mi := m.Minors[n]
		if f.Minor >= 0 && n != f.Minor || f.PID >= 0 && mi.PID != f.PID {
			continue
		}
		switch {
		case mi.PID == 0:
			lines = append(lines, fmt.Sprintf("minor=%d", n))
		case mi.Path == "":
			lines = append(lines, fmt.Sprintf("pid=%d minor=%d state=0", mi.PID, n))
		default:
			lines = append(lines, fmt.Sprintf("pid=%d minor=%d state=%s args=%s:%s", mi.PID, n, mi.state(), mi.Type, mi.Path))
		}
		seen[mi.PID] = true
	}
	pids := append([]int(nil), m.Tapdisks...)
	sort.Ints(pids)
	for _, p := range pids {
		if !seen[p] && f.Minor < 0 && (f.PID < 0 || f.PID == p) {
			lines = append(lines, fmt.Sprintf("pid=%d", p))
		}
	}
	if len(lines) == 0 {
		return ""
	}
	return strings.Join(lines, "\n") + "\n"
}

// state is the VBD state as tap-ctl prints it (printf "%#x").
func (mi *Minor) state() string {
	v := 0
	if mi.Paused {
		v |= tapdisk.StatePaused
	}
	if mi.ResumeFailed {
		v |= StateResumeFailed
	}
	if v == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", v)
}
