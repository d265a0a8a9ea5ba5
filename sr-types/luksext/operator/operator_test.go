package operator

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/smapi"
)

func runCLI(t *testing.T, d Deps, stdin string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = Run(context.Background(), Invocation{Args: append([]string{"luksext"}, args...), Stdin: strings.NewReader(stdin), Stdout: &out, Stderr: &errb}, d)
	return out.String(), errb.String(), code
}

func TestAdminParseCommandLine(t *testing.T) {
	cases := []struct {
		args    []string
		verb    string
		pos     []string
		keyFile string
		force   bool
		json    bool
		err     string
	}{
		{args: []string{"status"}, verb: "status"},
		{args: []string{"status", "--json", "/dev/sdb"}, verb: "status", pos: []string{"/dev/sdb"}, json: true},
		{args: []string{"rebind", "SR", "0", "--key-file", "-"}, verb: "rebind", pos: []string{"SR", "0"}, keyFile: "-"},
		{args: []string{"--key-file=/root/k", "rebind", "SR", "0"}, verb: "rebind", pos: []string{"SR", "0"}, keyFile: "/root/k"},
		{args: []string{"unbind", "SR", "1", "--force"}, verb: "unbind", pos: []string{"SR", "1"}, force: true},
		{args: []string{"recovery", "rotate", "SR"}, verb: "recovery rotate", pos: []string{"SR"}},
		{args: []string{"bind", "SR", "tpm2", `{"pcr_ids":"7"}`}, verb: "bind", pos: []string{"SR", "tpm2", `{"pcr_ids":"7"}`}},
		{args: []string{"header-restore", "SR", "f", "-y"}, verb: "header-restore", pos: []string{"SR", "f"}},
		{args: []string{"rebind", "SR"}, verb: "rebind", err: "needs 2 argument(s), got 1"},
		{args: []string{"rebind", "SR", "0", "1"}, verb: "rebind", err: "at most 2"},
		{args: []string{"status", "--force"}, verb: "status", err: "status does not take --force"},
		{args: []string{"unlock", "SR", "--yes"}, verb: "unlock", err: "does not take --yes"},
		{args: []string{"unlock", "SR", "--key-file"}, err: "--key-file needs a value"},
		{args: []string{"frobnicate"}, err: `unknown command "frobnicate"`},
		{args: []string{"recovery", "shred", "SR"}, verb: "recovery", err: `unknown recovery command "shred"`},
		{args: []string{"recovery"}, verb: "recovery", err: "needs a sub-command"},
		{args: []string{"status", "--pasword=x"}, err: "unknown option --pasword=x"},
		// A passphrase is never taken from the command line.
		{args: []string{"unlock", "SR", "--passphrase", "secret"}, err: "unknown option --passphrase"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			cl, v, err := parseCommandLine(c.args)
			if c.verb != "" {
				require.NotNil(t, v)
				assert.Equal(t, c.verb, v.Name)
			}
			if c.err != "" {
				require.Error(t, err)
				assert.ErrorIs(t, err, ErrUsage)
				assert.Contains(t, err.Error(), c.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, c.pos, nilIfEmpty(cl.Args))
			assert.Equal(t, c.keyFile, cl.KeyFile)
			assert.Equal(t, c.force, cl.Force)
			assert.Equal(t, c.json, cl.JSON)
		})
	}
}

func nilIfEmpty(s []string) []string {
	if len(s) == 0 {
		return nil
	}
	return s
}

// Every verb has a help page naming its usage, and the overview lists
// every runnable verb and every exit code.
func TestAdminHelpForEveryVerb(t *testing.T) {
	overview, _, code := runCLI(t, Deps{}, "", "--help")
	require.Equal(t, ExitOK, code)
	for _, c := range []int{ExitOK, ExitFailure, ExitUsage, ExitWrongPassphrase, ExitNotFound, ExitKeyUnavailable, ExitBusy, ExitRefused, ExitInvalidConfig} {
		assert.Contains(t, overview, fmt.Sprintf("\n  %d  ", c), "exit code %d documented", c)
	}
	noArgs, _, code := runCLI(t, Deps{}, "")
	assert.Equal(t, ExitOK, code)
	assert.Equal(t, overview, noArgs)
	for _, v := range verbs {
		t.Run(v.Name, func(t *testing.T) {
			if v.Run != nil {
				assert.Contains(t, overview, "  "+v.Name+" ")
			}
			for _, form := range [][]string{append(strings.Fields(v.Name), "--help"), append([]string{"help"}, strings.Fields(v.Name)...), append(strings.Fields(v.Name), "-h")} {
				out, errOut, code := runCLI(t, Deps{}, "", form...)
				require.Equal(t, ExitOK, code, "%v: %s", form, errOut)
				assert.True(t, strings.HasPrefix(out, "usage: luksext "+v.Usage+"\n"), "%v:\n%s", form, out)
				assert.Contains(t, out, v.Help)
				assert.Contains(t, out, "Exit codes:")
				for _, f := range v.Flags {
					assert.Contains(t, out, f+" ", "flag %s explained", f)
				}
			}
		})
	}
}

