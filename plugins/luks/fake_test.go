package luks

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
	"github.com/luksext/luksext/plugins/secret"
)

// Unit tests with runfake: what we send to cryptsetup for each dom0
// cryptsetup generation, and how failures are classified.

func fakeManager(t *testing.T, version string, cryptsetup runfake.Handler) (*Manager, *runfake.Runner) {
	r := runfake.New()
	r.Handle("cryptsetup", func(c runfake.Call) (run.Result, error) {
		if len(c.Args) == 1 && c.Args[0] == "--version" {
			return run.Result{Stdout: []byte("cryptsetup " + version + "\n")}, nil
		}
		return cryptsetup(c)
	})
	return New(r, testLogger(t)), r
}

func ok(runfake.Call) (run.Result, error) { return run.Result{}, nil }

func exitWith(code int) runfake.Handler {
	return func(c runfake.Call) (run.Result, error) {
		return run.Result{}, &run.CommandError{Path: c.Tool, Args: c.Args, ExitCode: code, Stderr: "No key available with this passphrase."}
	}
}

// fakeLUKS writes a real LUKS1/2 image so header reads succeed; the fake
// then stands in for cryptsetup's writes.
func fakeLUKS(t *testing.T, version int) string {
	testdata := map[int]string{1: "luks1.img", 2: "luks2.img"}[version]
	p := filepath.Join(t.TempDir(), testdata)
	m := realManager(t)
	img := formatted(t, m, version, secret.FromString("x"))
	b, err := os.ReadFile(img)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(p, b, 0o600))
	return p
}

func TestCapabilitiesByVersion(t *testing.T) {
	for _, tc := range []struct {
		v                                 string
		luks2, pbkdf, tokenImport, mdSize bool
	}{
		{"1.7.4", false, false, false, false},
		{"2.0.3", true, true, false, false},
		{"2.0.4", true, true, true, false},
		{"2.1.0", true, true, true, true},
		{"2.6.1", true, true, true, true},
		{"10.0.0", true, true, true, true},
	} {
		c, err := CapabilitiesFor(tc.v)
		require.NoError(t, err, tc.v)
		assert.Equal(t, []bool{tc.luks2, tc.pbkdf, tc.tokenImport, tc.mdSize},
			[]bool{c.LUKS2, c.PBKDFOptions, c.TokenImport, c.MetadataSize}, tc.v)
	}
	_, err := CapabilitiesFor("garbage")
	assert.Error(t, err)
}

func TestFormatArgsPerCryptsetupVersion(t *testing.T) {
	img := image(t, 1<<20)
	for _, tc := range []struct {
		version  string
		want     int
		contains []string
		absent   []string
	}{
		{"1.7.4", 1, []string{"luksFormat --batch-mode --cipher aes-xts-plain64 --key-size 512 --uuid U --hash sha256 --iter-time 1 --key-slot 0 --key-file=- " + img}, []string{"--type", "--sector-size", "--label", "--pbkdf"}},
		{"2.0.3", 2, []string{"--type luks2", "--sector-size 512", "--label L", "--pbkdf pbkdf2 --hash sha256 --pbkdf-force-iterations 1000"}, []string{"--iter-time"}},
	} {
		t.Run(tc.version, func(t *testing.T) {
			m, r := fakeManager(t, tc.version, ok)
			v, err := m.Format(context.Background(), img, FormatOptions{UUID: "U", Label: "L", Passphrase: secret.FromString("p"), KDF: MinimalKDF()})
			require.NoError(t, err)
			assert.Equal(t, tc.want, v)
			calls := r.Calls()
			line := calls[len(calls)-1].Line()
			for _, s := range tc.contains {
				assert.Contains(t, line, s)
			}
			for _, s := range tc.absent {
				assert.NotContains(t, line, s)
			}
		})
	}
	m, _ := fakeManager(t, "1.7.4", ok)
	_, err := m.Format(context.Background(), img, FormatOptions{Version: 2, Passphrase: secret.FromString("p")})
	assert.ErrorIs(t, err, ErrNotSupported)
}

