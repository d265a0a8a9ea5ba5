package luks

import "strconv"

// KDF says how a keyslot's passphrase is stretched.
type KDF struct {
	// Algorithm is "pbkdf2" or "argon2id". LUKS1 only has pbkdf2; an
	// argon2id request on LUKS1 (or on cryptsetup 1.x) falls back to
	// pbkdf2 with IterTimeMS.
	Algorithm string
	// Iterations, when set, skips cryptsetup's benchmark: pbkdf2 rounds,
	// or argon2 time cost.
	Iterations int
	// IterTimeMS is the benchmark target when Iterations is zero
	// (cryptsetup's default is 2000 ms).
	IterTimeMS int
	// MemoryKiB caps argon2 memory; dom0 has little RAM, and cryptsetup's
	// default of up to 1 GiB would make an unlock fail with OOM.
	MemoryKiB int
	// Parallel is argon2's thread count.
	Parallel int
}

// MinimalKDF is for keyslots whose passphrase is 256 random bits (the TPM
// keyslot): stretching adds nothing there, it only slows every unlock.
// Same choice as clevis >= v19 and systemd-cryptenroll.
func MinimalKDF() KDF { return KDF{Algorithm: "pbkdf2", Iterations: 1000} }

// RecoveryKDF is for a passphrase a person chose: argon2id within 64 MiB
// (dom0 typically has 2-8 GiB shared with every VM's backend), 2 s.
func RecoveryKDF() KDF {
	return KDF{Algorithm: "argon2id", MemoryKiB: 64 << 10, Parallel: 1, IterTimeMS: 2000}
}

// args turns the KDF into cryptsetup options for a device of the given
// LUKS version.
func (k KDF) args(luksVersion int, caps Capabilities) []string {
	algo := k.Algorithm
	if algo == "" {
		algo = "pbkdf2"
	}
	if luksVersion == 1 && algo != "pbkdf2" {
		// LUKS1 cannot store argon2 parameters. Keep the time budget.
		algo = "pbkdf2"
		k.Iterations = 0
		if k.IterTimeMS == 0 {
			k.IterTimeMS = 2000
		}
	}
	if !caps.PBKDFOptions {
		// cryptsetup 1.x: PBKDF2 only, and no way to force the count. One
		// millisecond of benchmark gives the LUKS1 minimum of 1000 rounds
		// (or slightly more on a fast CPU).
		ms := k.IterTimeMS
		if k.Iterations > 0 || ms == 0 {
			ms = 1
		}
		return []string{"--hash", "sha256", "--iter-time", strconv.Itoa(ms)}
	}
	out := []string{"--pbkdf", algo}
	if algo == "pbkdf2" {
		out = append(out, "--hash", "sha256")
	}
	if k.Iterations > 0 {
		out = append(out, "--pbkdf-force-iterations", strconv.Itoa(k.Iterations))
	} else if k.IterTimeMS > 0 {
		out = append(out, "--iter-time", strconv.Itoa(k.IterTimeMS))
	}
	if algo != "pbkdf2" {
		if k.MemoryKiB > 0 {
			out = append(out, "--pbkdf-memory", strconv.Itoa(k.MemoryKiB))
		}
		if k.Parallel > 0 {
			out = append(out, "--pbkdf-parallel", strconv.Itoa(k.Parallel))
		}
	}
	return out
}
