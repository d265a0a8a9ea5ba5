package blockdev

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

// Each signature is made by the real tool that writes it, and blkid (an
// implementation independent of ours) says what it sees: ProbeMagic must
// find the same thing, and after Wipe neither may find anything.
func TestProbeMagicAgreesWithBlkidAndWipeRemovesEverything(t *testing.T) {
	tools := testenv.Tools(t, "blkid", "mkfs.ext4", "mkswap", "sfdisk")
	cases := []struct {
		name, want string
		make       func(path string) *exec.Cmd
	}{
		{"ext4", "ext4", func(p string) *exec.Cmd { return exec.Command(tools["mkfs.ext4"], "-q", "-F", "-L", "lbl", p) }},
		{"swap", "swap", func(p string) *exec.Cmd { return exec.Command(tools["mkswap"], p) }},
		{"gpt", "gpt", func(p string) *exec.Cmd {
			c := exec.Command(tools["sfdisk"], "-q", p)
			c.Stdin = strings.NewReader("label: gpt\n,\n")
			return c
		}},
		{"dos", "dos", func(p string) *exec.Cmd {
			c := exec.Command(tools["sfdisk"], "-q", p)
			c.Stdin = strings.NewReader("label: dos\n,\n")
			return c
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "disk.img")
			require.NoError(t, os.WriteFile(img, nil, 0o600))
			require.NoError(t, os.Truncate(img, 64<<20))
			out, err := tc.make(img).CombinedOutput()
			require.NoError(t, err, "%s", out)

			blkid := func() string {
				out, _ := exec.Command(tools["blkid"], "-p", "-o", "export", img).Output()
				return string(out)
			}
			require.Contains(t, blkid(), tc.want, "blkid sees what the tool wrote")
			sigs, err := ProbeMagic(img)
			require.NoError(t, err)
			require.NotEmpty(t, sigs)
			assert.Equal(t, tc.want, sigs[0].Type)

			_, err = Prober{}.CheckUnused(t.Context(), img, false)
			assert.ErrorIs(t, err, ErrSignaturePresent)
			_, err = Prober{}.CheckUnused(t.Context(), img, true)
			assert.NoError(t, err, "force accepts it")

			require.NoError(t, Wipe(img))
			sigs, err = ProbeMagic(img)
			require.NoError(t, err)
			assert.Empty(t, sigs, "nothing left after Wipe")
			assert.NotContains(t, blkid(), "TYPE=", "blkid finds nothing after Wipe")
			assert.NotContains(t, blkid(), "PTTYPE=")
		})
	}
}

func TestMissingDeviceIsNotFound(t *testing.T) {
	_, err := ProbeMagic(filepath.Join(t.TempDir(), "nope"))
	assert.ErrorIs(t, err, ErrDeviceNotFound)
	assert.NoError(t, CheckExclusive(filepath.Join(t.TempDir())), "a directory is not a block device: nothing to claim")
}
