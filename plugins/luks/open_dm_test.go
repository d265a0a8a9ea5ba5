package luks

import (
	"bytes"
	"encoding/json"
	"testing"

	luksgo "github.com/anatol/luks.go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/secret"
)

func TestCryptUUID(t *testing.T) {
	assert.Equal(t, "CRYPT-LUKS2-6f1e6a1c8b0e4d5e9c3a1b2c3d4e5f60-luksext-x",
		CryptUUID(2, "6f1e6a1c-8b0e-4d5e-9c3a-1b2c3d4e5f60", "luksext-x"))
}

// volumeKey reaches into luks.go's Volume: if a luks.go update renames or
// retypes the field, this fails instead of every open silently falling
// back to cryptsetup; and clearing it wipes luks.go's copy.
func TestVolumeKeyIsLuksGosKey(t *testing.T) {
	m := realManager(t)
	pass := secret.FromString("volume key test")
	for _, v := range []int{1, 2} {
		img := formatted(t, m, v, pass)
		d, err := luksgo.Open(img)
		require.NoError(t, err)
		vol, err := d.UnsealVolume(0, pass.Expose())
		require.NoError(t, err)
		d.Close()
		key := volumeKey(vol)
		require.Len(t, key, 64, "aes-xts-plain64 with a 512-bit key")
		assert.False(t, bytes.Equal(key, make([]byte, 64)))
		clear(key)
		assert.Equal(t, make([]byte, 64), volumeKey(vol), "wiped in luks.go's Volume")
	}
}

// checkOpenable sends what the Go path does not do like cryptsetup to
// cryptsetup, naming the reason.
func TestCheckOpenableFallbacks(t *testing.T) {
	m := realManager(t)
	pass := secret.FromString("fallback test")
	img := formatted(t, m, 2, pass)
	h, err := readHeader(img)
	require.NoError(t, err)
	require.NoError(t, checkOpenable(h, 0))
	assert.EqualError(t, checkOpenable(h, 5), "no keyslot 5")

	// A keyslot whose argon2 asks more than the bound (the header JSON
	// edited in memory: making such a slot costs cryptsetup seconds).
	var meta map[string]any
	require.NoError(t, json.Unmarshal(h.v2.json, &meta))
	meta["keyslots"].(map[string]any)["0"].(map[string]any)["kdf"] = map[string]any{"type": "argon2id", "memory": MaxArgon2MemoryKiB + 1024, "time": 4, "cpus": 1}
	h.v2.json, err = json.Marshal(meta)
	require.NoError(t, err)
	assert.EqualError(t, checkOpenable(h, 0), "keyslot 0's argon2 needs 257 MiB, more than the 256 MiB this process spends in dom0")
	assert.ErrorAs(t, checkOpenable(h, 0), new(errFallback))

	cbc := image(t, 32<<20)
	sh(t, "pw", "cryptsetup", "luksFormat", "-q", "--type", "luks1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--pbkdf-force-iterations", "1000", "--key-file=-", cbc)
	h, err = readHeader(cbc)
	require.NoError(t, err)
	assert.EqualError(t, checkOpenable(h, 0), "cipher aes-cbc-essiv:sha256")

	// A file, not a block device: cryptsetup (loop device) opens it.
	err = m.openDM(img, "x", h, pass, 0, m.log)
	assert.ErrorAs(t, err, new(errFallback))
}
