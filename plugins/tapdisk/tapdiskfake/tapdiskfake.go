// Package tapdiskfake is an in-memory model of blktap behind tap-ctl, for
// unit tests through runfake: it keeps tapdisks and minors, enforces the
// order real blktap enforces (attach needs an allocated minor, free needs
// a detached one, a paused minor refuses everything but unpause, ...), prints what tap-ctl prints when stdout is a pipe,
// and can simulate a crash of the caller right before or right after any
// command. The out-of-process fake used in VMs is tests/fakes/tapctl.
package tapdiskfake

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/tapdisk"
)

// Minor is one allocated blktap minor.
type Minor struct {
	PID      int // 0: not attached
	Type     string
	Path     string // "": no image open
	ReadOnly bool
	// Paused: tap-ctl pause succeeded and no unpause yet. Like tapdisk,
	// the image is closed (Path is what unpause will reopen) and every
	// I/O or image operation but unpause is refused.
	Paused bool
	// Writes counts I/Os accepted, per path they went to (Write).
	Writes map[string]int
	// Opens counts the times the image was (re)opened by path: open and
	// unpause. A model of the VM holding the file open reopens it by path
	// when this changes (tapdisk's reopen on unpause).
	Opens int
}

// Crash says when a command should report failure: Before (nothing done)
// or After (done, but the caller never learns it: as if it died).
type Crash struct {
	Command string
	After   bool
}

// ErrCrash is what a simulated crash returns.
var ErrCrash = errors.New("simulated crash")

// Blktap is the model.
type Blktap struct {
	mu       sync.Mutex
	nextPID  int
	tapdisks map[int]bool
	minors   map[int]*Minor
	crashes  []Crash
	// hang: pids whose tapdisk never answers pause (a stuck tapdisk).
	hang map[int]bool
	// AfterCommand, when set, is called after every command that changed
	// something (with the model's lock held: it may call State only).
	AfterCommand func()
}

type state struct {
	NextPID  int            `json:"next_pid"`
	Tapdisks []int          `json:"tapdisks"`
	Minors   map[int]*Minor `json:"minors"`
	Hang     map[int]bool   `json:"hang"`
}

// State serialises the model, so that a test can hand it to another
// process (which dies at a chosen point) and take it back.
func (b *Blktap) State() []byte {
	st := state{NextPID: b.nextPID, Tapdisks: b.pidsLocked(), Minors: b.minors, Hang: b.hang}
	out, _ := json.Marshal(st)
	return out
}

// LockedState is State for callers not holding the model's lock.
func (b *Blktap) LockedState() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.State()
}

// SetState replaces the model with one State returned.
func (b *Blktap) SetState(data []byte) error {
	var st state
	if err := json.Unmarshal(data, &st); err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.nextPID, b.minors, b.hang = st.NextPID, st.Minors, st.Hang
	if b.minors == nil {
		b.minors = map[int]*Minor{}
	}
	if b.hang == nil {
		b.hang = map[int]bool{}
	}
	b.tapdisks = map[int]bool{}
	for _, p := range st.Tapdisks {
		b.tapdisks[p] = true
	}
	return nil
}

// ErrPaused is returned by Write on a paused minor: tapdisk holds the
// request until unpause (a VM sees it stall, not fail).
var ErrPaused = errors.New("tapdisk is paused: request held")

// HangPause makes the tapdisk pid never answer tap-ctl pause: the call
// fails the way run.Exec reports a command killed at its timeout, and
// the tapdisk stays unpaused.
func (b *Blktap) HangPause(pid int, hang bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.hang[pid] = hang
}

// Write models one guest write through minor's tapdev: it reports the
// image path it lands in (the path the tapdisk opened: a rename does not
// redirect it, as tapdisk holds the file open), or ErrPaused.
func (b *Blktap) Write(minor int) (string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	m := b.minors[minor]
	if m == nil || m.Path == "" {
		return "", fmt.Errorf("minor %d has no image open", minor)
	}
	if m.Paused {
		return "", ErrPaused
	}
	if m.Writes == nil {
		m.Writes = map[string]int{}
	}
	m.Writes[m.Path]++
	return m.Path, nil
}

