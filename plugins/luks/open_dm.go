package luks

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"time"
	"unsafe"

	luksgo "github.com/anatol/luks.go"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/luksext/luksext/plugins/secret"
)

// This file opens a keyslot without cryptsetup: anatol/luks.go recovers
// the volume key, and the dm-crypt table is loaded with device-mapper
// ioctls (dm.go), producing exactly the device `cryptsetup open` makes
// (same name, DM uuid, table, key location, read-ahead, /dev/mapper node),
// so cryptsetup status/close, luksext status and SR.detach see no
// difference. It makes the hot path independent of dom0's cryptsetup
// version and spares SR.attach cryptsetup's own work. Measured in a TCG
// guest (make bench, tests/e2e TestBenchSRAttach; 2 loaded cores), first
// open after boot with the kernel's part done by hand: cryptsetup open
// 1.5-2.2 s, this open 0.38 s (keyslot in Go ~0.1 s, table load 20-60
// ms, the rest the udev wait cryptsetup does too). The kernel's one-time
// part after a boot is not ours: modprobe dm_crypt 0.8-1.3 s and the
// first crypt table 2.8-3.3 s (xts/aesni_intel/cryptd/ecb module loads
// and their crypto self-tests). Formatting and keyslot changes stay with
// cryptsetup.

// OpenMethod chooses how Open maps a keyslot.
type OpenMethod int

const (
	// OpenAuto maps with device-mapper ioctls and falls back to
	// cryptsetup, with a log line naming the reason, for anything
	// luks.go or this code does not handle.
	OpenAuto OpenMethod = iota
	// OpenCryptsetup always runs `cryptsetup open`.
	OpenCryptsetup
)

// MaxArgon2MemoryKiB bounds the argon2 memory an unattended unlock in dom0
// spends in this process (dom0 has 2-8 GiB shared with every VM backend);
// a keyslot asking for more goes to cryptsetup, which applies its own
// limits and fails readably. RecoveryKDF uses 64 MiB.
const MaxArgon2MemoryKiB = 256 << 10

// errFallback marks a reason to open with cryptsetup instead.
type errFallback struct{ reason string }

func (e errFallback) Error() string { return e.reason }

func fallback(format string, a ...any) error { return errFallback{fmt.Sprintf(format, a...)} }

// CryptUUID is the device-mapper uuid cryptsetup gives a LUKS mapping
// (lib/libdevmapper.c dm_prepare_uuid): CRYPT-LUKS<n>-<uuid without
// dashes>-<name>.
func CryptUUID(version int, luksUUID, name string) string {
	return fmt.Sprintf("CRYPT-LUKS%d-%s-%s", version, strings.ReplaceAll(luksUUID, "-", ""), name)
}

// notOurMapping refuses an existing mapping of this name that is not this
// disk's (its DM uuid names another LUKS device or none), so a retried
// attach does not mount someone else's device. Where device-mapper cannot
// be asked, the name alone decides, as before.
func notOurMapping(dev, name string) error {
	info, err := dmStatus(name)
	if err != nil {
		return nil
	}
	h, err := readHeader(dev)
	if err != nil {
		return nil
	}
	if want := CryptUUID(h.version, h.uuid, name); info.UUID != want {
		return fmt.Errorf("a device-mapper device named %s exists with uuid %q, not this disk's mapping (%s); remove it (dmsetup remove %s) if it is stale: %w", name, info.UUID, want, name, ErrBusy)
	}
	return nil
}

