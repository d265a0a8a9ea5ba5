// Package run executes external tools (cryptsetup, mkfs.ext4, mount,
// tap-ctl, ...) the way a storage plugin must: by absolute path, with a
// deadline, never with a secret on the command line or in the environment,
// and with errors that carry the exit code and a redacted, truncated stderr
// instead of anything a caller would be tempted to parse.
//
// Secrets travel on stdin (Cmd.Stdin) or through inherited pipes
// (Cmd.ExtraFiles, seen by the child as /dev/fd/3, /dev/fd/4, ...). The
// Runner interface is the seam for tests: runfake records calls and plays
// back scripted results without root.
package run

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/secret"
)

// Cmd describes one invocation.
type Cmd struct {
	// Tool is a name from the Paths table ("cryptsetup") or an absolute path.
	Tool string
	Args []string
	// Stdin, when set, is written to the child's standard input and then
	// closed. It is never logged.
	Stdin secret.Bytes
	// ExtraFiles are secrets handed to the child through pipes, in order:
	// the first is /dev/fd/3 in the child.
	ExtraFiles []secret.Bytes
	// Timeout bounds the run; zero means DefaultTimeout. xapi applies no
	// timeout of its own, so a hung tool would hang the xe command forever.
	Timeout time.Duration
	// Env is added to a minimal environment (PATH, LC_ALL=C). Never secrets.
	Env []string
}

// DefaultTimeout applies when Cmd.Timeout is zero.
const DefaultTimeout = 5 * time.Minute

// Result is what a finished command printed.
type Result struct {
	Stdout []byte
	Stderr []byte
}

// Runner runs commands. Implementations: Exec (real) and runfake.Runner.
type Runner interface {
	Run(ctx context.Context, c Cmd) (Result, error)
}

// Paths maps tool names to absolute paths. One table for the whole plugin,
// so that a missing tool is named in a clear error, and tests or other
// distributions can point elsewhere.
type Paths map[string]string

// DefaultPaths are where dom0 (and Debian) keep the tools we call.
// Lookup falls back to the other usual directories (see Resolve).
var DefaultPaths = Paths{
	"cryptsetup": "/usr/sbin/cryptsetup",
	"mkfs.ext4":  "/usr/sbin/mkfs.ext4",
	"e2fsck":     "/usr/sbin/e2fsck",
	"resize2fs":  "/usr/sbin/resize2fs",
	"tune2fs":    "/usr/sbin/tune2fs",
	"blkid":      "/usr/sbin/blkid",
	"wipefs":     "/usr/sbin/wipefs",
	"udevadm":    "/usr/bin/udevadm",
	"tap-ctl":    "/usr/sbin/tap-ctl",
	"vhd-util":   "/usr/bin/vhd-util",
	"qemu-img":   "/usr/bin/qemu-img",
	"lvm":        "/usr/sbin/lvm",
}

var searchDirs = []string{"/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin"}

// toolDirs are further places one tool is known to live in, tried after
// searchDirs. XCP-ng 8.3's qemu (4.2.1) installs its binaries, qemu-img
// included, in /usr/lib64/xen/bin, which is not on PATH (the qemu package
// of xcp-ng-rpms; /usr/lib/xen/bin is where upstream Xen builds put it).
var toolDirs = map[string][]string{
	"qemu-img": {"/usr/lib64/xen/bin", "/usr/lib/xen/bin"},
}

// ErrToolMissing is wrapped by errors about tools that are not installed.
var ErrToolMissing = errors.New("required tool is not installed")

// Resolve returns the absolute path of tool, or an error naming it.
func (p Paths) Resolve(tool string) (string, error) {
	if strings.HasPrefix(tool, "/") {
		if isExecutable(tool) {
			return tool, nil
		}
		return "", fmt.Errorf("%s: %w", tool, ErrToolMissing)
	}
	if path, ok := p[tool]; ok && isExecutable(path) {
		return path, nil
	}
	for _, d := range append(append([]string(nil), searchDirs...), toolDirs[tool]...) {
		if path := d + "/" + tool; isExecutable(path) {
			return path, nil
		}
	}
	looked := p[tool]
	if extra := toolDirs[tool]; len(extra) > 0 {
		looked = strings.TrimPrefix(looked+", "+strings.Join(extra, "/"+tool+", ")+"/"+tool, ", ")
	}
	return "", fmt.Errorf("%s (looked for %s): %w", tool, looked, ErrToolMissing)
}

