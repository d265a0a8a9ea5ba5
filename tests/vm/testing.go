package vm

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/testenv"
)

// Start prepares and boots a machine for t. It skips (or, with
// LUKSEXT_REQUIRE_ALL=1, fails) when this machine cannot run guests, and
// registers Shutdown with t.Cleanup.
func Start(t testing.TB, cfg Config) *Machine {
	t.Helper()
	if cfg.Log == nil {
		l := logrus.New()
		l.SetOutput(testLogWriter{t})
		l.SetFormatter(&logrus.TextFormatter{DisableTimestamp: true})
		cfg.Log = l
	}
	m, err := newMachine(cfg, t.TempDir())
	if errors.Is(err, ErrUnavailable) {
		testenv.Unavailable(t, err.Error())
	}
	if err != nil {
		t.Fatalf("vm: %v", err)
	}
	t.Cleanup(m.Shutdown)
	if err := m.boot(context.Background()); err != nil {
		t.Fatalf("vm: boot: %v", err)
	}
	return m
}

// Run runs a bash script as root in the guest (working directory: WorkDir)
// and returns its combined stdout and stderr and its exit code. The script
// is sourced by a forked subshell of the guest agent's bash (a new bash
// costs ~0.4 s under TCG): `exit N` ends it with N, `set -e` works, $0 is
// not the script's name. It fails
// the test if the guest stops or the script outlives Config.RunTimeout.
func (m *Machine) Run(t testing.TB, script string) (output string, exitCode int) {
	t.Helper()
	var out bytes.Buffer
	rc, err := m.Exec(context.Background(), script, &out)
	if err != nil {
		t.Fatalf("vm: run %q: %v\n--- script output ---\n%s\n--- guest console (tail) ---\n%s",
			firstLine(script), err, out.String(), m.ConsoleTail())
	}
	return out.String(), rc
}

// MustRun is Run that fails the test, with the output, on a non-zero exit.
func (m *Machine) MustRun(t testing.TB, script string) string {
	t.Helper()
	out, rc := m.Run(t, script)
	if rc != 0 {
		t.Fatalf("vm: script exited %d:\n%s\n--- output ---\n%s", rc, script, out)
	}
	return out
}

// Reboot syncs, powers the guest off and boots it again: same disks, same
// TPM state, /etc /var /usr /opt /root as they were, /run and /tmp empty.
func (m *Machine) Reboot(t testing.TB) {
	t.Helper()
	if err := m.RebootContext(context.Background()); err != nil {
		t.Fatalf("vm: reboot: %v", err)
	}
}

// ReplaceTPM gives the guest a new, empty TPM from the next boot on, as if
// its disks had moved to another host.
func (m *Machine) ReplaceTPM(t testing.TB) {
	t.Helper()
	if !m.cfg.TPM {
		t.Fatalf("vm: ReplaceTPM on a machine started without Config.TPM")
	}
	m.replaceTPM()
}

// Shutdown kills the guest and its vTPM. Start registers it with
// t.Cleanup; calling it earlier is fine.
func (m *Machine) Shutdown() { m.Close() }

func firstLine(s string) string {
	s = string(bytes.TrimSpace([]byte(s)))
	if i := bytes.IndexByte([]byte(s), '\n'); i >= 0 {
		return s[:i] + " ..."
	}
	return s
}

// testLogWriter sends harness log lines to the test's log.
type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}