// cleanStale finishes what a killed open left: a device of this name
// without a live table (killed between create/load and resume) is removed
// when it carries this disk's uuid, so the open that follows converges.
// live reports a complete mapping already there.
func (m *Manager) cleanStale(h *header, name string, log logrus.FieldLogger) (live bool, err error) {
	info, err := dmStatus(name)
	if errors.Is(err, unix.ENXIO) {
		return false, nil
	}
	if err != nil {
		// No device-mapper here (no dm_mod): cryptsetup will say why.
		return false, nil
	}
	want := CryptUUID(h.version, h.uuid, name)
	if info.UUID != want {
		return false, fmt.Errorf("a device-mapper device named %s exists with uuid %q, not this disk's mapping (%s); remove it (dmsetup remove %s) if it is stale: %w", name, info.UUID, want, name, ErrBusy)
	}
	if info.live() && !info.suspended() {
		return true, nil
	}
	if info.live() {
		return false, fmt.Errorf("%s is suspended (cryptsetup luksSuspend?); resume it with cryptsetup luksResume %s: %w", name, name, ErrBusy)
	}
	return false, m.removeHalfMade(name, info, log)
}

// removeHalfMade removes a device that an interrupted open left without a
// live table (it holds no data and nothing can have it mounted), and the
// udev cookie that open may have left (reapOrphanCookies). A device of
// this name that no LUKS open made (its DM uuid is not cryptsetup's for
// this name) is refused: it is someone else's.
func (m *Manager) removeHalfMade(name string, info dmInfo, log logrus.FieldLogger) error {
	if !strings.HasPrefix(info.UUID, "CRYPT-LUKS") || !strings.HasSuffix(info.UUID, "-"+name) {
		return fmt.Errorf("a device-mapper device named %s exists with uuid %q, which no LUKS open of this name makes; remove it (dmsetup remove %s) if it is stale: %w", name, info.UUID, name, ErrBusy)
	}
	log.WithField("dm_flags", fmt.Sprintf("%#x", info.Flags)).Warn("removing a half-created dm-crypt device left by an interrupted open")
	if err := dmRemove(name); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("removing the half-created device-mapper device %s: %w", name, err)
	}
	reapOrphanCookies(log)
	return nil
}

// openDM maps keyslot slot of dev as name with device-mapper ioctls. An
// errFallback means nothing was created and cryptsetup should try.
func (m *Manager) openDM(dev, name string, h *header, pass secret.Bytes, slot int, log logrus.FieldLogger) error {
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		return fallback("stat %s: %v", dev, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return fallback("%s is not a block device (cryptsetup sets up a loop device)", dev)
	}
	if err := ensureDMControl(); err != nil {
		return fallback("no device-mapper control node: %v", err)
	}
	if err := checkOpenable(h, slot); err != nil {
		return err
	}
	d, err := luksgo.Open(dev)
	if err != nil {
		return fallback("luks.go cannot read the header: %v", err)
	}
	defer d.Close()
	for _, f := range d.FlagsGet() {
		if _, ok := dmFlag[f]; !ok {
			return fallback("unknown LUKS2 persistent flag %q", f)
		}
	}
	t0 := time.Now()
	vol, err := d.UnsealVolume(slot, pass.Expose())
	tUnseal := time.Since(t0)
	if errors.Is(err, luksgo.ErrPassphraseDoesNotMatch) {
		return fmt.Errorf("%s keyslot %d: %w", dev, slot, ErrWrongPassphrase)
	}
	if err != nil {
		return fallback("luks.go cannot open keyslot %d: %v", slot, err)
	}
	key := volumeKey(vol)
	defer clear(key)
	if len(key) == 0 {
		return fallback("luks.go's Volume has no key field (library changed)")
	}
	sector := vol.StorageSectorSize
	if sector == 0 {
		sector = 512
	}
	if vol.StorageSize == 0 || vol.StorageSize%sector != 0 || vol.StorageOffset%512 != 0 {
		return fallback("data segment of %d bytes at %d is not a multiple of the %d-byte sector", vol.StorageSize, vol.StorageOffset, sector)
	}

	// Feature arguments in dm-crypt's order, as cryptsetup emits them
	// (lib/libdevmapper.c get_dm_crypt_params).
	var features []string
	for _, f := range []string{FlagAllowDiscards, FlagSameCPUCrypt, FlagSubmitFromCryptCPUs, FlagNoReadWorkqueue, FlagNoWriteWorkqueue} {
		for _, g := range vol.Flags {
			if g == f {
				features = append(features, dmFlag[f])
			}
		}
	}
	if sector != 512 {
		features = append(features, "sector_size:"+strconv.FormatUint(sector, 10))
	}

	uuid := CryptUUID(h.version, h.uuid, name)
	t0 = time.Now()
	info, err := dmCreate(name, uuid)
	if err != nil {
		if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("creating device-mapper device %s: %w", name, ErrBusy)
		}
		return fallback("device-mapper create: %v", err)
	}
	// From here on, every failure removes the device: never a half-made
	// mapping (after a kill -9 in between, the next Open (cleanStale) or
	// Close removes it, tests/e2e TestDMOpenCrashAndNoUdev).
	undo := func(cause error) error {
		if rerr := dmRemove(name); rerr != nil && !errors.Is(rerr, unix.ENXIO) {
			log.WithError(rerr).Warn("could not remove the half-created device-mapper device; the next open removes it")
		}
		return cause
	}
	keyring := h.version == 2 && keyringForVolumeKey()
	if err := loadCryptTable(name, h, vol, key, features, st.Rdev, keyring); err != nil {
		return undo(fallback("loading the dm-crypt table: %v", err))
	}
	var cookie *udevCookie
	if udevRunning() {
		if cookie, err = newUdevCookie(); err != nil {
			log.WithError(err).Debug("no udev cookie; waiting for the node instead")
		}
	}
	var cv uint32
	if cookie != nil {
		cv = cookie.value
	}
	if err := dmResume(name, cv); err != nil {
		if cookie != nil {
			cookie.wait(0)
		}
		return undo(fmt.Errorf("resuming device-mapper device %s: %w", name, err))
	}
	tDM := time.Since(t0)
	t0 = time.Now()
	if err := m.waitNode(name, info.Dev, cookie, log); err != nil {
		return err
	}
	setReadAhead(m.MapperPath(name), dev)
	log.WithFields(logrus.Fields{"ms_keyslot": tUnseal.Milliseconds(), "ms_dm_load": tDM.Milliseconds(), "ms_udev": time.Since(t0).Milliseconds(), "udev_cookie": cookie != nil}).Debug("device-mapper open timings")
	return nil
}

