package smapi

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// Plugin is what a multi-call binary hands to Main.
type Plugin struct {
	// Kind is "volume" or "datapath" (a log field).
	Kind  string
	Table Table
	// Classify maps domain errors to kinds (may be nil).
	Classify Classifier
	Log      logrus.FieldLogger
}

// Invocation is one process's worth of I/O.
type Invocation struct {
	Args   []string // argv; argv[0] names the method
	Stdin  io.Reader
	Stdout io.Writer
}

// MethodName returns the method an invocation asks for: the basename of
// argv[0] (the daemon executes <dir>/<Iface>.<method>, usually a symlink to
// the multi-call binary), or, when the binary is run under its own name,
// the first argument that looks like a method ("volume SR.stat --json").
func MethodName(args []string) string {
	if len(args) == 0 {
		return ""
	}
	base := filepath.Base(args[0])
	if strings.Contains(base, ".") {
		return base
	}
	for _, a := range args[1:] {
		if !strings.HasPrefix(a, "-") && strings.Contains(a, ".") {
			return a
		}
	}
	return base
}

// IsMethodCall reports whether args name a method of t (as opposed to an
// operator command line handled elsewhere by the same binary).
func IsMethodCall(t Table, args []string) bool {
	name := MethodName(args)
	_, ok := t.Lookup(name)
	return ok || strings.Contains(name, ".")
}

// MaxParamsSize bounds the params read from stdin. The largest real call
// (SR.create with a long device-config, Volume.set of a key) is a few KiB;
// reading without a bound lets one caller make a gigabyte-sized process
// and log line.
const MaxParamsSize = 4 << 20

// Main runs one SMAPIv3 call and returns the process exit status: it reads
// all of stdin, dispatches by method name, prints exactly one JSON value on
// stdout (the result, null for unit, or the error record) and never lets a
// panic, a log line or a Go stack reach stdout.
func Main(ctx context.Context, p Plugin, inv Invocation) (status int) {
	start := time.Now()
	method := MethodName(inv.Args)
	log := p.Log
	if log == nil {
		log = logrus.StandardLogger()
	}
	log = log.WithFields(logrus.Fields{"plugin": p.Kind, "method": method})

	var result any
	var err error
	defer func() {
		if r := recover(); r != nil {
			log.WithField("stack", string(debug.Stack())).Error("panic in handler")
			err = Errorf(KindInternal, "internal error in %s: %v (see the plugin log for the stack)", method, r)
		}
		status = finish(inv.Stdout, result, err, p.Classify, log, start)
	}()

	stdin, rerr := io.ReadAll(io.LimitReader(inv.Stdin, MaxParamsSize+1))
	if rerr != nil {
		err = Wrap(KindInvalidParameters, fmt.Errorf("reading stdin: %w", rerr))
		return
	}
	if len(stdin) > MaxParamsSize {
		err = Errorf(KindInvalidParameters, "the call's parameters are larger than %d MiB; no SMAPIv3 call needs that much (is a dbg or name field filled with junk?)", MaxParamsSize>>20)
		return
	}
	if cerr := CheckParams(stdin); cerr != nil {
		err = Wrap(KindInvalidParameters, cerr)
		return
	}
	if dbg := peekString(stdin, "dbg"); dbg != "" {
		log = log.WithField("dbg", dbg)
	}
	if sr := peekString(stdin, "sr"); sr != "" {
		log = log.WithField("sr", sr)
	}
	if key := peekString(stdin, "key"); key != "" {
		log = log.WithField("vol", key)
	}
	m, ok := p.Table.Lookup(method)
	if !ok || !m.Implemented() {
		err = Errorf(KindUnimplemented, "%s is not implemented by this %s plugin", method, p.Kind)
		return
	}
	timeout := m.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, os.Interrupt)
	defer stop()
	ctx = WithLogger(ctx, log)
	log.Debug("call started")
	result, err = m.Call(ctx, stdin)
	return
}

func finish(stdout io.Writer, result any, err error, classify Classifier, log logrus.FieldLogger, start time.Time) int {
	log = log.WithField("duration_ms", time.Since(start).Milliseconds())
	if stream, ok := result.(StreamResult); ok && err == nil {
		werr := stream(stdout)
		if werr == nil {
			_, werr = io.WriteString(stdout, "\n")
		}
		if werr != nil {
			log.WithError(werr).Error("writing result")
			return 1
		}
		log.Info("call succeeded")
		return 0
	}
	if err == nil {
		out, merr := EncodeResult(result)
		if merr == nil {
			if _, werr := stdout.Write(out); werr != nil {
				log.WithError(werr).Error("writing result")
				return 1
			}
			log.Info("call succeeded")
			return 0
		}
		err = Errorf(KindInternal, "encoding result: %v", merr)
	}
	rec := ToRecord(err, classify)
	log.WithFields(logrus.Fields{"code": rec.Code, "error_kind": rec.Params[0]}).Error("call failed: " + rec.Params[1])
	_, _ = stdout.Write(rec.Encode())
	return 1
}

type loggerKey struct{}

// WithLogger stores the call's logger (with plugin/method/dbg fields) in ctx.
func WithLogger(ctx context.Context, l logrus.FieldLogger) context.Context {
	return context.WithValue(ctx, loggerKey{}, l)
}

// Logger returns the call's logger, or the standard one.
func Logger(ctx context.Context) logrus.FieldLogger {
	if l, ok := ctx.Value(loggerKey{}).(logrus.FieldLogger); ok {
		return l
	}
	return logrus.StandardLogger()
}

// peekString extracts a top-level string member for log fields without
// decoding (or logging) anything else of the params.
func peekString(stdin []byte, key string) string {
	var m map[string]rawJSON
	if DecodeLoose(stdin, &m) != nil {
		return ""
	}
	if p, ok := lookupFold(m, "params"); ok {
		var inner map[string]rawJSON
		if DecodeLoose(p, &inner) == nil {
			m = inner
		}
	}
	v, ok := lookupFold(m, key)
	if !ok {
		return ""
	}
	var s string
	if DecodeLoose(v, &s) != nil {
		return ""
	}
	return s
}