func TestKDFArgs(t *testing.T) {
	c26, _ := CapabilitiesFor("2.6.1")
	c17, _ := CapabilitiesFor("1.7.4")
	assert.Equal(t, "--pbkdf argon2id --iter-time 2000 --pbkdf-memory 65536 --pbkdf-parallel 1", strings.Join(RecoveryKDF().args(2, c26), " "))
	assert.Equal(t, "--pbkdf pbkdf2 --hash sha256 --iter-time 2000", strings.Join(RecoveryKDF().args(1, c26), " "), "LUKS1 has no argon2")
	assert.Equal(t, "--hash sha256 --iter-time 2000", strings.Join(RecoveryKDF().args(1, c17), " "))
	assert.Equal(t, "--hash sha256 --iter-time 1", strings.Join(MinimalKDF().args(1, c17), " "))
}

func TestExitCodesClassified(t *testing.T) {
	img := fakeLUKS(t, 2)
	for code, kind := range map[int]error{2: ErrWrongPassphrase, 5: ErrBusy, 4: ErrDeviceNotFound} {
		m, _ := fakeManager(t, "2.6.1", exitWith(code))
		err := m.Open(context.Background(), img, "luksext-x", secret.FromString("p"), 0)
		assert.ErrorIs(t, err, kind, "exit %d", code)
	}
	m, _ := fakeManager(t, "2.6.1", exitWith(1))
	err := m.TestKeyslot(context.Background(), img, secret.FromString("p"), 0)
	require.Error(t, err)
	assert.NotErrorIs(t, err, ErrWrongPassphrase)

	// No cryptsetup at all.
	m = New(runfake.New(), logrus.New())
	_, err = m.Capabilities(context.Background())
	assert.ErrorIs(t, err, ErrToolMissing)

	// Not a LUKS device and no device: decided before running anything.
	m, r := fakeManager(t, "2.6.1", ok)
	assert.ErrorIs(t, m.Open(context.Background(), image(t, 1<<20), "n", secret.FromString("p"), 0), ErrNotLUKS)
	assert.ErrorIs(t, m.Open(context.Background(), "/nonexistent/dev", "n", secret.FromString("p"), 0), ErrDeviceNotFound)
	assert.Empty(t, r.Calls())
}

func TestCloseIsIdempotent(t *testing.T) {
	m, r := fakeManager(t, "2.6.1", ok)
	m.DevDir = t.TempDir()
	require.NoError(t, m.Close(context.Background(), "luksext-a"))
	assert.Empty(t, r.Calls(), "closing an absent mapping runs nothing")
	require.NoError(t, os.MkdirAll(filepath.Join(m.DevDir, "mapper"), 0o755))
	require.NoError(t, os.WriteFile(m.MapperPath("luksext-a"), nil, 0o600))
	assert.True(t, m.IsOpen("luksext-a"))
	r.Handle("cryptsetup", exitWith(5))
	assert.ErrorIs(t, m.Close(context.Background(), "luksext-a"), ErrBusy)
	r.Handle("cryptsetup", ok)
	require.NoError(t, m.Close(context.Background(), "luksext-a"))
	assert.Equal(t, "cryptsetup close luksext-a", r.Calls()[len(r.Calls())-1].Line())
}

func TestTokenWriterFollowsCryptsetupVersion(t *testing.T) {
	for _, tc := range []struct {
		version    string
		wantImport bool
	}{{"2.0.3", false}, {"2.0.4", true}} {
		t.Run(tc.version, func(t *testing.T) {
			img := fakeLUKS(t, 2)
			m, r := fakeManager(t, tc.version, ok)
			jwe := "eyJhbGciOiJkaXIifQ..aXY.Y3Q.dGFn"
			require.NoError(t, m.Bind(context.Background(), img, 0, jwe))
			imported := false
			for _, c := range r.Calls() {
				imported = imported || strings.HasPrefix(c.Line(), "cryptsetup token import")
			}
			assert.Equal(t, tc.wantImport, imported)
			if !tc.wantImport {
				bs, err := m.Bindings(img)
				require.NoError(t, err)
				assert.Equal(t, []Binding{{Keyslot: 0, Token: 0, JWE: jwe}}, bs)
			}
		})
	}
}

