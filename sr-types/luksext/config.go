// Package luksext is the luksext SR type: its identity (Plugin.Query), its
// device-config schema, and the method tables of its volume and datapath
// plugins, wired to the libraries under plugins/.
package luksext

// Names on the host. The plugin name must equal the suffix of the volume
// plugin directory (xapi derives the SR type from both), and the datapath
// directory name is the URI scheme of our volumes.
const (
	PluginName        = "luksext"
	VolumePluginDir   = "org.xen.xapi.storage." + PluginName
	DatapathPluginDir = PluginName
	URIScheme         = DatapathPluginDir
	APIVersion        = "5.0"
)

// Version is stamped at build time (-ldflags -X).
var Version = "dev"

// ConfigKey documents one device-config key.
type ConfigKey struct {
	Name        string
	Description string
}

// Device-config keys. Keys ending in "password" reach the plugin as
// "<key>_secret" = <uuid of a xapi Secret>, because xapi stores them as
// Secret objects; the plugin resolves them through XenAPI.
const (
	KeyDevice           = "device"
	KeyRecoveryPassword = "recovery-password"
	KeyRecoveryFallback = "recovery-fallback"
	KeyTPM2PCRIDs       = "tpm2-pcr-ids"
	KeyTPM2PCRBank      = "tpm2-pcr-bank"
	KeyTangURL          = "tang-url"
	KeyTangThp          = "tang-thp"
	KeyTangTrust        = "tang-trust"
	KeySSSThreshold     = "sss-threshold"
	KeyForce            = "force"
	KeySRUUID           = "sr_uuid"
	KeyLUKSUUID         = "luks-uuid"
)

// ConfigKeys is the schema shown by Plugin.Query (xe sm-list, XO).
var ConfigKeys = []ConfigKey{
	{KeyDevice, "required: block device to encrypt, e.g. /dev/sdb or /dev/disk/by-id/...; the stable by-id path is stored"},
	{KeyRecoveryPassword, "optional: recovery passphrase for a second LUKS keyslot, used when the TPM refuses (stored by xapi as a secret; removed from the PBD after creation unless recovery-fallback=true)"},
	{KeyRecoveryFallback, "optional: true keeps the recovery passphrase in xapi so SR.attach falls back to it automatically (less secure)"},
	{KeyTPM2PCRIDs, "optional: PCRs the key is sealed to, e.g. 7 or 0,2,7 (default: none, like clevis tpm2 '{}')"},
	{KeyTPM2PCRBank, "optional: PCR bank for tpm2-pcr-ids, sha256 (default) or sha1"},
	{KeyTangURL, "optional: comma-separated Tang server URLs to bind to as well (clevis sss)"},
	{KeyTangThp, "optional: comma-separated thumbprints of the Tang signing keys, in tang-url order (tang-show-keys on the server)"},
	{KeyTangTrust, "optional: true trusts the Tang advertisement without a thumbprint (not recommended)"},
	{KeySSSThreshold, "optional: how many of {TPM, Tang servers} must agree to unlock (default 1: any one)"},
	{KeyForce, "optional: true erases a device that already holds data (a filesystem, partition table, LUKS or LVM); all data on it is lost"},
	{KeySRUUID, "set by SR.create: the SR's uuid"},
	{KeyLUKSUUID, "set by SR.create: the LUKS header uuid, used to find the device if its path changes"},
}

// Configuration returns the schema as Plugin.Query's configuration map.
func Configuration() map[string]string {
	m := make(map[string]string, len(ConfigKeys))
	for _, k := range ConfigKeys {
		m[k.Name] = k.Description
	}
	return m
}