// checkOpenable refuses, from our own header parse, what the Go path does
// not do exactly like cryptsetup.
func checkOpenable(h *header, slot int) error {
	if h.version == 1 {
		c := cstring(h.v1.CipherName[:]) + "-" + cstring(h.v1.CipherMode[:])
		if c != "aes-xts-plain64" {
			return fallback("cipher %s", c)
		}
		return nil
	}
	var meta struct {
		Keyslots map[string]struct {
			KDF struct {
				Type   string `json:"type"`
				Memory int    `json:"memory"`
			} `json:"kdf"`
		} `json:"keyslots"`
		Segments map[string]struct {
			Type       string          `json:"type"`
			Encryption string          `json:"encryption"`
			Integrity  json.RawMessage `json:"integrity"`
			Flags      []string        `json:"flags"`
		} `json:"segments"`
		Config struct {
			Requirements json.RawMessage `json:"requirements"`
		} `json:"config"`
	}
	if err := json.Unmarshal(h.v2.json, &meta); err != nil {
		return fallback("LUKS2 JSON: %v", err)
	}
	ks, ok := meta.Keyslots[strconv.Itoa(slot)]
	if !ok {
		return fallback("no keyslot %d", slot)
	}
	if strings.HasPrefix(ks.KDF.Type, "argon2") && ks.KDF.Memory > MaxArgon2MemoryKiB {
		return fallback("keyslot %d's argon2 needs %d MiB, more than the %d MiB this process spends in dom0", slot, ks.KDF.Memory>>10, MaxArgon2MemoryKiB>>10)
	}
	if len(meta.Segments) != 1 {
		return fallback("%d data segments (reencryption in progress?)", len(meta.Segments))
	}
	for _, s := range meta.Segments {
		switch {
		case s.Type != "crypt":
			return fallback("segment type %s", s.Type)
		case s.Encryption != "aes-xts-plain64":
			return fallback("cipher %s", s.Encryption)
		case len(s.Integrity) > 0 && string(s.Integrity) != "null":
			return fallback("dm-integrity segment")
		case len(s.Flags) > 0:
			return fallback("segment flags %v", s.Flags)
		}
	}
	if r := strings.TrimSpace(string(meta.Config.Requirements)); r != "" && r != "null" && r != "{}" {
		return fallback("header requirements %s", r)
	}
	return nil
}