func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

// CommandError is returned when a command ran and failed, or could not run.
type CommandError struct {
	Path     string
	Args     []string // safe to show: secrets never enter argv
	ExitCode int      // -1 when the command did not exit normally
	Stderr   string   // truncated
	Err      error
}

func (e *CommandError) Error() string {
	msg := fmt.Sprintf("%s %s", e.Path, strings.Join(e.Args, " "))
	if e.ExitCode >= 0 {
		msg += fmt.Sprintf(": exit status %d", e.ExitCode)
	} else if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	if s := strings.TrimSpace(e.Stderr); s != "" {
		msg += ": " + s
	}
	return msg
}

func (e *CommandError) Unwrap() error { return e.Err }

// ExitCode returns the exit status carried by err, or -1.
func ExitCode(err error) int {
	var ce *CommandError
	if errors.As(err, &ce) {
		return ce.ExitCode
	}
	return -1
}

const maxStderr = 2048

// Exec is the real Runner.
type Exec struct {
	Paths Paths
	Log   logrus.FieldLogger
}

// NewExec returns a Runner using DefaultPaths.
func NewExec(log logrus.FieldLogger) *Exec { return &Exec{Paths: DefaultPaths, Log: log} }

// Run implements Runner.
func (x *Exec) Run(ctx context.Context, c Cmd) (Result, error) {
	path, err := x.Paths.Resolve(c.Tool)
	if err != nil {
		return Result{}, &CommandError{Path: c.Tool, Args: c.Args, ExitCode: -1, Err: err}
	}
	timeout := c.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	cmd := exec.CommandContext(ctx, path, c.Args...)
	cmd.Env = append([]string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}, c.Env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Kill the whole child, and do not wait forever for grandchildren that
	// kept our pipes open.
	cmd.WaitDelay = 5 * time.Second
	if !c.Stdin.IsEmpty() {
		cmd.Stdin = bytes.NewReader(c.Stdin.Expose())
	}
	var closers []io.Closer
	defer func() {
		for _, cl := range closers {
			_ = cl.Close()
		}
	}()
	for _, s := range c.ExtraFiles {
		r, w, err := os.Pipe()
		if err != nil {
			return Result{}, fmt.Errorf("creating pipe: %w", err)
		}
		closers = append(closers, r)
		cmd.ExtraFiles = append(cmd.ExtraFiles, r)
		// Pipes hold 64 KiB; secrets are far smaller, so write before start
		// and close to give the child EOF.
		if _, err := w.Write(s.Expose()); err != nil {
			_ = w.Close()
			return Result{}, fmt.Errorf("writing to pipe: %w", err)
		}
		_ = w.Close()
	}

	start := time.Now()
	err = cmd.Run()
	log := x.log().WithFields(logrus.Fields{"cmd": path + " " + strings.Join(c.Args, " "), "duration_ms": time.Since(start).Milliseconds()})
	res := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
	if err == nil {
		log.Debug("command succeeded")
		return res, nil
	}
	ce := &CommandError{Path: path, Args: c.Args, ExitCode: -1, Stderr: truncate(stderr.String()), Err: err}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.Exited() {
		ce.ExitCode = ee.ExitCode()
	}
	if ctx.Err() != nil {
		ce.Err = fmt.Errorf("timed out after %s: %w", timeout, ctx.Err())
		ce.ExitCode = -1
	}
	log.WithField("exit_code", ce.ExitCode).Debug("command failed")
	return res, ce
}

func (x *Exec) log() logrus.FieldLogger {
	if x.Log == nil {
		return logrus.StandardLogger()
	}
	return x.Log
}

func truncate(s string) string {
	if len(s) <= maxStderr {
		return s
	}
	return s[:maxStderr] + "...(truncated)"
}
