package clevis_test

import "testing"

// Configurations found on existing clevis-bound disks besides the common
// ones: clevis <= 21 defaults pcr_bank to sha1 when only pcr_ids is given
// (seed 01's users), older scripts pass pcr_ids as a JSON array, and some
// sites chose an RSA primary. Each must work both ways.
func TestInteropTPM2Variants(t *testing.T) {
	for name, cfg := range map[string]string{
		"pcr_ids only (clevis default bank)": `{"pcr_ids":"7"}`,
		"sha1 bank, two PCRs":                `{"pcr_bank":"sha1","pcr_ids":"0,7"}`,
		"pcr_ids as array":                   `{"pcr_bank":"sha256","pcr_ids":[1,7]}`,
		"rsa primary":                        `{"key":"rsa","pcr_bank":"sha256","pcr_ids":"7"}`,
	} {
		t.Run(name, func(t *testing.T) {
			newFixture(t, false).bothWays("tpm2", cfg)
		})
	}
}
