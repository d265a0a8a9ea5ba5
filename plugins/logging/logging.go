// Package logging sets up logrus for a plugin process: text lines on stderr
// (xapi-storage-script copies a failed call's stderr into its own log) and
// the same lines to syslog with facility LOCAL2 and tag SMAPIv3-luksext,
// which XCP-ng routes to /var/log/SMlog. Never stdout: stdout carries the
// one JSON value of the SMAPIv3 reply.
package logging

import (
	"bufio"
	"io"
	"log/syslog"
	"os"
	"strings"

	"github.com/sirupsen/logrus"
)

// SyslogTag is the program name syslog lines carry.
const SyslogTag = "SMAPIv3-luksext"

// SysconfigPath holds LOG_LEVEL=debug|info|warn|error (installed by the RPM).
const SysconfigPath = "/etc/sysconfig/luksext"

// Options configure New.
type Options struct {
	Plugin string    // "volume", "datapath", "luksext"
	Stderr io.Writer // default os.Stderr
	// Syslog enables the LOCAL2 hook; it is silently absent where no syslog
	// socket exists (build machines, tests).
	Syslog bool
	// Level overrides the configured level (for tests).
	Level string
}

// New returns a logger with the plugin and pid fields set.
func New(o Options) *logrus.Entry {
	l := logrus.New()
	l.SetOutput(o.Stderr)
	if o.Stderr == nil {
		l.SetOutput(os.Stderr)
	}
	l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, DisableColors: true})
	l.AddHook(RedactHook{})
	level := o.Level
	if level == "" {
		level = configuredLevel()
	}
	if lv, err := logrus.ParseLevel(level); err == nil {
		l.SetLevel(lv)
	} else {
		l.SetLevel(logrus.InfoLevel)
	}
	if o.Syslog {
		if w, err := syslog.New(syslog.LOG_LOCAL2|syslog.LOG_INFO, SyslogTag); err == nil {
			l.AddHook(&syslogHook{w: w})
		}
	}
	return l.WithFields(logrus.Fields{"plugin": o.Plugin, "pid": os.Getpid()})
}

// configuredLevel reads LUKSEXT_LOG_LEVEL, then LOG_LEVEL in the sysconfig
// file, defaulting to info.
func configuredLevel() string {
	if v := os.Getenv("LUKSEXT_LOG_LEVEL"); v != "" {
		return v
	}
	f, err := os.Open(SysconfigPath)
	if err != nil {
		return "info"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(s.Text()), "=")
		if ok && k == "LOG_LEVEL" {
			return strings.Trim(v, `"'`)
		}
	}
	return "info"
}

type syslogHook struct{ w *syslog.Writer }

func (h *syslogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (h *syslogHook) Fire(e *logrus.Entry) error {
	line, err := (&logrus.TextFormatter{DisableTimestamp: true, DisableColors: true}).Format(e)
	if err != nil {
		return err
	}
	msg := strings.TrimSpace(string(line))
	switch e.Level {
	case logrus.PanicLevel, logrus.FatalLevel, logrus.ErrorLevel:
		return h.w.Err(msg)
	case logrus.WarnLevel:
		return h.w.Warning(msg)
	case logrus.InfoLevel:
		return h.w.Info(msg)
	default:
		return h.w.Debug(msg)
	}
}

// RedactHook blanks fields whose names say they hold a secret. It is a
// second line of defence: secrets are held in secret.Bytes, which already
// prints as [redacted], and are never put in fields on purpose.
type RedactHook struct{}

// Levels implements logrus.Hook.
func (RedactHook) Levels() []logrus.Level { return logrus.AllLevels }

// Fire implements logrus.Hook.
func (RedactHook) Fire(e *logrus.Entry) error {
	for k := range e.Data {
		if IsSecretName(k) {
			e.Data[k] = "[redacted]"
		}
	}
	return nil
}

// IsSecretName reports whether a field or configuration key name denotes a
// secret (password, passphrase, secret, jwk, key material).
func IsSecretName(name string) bool {
	n := strings.ToLower(name)
	for _, w := range []string{"password", "passphrase", "secret", "jwk", "keyfile", "key_material"} {
		if strings.Contains(n, w) {
			return true
		}
	}
	return false
}
