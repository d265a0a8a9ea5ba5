// Package tpmtest starts a private swtpm for a test: fresh state in
// t.TempDir(), random free loopback ports, killed in t.Cleanup. It hands
// out both the Spec for our Go code and the TCTI string for tpm2-tools and
// clevis, so interop tests talk to the same TPM from both sides.
package tpmtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/plugins/tpm"
)

// SWTPM is one running software TPM.
type SWTPM struct {
	// Spec opens the TPM from Go (swtpm:tcp:127.0.0.1:PORT).
	Spec tpm.Spec
	// TCTI is for tpm2-tools and clevis (swtpm:host=127.0.0.1,port=PORT).
	TCTI string
	// StateDir keeps the TPM's persistent state (seeds, NV) across Restart.
	StateDir string

	bin  string
	cmd  *exec.Cmd
	done chan struct{}
}

// Start launches a fresh swtpm and registers its shutdown with t.Cleanup.
func Start(t testing.TB) *SWTPM {
	t.Helper()
	tools := testenv.Tools(t, "swtpm")
	// Not t.TempDir(): its path contains the test name, and swtpm's
	// comma-separated options cannot carry a subtest name with commas.
	dir, err := os.MkdirTemp("", "luksext-swtpm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	s := &SWTPM{StateDir: dir, bin: tools["swtpm"]}
	s.start(t)
	t.Cleanup(s.stop)
	return s
}

// Env is the environment tpm2-tools and clevis need to reach this TPM.
// clevis' tpm2 pin only probes /dev/tpmrm? when TPM2TOOLS_TCTI is unset.
func (s *SWTPM) Env() []string {
	return []string{"TPM2TOOLS_TCTI=" + s.TCTI}
}

// Restart stops swtpm and starts it again on the same state, as a host
// reboot would: PCRs are reset, sealed objects stay loadable. Ports change.
func (s *SWTPM) Restart(t testing.TB) {
	t.Helper()
	s.stop()
	s.start(t)
}

// FlushAll removes leftover transient objects and sessions. swtpm has no
// resource manager, and clevis 19's tpm2 pin leaks a session per call
// (fixed in clevis 22), which exhausts the TPM after a few calls.
func (s *SWTPM) FlushAll(t testing.TB) {
	t.Helper()
	tools := testenv.Tools(t, "tpm2_flushcontext")
	for _, flag := range []string{"-t", "-l", "-s"} {
		cmd := exec.Command(tools["tpm2_flushcontext"], flag)
		cmd.Env = append(os.Environ(), s.Env()...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("tpm2_flushcontext %s: %v: %s", flag, err, out)
		}
	}
}

func (s *SWTPM) start(t testing.TB) {
	t.Helper()
	var lastErr error
	// Another process may grab a port between our probe and swtpm's bind;
	// try a few port pairs before giving up.
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePortPair()
		if err != nil {
			lastErr = err
			continue
		}
		if err := s.launch(port); err != nil {
			lastErr = err
			continue
		}
		return
	}
	t.Fatalf("starting swtpm: %v", lastErr)
}

func (s *SWTPM) launch(port int) error {
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	logFile := filepath.Join(s.StateDir, "swtpm.log")
	cmd := exec.Command(s.bin, "socket", "--tpm2",
		"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
		"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
		"--flags", "startup-clear",
		"--tpmstate", "dir="+s.StateDir,
		"--log", "file="+logFile)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("exec swtpm: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-done:
			log, _ := os.ReadFile(logFile)
			return fmt.Errorf("swtpm exited during start-up: %s", log)
		default:
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			_ = c.Close()
			s.cmd, s.done = cmd, done
			s.Spec = tpm.Spec{Kind: tpm.KindSWTPM, Addr: addr}
			s.TCTI = fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", port)
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	<-done
	return fmt.Errorf("swtpm did not listen on %s within 10s", addr)
}

func (s *SWTPM) stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// freePortPair finds P such that P and P+1 are free on 127.0.0.1 (swtpm
// wants its control port next to the server port by convention here).
func freePortPair() (int, error) {
	for i := 0; i < 20; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port+1)))
		_ = l.Close()
		if err != nil || port+1 > 65535 {
			continue
		}
		_ = l2.Close()
		return port, nil
	}
	return 0, fmt.Errorf("no two consecutive free ports found on 127.0.0.1")
}