// TestCanaryPassphraseNeverInArgvOrErrors: secrets reach cryptsetup on
// stdin or /dev/fd/3 only, and no error or log line carries them.
func TestCanaryPassphraseNeverInArgvOrErrors(t *testing.T) {
	canary := "CANARY-7f3a9c-passphrase"
	canary2 := "CANARY-second-b81e"
	forms := func(s string) []string {
		return []string{s, hex.EncodeToString([]byte(s)), base64.StdEncoding.EncodeToString([]byte(s)), base64.RawURLEncoding.EncodeToString([]byte(s))}
	}
	img := fakeLUKS(t, 2)
	var logs strings.Builder
	log := logrus.New()
	log.SetOutput(&logs)
	log.SetLevel(logrus.DebugLevel)
	r := runfake.New()
	m := New(r, log)
	m.DevDir = t.TempDir()
	r.Handle("cryptsetup", func(c runfake.Call) (run.Result, error) {
		if c.Line() == "cryptsetup --version" {
			return run.Result{Stdout: []byte("cryptsetup 2.6.1")}, nil
		}
		return run.Result{}, &run.CommandError{Path: c.Tool, Args: c.Args, ExitCode: 2}
	})
	ctx := context.Background()
	var errs []error
	_, err := m.Format(ctx, image(t, 1<<20), FormatOptions{Passphrase: secret.FromString(canary), KDF: MinimalKDF()})
	errs = append(errs, err)
	_, err = m.AddKeyslot(ctx, img, secret.FromString(canary), secret.FromString(canary2), -1, MinimalKDF())
	errs = append(errs, err)
	errs = append(errs, m.TestKeyslot(ctx, img, secret.FromString(canary), 0))
	errs = append(errs, m.Open(ctx, img, "luksext-x", secret.FromString(canary), 0))

	sawStdin, sawPipe := false, false
	for _, c := range r.Calls() {
		for _, f := range append(forms(canary), forms(canary2)...) {
			assert.NotContains(t, c.Line(), f)
		}
		sawStdin = sawStdin || string(c.Stdin) == canary
		for _, x := range c.ExtraFiles {
			sawPipe = sawPipe || string(x) == canary2
		}
	}
	assert.True(t, sawStdin, "the passphrase must arrive on stdin")
	assert.True(t, sawPipe, "the new passphrase must arrive on /dev/fd/3")
	for i, err := range errs {
		require.Error(t, err, "call %d", i)
		for _, f := range append(forms(canary), forms(canary2)...) {
			assert.NotContains(t, err.Error(), f)
			assert.NotContains(t, fmt.Sprintf("%+v %#v", err, err), f)
		}
	}
	for _, f := range append(forms(canary), forms(canary2)...) {
		assert.NotContains(t, logs.String(), f)
	}
}

func TestUnsupportedCryptsetupRefusedBeforeAnyChange(t *testing.T) {
	img := fakeLUKS(t, 2)
	for _, v := range []string{"1.6.8", "3.0.0"} {
		m, r := fakeManager(t, v, ok)
		_, err := m.AddKeyslot(context.Background(), img, secret.FromString("a"), secret.FromString("b"), -1, MinimalKDF())
		require.ErrorIs(t, err, ErrUnsupportedCryptsetup, v)
		assert.ErrorIs(t, err, run.ErrToolMissing, "reaches xe as Tool_missing")
		assert.Contains(t, err.Error(), "cryptsetup "+v)
		require.ErrorIs(t, m.RemoveKeyslot(context.Background(), img, 0), ErrUnsupportedCryptsetup, v)
		for _, c := range r.Calls() {
			assert.Equal(t, "cryptsetup --version", c.Line(), "only the version was asked")
		}
	}
	for _, v := range []string{"1.7.4", "2.0.3", "2.6.1", "2.7.5"} {
		m, _ := fakeManager(t, v, ok)
		_, err := m.Capabilities(context.Background())
		assert.NoError(t, err, v)
	}
}
