// Package tapdisk drives blktap's tap-ctl, the command-line front end of
// tapdisk (the user-space process that serves a VHD or qcow2 image as the
// block device /dev/xen/blktap-2/tapdevN, which tapback hands to guests as
// a vbd3 backend). It speaks tap-ctl's command-line contract exactly as
// xapi-project/blktap control/tap-ctl.c defines it, and parses its
// non-tty output (spawn prints the pid, allocate the device path, list
// key=value lines). It keeps no state of its own: see tapdisk/attachment
// for the refcounted, crash-safe use of these steps.
package tapdisk

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/luksext/luksext/plugins/run"
)

// Tool is the name of tap-ctl in the run.Paths table.
const Tool = "tap-ctl"

// DeviceDir is where blktap creates the tapdev nodes.
const DeviceDir = "/dev/xen/blktap-2"

// DefaultTimeout bounds each tap-ctl call. Opening an image on a busy,
// encrypted SR can take a while; a hung tapdisk must not hang xapi forever.
const DefaultTimeout = 2 * time.Minute

// ErrTapCtl is wrapped by every failure of a tap-ctl command that ran.
var ErrTapCtl = errors.New("tap-ctl failed")

// ErrBadOutput is wrapped when tap-ctl printed something we cannot parse
// (another blktap version than the ones this plugin was written against).
var ErrBadOutput = errors.New("unexpected tap-ctl output")

// Image names what tapdisk should open: a driver ("vhd", "qcow2", "aio")
// and an absolute path. tap-ctl takes it as "type:path".
type Image struct {
	Type string
	Path string
}

// Arg is the -a argument of tap-ctl open.
func (i Image) Arg() string { return i.Type + ":" + i.Path }

// OpenOptions are the flags of tap-ctl open that we use.
type OpenOptions struct {
	ReadOnly bool // -R
}

// Ctl runs tap-ctl through a run.Runner.
type Ctl struct {
	Runner  run.Runner
	Timeout time.Duration // zero: DefaultTimeout
}

// Entry is one line of tap-ctl list. PID or Minor is -1 when the line has
// none: a spawned tapdisk with no device has no minor, an allocated minor
// with no tapdisk has no pid. Type and Path are set once an image is open.
type Entry struct {
	PID   int
	Minor int
	State int
	Type  string
	Path  string
}

// Open reports whether the entry has an image open (a paused tapdisk still
// lists the image it will reopen).
func (e Entry) Open() bool { return e.Path != "" }

// State bits of a tap-ctl list entry (blktap drivers/tapdisk-vbd.h).
const (
	StatePauseRequested = 0x10 // TD_VBD_PAUSE_REQUESTED: draining
	StatePaused         = 0x20 // TD_VBD_PAUSED: image closed, I/O held
)

// Paused reports whether the tapdisk has paused (or begun pausing) minor.
func (e Entry) Paused() bool { return e.State > 0 && e.State&(StatePaused|StatePauseRequested) != 0 }

// DevicePath is the tapdev node of minor, as blktap names it.
func DevicePath(minor int) string { return fmt.Sprintf("%s/tapdev%d", DeviceDir, minor) }

func (c Ctl) run(ctx context.Context, args ...string) (string, error) {
	return c.runFor(ctx, c.Timeout, args...)
}

func (c Ctl) runFor(ctx context.Context, timeout time.Duration, args ...string) (string, error) {
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	// run.Exec gives the child fresh pipes for stdout/stderr and closes
	// every other descriptor on exec, so the plugin's own stdout/stderr
	// (which xapi-storage-script reads to EOF) never reach tap-ctl or the
	// long-lived tapdisk it spawns.
	res, err := c.Runner.Run(ctx, run.Cmd{Tool: Tool, Args: args, Timeout: timeout})
	if err != nil {
		if errors.Is(err, run.ErrToolMissing) {
			return "", fmt.Errorf("tap-ctl %s: %w", args[0], err)
		}
		return "", fmt.Errorf("tap-ctl %s: %w: %w", args[0], ErrTapCtl, err)
	}
	return string(res.Stdout), nil
}

// Spawn starts an idle tapdisk and returns its pid.
func (c Ctl) Spawn(ctx context.Context) (int, error) {
	out, err := c.run(ctx, "spawn")
	if err != nil {
		return 0, err
	}
	// Not a tty: tap-ctl prints the bare number.
	pid, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("tap-ctl spawn printed %q, want a pid: %w", strings.TrimSpace(out), ErrBadOutput)
	}
	return pid, nil
}

var devMinor = regexp.MustCompile(`tapdev(\d+)$`)

