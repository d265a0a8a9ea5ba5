package luksext

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/gc"
	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/lock"
	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
)

// GCCommand is argv[1] of the volume binary in garbage-collector mode:
// `volume gc <sr> [-interval 10s] [-once]`.
const GCCommand = "gc"

// The GC holds gcRunningLock for its whole life: it is how StartGC knows one
// is running and how StopGC knows it has gone.
func gcRunningLock(st store.Store) string { return st.Path("gc", "running.lock") }
func gcPIDFile(st store.Store) string     { return st.Path("gc", "pid") }

// StartGC starts the SR's garbage collector as a detached process of this
// executable (the volume binary): see StartGCFrom. SR.attach calls it.
func StartGC(sr string) error {
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding the plugin executable to start the garbage collector: %w", err)
	}
	return StartGCFrom(self, sr)
}

// StartGCFrom starts `volume gc <sr>` from the volume binary at exe as a
// detached process (its own session, stdin/stdout/stderr on /dev/null:
// xapi-storage-script waits for EOF on the plugin's pipes, so a child
// holding them would hang the call). The child inherits the environment,
// so its knobs (GCIntervalEnv) follow the caller's. Nothing happens when a
// collector already runs for the SR. Tests pass the binary they built.
func StartGCFrom(self, sr string) error {
	abs, err := filepath.Abs(sr)
	if err != nil {
		return err
	}
	st := store.New(abs)
	if err := refuseHalfAdopted(abs); err != nil {
		return err
	}
	if held, err := lock.Held(gcRunningLock(st), lock.Exclusive); err != nil || held {
		return err
	}
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer null.Close()
	cmd := exec.Command(self, GCCommand, abs)
	// argv[0] without a dot, so the multi-call binary never reads it as a
	// method name.
	cmd.Args[0] = "luksext-gc"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = null, null, null
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the garbage collector of SR %s: %w", abs, err)
	}
	return cmd.Process.Release()
}