// New returns an empty model, registered as tap-ctl on r.
func New(r *runfake.Runner) *Blktap {
	b := &Blktap{nextPID: 1000, tapdisks: map[int]bool{}, minors: map[int]*Minor{}, hang: map[int]bool{}}
	r.Handle(tapdisk.Tool, b.handle)
	return b
}

// CrashOnce makes the next matching command fail as c describes.
func (b *Blktap) CrashOnce(c Crash) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.crashes = append(b.crashes, c)
}

// PendingCrashes is how many CrashOnce calls have not fired yet.
func (b *Blktap) PendingCrashes() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.crashes)
}

// Tapdisks returns the running tapdisks' pids, sorted.
func (b *Blktap) Tapdisks() []int {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []int
	for p := range b.tapdisks {
		out = append(out, p)
	}
	sort.Ints(out)
	return out
}

// Minors returns a copy of the allocated minors.
func (b *Blktap) Minors() map[int]Minor {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[int]Minor{}
	for n, m := range b.minors {
		c := *m
		if m.Writes != nil {
			c.Writes = map[string]int{}
			for k, v := range m.Writes {
				c.Writes[k] = v
			}
		}
		out[n] = c
	}
	return out
}

// KillTapdisk simulates a tapdisk crash: the process and its attachments
// vanish, the minors stay allocated (as with the kernel driver).
func (b *Blktap) KillTapdisk(pid int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.tapdisks, pid)
	for _, m := range b.minors {
		if m.PID == pid {
			*m = Minor{}
		}
	}
}

func errno(code int, msg string, c runfake.Call) error {
	return &run.CommandError{Path: "/usr/sbin/tap-ctl", Args: c.Args, ExitCode: code, Stderr: msg}
}

func (b *Blktap) handle(c runfake.Call) (run.Result, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(c.Args) == 0 {
		return run.Result{}, errno(22, "usage", c)
	}
	cmd := c.Args[0]
	var after bool
	for i, cr := range b.crashes {
		if cr.Command == cmd {
			b.crashes = append(b.crashes[:i], b.crashes[i+1:]...)
			if !cr.After {
				return run.Result{}, fmt.Errorf("tap-ctl %s: %w", cmd, ErrCrash)
			}
			after = true
			break
		}
	}
	res, err := b.do(cmd, flags(c.Args[1:]), c)
	if err == nil && cmd != "list" && b.AfterCommand != nil {
		b.AfterCommand()
	}
	if after && err == nil {
		return run.Result{}, fmt.Errorf("tap-ctl %s (done): %w", cmd, ErrCrash)
	}
	return res, err
}

func flags(args []string) map[string]string {
	f := map[string]string{}
	for i := 0; i < len(args); i++ {
		if strings.HasPrefix(args[i], "-") {
			if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				f[args[i]] = args[i+1]
				i++
			} else {
				f[args[i]] = ""
			}
		}
	}
	return f
}

