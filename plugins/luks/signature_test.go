package luks

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/secret"
)

// Format refuses devices made by the real tools and erases them with force.
func TestFormatRefusesSignaturesUnlessForced(t *testing.T) {
	m := realManager(t, "mkfs.ext4", "mkswap", "sfdisk")
	for _, tc := range []struct {
		name string
		make func(t *testing.T, img string)
		want string
	}{
		{"ext4", func(t *testing.T, img string) { sh(t, "", "mkfs.ext4", "-q", "-L", "data", img) }, "holds an ext4 filesystem (label 'data'); pass force=true to erase it"},
		{"gpt", func(t *testing.T, img string) { sh(t, "label: gpt\n,\n", "sfdisk", "-q", img) }, "holds a GPT partition table"},
		{"mbr", func(t *testing.T, img string) { sh(t, "label: dos\n,\n", "sfdisk", "-q", img) }, "holds an MBR (DOS) partition table"},
		{"luks", func(t *testing.T, img string) {
			sh(t, "x", "cryptsetup", "luksFormat", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", img)
		}, "holds a LUKS header"},
		{"swap", func(t *testing.T, img string) { sh(t, "", "mkswap", "-L", "oldswap", img) }, "holds a swap area (label 'oldswap')"},
		// No pvcreate/mdadm here (they need a block device): their
		// on-disk magics, as LVM2 and md write them.
		{"lvm", func(t *testing.T, img string) {
			f := openRW(t, img)
			_, err := f.WriteAt([]byte("LABELONE"), 512)
			require.NoError(t, err)
			_, err = f.WriteAt([]byte("LVM2 001"), 512+0x18)
			require.NoError(t, err)
			require.NoError(t, f.Close())
		}, "holds an LVM physical volume"},
		{"md-1.2", func(t *testing.T, img string) {
			f := openRW(t, img)
			_, err := f.WriteAt([]byte{0xfc, 0x4e, 0x2b, 0xa9}, 4096)
			require.NoError(t, err)
			require.NoError(t, f.Close())
		}, "holds a Linux software RAID (md) member"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := image(t, 32<<20)
			tc.make(t, img)
			opts := FormatOptions{Passphrase: secret.FromString("p"), KDF: MinimalKDF()}
			_, err := m.Format(context.Background(), img, opts)
			require.ErrorIs(t, err, ErrSignaturePresent)
			assert.Contains(t, err.Error(), "device "+img+" "+tc.want)

			opts.Force = true
			_, err = m.Format(context.Background(), img, opts)
			require.NoError(t, err)
			sigs, err := blockdev.Prober{Run: m.run}.Probe(context.Background(), img)
			require.NoError(t, err)
			require.Len(t, sigs, 1, "only our LUKS header may remain: %+v", sigs)
			assert.Equal(t, "crypto_LUKS", sigs[0].Type)
			require.NoError(t, m.TestKeyslot(context.Background(), img, secret.FromString("p"), 0))
		})
	}
	t.Run("empty", func(t *testing.T) {
		_, err := m.Format(context.Background(), image(t, 32<<20), FormatOptions{Passphrase: secret.FromString("p"), KDF: MinimalKDF()})
		require.NoError(t, err)
	})
}
