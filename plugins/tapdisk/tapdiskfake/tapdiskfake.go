// Package tapdiskfake models blktap behind tap-ctl for tests. Model (model.go)
// is the one copy of tap-ctl's command semantics, shared by both fakes:
// Blktap here, in memory, for unit tests through runfake (it prints what
// tap-ctl prints when stdout is a pipe and can simulate a crash of the
// caller right before or right after any command), and the out-of-process
// fake tests/fakes/tapctl used in VMs, whose tapdisks serve real images.
package tapdiskfake

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/tapdisk"
)

// Crash says when a command should report failure: Before (nothing done)
// or After (done, but the caller never learns it: as if it died).
type Crash struct {
	Command string
	After   bool
}

// ErrCrash is what a simulated crash returns.
var ErrCrash = errors.New("simulated crash")

// Blktap is blktap in memory: a Model whose tapdisks are pids only.
type Blktap struct {
	mu      sync.Mutex
	nextPID int
	model   Model
	crashes []Crash
	// hang: pids whose tapdisk never answers pause (a stuck tapdisk).
	hang map[int]bool
	// AfterCommand, when set, is called after every command that changed
	// something (with the model's lock held: it may call State only).
	AfterCommand func()
}

type state struct {
	NextPID int          `json:"next_pid"`
	Model   Model        `json:"model"`
	Hang    map[int]bool `json:"hang"`
}

// State serialises the model, so that a test can hand it to another
// process (which dies at a chosen point) and take it back.
func (b *Blktap) State() []byte {
	out, _ := json.Marshal(state{NextPID: b.nextPID, Model: b.model, Hang: b.hang})
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
	b.nextPID, b.model, b.hang = st.NextPID, st.Model, st.Hang
	b.model.init()
	if b.hang == nil {
		b.hang = map[int]bool{}
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
	m := b.model.Minors[minor]
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
	b := &Blktap{nextPID: 1000, hang: map[int]bool{}}
	b.model.init()
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
	out := append([]int(nil), b.model.Tapdisks...)
	sort.Ints(out)
	return out
}

// Minors returns a copy of the allocated minors.
func (b *Blktap) Minors() map[int]Minor {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[int]Minor{}
	for n, m := range b.model.Minors {
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
	b.model.TapdiskGone(pid)
}

func (b *Blktap) handle(c runfake.Call) (run.Result, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(c.Args) == 0 {
		return run.Result{}, &run.CommandError{Path: "/usr/sbin/tap-ctl", Args: c.Args, ExitCode: 22, Stderr: "usage"}
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
	stdout, err := b.model.Do(cmd, c.Args[1:], memBackend{b})
	var en *Errno
	if errors.As(err, &en) {
		err = &run.CommandError{Path: "/usr/sbin/tap-ctl", Args: c.Args, ExitCode: en.ExitCode(), Stderr: en.Error()}
	}
	if err != nil {
		return run.Result{}, err
	}
	if cmd != "list" && b.AfterCommand != nil {
		b.AfterCommand()
	}
	if after {
		return run.Result{}, fmt.Errorf("tap-ctl %s (done): %w", cmd, ErrCrash)
	}
	return run.Result{Stdout: []byte(stdout)}, nil
}

// memBackend: tapdisks are pids, devices are names, I/O is Write.
type memBackend struct{ b *Blktap }

func (m memBackend) Spawn() (int, error) {
	m.b.nextPID++
	return m.b.nextPID, nil
}

func (memBackend) Allocate(minor int) (string, error) { return tapdisk.DevicePath(minor), nil }
func (memBackend) Free(int)                           {}
func (memBackend) Open(int, int, string, string, bool) error {
	return nil
}
func (memBackend) Close(int, int) error { return nil }
func (memBackend) Exit(int)             {}

func (m memBackend) Pause(pid, _ int, _ time.Duration) error {
	if m.b.hang[pid] {
		return &run.CommandError{Path: "/usr/sbin/tap-ctl", Args: []string{"pause"}, ExitCode: -1,
			Err: fmt.Errorf("timed out: %w", context.DeadlineExceeded)}
	}
	return nil
}

func (memBackend) Unpause(int, int, string, string, time.Duration) error { return nil }
