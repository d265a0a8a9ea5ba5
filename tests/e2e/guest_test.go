// Package e2e runs the installed luksext plugins inside a QEMU guest with a
// real dm-crypt, a real (software) TPM and udev, invoking the method
// executables exactly as xapi-storage-script does: the method's path,
// "--json", the params on stdin, one JSON value on stdout.
package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/tests/vm"
)

// guest is a booted VM with the plugins installed in its work directory.
type guest struct {
	*vm.Machine
	work   string // same path on host and guest
	volume string // the volume plugin directory
}

func repoRoot(t testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	require.True(t, ok)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// bootGuest builds and installs the plugins (make install DESTDIR=...)
// and the fake xapi into a work directory the guest shares, then boots.
func bootGuest(t *testing.T, cfg vm.Config) *guest {
	t.Helper()
	testenv.Tools(t, "make", "cryptsetup", "mkfs.ext4", "e2fsck", "tpm2_pcrextend")
	m := vm.Start(t, cfg)
	work, _ := m.WorkDir()
	t.Cleanup(func() {
		if t.Failed() { // the plugins' own account of what went wrong
			if b, err := os.ReadFile(filepath.Join(work, "plugin-stderr.log")); err == nil {
				lines := strings.Split(strings.TrimSpace(string(b)), "\n")
				if len(lines) > 80 {
					lines = lines[len(lines)-80:]
				}
				t.Logf("last plugin log lines:\n%s", strings.Join(lines, "\n"))
			}
		}
	})
	out, err := exec.Command("make", "-C", repoRoot(t), "install", "DESTDIR="+filepath.Join(work, "root"), "BIN="+filepath.Join(work, "bin")).CombinedOutput()
	require.NoError(t, err, "make install: %s", out)
	build := exec.Command("go", "build", "-o", filepath.Join(work, "bin", "fakexapi"), "./tests/cmd/fakexapi")
	build.Dir = repoRoot(t)
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err = build.CombinedOutput()
	require.NoError(t, err, "building fakexapi: %s", out)
	g := &guest{Machine: m, work: work,
		volume: filepath.Join(work, "root/usr/libexec/xapi-storage-script/volume", luksext.VolumePluginDir)}
	// Until a dom0 profile replaces them (dom0_test.go), the guest runs
	// this machine's (Debian's) tools: say which, and check it.
	hostVer, err := exec.Command("cryptsetup", "--version").Output()
	require.NoError(t, err)
	guestVer := g.MustRun(t, "cryptsetup --version; blkid -V; mount -V")
	t.Logf("guest tools (Debian profile):\n%s", guestVer)
	require.True(t, strings.HasPrefix(guestVer, string(hostVer)), "the guest runs the host's cryptsetup: %q vs %q", guestVer, hostVer)
	return g
}

// startXAPI runs the fake xapi in the guest with the given secrets, fed on
// stdin from a file in the work dir (the test's own input, excluded from
// the canary scan).
func (g *guest) startXAPI(t *testing.T, secrets map[string]string) {
	t.Helper()
	var lines []string
	for k, v := range secrets {
		lines = append(lines, k+"="+v)
	}
	in := filepath.Join(g.work, "input-secrets")
	require.NoError(t, os.WriteFile(in, []byte(strings.Join(lines, "\n")+"\n"), 0o600))
	g.MustRun(t, fmt.Sprintf(`pkill -f fakexapi; rm -f /run/fakexapi.sock
setsid %s/bin/fakexapi -socket /run/fakexapi.sock -calls %s/xapi-calls.log <%s >/dev/null 2>&1 &
for i in $(seq 100); do [ -S /run/fakexapi.sock ] && exit 0; sleep 0.1; done; echo "fake xapi did not start"; exit 1`, g.work, g.work, in))
}

// call invokes a volume plugin method the way xapi-storage-script does and
// validates the reply's shape; it returns the reply and its error record.
func (g *guest) call(t *testing.T, method string, params any) (smapitest.Reply, *smapi.ErrorRecord) {
	t.Helper()
	b, err := json.Marshal(params)
	require.NoError(t, err)
	in := filepath.Join(g.work, "params-"+method+".json")
	require.NoError(t, os.WriteFile(in, b, 0o600))
	outFile := filepath.Join(g.work, "stdout-"+method+".json")
	script := fmt.Sprintf(`export LUKSEXT_XAPI_SOCKET=/run/fakexapi.sock LUKSEXT_LOG_LEVEL=debug
%s/%s --json <%s >%s 2>>%s/plugin-stderr.log
echo "EXIT=$?"`, g.volume, method, in, outFile, g.work)
	out, code := g.Run(t, script)
	require.Equal(t, 0, code, out)
	i := strings.LastIndex(out, "EXIT=")
	require.GreaterOrEqual(t, i, 0, out)
	exit, err := strconv.Atoi(strings.TrimSpace(out[i+5:]))
	require.NoError(t, err)
	stdout, err := os.ReadFile(outFile)
	require.NoError(t, err)
	r := smapitest.Reply{Stdout: stdout, ExitCode: exit}
	table := luksext.VolumeTable(luksext.Deps{})
	m, ok := table.Lookup(method)
	require.True(t, ok, method)
	probs, rec := smapitest.CheckReply(r, m.Result)
	require.Empty(t, probs, "%s reply breaks the protocol: %s", method, stdout)
	return r, rec
}

// ok calls method, requires success and decodes the result into out.
func (g *guest) ok(t *testing.T, method string, params any, out any) {
	t.Helper()
	r, rec := g.call(t, method, params)
	require.Nil(t, rec, "%s failed: %+v", method, rec)
	if out != nil {
		require.NoError(t, json.Unmarshal(r.Stdout, out))
	}
}

// fails calls method and requires the error named want (params[0]).
func (g *guest) fails(t *testing.T, method string, params any, want string) *smapi.ErrorRecord {
	t.Helper()
	_, rec := g.call(t, method, params)
	require.NotNil(t, rec, "%s should have failed with %s", method, want)
	require.Equal(t, want, rec.Params[0], "%s: %v", method, rec.Params)
	return rec
}
