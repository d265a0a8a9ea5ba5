package luksext

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/testenv"
)

// fakeDisk makes a block device node (and a by-id link to it) in a temp
// /dev, so validation can be tested without a real disk.
func fakeDisk(t *testing.T) (devDir, dev string) {
	testenv.Root(t)
	devDir = t.TempDir()
	dev = filepath.Join(devDir, "sdb")
	require.NoError(t, syscall.Mknod(dev, syscall.S_IFBLK|0o600, int(7<<8|200)))
	require.NoError(t, os.MkdirAll(filepath.Join(devDir, "disk", "by-id"), 0o755))
	require.NoError(t, os.Symlink("../../sdb", filepath.Join(devDir, "disk", "by-id", "wwn-0x5000")))
	require.NoError(t, os.Symlink("../../sdb", filepath.Join(devDir, "disk", "by-id", "ata-ST2000_XYZ")))
	return devDir, dev
}

func TestParseCreateConfig_Valid(t *testing.T) {
	devDir, dev := fakeDisk(t)
	p, err := parseCreateConfig(map[string]string{
		"device": dev, "tpm2-pcr-ids": "0, 7", "tang-url": "http://tang1:7500,https://tang2",
		"tang-thp": "thp1,thp2", "sss-threshold": "2", "recovery-password_secret": "u", "recovery-fallback": "true",
	}, devDir)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(devDir, "disk/by-id/ata-ST2000_XYZ"), p.Stable, "by-id path preferred over wwn")
	assert.Equal(t, clevis.PinSSS, p.Policy.Pin)
	require.Len(t, p.Policy.SSS.Pins, 3)
	assert.Equal(t, 2, p.Policy.SSS.T)
	assert.Equal(t, "0,7", p.Policy.SSS.Pins[0].TPM2.PCRIDs.String())
	assert.Equal(t, "sha256", p.Policy.SSS.Pins[0].TPM2.PCRBank)
	assert.Equal(t, "thp2", p.Policy.SSS.Pins[2].Tang.Thp)

	out := p.resultConfig("sr", "luks")
	assert.Equal(t, p.Stable, out["device"])
	assert.Equal(t, "u", out["recovery-password_secret"], "kept only because recovery-fallback=true")
	for k := range out {
		assert.NotEqual(t, "recovery-password", k)
	}

	p, err = parseCreateConfig(map[string]string{"device": dev, "recovery-password_secret": "u"}, devDir)
	require.NoError(t, err)
	assert.Equal(t, clevis.PinTPM2, p.Policy.Pin)
	assert.NotContains(t, p.resultConfig("sr", "luks"), "recovery-password_secret", "not kept without the fallback")
}

func TestParseCreateConfig_Invalid(t *testing.T) {
	devDir, dev := fakeDisk(t)
	cases := map[string]struct {
		cfg  map[string]string
		kind string
		says string
	}{
		"no device":         {map[string]string{}, "Invalid_configuration", "device"},
		"relative device":   {map[string]string{"device": "sdb"}, "Invalid_configuration", "absolute"},
		"missing device":    {map[string]string{"device": "/dev/nonexistent-xyz"}, "Device_not_found", "does not exist"},
		"char device":       {map[string]string{"device": "/dev/null"}, "Invalid_configuration", "not a block device"},
		"unknown key":       {map[string]string{"device": dev, "devcie": "x"}, "Invalid_configuration", "devcie"},
		"bad pcr":           {map[string]string{"device": dev, "tpm2-pcr-ids": "7,x"}, "Invalid_configuration", "tpm2-pcr-ids"},
		"bank without ids":  {map[string]string{"device": dev, "tpm2-pcr-bank": "sha1"}, "Invalid_configuration", "tpm2-pcr-bank"},
		"tang without thp":  {map[string]string{"device": dev, "tang-url": "http://t"}, "Invalid_configuration", "tang-thp"},
		"thp count":         {map[string]string{"device": dev, "tang-url": "http://a,http://b", "tang-thp": "x"}, "Invalid_configuration", "2 tang-url"},
		"threshold":         {map[string]string{"device": dev, "tang-url": "http://a", "tang-thp": "x", "sss-threshold": "3"}, "Invalid_configuration", "sss-threshold"},
		"force not bool":    {map[string]string{"device": dev, "force": "maybe"}, "Invalid_configuration", "force"},
		"fallback, no pass": {map[string]string{"device": dev, "recovery-fallback": "true"}, "Invalid_configuration", "recovery-fallback"},
		"short passphrase":  {map[string]string{"device": dev, "recovery-password": "short"}, "Invalid_configuration", "8 characters"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := parseCreateConfig(c.cfg, devDir)
			require.Error(t, err)
			rec := smapi.ToRecord(err, Classify)
			assert.Equal(t, c.kind, rec.Params[0])
			assert.Contains(t, rec.Params[1], c.says)
			assert.NotContains(t, rec.Params[1], "short", "passphrases are never echoed") // only the short-passphrase case has one
		})
	}
}

func TestTangTrustIsExplicit(t *testing.T) {
	devDir, dev := fakeDisk(t)
	p, err := parseCreateConfig(map[string]string{"device": dev, "tang-url": "http://t", "tang-trust": "true"}, devDir)
	require.NoError(t, err)
	assert.True(t, p.Policy.SSS.Pins[1].Tang.Trust)
}
