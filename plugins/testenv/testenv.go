// Package testenv decides whether a test that needs real tools (swtpm,
// clevis, tangd, QEMU, root) can run here. On a developer machine a missing
// tool skips the test with the reason printed; in CI, where .ci/run sets
// LUKSEXT_REQUIRE_ALL=1 after installing everything, the same situation is
// a failure, so a broken install step can never pass as a green run.
package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// RequireAllVar turns skips into failures when set to 1.
const RequireAllVar = "LUKSEXT_REQUIRE_ALL"

// Strict reports whether skips are failures in this run.
func Strict() bool { return os.Getenv(RequireAllVar) == "1" }

// Unavailable skips (or, in strict mode, fails) the test with reason.
func Unavailable(t testing.TB, reason string) {
	t.Helper()
	if Strict() {
		t.Fatalf("%s, and %s=1 forbids skipping", reason, RequireAllVar)
	}
	t.Skipf("skipped: %s (install it, or see README 'Running the tests')", reason)
}

// Tools returns the absolute path of each named tool, skipping or failing
// the test when one is missing. Names without a slash are looked up in
// PATH plus the sbin directories (tests may run without them in PATH).
func Tools(t testing.TB, names ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	var missing []string
	for _, n := range names {
		p, err := LookPath(n)
		if err != nil {
			missing = append(missing, n)
			continue
		}
		out[n] = p
	}
	if len(missing) > 0 {
		Unavailable(t, "missing tools: "+strings.Join(missing, ", "))
	}
	return out
}

// LookPath is exec.LookPath that also searches the sbin directories.
func LookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/libexec", "/usr/lib/x86_64-linux-gnu/swtpm"} {
		p := d + "/" + name
		if st, err := os.Stat(p); err == nil && st.Mode().Perm()&0o111 != 0 && !st.IsDir() {
			return p, nil
		}
	}
	return exec.LookPath(name)
}

// Root skips (or fails) unless the test runs as root.
func Root(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "needs root")
	}
}
