// Package xo runs the Xen Orchestra plugin's own tests (node --test, in
// packaging/xo/xo-server-luksext) as part of `go test ./...`, so `make
// test` and CI run them: npm ci against the committed lockfile (the real
// xen-api client, pinned), then the tests against a fake XAPI on
// 127.0.0.1. The package is copied to a temporary directory first, so no
// node_modules ever lands in the source tree.
package xo

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/luksext/luksext/plugins/testenv"
)

const pluginDir = "../../packaging/xo/xo-server-luksext"

func TestXOServerPlugin(t *testing.T) {
	tools := testenv.Tools(t, "node", "npm")
	out, err := exec.Command(tools["node"], "--version").Output()
	if err != nil {
		t.Fatalf("node --version: %v", err)
	}
	// node:test and `node --test` are stable from Node 18 (Debian 12 ships 18.20).
	if m := regexp.MustCompile(`^v(\d+)\.`).FindSubmatch(out); m == nil {
		t.Fatalf("node --version said %q", out)
	} else if n, _ := strconv.Atoi(string(m[1])); n < 18 {
		testenv.Unavailable(t, "node "+strings.TrimSpace(string(out))+" is older than 18 (no node:test)")
	}

	dir := t.TempDir()
	for _, f := range []string{"package.json", "package-lock.json", "index.mjs", "test/fake-xapi.mjs", "test/plugin.test.mjs"} {
		b, err := os.ReadFile(filepath.Join(pluginDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, f)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	run := func(timeout time.Duration, name string, args ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "NO_COLOR=1", "npm_config_update_notifier=false")
		out, err := cmd.CombinedOutput()
		t.Logf("%s %s:\n%s", filepath.Base(name), strings.Join(args, " "), out)
		if err != nil {
			t.Fatalf("%s %s: %v", filepath.Base(name), strings.Join(args, " "), err)
		}
	}
	run(5*time.Minute, tools["npm"], "ci", "--no-audit", "--no-fund")
	run(3*time.Minute, tools["node"], "--test", "test/plugin.test.mjs")
}
