package luks

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/secret"
)

// These tests run the real cryptsetup, clevis, luksmeta and tangd against
// image files: no device-mapper needed.

func TestFormatLUKS2_LayoutKeyslotsAndPassphrases(t *testing.T) {
	m := realManager(t)
	ctx := context.Background()
	tpmPass, err := NewKeyslotPassphrase()
	require.NoError(t, err)
	require.Len(t, tpmPass.Expose(), 43)
	img := formatted(t, m, 2, tpmPass)

	dump := sh(t, "", "cryptsetup", "luksDump", img)
	assert.Contains(t, dump, "Version:       \t2")
	assert.Regexp(t, `Label:\s+luksext-0c0ffee0-0000-4000-8000-000000000001`, dump)
	assert.Regexp(t, `UUID:\s+6f1e6a1c-8b0e-4d5e-9c3a-1b2c3d4e5f60`, dump)
	assert.Regexp(t, `sector:\s+512 \[bytes\]`, dump)
	assert.Regexp(t, `cipher:\s+aes-xts-plain64`, dump)
	assert.Regexp(t, `(?s)0: luks2.*Key:\s+512 bits.*PBKDF:\s+pbkdf2.*Iterations:\s+1000\n`, dump)

	recovery := secret.FromString("correct horse battery staple")
	slot, err := m.AddKeyslot(ctx, img, tpmPass, recovery, -1, recoveryTestKDF)
	require.NoError(t, err)
	assert.Equal(t, 1, slot)
	dump = sh(t, "", "cryptsetup", "luksDump", img)
	assert.Regexp(t, `(?s)1: luks2.*PBKDF:\s+argon2id.*Memory:\s+32768`, dump)

	ks, err := m.Keyslots(img)
	require.NoError(t, err)
	assert.Equal(t, []Keyslot{{ID: 0, KDF: "pbkdf2", Priority: 1}, {ID: 1, KDF: "argon2id", Priority: 1}}, ks)

	// Each passphrase opens its own slot, and only that one.
	require.NoError(t, m.TestKeyslot(ctx, img, tpmPass, 0))
	require.NoError(t, m.TestKeyslot(ctx, img, recovery, 1))
	require.ErrorIs(t, m.TestKeyslot(ctx, img, recovery, 0), ErrWrongPassphrase)
	require.ErrorIs(t, m.TestKeyslot(ctx, img, secret.FromString("wrong"), -1), ErrWrongPassphrase)
	// And plain cryptsetup, as an administrator would type it, agrees.
	sh(t, "correct horse battery staple", "cryptsetup", "open", "--test-passphrase", img)

	// Remove the recovery slot; removing it again converges.
	require.NoError(t, m.RemoveKeyslot(ctx, img, 1))
	require.NoError(t, m.RemoveKeyslot(ctx, img, 1))
	ks, err = m.Keyslots(img)
	require.NoError(t, err)
	assert.Equal(t, []Keyslot{{ID: 0, KDF: "pbkdf2", Priority: 1}}, ks)
	_, code := shCode(t, "correct horse battery staple", "cryptsetup", "open", "--test-passphrase", img)
	assert.Equal(t, 2, code, "removed slot must no longer open")
}

func TestFormatLUKS1(t *testing.T) {
	m := realManager(t)
	ctx := context.Background()
	pass := secret.FromString("tpm-slot-pass")
	img := formatted(t, m, 1, pass)
	dump := sh(t, "", "cryptsetup", "luksDump", img)
	assert.Contains(t, dump, "Version:       \t1")
	assert.Regexp(t, `Cipher mode:\s+xts-plain64`, dump)
	assert.Regexp(t, `MK bits:\s+512`, dump)
	assert.Regexp(t, `UUID:\s+6f1e6a1c-8b0e-4d5e-9c3a-1b2c3d4e5f60`, dump)
	assert.Regexp(t, `Key Slot 0: ENABLED\n\s+Iterations:\s+1000\n`, dump)

	rec := secret.FromString("recovery words")
	recoveryFast := RecoveryKDF()
	recoveryFast.IterTimeMS = 100 // same LUKS1 fallback path (argon2id -> pbkdf2), faster
	slot, err := m.AddKeyslot(ctx, img, pass, rec, 3, recoveryFast)
	require.NoError(t, err)
	assert.Equal(t, 3, slot)
	require.NoError(t, m.TestKeyslot(ctx, img, rec, 3))
	require.NoError(t, m.TestKeyslot(ctx, img, pass, 0))
	require.ErrorIs(t, m.TestKeyslot(ctx, img, pass, 3), ErrWrongPassphrase)
}

