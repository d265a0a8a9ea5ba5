// Package tangtest runs a real Tang server for a test: tangd behind socat
// on a random 127.0.0.1 port, with a fresh key directory made by
// tangd-keygen, killed in t.Cleanup.
package tangtest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/luksext/luksext/plugins/testenv"
)

// Server is one running Tang server.
type Server struct {
	URL    string // http://127.0.0.1:PORT
	KeyDir string
	// Thp is the S256 thumbprint of the signing key, computed by jose(1)
	// so that it is independent of our own thumbprint code.
	Thp string

	tools map[string]string
	port  int
	cmd   *exec.Cmd
	done  chan struct{}
}

// Start makes keys and serves them.
func Start(t testing.TB) *Server {
	t.Helper()
	tools := testenv.Tools(t, "socat", "tangd", "tangd-keygen", "jose")
	// Not t.TempDir(): the path goes into a socat address, where commas and
	// colons from a subtest name would be parsed as syntax.
	dir, err := os.MkdirTemp("", "luksext-tang-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	s := &Server{KeyDir: dir, tools: tools}
	if out, err := exec.Command(s.tools["tangd-keygen"], s.KeyDir).CombinedOutput(); err != nil {
		t.Fatalf("tangd-keygen: %v: %s", err, out)
	}
	s.Thp = s.SigningThumbprint(t)
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		if lastErr = s.launch(0); lastErr == nil {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("starting tang: %v", lastErr)
	}
	t.Cleanup(s.Stop)
	return s
}

// SigningThumbprint returns the S256 thumbprint of the (first) advertised
// signing key.
func (s *Server) SigningThumbprint(t testing.TB) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(s.KeyDir, "*.jwk"))
	for _, f := range files {
		// Rotated keys are kept as hidden ".<thp>.jwk" files (still used
		// for recovery, no longer advertised); Glob's "*" matches the dot.
		if strings.HasPrefix(filepath.Base(f), ".") {
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), `"verify"`) {
			continue
		}
		out, err := exec.Command(s.tools["jose"], "jwk", "thp", "-i", f, "-a", "S256").Output()
		if err != nil {
			t.Fatalf("jose jwk thp: %v", err)
		}
		return strings.TrimSpace(string(out))
	}
	t.Fatalf("no signing key in %s", s.KeyDir)
	return ""
}

// Stop kills the server (a Tang outage). Safe to call twice.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	// socat forks a child per connection: kill the whole process group.
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.done
	s.cmd = nil
}

// Restart serves the key directory again on the same port.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	if err := s.launch(s.port); err != nil {
		t.Fatalf("restarting tang: %v", err)
	}
}

// ReplaceKeys deletes every key (active and rotated) and makes new ones:
// data bound before can no longer be recovered from this server.
func (s *Server) ReplaceKeys(t testing.TB) {
	t.Helper()
	entries, err := os.ReadDir(s.KeyDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".jwk") {
			if err := os.Remove(filepath.Join(s.KeyDir, e.Name())); err != nil {
				t.Fatal(err)
			}
		}
	}
	if out, err := exec.Command(s.tools["tangd-keygen"], s.KeyDir).CombinedOutput(); err != nil {
		t.Fatalf("tangd-keygen: %v: %s", err, out)
	}
	s.Thp = s.SigningThumbprint(t)
}

func (s *Server) launch(port int) error {
	if port == 0 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		port = l.Addr().(*net.TCPAddr).Port
		_ = l.Close()
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	cmd := exec.Command(s.tools["socat"],
		fmt.Sprintf("TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork", port),
		fmt.Sprintf("EXEC:%s %s", s.tools["tangd"], s.KeyDir))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			return fmt.Errorf("socat exited during start-up (port %d taken?)", port)
		default:
		}
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			_ = c.Close()
			s.cmd, s.done, s.port = cmd, done, port
			s.URL = "http://" + addr
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
	return fmt.Errorf("socat did not listen on %s", addr)
}