// LUKS2 persistent flag names (luks.go's, i.e. cryptsetup's) and their
// dm-crypt feature arguments.
const (
	FlagAllowDiscards       = luksgo.FlagAllowDiscards
	FlagSameCPUCrypt        = luksgo.FlagSameCPUCrypt
	FlagSubmitFromCryptCPUs = luksgo.FlagSubmitFromCryptCPUs
	FlagNoReadWorkqueue     = luksgo.FlagNoReadWorkqueue
	FlagNoWriteWorkqueue    = luksgo.FlagNoWriteWorkqueue
)

var dmFlag = map[string]string{
	FlagAllowDiscards:       "allow_discards",
	FlagSameCPUCrypt:        "same_cpu_crypt",
	FlagSubmitFromCryptCPUs: "submit_from_crypt_cpus",
	FlagNoReadWorkqueue:     "no_read_workqueue",
	FlagNoWriteWorkqueue:    "no_write_workqueue",
}

// volumeKey returns the volume key inside luks.go's Volume. luks.go keeps
// it unexported and hands it only to its own SetupMapper, which can
// neither wipe its copies nor put the key in the kernel keyring as
// cryptsetup does for LUKS2; the slice returned aliases the Volume's, so
// clearing it wipes luks.go's copy too.
func volumeKey(v *luksgo.Volume) []byte {
	f := reflect.ValueOf(v).Elem().FieldByName("key")
	if !f.IsValid() || f.Kind() != reflect.Slice || f.Type().Elem().Kind() != reflect.Uint8 {
		return nil
	}
	return *(*[]byte)(unsafe.Pointer(f.UnsafeAddr()))
}

// keyringForVolumeKey: cryptsetup >= 2.0 hands a LUKS2 volume key to
// dm-crypt through the kernel keyring (lib/setup.c
// crypt_use_keyring_for_vk) when dm-crypt is >= 1.15 (kernel 4.10; dom0's
// 4.19 has 1.18.1) and the kernel has keyrings, so `dmsetup table` shows
// a key reference instead of the key. LUKS1 keys always go in the table.
func keyringForVolumeKey() bool {
	v, ok, err := dmTargetVersion("crypt")
	if err != nil {
		return false
	}
	if !ok {
		// dm-crypt not loaded yet: the table load below loads it
		// (request_module). Decide by the kernel release instead.
		var u unix.Utsname
		if unix.Uname(&u) != nil {
			return false
		}
		var major, minor int
		if _, err := fmt.Sscanf(cstring(u.Release[:]), "%d.%d", &major, &minor); err != nil {
			return false
		}
		return major > 4 || major == 4 && minor >= 10
	}
	return v[0] > 1 || v[0] == 1 && v[1] >= 15
}