// clevisTokenJSON is what `cryptsetup token export` returns.
func exportToken(t *testing.T, img string, id int) map[string]any {
	t.Helper()
	out := sh(t, "", "cryptsetup", "token", "export", "--token-id", strconv.Itoa(id), img)
	var tok map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &tok), out)
	return tok
}

func TestClevisTokenLUKS2_ReadByCryptsetupAndClevis(t *testing.T) {
	url := tangServer(t)
	for _, w := range []struct {
		name   string
		writer TokenWriter
	}{{"go-header-writer", TokenWriterGo}, {"cryptsetup-token-import", TokenWriterCryptsetup}} {
		t.Run(w.name, func(t *testing.T) {
			m := realManager(t, "clevis", "jose")
			m.TokenWriter = w.writer
			ctx := context.Background()
			bootstrap := secret.FromString("bootstrap")
			img := formatted(t, m, 2, bootstrap)
			rec := secret.FromString("recovery")
			_, err := m.AddKeyslot(ctx, img, bootstrap, rec, 1, MinimalKDF())
			require.NoError(t, err)

			slotPass, err := NewKeyslotPassphrase()
			require.NoError(t, err)
			slot, err := m.AddKeyslot(ctx, img, bootstrap, slotPass, -1, MinimalKDF())
			require.NoError(t, err)
			require.Equal(t, 2, slot)
			jwe := tangJWE(t, url, slotPass)
			require.NoError(t, m.Bind(ctx, img, slot, jwe))
			require.NoError(t, m.Bind(ctx, img, slot, jwe), "binding the same JWE again must converge")
			require.NoError(t, m.WriteMetadata(ctx, img, Metadata{SRUUID: "0c0ffee0-0000-4000-8000-000000000001", State: "creating"}))

			// cryptsetup reads both header copies and the token back.
			dump := sh(t, "", "cryptsetup", "luksDump", img)
			assert.Regexp(t, `(?s)Tokens:\n\s+0: clevis\n\s+Keyslot:\s+2\n\s+1: luksext\n`, dump)
			tok := exportToken(t, img, 0)
			assert.Equal(t, "clevis", tok["type"])
			assert.Equal(t, []any{"2"}, tok["keyslots"])
			parts := strings.Split(jwe, ".")
			assert.Equal(t, map[string]any{"protected": parts[0], "encrypted_key": parts[1], "iv": parts[2],
				"ciphertext": parts[3], "tag": parts[4]}, tok["jwe"])
			sh(t, "", "cryptsetup", "repair", "--batch-mode", img) // no complaint about either copy
			assert.Equal(t, dump, sh(t, "", "cryptsetup", "luksDump", img), "repair must find nothing to fix")

			// clevis finds the binding and recovers the keyslot passphrase
			// through tang: the whole clevis read path works.
			list := sh(t, "", "clevis", "luks", "list", "-d", img)
			assert.Regexp(t, `^2: tang '\{"url":"`+regexp.QuoteMeta(url)+`"\}'`, list)
			got := sh(t, "", "clevis", "luks", "pass", "-d", img, "-s", "2")
			assert.Equal(t, string(slotPass.Expose()), got)
			sh(t, got, "cryptsetup", "open", "--test-passphrase", "--key-slot", "2", "--key-file=-", img)

			// Our own reads agree.
			bs, err := m.Bindings(img)
			require.NoError(t, err)
			require.Equal(t, []Binding{{Keyslot: 2, Token: 0, JWE: jwe}}, bs)
			info, err := m.Inspect(img)
			require.NoError(t, err)
			assert.Equal(t, "0c0ffee0-0000-4000-8000-000000000001", info.SRUUID())
			assert.Equal(t, "creating", info.Metadata.State)

			// Replace the metadata, unbind: clevis sees no binding left.
			require.NoError(t, m.WriteMetadata(ctx, img, Metadata{SRUUID: "0c0ffee0-0000-4000-8000-000000000001", State: "ready"}))
			require.NoError(t, m.Unbind(ctx, img, slot))
			assert.Equal(t, "", strings.TrimSpace(sh(t, "", "clevis", "luks", "list", "-d", img)))
			md, ok, err := m.ReadMetadata(img)
			require.NoError(t, err)
			require.True(t, ok)
			assert.Equal(t, "ready", md.State)
			assert.NotContains(t, sh(t, "", "cryptsetup", "luksDump", img), "clevis")
		})
	}
}

