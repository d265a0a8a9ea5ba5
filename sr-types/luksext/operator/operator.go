package operator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/luksext/luksext/sr-types/luksext"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
)

// Command is the name the volume binary answers to as the operator
// command (through the symlink /usr/sbin/luksext).
const Command = "luksext"

// Exit codes of the operator command. Scripts may rely on them; they are
// listed by `luksext --help` and in README.md.
const (
	ExitOK              = 0 // done (or nothing to do)
	ExitFailure         = 1 // anything not listed below
	ExitUsage           = 2 // bad command line
	ExitWrongPassphrase = 3 // the passphrase opens no keyslot; nothing changed
	ExitNotFound        = 4 // no such SR, device or keyslot on this host
	ExitKeyUnavailable  = 5 // no binding unseals and no passphrase was given (status: an SR cannot unlock by itself)
	ExitBusy            = 6 // another operation holds the SR, or the device is in use
	ExitRefused         = 7 // refused for safety: would lock you out, or not confirmed (see --force / --yes)
	ExitInvalidConfig   = 8 // bad clevis configuration, or a Tang server that is not the trusted one
)

var exitCodeHelp = `Exit codes:
  0  done (or already in the requested state)
  1  failure not listed below (details on stderr)
  2  bad command line
  3  wrong passphrase: it opens no keyslot; nothing was changed
  4  no such SR, device or keyslot on this host
  5  no key: no binding unseals and no passphrase was given
     (status: at least one SR shown cannot unlock by itself)
  6  busy: another operation holds the SR lock, or the device is in use
  7  refused for safety (would leave no way in, or not confirmed): see --force / --yes;
     adopt: the SR holds what luksext does not take over (Not_adoptable)
  8  invalid clevis configuration, or a Tang server whose key is not the trusted one`

// Errors of the operator command that have no SMAPI kind.
var (
	// ErrUsage: the command line is wrong; the message says how.
	ErrUsage = errors.New("usage error")
	// ErrRefused: the change would leave the disk with too few ways in, or
	// a destructive step was not confirmed.
	ErrRefused = errors.New("refused")
)

// Deps are the edges of the operator command.
type Deps struct {
	SR luksext.SRDeps
	// Run executes cryptsetup for header backup/restore.
	Run run.Runner
	// Terminal asks a person for passphrases and confirmations.
	Terminal Terminal
	// JournalDir keeps the record of an unfinished key change so that a
	// rerun after a crash finishes or undoes it. It must survive a reboot.
	JournalDir string
	// RecoveryKDF stretches recovery passphrases (luks.RecoveryKDF()).
	RecoveryKDF luks.KDF
	// LockWait bounds how long a verb waits for an SR.* call to finish.
	LockWait time.Duration
	Log      logrus.FieldLogger
	// AdoptCrash is called after each step of luksext adopt
	// (luksext.AdoptSteps); Main sets it from AdoptCrashEnv for the VM
	// tier's kill -9 tests. nil in production.
	AdoptCrash func(step string)
}

// AdoptCrashEnv names a step of luksext adopt after which the command
// kills itself with SIGKILL (tests of crash recovery only).
const AdoptCrashEnv = "LUKSEXT_ADOPT_CRASH_AFTER"

// DefaultJournalDir is persistent, unlike StateDir: an interrupted key
// change must still be finished after a reboot.
const DefaultJournalDir = "/var/lib/luksext/journal"