// loadCryptTable loads the crypt target. With keyring, the key goes in
// the calling thread's keyring under cryptsetup's description
// (lib/luks2/luks2_keyslot.c: "cryptsetup:<uuid>-d<digest>"), dm-crypt
// copies it at load (request_key from this thread) and it is unlinked
// right after, as cryptsetup does (crypt_drop_keyring_key).
func loadCryptTable(name string, h *header, vol *luksgo.Volume, key []byte, features []string, backing uint64, keyring bool) error {
	var keyArg []byte
	if keyring {
		digest, err := luks2DigestOf(h, vol)
		if err != nil {
			keyring = false
		} else {
			desc := fmt.Sprintf("cryptsetup:%s-d%d", h.uuid, digest)
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			id, err := unix.AddKey("logon", desc, key, unix.KEY_SPEC_THREAD_KEYRING)
			if err != nil {
				keyring = false
			} else {
				defer unix.KeyctlInt(unix.KEYCTL_UNLINK, id, unix.KEY_SPEC_THREAD_KEYRING, 0, 0)
				keyArg = []byte(fmt.Sprintf(":%d:logon:%s", len(key), desc))
			}
		}
	}
	if !keyring {
		keyArg = make([]byte, hex.EncodedLen(len(key)))
		hex.Encode(keyArg, key)
	}
	params := make([]byte, 0, 128+len(keyArg))
	params = append(params, vol.StorageEncryption...)
	params = append(params, ' ')
	params = append(params, keyArg...)
	clear(keyArg)
	params = fmt.Appendf(params, " %d %d:%d %d", vol.StorageIvTweak, unix.Major(backing), unix.Minor(backing), vol.StorageOffset/512)
	if len(features) > 0 {
		params = fmt.Appendf(params, " %d %s", len(features), strings.Join(features, " "))
	}
	defer clear(params)
	return dmLoad(name, "crypt", vol.StorageSize/512, params)
}

// luks2DigestOf finds the digest id covering the volume's segment (the
// one digest of a single-segment LUKS2 device).
func luks2DigestOf(h *header, vol *luksgo.Volume) (int, error) {
	var meta struct {
		Digests map[string]struct {
			Segments []string `json:"segments"`
		} `json:"digests"`
	}
	if err := json.Unmarshal(h.v2.json, &meta); err != nil {
		return 0, err
	}
	for id, d := range meta.Digests {
		if len(d.Segments) > 0 {
			return strconv.Atoi(id)
		}
	}
	return 0, errors.New("no digest for the data segment")
}

// waitNode waits until /dev/mapper/<name> is the new device: through the
// udev cookie when udev runs (what libdevmapper does), then by looking.
// Without udev, it makes the node itself, as libdevmapper does when udev
// is not running (libdm/libdm-common.c _add_dev_node).
func (m *Manager) waitNode(name string, devno uint64, cookie *udevCookie, log logrus.FieldLogger) error {
	path := m.MapperPath(name)
	isOurs := func() bool {
		var st unix.Stat_t
		return unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == devno
	}
	if cookie != nil {
		if !cookie.wait(dmUdevCookieWaitDeadline) {
			log.Warn("udev did not complete the device-mapper cookie (no dm udev rules?); checking the node")
		}
		if isOurs() {
			return nil
		}
	} else if udevRunning() {
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
			if isOurs() {
				return nil
			}
		}
	}
	if isOurs() {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", filepath.Dir(path), err)
	}
	_ = os.Remove(path) // a stale node or link of an older device
	if err := unix.Mknod(path, unix.S_IFBLK|0o600, int(devno)); err != nil && !isOurs() {
		return fmt.Errorf("creating the device node %s: %w", path, err)
	}
	log.WithField("node", path).Info("created the device-mapper node (udev is not running)")
	return nil
}

// setReadAhead does what cryptsetup asks libdevmapper to do
// (DM_READ_AHEAD_MINIMUM_FLAG with the backing device's read-ahead): raise
// the mapping's read-ahead to the backing device's when it is lower.
func setReadAhead(mapper, backing string) {
	get := func(p string) (int, bool) {
		f, err := os.Open(p)
		if err != nil {
			return 0, false
		}
		defer f.Close()
		v, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKRAGET)
		return v, err == nil
	}
	want, ok := get(backing)
	if !ok {
		return
	}
	have, ok := get(mapper)
	if !ok || have >= want {
		return
	}
	if f, err := os.Open(mapper); err == nil {
		_ = unix.IoctlSetInt(int(f.Fd()), unix.BLKRASET, want)
		f.Close()
	}
}

// devnoOf is the device number of a mapping (0 when unknown).
func (m *Manager) devnoOf(name string) uint64 {
	info, err := dmStatus(name)
	if err != nil {
		return 0
	}
	return info.Dev
}
