package luks

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/testenv"
)

// testKDFs keep real cryptsetup runs fast: minimal pbkdf2 for the TPM
// slot, and a small but real argon2id for the recovery slot.
var recoveryTestKDF = KDF{Algorithm: "argon2id", Iterations: 4, MemoryKiB: 32 << 10, Parallel: 1}

func testLogger(t *testing.T) *logrus.Logger {
	l := logrus.New()
	l.SetOutput(testWriter{t})
	l.SetLevel(logrus.DebugLevel)
	return l
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// realManager returns a Manager running the host's cryptsetup.
func realManager(t *testing.T, tools ...string) *Manager {
	t.Helper()
	testenv.Tools(t, append([]string{"cryptsetup"}, tools...)...)
	return New(run.NewExec(testLogger(t)), testLogger(t))
}

// image makes a sparse file of size bytes.
func image(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(size))
	require.NoError(t, f.Close())
	return p
}

// sh runs a real tool and returns stdout, failing the test on error.
func sh(t *testing.T, stdin string, name string, args ...string) string {
	t.Helper()
	out, code := shCode(t, stdin, name, args...)
	require.Equal(t, 0, code, "%s %s failed: %s", name, strings.Join(args, " "), out)
	return out
}

// shCode runs a tool and returns combined output and exit code.
func shCode(t *testing.T, stdin string, name string, args ...string) (string, int) {
	t.Helper()
	path, err := testenv.LookPath(name)
	require.NoError(t, err, name)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin")
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return out.String(), ee.ExitCode()
	}
	require.NoError(t, err)
	return out.String(), 0
}

// formatted returns a LUKS device image of the given version with pass in
// keyslot 0 (minimal KDF), formatted by our Format.
func formatted(t *testing.T, m *Manager, version int, pass secret.Bytes) string {
	t.Helper()
	img := image(t, 32<<20)
	got, err := m.Format(context.Background(), img, FormatOptions{
		Version: version, UUID: "6f1e6a1c-8b0e-4d5e-9c3a-1b2c3d4e5f60", Label: SRName("0c0ffee0-0000-4000-8000-000000000001"),
		Passphrase: pass.Clone(), KDF: MinimalKDF(),
	})
	require.NoError(t, err)
	require.Equal(t, version, got)
	return img
}

// tangServer runs a real tangd behind socat on a free port and returns
// its URL. The process group is killed at cleanup.
func tangServer(t *testing.T) string {
	t.Helper()
	tools := testenv.Tools(t, "tangd", "tangd-keygen", "socat", "clevis", "jose")
	db := t.TempDir()
	sh(t, "", tools["tangd-keygen"], db)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	port := l.Addr().(*net.TCPAddr).Port
	require.NoError(t, l.Close())
	cmd := exec.Command(tools["socat"], fmt.Sprintf("TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork", port),
		"EXEC:"+tools["tangd"]+" "+db)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get(url + "/adv")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return url
			}
		}
		require.True(t, time.Now().Before(deadline), "tangd did not answer: %v", err)
		time.Sleep(100 * time.Millisecond)
	}
}

// tangJWE encrypts plaintext with the real `clevis encrypt tang`.
func tangJWE(t *testing.T, url string, plaintext secret.Bytes) string {
	t.Helper()
	out := sh(t, string(plaintext.Expose()), "clevis", "encrypt", "tang", fmt.Sprintf(`{"url":%q}`, url), "-y")
	jwe := strings.TrimSpace(out)
	require.Equal(t, 4, strings.Count(jwe, "."), "not a compact JWE: %q", jwe)
	return jwe
}

func openRW(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	return f
}