// Invocation is the process' command line and standard streams.
type Invocation struct {
	Args           []string // Args[0] is the program name
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// Main runs the operator command on the real host and returns the
// process exit code.
func Main(inv Invocation) int {
	logTo := io.Discard
	for _, a := range inv.Args[1:] {
		if a == "-v" || a == "--verbose" {
			logTo = inv.Stderr
		}
	}
	// Logs go to syslog (SMlog) like the plugins' own; stderr is for the
	// one-line answer unless --verbose.
	log := logging.New(logging.Options{Plugin: Command, Stderr: logTo, Syslog: true})
	real := luksext.RealDeps(log)
	d := Deps{
		SR:          real.SR,
		Run:         run.NewExec(log),
		Terminal:    TTY{},
		JournalDir:  DefaultJournalDir,
		RecoveryKDF: luks.RecoveryKDF(),
		Log:         log,
	}
	if step := os.Getenv(AdoptCrashEnv); step != "" {
		d.AdoptCrash = func(s string) {
			if s == step {
				_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {} // SIGKILL is not deliverable late, but never go on
			}
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	return Run(ctx, inv, d)
}

// admin carries one invocation's state.
type admin struct {
	*luksext.Host
	Deps
	inv  Invocation
	opts cmdline
	// ctx ends on SIGTERM: a key file read that waits must end with it.
	ctx context.Context
}

// Run parses inv.Args, runs the verb and prints its answer: text, or
// one JSON object with --json (errors included). It returns the exit code.
func Run(ctx context.Context, inv Invocation, d Deps) int {
	if d.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		d.Log = l
	}
	if d.LockWait == 0 {
		d.LockWait = time.Minute
	}
	if d.JournalDir == "" {
		d.JournalDir = DefaultJournalDir
	}
	if d.RecoveryKDF.Algorithm == "" {
		d.RecoveryKDF = luks.RecoveryKDF()
	}
	cl, v, err := parseCommandLine(inv.Args[1:])
	if err == nil && (cl.Help || v == nil) {
		fmt.Fprint(inv.Stdout, helpText(v))
		return ExitOK
	}
	if err != nil {
		return reportError(inv, cl.JSON, v, err)
	}
	a := &admin{Host: luksext.NewHost(d.SR), Deps: d, inv: inv, opts: cl, ctx: ctx}
	ctx = smapi.WithLogger(ctx, d.Log.WithFields(logrus.Fields{"verb": v.Name}))
	res, err := v.Run(a, ctx)
	if err != nil {
		return reportError(inv, cl.JSON, v, err)
	}
	if cl.JSON {
		enc := json.NewEncoder(inv.Stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(res)
	} else {
		fmt.Fprint(inv.Stdout, res.Text())
	}
	if st, ok := res.(statusReport); ok && !st.allUnlockAutomatically() {
		return ExitKeyUnavailable
	}
	return ExitOK
}

// report is a verb's answer: JSON for tools, Text for people.
type report interface{ Text() string }

// errorReport is the --json form of a failure.
type errorReport struct {
	Error struct {
		Kind     string `json:"kind"`
		Message  string `json:"message"`
		ExitCode int    `json:"exit_code"`
	} `json:"error"`
}

func reportError(inv Invocation, asJSON bool, v *verb, err error) int {
	code, kind := classifyAdminError(err)
	msg := err.Error()
	if errors.Is(err, ErrUsage) {
		msg = strings.TrimPrefix(msg, ErrUsage.Error()+": ")
		if v != nil {
			msg += "\nusage: " + Command + " " + v.Usage + "\n(" + Command + " " + v.Name + " --help for more)"
		} else {
			msg += "\n(" + Command + " --help lists the commands)"
		}
	}
	fmt.Fprintf(inv.Stderr, "%s: %s\n", Command, msg)
	if asJSON {
		var r errorReport
		r.Error.Kind, r.Error.Message, r.Error.ExitCode = kind, err.Error(), code
		enc := json.NewEncoder(inv.Stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(r)
	}
	return code
}

// classifyAdminError gives an error its exit code and kind name, from the
// same classification SMAPI error records use (luksext.Classify).
func classifyAdminError(err error) (int, string) {
	switch {
	case errors.Is(err, ErrUsage):
		return ExitUsage, "Usage"
	case errors.Is(err, ErrRefused):
		return ExitRefused, "Refused"
	}
	kind := smapi.KindOf(err, luksext.Classify)
	switch kind {
	case smapi.KindWrongPassphrase:
		return ExitWrongPassphrase, kind.Name
	case smapi.KindDeviceNotFound, smapi.KindSRDoesNotExist:
		return ExitNotFound, kind.Name
	case smapi.KindKeyUnavailable, smapi.KindTPMUnavailable:
		return ExitKeyUnavailable, kind.Name
	case smapi.KindInUse:
		return ExitBusy, kind.Name
	case smapi.KindInvalidConfiguration:
		return ExitInvalidConfig, kind.Name
	case smapi.KindInvalidParameters:
		return ExitUsage, kind.Name
	case smapi.KindNotAdoptable:
		return ExitRefused, kind.Name
	}
	return ExitFailure, kind.Name
}

func usageErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUsage, fmt.Sprintf(format, args...))
}

func refused(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, args...))
}