// Open is a shortcut for tests that talk to the TPM directly.
func (s *SWTPM) Open(t testing.TB) transport.TPMCloser {
	t.Helper()
	tp, err := s.Spec.Open(context.Background())
	if err != nil {
		t.Fatalf("opening swtpm: %v", err)
	}
	t.Cleanup(func() { _ = tp.Close() })
	return tp
}

// LockOut puts the TPM into dictionary-attack lockout, as repeated wrong
// passwords for some DA-protected key would: it sets max-tries to 1 and
// fails one password check. It returns the TPM's answer to the next
// (correct) authorization, which is TPM_RC_LOCKOUT.
func (s *SWTPM) LockOut(t testing.TB) error {
	t.Helper()
	tools := testenv.Tools(t, "tpm2_dictionarylockout")
	cmd := exec.Command(tools["tpm2_dictionarylockout"], "--setup-parameters", "--max-tries=1",
		"--recovery-time=1000", "--lockout-recovery-time=1000")
	cmd.Env = append(os.Environ(), s.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tpm2_dictionarylockout: %v: %s", err, out)
	}
	tp, err := s.Spec.Open(context.Background())
	if err != nil {
		t.Fatalf("opening swtpm: %v", err)
	}
	defer tp.Close()
	primary, err := tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}.Execute(tp)
	if err != nil {
		t.Fatalf("CreatePrimary: %v", err)
	}
	defer func() { _, _ = tpm2.FlushContext{FlushHandle: primary.ObjectHandle}.Execute(tp) }()
	parent := tpm2.AuthHandle{Handle: primary.ObjectHandle, Name: primary.Name, Auth: tpm2.PasswordAuth(nil)}
	// A password-protected object without noDA, unlike clevis' objects.
	created, err := tpm2.Create{
		ParentHandle: parent,
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			UserAuth: tpm2.TPM2BAuth{Buffer: []byte("right")},
			Data:     tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: []byte("x")}),
		}},
		InPublic: tpm2.New2B(tpm2.TPMTPublic{
			Type: tpm2.TPMAlgKeyedHash, NameAlg: tpm2.TPMAlgSHA256,
			ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, UserWithAuth: true},
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
				Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
			}),
		}),
	}.Execute(tp)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	loaded, err := tpm2.Load{ParentHandle: parent, InPrivate: created.OutPrivate, InPublic: created.OutPublic}.Execute(tp)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	defer func() { _, _ = tpm2.FlushContext{FlushHandle: loaded.ObjectHandle}.Execute(tp) }()
	unseal := func(pw string) error {
		_, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: loaded.ObjectHandle, Name: loaded.Name,
			Auth: tpm2.PasswordAuth([]byte(pw))}}.Execute(tp)
		return err
	}
	// The first DA failure may answer TPM_RC_RETRY (the TPM persists its
	// DA state first); the failure counts on the next try.
	for i := 0; i < 5; i++ {
		err = unseal("wrong")
		if errors.Is(err, tpm2.TPMRCAuthFail) || errors.Is(err, tpm2.TPMRCLockout) {
			break
		}
		if !errors.Is(err, tpm2.TPMRCRetry) {
			t.Fatalf("wrong password: want TPM_RC_AUTH_FAIL, got %v", err)
		}
	}
	err = unseal("right")
	if !errors.Is(err, tpm2.TPMRCLockout) {
		t.Fatalf("TPM did not enter lockout: %v", err)
	}
	return err
}

// ClearLockout ends a dictionary-attack lockout with the (empty) lockout
// authorization, as an administrator would with tpm2_dictionarylockout -c.
func (s *SWTPM) ClearLockout(t testing.TB) {
	t.Helper()
	tools := testenv.Tools(t, "tpm2_dictionarylockout")
	cmd := exec.Command(tools["tpm2_dictionarylockout"], "--clear-lockout")
	cmd.Env = append(os.Environ(), s.Env()...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tpm2_dictionarylockout --clear-lockout: %v: %s", err, out)
	}
}