func TestAdminUsageErrorsExit2(t *testing.T) {
	for _, args := range [][]string{{"rebind"}, {"frobnicate"}, {"status", "a", "b"}, {"unlock", "SR", "--passphrase=x"}} {
		out, errOut, code := runCLI(t, Deps{}, "", args...)
		assert.Equal(t, ExitUsage, code, "%v", args)
		assert.Empty(t, out, "usage errors go to stderr")
		assert.True(t, strings.HasPrefix(errOut, "luksext: "), errOut)
	}
	out, _, code := runCLI(t, Deps{}, "", "rebind", "--json")
	assert.Equal(t, ExitUsage, code)
	var r errorReport
	require.NoError(t, json.Unmarshal([]byte(out), &r), out)
	assert.Equal(t, "Usage", r.Error.Kind)
	assert.Equal(t, ExitUsage, r.Error.ExitCode)
}

// Exit codes follow the same kinds as the SMAPI error records.
func TestAdminExitCodes(t *testing.T) {
	cases := []struct {
		err  error
		code int
		kind string
	}{
		{usageErr("x"), ExitUsage, "Usage"},
		{refused("x"), ExitRefused, "Refused"},
		{smapi.Errorf(smapi.KindWrongPassphrase, "x"), ExitWrongPassphrase, "Wrong_passphrase"},
		{fmt.Errorf("open: %w", luks.ErrWrongPassphrase), ExitWrongPassphrase, "Wrong_passphrase"},
		{smapi.Errorf(smapi.KindSRDoesNotExist, "x"), ExitNotFound, "SR_does_not_exist"},
		{fmt.Errorf("x: %w", luks.ErrDeviceNotFound), ExitNotFound, "Device_not_found"},
		{fmt.Errorf("x: %w", clevis.ErrPCRMismatch), ExitKeyUnavailable, "Key_unavailable"},
		{fmt.Errorf("x: %w", clevis.ErrTPMAbsent), ExitKeyUnavailable, "TPM_unavailable"},
		{smapi.Errorf(smapi.KindInUse, "x"), ExitBusy, "In_use"},
		{fmt.Errorf("x: %w", luks.ErrBusy), ExitBusy, "In_use"},
		{fmt.Errorf("x: %w", clevis.ErrThumbprintMismatch), ExitInvalidConfig, "Invalid_configuration"},
		{errors.New("disk on fire"), ExitFailure, "Internal_error"},
		{fmt.Errorf("x: %w", context.Canceled), ExitFailure, "Cancelled"},
	}
	codes := map[int]bool{}
	for _, c := range cases {
		code, kind := classifyAdminError(c.err)
		assert.Equal(t, c.code, code, "%v", c.err)
		assert.Equal(t, c.kind, kind, "%v", c.err)
		codes[code] = true
	}
	assert.Len(t, codes, 8, "every documented failure code (1-8) is reachable")
}

func TestAdminReadKeyFile(t *testing.T) {
	p, err := readKeyFile(context.Background(), "-", strings.NewReader("correct horse\n"))
	require.NoError(t, err)
	assert.Equal(t, "correct horse", string(p.Expose()), "one trailing newline dropped")
	p, err = readKeyFile(context.Background(), "-", strings.NewReader("two\n\n"))
	require.NoError(t, err)
	assert.Equal(t, "two\n", string(p.Expose()), "only one")
	p, err = readKeyFile(context.Background(), "-", strings.NewReader("no newline"))
	require.NoError(t, err)
	assert.Equal(t, "no newline", string(p.Expose()))
	_, err = readKeyFile(context.Background(), "-", strings.NewReader(""))
	assert.ErrorIs(t, err, ErrUsage)
	_, err = readKeyFile(context.Background(), "-", strings.NewReader(strings.Repeat("x", maxPassphrase+1)))
	assert.ErrorIs(t, err, ErrUsage)
	f := filepath.Join(t.TempDir(), "k")
	require.NoError(t, os.WriteFile(f, []byte("from a file\r\n"), 0o600))
	p, err = readKeyFile(context.Background(), f, nil)
	require.NoError(t, err)
	assert.Equal(t, "from a file", string(p.Expose()))
	_, err = readKeyFile(context.Background(), filepath.Join(t.TempDir(), "absent"), nil)
	assert.ErrorIs(t, err, ErrUsage)

	line, err := readSecretLine(strings.NewReader("typed\r\nnext line"))
	require.NoError(t, err)
	assert.Equal(t, "typed", string(line.Expose()), "stops at the first newline")
}

// policyOf rebuilds clevis' configuration from a JWE header, recursively.
func TestAdminPolicyOfMalformed(t *testing.T) {
	for _, jwe := range []string{"", "a.b.c.d.e", "not a jwe"} {
		_, _, err := policyOf(jwe)
		assert.Error(t, err, jwe)
	}
}