func TestClevisBoundByClevis_ReadByUs(t *testing.T) {
	url := tangServer(t)
	for _, version := range []int{1, 2} {
		t.Run(fmt.Sprintf("LUKS%d", version), func(t *testing.T) {
			m := realManager(t, "clevis", "luksmeta")
			ctx := context.Background()
			img := formatted(t, m, version, secret.FromString("admin-pass"))
			// seed 01's recipe, with tang standing in for the TPM here
			// (the TPM variant runs in the VM test).
			sh(t, "admin-pass", "clevis", "luks", "bind", "-y", "-d", img, "-k", "-", "tang", fmt.Sprintf(`{"url":%q}`, url))
			bs, err := m.Bindings(img)
			require.NoError(t, err)
			require.Len(t, bs, 1)
			assert.Equal(t, 1, bs[0].Keyslot)
			// The JWE we read decrypts (with clevis) to a passphrase that
			// opens exactly that keyslot.
			pass := sh(t, bs[0].JWE, "clevis", "decrypt")
			require.NoError(t, m.TestKeyslot(ctx, img, secret.FromString(pass), bs[0].Keyslot))
		})
	}
}

func TestLuksmeta_BothDirectionsWithLuksmetaTool(t *testing.T) {
	url := tangServer(t)
	m := realManager(t, "luksmeta", "clevis")
	ctx := context.Background()
	admin := secret.FromString("admin")
	img := formatted(t, m, 1, admin)

	// luksmeta tool first: init and a foreign slot 4.
	sh(t, "", "luksmeta", "init", "-f", "-d", img)
	foreign := strings.Repeat("x", 5000) // two pages, forces our allocator to skip them
	sh(t, foreign, "luksmeta", "save", "-d", img, "-s", "4", "-u", "a1b2c3d4-0000-4000-8000-000000000004")

	// Then us: a clevis binding for keyslot 1, and our metadata in slot 7.
	slotPass, err := NewKeyslotPassphrase()
	require.NoError(t, err)
	slot, err := m.AddKeyslot(ctx, img, admin, slotPass, -1, MinimalKDF())
	require.NoError(t, err)
	require.Equal(t, 1, slot)
	jwe := tangJWE(t, url, slotPass)
	require.NoError(t, m.Bind(ctx, img, slot, jwe))
	require.NoError(t, m.WriteMetadata(ctx, img, Metadata{SRUUID: "abc", State: "ready"}))

	show := sh(t, "", "luksmeta", "show", "-d", img)
	assert.Regexp(t, `(?m)^1\s+active\s+cb6e8904-81ff-40da-a84a-07ab9ab5715e$`, show)
	assert.Regexp(t, `(?m)^4\s+inactive\s+a1b2c3d4-0000-4000-8000-000000000004$`, show)
	assert.Regexp(t, `(?m)^7\s+inactive\s+04edf48a-36de-412f-b09d-35aefd4515fb$`, show)
	assert.Equal(t, jwe, sh(t, "", "luksmeta", "load", "-d", img, "-s", "1"))
	assert.Equal(t, foreign, sh(t, "", "luksmeta", "load", "-d", img, "-s", "4"), "our writes must not overlap foreign data")
	var md Metadata
	require.NoError(t, json.Unmarshal([]byte(sh(t, "", "luksmeta", "load", "-d", img, "-s", "7")), &md))
	assert.Equal(t, Metadata{SRUUID: "abc", State: "ready", Schema: 1}, md)

	// clevis reads our binding and recovers the passphrase.
	assert.Regexp(t, `^1: tang`, sh(t, "", "clevis", "luks", "list", "-d", img))
	assert.Equal(t, string(slotPass.Expose()), sh(t, "", "clevis", "luks", "pass", "-d", img, "-s", "1"))

	// Reverse: luksmeta wipes slot 4 and saves a new one; we read it.
	sh(t, "", "luksmeta", "wipe", "-f", "-d", img, "-s", "4")
	sh(t, "hello", "luksmeta", "save", "-d", img, "-s", "5", "-u", "a1b2c3d4-0000-4000-8000-000000000005")
	data, uuid, ok, err := luksmetaLoad(img, 5)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, "hello", string(data))
	assert.Equal(t, "a1b2c3d4-0000-4000-8000-000000000005", fmt.Sprintf("%x-%x-%x-%x-%x", uuid[:4], uuid[4:6], uuid[6:8], uuid[8:10], uuid[10:]))
	bs, err := m.Bindings(img)
	require.NoError(t, err)
	assert.Equal(t, []Binding{{Keyslot: 1, Token: 1, JWE: jwe}}, bs)

	// Unbind through us; luksmeta agrees the slot is empty.
	require.NoError(t, m.Unbind(ctx, img, 1))
	assert.NotRegexp(t, `(?m)^1\s+active\s+cb6e`, sh(t, "", "luksmeta", "show", "-d", img))
	_, code := shCode(t, "", "luksmeta", "load", "-d", img, "-s", "1")
	assert.NotEqual(t, 0, code)
}