// Allocate reserves a minor and returns it with the device path tap-ctl
// printed (/dev/xen/blktap-2/tapdevN).
func (c Ctl) Allocate(ctx context.Context) (minor int, device string, err error) {
	out, err := c.run(ctx, "allocate")
	if err != nil {
		return 0, "", err
	}
	device = strings.TrimSpace(out)
	m := devMinor.FindStringSubmatch(device)
	if m == nil {
		return 0, "", fmt.Errorf("tap-ctl allocate printed %q, want a tapdev path: %w", device, ErrBadOutput)
	}
	minor, _ = strconv.Atoi(m[1])
	return minor, device, nil
}

// Attach binds minor to the tapdisk pid.
func (c Ctl) Attach(ctx context.Context, pid, minor int) error {
	_, err := c.run(ctx, "attach", "-p", strconv.Itoa(pid), "-m", strconv.Itoa(minor))
	return err
}

// Open makes the tapdisk serve img on minor.
func (c Ctl) Open(ctx context.Context, pid, minor int, img Image, o OpenOptions) error {
	args := []string{"open", "-p", strconv.Itoa(pid), "-m", strconv.Itoa(minor), "-a", img.Arg()}
	if o.ReadOnly {
		args = append(args, "-R")
	}
	_, err := c.run(ctx, args...)
	return err
}

// Close flushes and closes the image served on minor.
func (c Ctl) Close(ctx context.Context, pid, minor int) error {
	_, err := c.run(ctx, "close", "-p", strconv.Itoa(pid), "-m", strconv.Itoa(minor))
	return err
}

// Detach unbinds minor from the tapdisk (which exits when it serves no
// more devices).
func (c Ctl) Detach(ctx context.Context, pid, minor int) error {
	_, err := c.run(ctx, "detach", "-p", strconv.Itoa(pid), "-m", strconv.Itoa(minor))
	return err
}

// Pause asks the tapdisk to quiesce minor: it drains the requests in
// flight, closes the image and holds every new request until Unpause
// (blktap control/tap-ctl-pause.c, drivers/tapdisk-vbd.c). The image may
// then be renamed or rewritten. timeout bounds the wait (tap-ctl's own -t
// is unusable on pause: tap-ctl.c falls through to the usage error).
func (c Ctl) Pause(ctx context.Context, pid, minor int, timeout time.Duration) error {
	_, err := c.runFor(ctx, timeout, "pause", "-p", strconv.Itoa(pid), "-m", strconv.Itoa(minor))
	return err
}

// Unpause reopens the image of a paused minor and lets I/O flow again.
// With img, tapdisk opens img instead of the path it had (tap-ctl unpause
// -a type:path); without, it reopens the same path, i.e. whatever file has
// that name now. tapdisk answers EINVAL when minor is not paused.
func (c Ctl) Unpause(ctx context.Context, pid, minor int, img *Image) error {
	args := []string{"unpause", "-p", strconv.Itoa(pid), "-m", strconv.Itoa(minor)}
	if img != nil {
		args = append(args, "-a", img.Arg())
	}
	_, err := c.run(ctx, args...)
	return err
}

// Free releases minor.
func (c Ctl) Free(ctx context.Context, minor int) error {
	_, err := c.run(ctx, "free", "-m", strconv.Itoa(minor))
	return err
}

// List returns every tapdisk and minor blktap knows of.
func (c Ctl) List(ctx context.Context) ([]Entry, error) {
	out, err := c.run(ctx, "list")
	if err != nil {
		return nil, err
	}
	return ParseList(out)
}

// ParseList parses tap-ctl list's non-tty output: one line per entry of
// space-separated pid=N minor=N state=0xN args=type:path fields, each
// present only when known (tap_cli_list_dict).
func ParseList(out string) ([]Entry, error) {
	var entries []Entry
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		e := Entry{PID: -1, Minor: -1, State: -1}
		for _, field := range strings.Fields(line) {
			k, v, ok := strings.Cut(field, "=")
			if !ok {
				return nil, fmt.Errorf("tap-ctl list line %q: %w", line, ErrBadOutput)
			}
			var err error
			switch k {
			case "pid":
				e.PID, err = strconv.Atoi(v)
			case "minor":
				e.Minor, err = strconv.Atoi(v)
			case "state":
				var s int64
				s, err = strconv.ParseInt(v, 0, 32)
				e.State = int(s)
			case "args":
				// The path may itself contain ':'; the type never does.
				t, p, found := strings.Cut(v, ":")
				if !found {
					err = fmt.Errorf("args %q is not type:path", v)
				}
				e.Type, e.Path = t, p
			}
			if err != nil {
				return nil, fmt.Errorf("tap-ctl list line %q: %w: %v", line, ErrBadOutput, err)
			}
		}
		entries = append(entries, e)
	}
	return entries, nil
}
