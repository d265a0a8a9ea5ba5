// Package runfake is a stateful fake of run.Runner: it records every call
// (with the secrets it was given, so tests can assert they arrived on stdin
// and not in argv) and answers from handlers registered per tool.
package runfake

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
)

// Call is one recorded invocation.
type Call struct {
	Tool       string
	Args       []string
	Stdin      []byte
	ExtraFiles [][]byte
}

// Line is the tool and its arguments joined by spaces.
func (c Call) Line() string { return strings.TrimSpace(c.Tool + " " + strings.Join(c.Args, " ")) }

// Handler answers one call.
type Handler func(c Call) (run.Result, error)

// Runner is the fake.
type Runner struct {
	mu       sync.Mutex
	calls    []Call
	handlers map[string]Handler
}

// New returns a Runner that fails every call to a tool with no handler.
func New() *Runner { return &Runner{handlers: map[string]Handler{}} }

// Handle registers h for tool.
func (r *Runner) Handle(tool string, h Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.handlers[tool] = h
}

// Calls returns a copy of the calls so far.
func (r *Runner) Calls() []Call {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Call(nil), r.calls...)
}

// Run implements run.Runner.
func (r *Runner) Run(_ context.Context, c run.Cmd) (run.Result, error) {
	call := Call{Tool: c.Tool, Args: append([]string(nil), c.Args...), Stdin: copyBytes(c.Stdin)}
	for _, f := range c.ExtraFiles {
		call.ExtraFiles = append(call.ExtraFiles, copyBytes(f))
	}
	r.mu.Lock()
	r.calls = append(r.calls, call)
	h := r.handlers[c.Tool]
	r.mu.Unlock()
	if h == nil {
		return run.Result{}, &run.CommandError{Path: c.Tool, Args: c.Args, ExitCode: -1,
			Err: fmt.Errorf("%s: %w", c.Tool, run.ErrToolMissing)}
	}
	return h(call)
}

func copyBytes(s secret.Bytes) []byte {
	if s.IsEmpty() {
		return nil
	}
	return append([]byte(nil), s.Expose()...)
}