func (b *Blktap) do(cmd string, f map[string]string, c runfake.Call) (run.Result, error) {
	pid, _ := strconv.Atoi(f["-p"])
	minor, hasMinor := -1, false
	if v, ok := f["-m"]; ok {
		minor, _ = strconv.Atoi(v)
		hasMinor = true
	}
	m := b.minors[minor]
	switch cmd {
	case "spawn":
		b.nextPID++
		b.tapdisks[b.nextPID] = true
		return out(fmt.Sprintf("%d\n", b.nextPID)), nil
	case "allocate":
		n := 0
		for b.minors[n] != nil {
			n++
		}
		b.minors[n] = &Minor{}
		return out(tapdisk.DevicePath(n) + "\n"), nil
	case "list":
		return out(b.list()), nil
	}
	if !hasMinor {
		return run.Result{}, errno(22, "usage", c)
	}
	switch cmd {
	case "free":
		if m == nil {
			return run.Result{}, errno(2, "No such file or directory", c)
		}
		if m.PID != 0 {
			return run.Result{}, errno(16, "Device or resource busy", c)
		}
		delete(b.minors, minor)
		return out(""), nil
	}
	if !b.tapdisks[pid] {
		// tap-ctl cannot connect to the tapdisk's control socket.
		return run.Result{}, errno(2, "No such file or directory", c)
	}
	if m == nil {
		return run.Result{}, errno(19, "No such device", c)
	}
	if m.Paused && cmd != "unpause" && cmd != "pause" {
		// tapdisk refuses to change a paused VBD until it is unpaused.
		return run.Result{}, errno(16, "Device or resource busy", c)
	}
	switch cmd {
	case "pause":
		if m.PID != pid || m.Path == "" {
			return run.Result{}, errno(22, "Invalid argument", c)
		}
		if b.hang[pid] {
			return run.Result{}, &run.CommandError{Path: "/usr/sbin/tap-ctl", Args: c.Args, ExitCode: -1,
				Err: fmt.Errorf("timed out: %w", context.DeadlineExceeded)}
		}
		m.Paused = true
	case "unpause":
		if m.PID != pid || !m.Paused {
			return run.Result{}, errno(22, "Invalid argument", c)
		}
		if a, ok := f["-a"]; ok {
			typ, path, ok := strings.Cut(a, ":")
			if !ok {
				return run.Result{}, errno(22, "Invalid argument", c)
			}
			m.Type, m.Path = typ, path
		}
		m.Paused = false
		m.Opens++
	case "attach":
		if m.PID != 0 {
			return run.Result{}, errno(16, "Device or resource busy", c)
		}
		m.PID = pid
	case "open":
		if m.PID != pid {
			return run.Result{}, errno(22, "Invalid argument", c)
		}
		if m.Path != "" {
			return run.Result{}, errno(16, "Device or resource busy", c)
		}
		typ, path, ok := strings.Cut(f["-a"], ":")
		if !ok {
			return run.Result{}, errno(22, "Invalid argument", c)
		}
		_, ro := f["-R"]
		m.Type, m.Path, m.ReadOnly = typ, path, ro
		m.Opens++
	case "close":
		if m.PID != pid || m.Path == "" {
			return run.Result{}, errno(22, "Invalid argument", c)
		}
		m.Type, m.Path, m.ReadOnly = "", "", false
	case "detach":
		if m.PID != pid {
			return run.Result{}, errno(22, "Invalid argument", c)
		}
		if m.Path != "" {
			return run.Result{}, errno(16, "Device or resource busy", c)
		}
		m.PID = 0
		// Like tapdisk, exit once no device is left.
		for _, other := range b.minors {
			if other.PID == pid {
				return out(""), nil
			}
		}
		delete(b.tapdisks, pid)
	default:
		return run.Result{}, errno(22, "invalid COMMAND "+cmd, c)
	}
	return out(""), nil
}

func (b *Blktap) list() string {
	var lines []string
	seen := map[int]bool{}
	var ns []int
	for n := range b.minors {
		ns = append(ns, n)
	}
	sort.Ints(ns)
	for _, n := range ns {
		m := b.minors[n]
		switch {
		case m.PID == 0:
			lines = append(lines, fmt.Sprintf("minor=%d", n))
		case m.Path == "":
			lines = append(lines, fmt.Sprintf("pid=%d minor=%d state=0", m.PID, n))
			seen[m.PID] = true
		default:
			state := 0
			if m.Paused {
				state = tapdisk.StatePaused
			}
			lines = append(lines, fmt.Sprintf("pid=%d minor=%d state=%#x args=%s:%s", m.PID, n, state, m.Type, m.Path))
			seen[m.PID] = true
		}
	}
	for _, p := range b.pidsLocked() {
		if !seen[p] {
			lines = append(lines, fmt.Sprintf("pid=%d", p))
		}
	}
	if len(lines) == 0 {
		return ""
	}
	return strings.Join(lines, "\n") + "\n"
}

func (b *Blktap) pidsLocked() []int {
	var out []int
	for p := range b.tapdisks {
		out = append(out, p)
	}
	sort.Ints(out)
	return out
}

func out(s string) run.Result { return run.Result{Stdout: []byte(s)} }