// StopGC stops the SR's garbage collector (SIGTERM, then SIGKILL after
// timeout) and waits until it has exited, so that the SR can be unmounted.
// Stopping at any moment is safe: the GC's work is journalled. SR.detach
// calls it; it is a no-op when no GC runs.
func StopGC(sr string, timeout time.Duration) error {
	abs, err := filepath.Abs(sr)
	if err != nil {
		return err
	}
	st := store.New(abs)
	running := func() bool { h, _ := lock.Held(gcRunningLock(st), lock.Shared); return h }
	if !running() {
		return nil
	}
	// The collector takes its lock, then writes its pid: until it has, the
	// file names the previous collector (an attach followed at once by a
	// detach, then another attach). The pid is read again while waiting,
	// and each new one is signalled.
	pid, signalled := 0, 0
	deadline := time.Now().Add(timeout)
	for running() {
		if pid = readPID(gcPIDFile(st)); pid > 0 && pid != signalled {
			_ = syscall.Kill(pid, syscall.SIGTERM)
			signalled = pid
		}
		if time.Now().After(deadline) {
			if pid > 0 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			if time.Now().After(deadline.Add(5 * time.Second)) {
				return fmt.Errorf("the garbage collector of SR %s (pid %d) does not exit", abs, pid)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil
}

func readPID(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// Knobs of the garbage collector: an environment variable (read first) or
// the same-named key without the LUKSEXT_ prefix in /etc/sysconfig/luksext,
// e.g. GC_INTERVAL=5m. Durations in Go syntax (15s, 2m).
const (
	GCIntervalEnv = "LUKSEXT_GC_INTERVAL" // time between passes (default 15s)
	// GCLiveLeafMaxEnv: bytes of data a running VM's leaf may hold to be
	// coalesced into its parent while the VM is paused (gc.DefaultLiveLeafMax).
	GCLiveLeafMaxEnv = "LUKSEXT_GC_LIVE_LEAF_MAX"
)

// gcKnob reads a knob from the environment, then the sysconfig file.
func gcKnob(env string) string {
	if v := os.Getenv(env); v != "" {
		return v
	}
	return sysconfigValue(strings.TrimPrefix(env, "LUKSEXT_"))
}

func gcLiveLeafMax(log logrus.FieldLogger) int64 {
	v := gcKnob(GCLiveLeafMaxEnv)
	if v == "" {
		return 0
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		log.WithField("value", v).Warn("ignoring a bad GC_LIVE_LEAF_MAX (want a number of bytes)")
		return 0
	}
	return n
}

// DefaultGCInterval is the time between two passes of the collector.
const DefaultGCInterval = 15 * time.Second

// gcInterval reads the configured interval; a bad value is logged and
// ignored rather than stopping the collector.
func gcInterval(log logrus.FieldLogger) time.Duration {
	v := gcKnob(GCIntervalEnv)
	if v == "" {
		return DefaultGCInterval
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		log.WithField("value", v).Warn("ignoring a bad GC_INTERVAL (want a duration such as 15s or 5m)")
		return DefaultGCInterval
	}
	return d
}

// sysconfigValue returns KEY's value in /etc/sysconfig/luksext (shell
// assignment syntax, quotes stripped), or "".
func sysconfigValue(key string) string {
	b, err := os.ReadFile(logging.SysconfigPath)
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if ok && k == key {
			return strings.Trim(v, `"'`)
		}
	}
	return ""
}

// RunGC is the garbage collector's main (entrypoint.Volume hands it `volume gc
// ...`): args are what follows "gc" on the command line.
func RunGC(args []string) int {
	log := logging.New(logging.Options{Plugin: "volume-gc", Syslog: true})
	fs := flag.NewFlagSet("luksext-gc", flag.ContinueOnError)
	interval := fs.Duration("interval", gcInterval(log), "time between passes")
	once := fs.Bool("once", false, "collect until nothing is left to do, then exit")
	var sr string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		sr, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil || sr == "" {
		fmt.Fprintln(os.Stderr, "usage: volume gc <sr mount path> [-interval 15s] [-once]")
		return 2
	}
	log = log.WithField("sr", sr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	runner := run.NewExec(log)
	d := VolumeDeps{Images: image.Files{Runner: runner}, Datapath: &attachment.Manager{Ctl: tapdisk.Ctl{Runner: runner}, Log: log}}
	if err := runGC(ctx, sr, *interval, *once, d, nil, log); err != nil {
		log.WithError(err).Error("garbage collector failed")
		return 1
	}
	return 0
}

// errGCRunning: another collector holds the SR.
var errGCRunning = errors.New("a garbage collector already runs for this SR")

// ErrAdoptionPending: the SR is half-way through luksext adopt. Its VHDs
// are not all recorded yet, and the collector deletes uuid-named image
// files without a record (after OrphanAge): it must not run.
var ErrAdoptionPending = errors.New("the adoption of this SR (luksext adopt) is not complete; the garbage collector does not run until it is (rerun luksext adopt)")

// refuseHalfAdopted is StartGCFrom's guard and half of gcMayCollect: no
// pass on an SR whose adopt journal exists.
func refuseHalfAdopted(sr string) error {
	pending, err := AdoptionPending(sr)
	if err != nil {
		return err
	}
	if pending {
		return fmt.Errorf("SR %s: %w", sr, ErrAdoptionPending)
	}
	return nil
}

// gcMayCollect is the one "may this SR be collected" predicate, asked
// before the first pass, before each pass with -once and between passes
// of a running collector: a luksext SR is mounted at sr (its record reads,
// else Sr_not_attached) and no adoption of it is half done.
func gcMayCollect(sr string) error {
	if _, err := readSRMeta(sr); err != nil {
		return err
	}
	return refuseHalfAdopted(sr)
}

func runGC(ctx context.Context, sr string, interval time.Duration, once bool, d VolumeDeps, fault func(string), log logrus.FieldLogger) error {
	if err := gcMayCollect(sr); err != nil {
		return err
	}
	st := store.New(sr)
	l, ok, err := lock.TryAcquire(gcRunningLock(st), lock.Exclusive)
	if err != nil {
		return err
	}
	if !ok {
		log.Info(errGCRunning.Error())
		return nil
	}
	defer l.Release()
	if err := store.WriteJSON(gcPIDFile(st), os.Getpid()); err != nil {
		return err
	}
	// The GC holds no SR handle (it checks the SR before each pass), so
	// its volumes have none to release.
	v := &volumes{d: d, st: st, log: log, release: func() {}}
	c := v.collector(fault)
	c.LiveLeafMax = gcLiveLeafMax(log)
	// Volume operations a crashed call left journalled may hold a VM
	// paused: the GC finishes them on its next pass.
	c.RecoverVolumes = func(ctx context.Context) error {
		l, err := v.exclusive(ctx)
		if err != nil {
			return err
		}
		l.Release()
		return nil
	}
	if once {
		for {
			if err := gcMayCollect(sr); err != nil {
				return err
			}
			changed, err := c.Pass(ctx)
			if err != nil || !changed {
				return err
			}
		}
	}
	return c.Run(ctx, interval, func() bool { return gcMayCollect(sr) == nil })
}

// collector is the SR's garbage collector with this call's edges: images,
// and the datapath to pause VMs' tapdisks with.
func (v *volumes) collector(fault func(string)) *gc.Collector {
	c := &gc.Collector{Store: v.st, Images: v.d.Images, Log: v.log, SRLock: srLockPath(v.st), Fault: fault}
	if v.d.Datapath != nil {
		m := v.d.Datapath
		c.Pause = func(ctx context.Context, paths ...string) (func(context.Context) error, int, error) {
			return pauseAll(ctx, m, v.log, paths...)
		}
	}
	return c
}

// CollectOnce runs the SR's garbage collector in this process until there
// is nothing left to do (tests and operators), with d's images and
// datapath. fault, when set, is called after each journalled step.
func CollectOnce(ctx context.Context, sr string, d VolumeDeps, fault func(step string), log logrus.FieldLogger) error {
	abs, err := filepath.Abs(sr)
	if err != nil {
		return err
	}
	return runGC(ctx, abs, 0, true, d, fault, log)
}