func TestEraseLeavesNoHeaderNoBinding(t *testing.T) {
	url := tangServer(t)
	for _, version := range []int{1, 2} {
		t.Run(fmt.Sprintf("LUKS%d", version), func(t *testing.T) {
			m := realManager(t, "clevis")
			ctx := context.Background()
			pass := secret.FromString("pass")
			img := formatted(t, m, version, pass)
			require.NoError(t, m.Bind(ctx, img, 0, tangJWE(t, url, pass)))
			require.NoError(t, m.Erase(ctx, img))
			_, code := shCode(t, "", "cryptsetup", "luksDump", img)
			assert.NotEqual(t, 0, code, "luksDump must fail after erase")
			_, code = shCode(t, "", "cryptsetup", "isLuks", img)
			assert.NotEqual(t, 0, code)
			// cryptsetup would fall back to a LUKS2 secondary header: none left.
			_, code = shCode(t, "pass", "cryptsetup", "open", "--test-passphrase", "--type", "luks2", img)
			assert.NotEqual(t, 0, code)
			_, err := m.Bindings(img)
			assert.ErrorIs(t, err, ErrNotLUKS)
			require.NoError(t, m.Erase(ctx, img), "erasing again converges")
		})
	}
}

func TestGoHeaderWriter_SurvivesDamagedPrimary(t *testing.T) {
	m := realManager(t)
	m.TokenWriter = TokenWriterGo
	ctx := context.Background()
	img := formatted(t, m, 2, secret.FromString("p"))
	require.NoError(t, m.WriteMetadata(ctx, img, Metadata{SRUUID: "s1", State: "one"}))
	before := sh(t, "", "cryptsetup", "luksDump", img)
	// Break the primary's JSON area: cryptsetup must recover from the
	// secondary copy our writer kept consistent.
	f := openRW(t, img)
	_, err := f.WriteAt([]byte("garbage"), 4096+10)
	require.NoError(t, err)
	require.NoError(t, f.Close())
	md, ok, err := m.ReadMetadata(img)
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, "one", md.State)
	assert.Equal(t, before, sh(t, "", "cryptsetup", "luksDump", img))
	// Our next write repairs the primary.
	require.NoError(t, m.WriteMetadata(ctx, img, Metadata{SRUUID: "s1", State: "two"}))
	h, err := readHeader(img)
	require.NoError(t, err)
	require.Len(t, h.copies, 2)
	assert.Equal(t, h.copies[0].bin.SeqID, h.copies[1].bin.SeqID)
	assert.Contains(t, sh(t, "", "cryptsetup", "token", "export", "--token-id", "0", img), `"state":"two"`)
}
