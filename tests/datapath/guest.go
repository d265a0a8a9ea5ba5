package datapath

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/tests/vm"
)

// Guest is a VM with the datapath plugin built into its work directory and
// the fake tap-ctl installed as /usr/sbin/tap-ctl, where the plugin's
// run.DefaultPaths look for the real one: no override in the plugin.
type Guest struct {
	M   *vm.Machine
	Bin Binaries
	n   atomic.Int64
}

// Install builds the binaries into m's work directory (shared with the
// guest) and installs the fake tap-ctl in the guest.
func Install(t testing.TB, m *vm.Machine) *Guest {
	t.Helper()
	host, _ := m.WorkDir()
	g := &Guest{M: m, Bin: Build(t, filepath.Join(host, "luksext-datapath"))}
	m.MustRun(t, fmt.Sprintf("install -m 0755 %s /usr/sbin/tap-ctl && modprobe nbd && /usr/sbin/tap-ctl list", g.Bin.TapCtl))
	return g
}

// Invoke implements smapitest.Invoker: it runs the method's executable in
// the guest as xapi-storage-script does (argv [path, "--json"], params on
// stdin, stdout and stderr read separately).
func (g *Guest) Invoke(ctx context.Context, method string, stdin []byte) (smapitest.Reply, error) {
	dir := filepath.Join(filepath.Dir(g.Bin.TapCtl), "calls")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return smapitest.Reply{}, err
	}
	base := filepath.Join(dir, fmt.Sprintf("%d", g.n.Add(1)))
	if err := os.WriteFile(base+".in", stdin, 0o644); err != nil {
		return smapitest.Reply{}, err
	}
	exe := filepath.Join(g.Bin.PluginDir, method)
	// A method with no file runs through the binary under that name, as a
	// multi-call binary would see a call it does not know.
	script := fmt.Sprintf(`if [ -e %[1]q ]; then %[1]q --json; else (exec -a %[1]q %[2]q --json); fi <%[3]q.in >%[3]q.out 2>%[3]q.err`,
		exe, filepath.Join(g.Bin.PluginDir, "datapath"), base)
	var out bytes.Buffer
	code, err := g.M.Exec(ctx, script, &out)
	if err != nil {
		return smapitest.Reply{}, fmt.Errorf("%w: %s", err, out.String())
	}
	stdout, _ := os.ReadFile(base + ".out")
	stderr, _ := os.ReadFile(base + ".err")
	return smapitest.Reply{Stdout: stdout, Stderr: stderr, ExitCode: code}, nil
}

// MustRun runs script in the guest; a shorthand for tests.
func (g *Guest) MustRun(t testing.TB, script string) string {
	t.Helper()
	return strings.TrimSpace(g.M.MustRun(t, script))
}
