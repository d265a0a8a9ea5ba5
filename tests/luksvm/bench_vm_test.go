//go:build bench

package luksvm

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/tests/vm"
)

// TestBenchOpenVsClevisUnlock: SR.attach's unlock (read the binding, Go
// TPM unseal, cryptsetup open of that keyslot) against `clevis luks
// unlock` on the same device and the same vTPM, in one guest.
func TestBenchOpenVsClevisUnlock(t *testing.T) {
	m := vm.Start(t, vm.Config{Disks: []int64{48 << 20}, TPM: true})
	out := runInGuest(t, m, "^TestGuestBench$")
	for _, line := range strings.Split(out, "\n") {
		if i := strings.Index(line, "BENCH "); i >= 0 {
			fmt.Println(line[i:])
		}
	}
}

func TestGuestBench(t *testing.T) {
	inGuest(t)
	e := newEnv(t)
	const dev, name = "/dev/vda", "bench"
	cfg, err := clevis.ParseConfig("tpm2", []byte("{}"))
	require.NoError(t, err)
	pass, err := luks.NewKeyslotPassphrase()
	require.NoError(t, err)
	jwe, err := e.cl.Encrypt(e.ctx, cfg, pass)
	require.NoError(t, err)
	_, err = e.m.Format(e.ctx, dev, luks.FormatOptions{Label: "bench", Passphrase: pass.Clone(), KDF: luks.MinimalKDF()})
	require.NoError(t, err)
	require.NoError(t, e.m.Bind(e.ctx, dev, 0, jwe))

	const rounds = 3
	var ours, theirs time.Duration
	for i := 0; i < rounds; i++ {
		t0 := time.Now()
		bs, err := e.m.Bindings(dev)
		require.NoError(t, err)
		key, err := e.cl.Decrypt(e.ctx, bs[0].JWE)
		require.NoError(t, err)
		require.NoError(t, e.m.Open(e.ctx, dev, name, key, bs[0].Keyslot))
		ours += time.Since(t0)
		key.Wipe()
		require.NoError(t, e.m.Close(e.ctx, name))

		t0 = time.Now()
		mustSh(t, "", "clevis", "luks", "unlock", "-d", dev, "-n", name)
		theirs += time.Since(t0)
		require.NoError(t, e.m.Close(e.ctx, name))
	}
	o, c := ours/rounds, theirs/rounds
	fmt.Printf("BENCH luks open (TPM unseal + dm-crypt, TCG guest): ours %d ms, clevis luks unlock %d ms, ratio %.2f\n",
		o.Milliseconds(), c.Milliseconds(), float64(o)/float64(c))
}
