package vm

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// luksScript formats /dev/vda with a cheap PBKDF (TCG makes argon2 take
// minutes), makes ext4 on it and writes a marker. The passphrase is a test
// constant, not a secret.
const luksScript = `set -e
modprobe dm_crypt
printf %s vmtest-pass | cryptsetup luksFormat --batch-mode --type luks2 --sector-size 512 \
	--pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file=- /dev/vda
printf %s vmtest-pass | cryptsetup open --key-file=- /dev/vda vmtest
mkfs.ext4 -q -E lazy_itable_init=1,lazy_journal_init=1 /dev/mapper/vmtest
mkdir -p /mnt/vmtest
mount /dev/mapper/vmtest /mnt/vmtest
echo "$MARKER" > /mnt/vmtest/marker
umount /mnt/vmtest
cryptsetup close vmtest
udevadm settle
readlink -f /dev/disk/by-uuid/$(cryptsetup luksUUID /dev/vda)
`

const readLuksScript = `set -e
modprobe dm_crypt
printf %s vmtest-pass | cryptsetup open --key-file=- /dev/vda vmtest
mkdir -p /mnt/vmtest
mount /dev/mapper/vmtest /mnt/vmtest
cat /mnt/vmtest/marker
umount /mnt/vmtest
cryptsetup close vmtest
`

// tpmScript prints the vTPM's identity (a hash of the EK public, derived
// from the endorsement seed), an NV index's content if it exists, and
// PCR 16 (reset to zeros by every power-on).
const tpmScript = `set -e
cd "$(mktemp -d)"
tpm2_createek -c ek.ctx -G ecc -u ek.pub >/dev/null
echo "ek=$(sha256sum < ek.pub | cut -d' ' -f1)"
if tpm2_nvreadpublic 0x1500016 >/dev/null 2>&1; then
	echo "nv=$(tpm2_nvread 0x1500016 -s 16 | od -An -tx1 | tr -d ' \n')"
else
	echo "nv=none"
fi
echo "pcr16=$(tpm2_pcrread sha256:16 | sed -n 's/.*16 *: *0x//p')"
`

func TestMachineDisksLuksTPMAndReboot(t *testing.T) {
	m := Start(t, Config{Disks: []int64{32 << 20, 8 << 20}, TPM: true})

	t.Run("devices", func(t *testing.T) {
		out := m.MustRun(t, `set -e
test -b /dev/vda && test -b /dev/vdb && test -c /dev/tpmrm0 && test -c /dev/tpm0
readlink -f /dev/disk/by-id/virtio-luksext-disk0 /dev/disk/by-id/virtio-luksext-disk1
test -z "$(ls /dev/vdc 2>/dev/null)"
cat /sys/block/vda/size /sys/block/vdb/size`)
		assert.Equal(t, "/dev/vda\n/dev/vdb\n65536\n16384\n", out)
	})

	t.Run("exit code and combined output", func(t *testing.T) {
		out, rc := m.Run(t, "echo to-stdout; echo to-stderr >&2; exit 7")
		assert.Equal(t, 7, rc)
		assert.Contains(t, out, "to-stdout")
		assert.Contains(t, out, "to-stderr")
	})

	t.Run("runs are concurrent", func(t *testing.T) {
		// The first script waits for a file only the second creates: it
		// can only succeed if both run at the same time.
		// (Exec, not Run, in the goroutine: t.Fatal belongs to the test's.)
		var wg sync.WaitGroup
		var waitOut bytes.Buffer
		var waitRC int
		var waitErr error
		wg.Add(1)
		go func() {
			defer wg.Done()
			waitRC, waitErr = m.Exec(context.Background(),
				`for i in $(seq 1200); do [ -e /tmp/go-ahead ] && echo seen && exit 0; sleep 0.1; done; exit 1`, &waitOut)
		}()
		m.MustRun(t, "sleep 1; touch /tmp/go-ahead")
		wg.Wait()
		require.NoError(t, waitErr)
		assert.Equal(t, 0, waitRC, waitOut.String())
	})

	t.Run("a script past its deadline is reported, the guest goes on", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var out bytes.Buffer
		_, err := m.Exec(ctx, "echo started; sleep 600", &out)
		assert.ErrorIs(t, err, ErrTimeout)
		assert.Equal(t, "started\n", out.String())
		assert.Equal(t, "still here\n", m.MustRun(t, "echo still here"))
	})

	host, guest := m.WorkDir()
	t.Run("work dir is shared both ways", func(t *testing.T) {
		require.NoError(t, os.WriteFile(filepath.Join(host, "from-host"), []byte("hello guest"), 0o644))
		out := m.MustRun(t, `pwd; cat from-host; echo "hello host" > from-guest`)
		assert.Equal(t, guest+"\nhello guest", out)
		b, err := os.ReadFile(filepath.Join(host, "from-guest"))
		require.NoError(t, err)
		assert.Equal(t, "hello host\n", string(b))
	})

	marker := "luksext-plaintext-" + randomHex(t)
	t.Run("dm-crypt and udev", func(t *testing.T) {
		out := m.MustRun(t, "export MARKER="+marker+"\n"+luksScript)
		// by-uuid exists for the LUKS UUID, so a reboot can find it.
		assert.Equal(t, "/dev/vda", lastLine(out))
		img, err := os.ReadFile(m.DiskPath(0))
		require.NoError(t, err)
		assert.False(t, bytes.Contains(img, []byte(marker)), "plaintext marker found on the encrypted disk image")
		assert.True(t, bytes.Contains(img[:4096], []byte("LUKS\xba\xbe")), "no LUKS header at the start of disk 0")
	})

	m.MustRun(t, `set -e
mkdir -p /var/lib/luksext-vmtest /usr/local/lib/luksext-vmtest
echo var-survives > /var/lib/luksext-vmtest/state
echo usr-survives > /usr/local/lib/luksext-vmtest/installed
echo etc-survives > /etc/luksext-vmtest.conf
rm /etc/hostname
echo gone > /tmp/luksext-vmtest; echo gone > /run/luksext-vmtest
tpm2_nvdefine 0x1500016 -C o -s 16 -a "ownerread|ownerwrite|authread|authwrite" >/dev/null
printf 0123456789abcdef | tpm2_nvwrite 0x1500016 -C o -i-
tpm2_pcrextend 16:sha256=0000000000000000000000000000000000000000000000000000000000000001`)
	before := parseKV(m.MustRun(t, tpmScript))
	require.NotEqual(t, "none", before["nv"])
	require.NotRegexp(t, `^0+$`, before["pcr16"], "PCR 16 was not extended")

	t0 := time.Now()
	m.Reboot(t)
	t.Logf("reboot took %s", time.Since(t0).Round(time.Millisecond))

	t.Run("after reboot: disk, overlays and tmpfs", func(t *testing.T) {
		assert.Equal(t, marker+"\n", m.MustRun(t, readLuksScript))
		out := m.MustRun(t, `cat /var/lib/luksext-vmtest/state /usr/local/lib/luksext-vmtest/installed /etc/luksext-vmtest.conf
test -e /etc/hostname && echo hostname-back
ls /tmp/luksext-vmtest /run/luksext-vmtest 2>&1 | grep -c 'No such file'`)
		assert.Equal(t, "var-survives\nusr-survives\netc-survives\n2\n", out, "a deleted /etc file must stay deleted (whiteout)")
	})
	after := parseKV(m.MustRun(t, tpmScript))
	t.Run("after reboot: same TPM, PCRs reset", func(t *testing.T) {
		assert.Equal(t, before["ek"], after["ek"])
		assert.Equal(t, hex.EncodeToString([]byte("0123456789abcdef")), after["nv"])
		assert.Regexp(t, `^0+$`, after["pcr16"])
	})

	m.ReplaceTPM(t)
	m.Reboot(t)
	t.Run("after ReplaceTPM: another TPM", func(t *testing.T) {
		replaced := parseKV(m.MustRun(t, tpmScript))
		assert.NotEqual(t, before["ek"], replaced["ek"])
		assert.Equal(t, "none", replaced["nv"])
		// The disk is still there and still opens with its passphrase.
		assert.Equal(t, marker+"\n", m.MustRun(t, readLuksScript))
	})

	t.Run("shutdown kills QEMU and swtpm", func(t *testing.T) {
		m.bootMu.Lock()
		qemuPID, tpmPID := m.cur.qemu.Process.Pid, m.cur.swtpm.Process.Pid
		m.bootMu.Unlock()
		m.Shutdown()
		for _, pid := range []int{qemuPID, tpmPID} {
			assert.ErrorIs(t, syscall.Kill(pid, 0), syscall.ESRCH, "process %d still alive", pid)
		}
		_, err := os.Stat(m.sockDir)
		assert.ErrorIs(t, err, os.ErrNotExist)
	})
}

func randomHex(t *testing.T) string {
	b := make([]byte, 8)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

var kvLine = regexp.MustCompile(`^(\w+)=(.*)$`)

func parseKV(s string) map[string]string {
	out := map[string]string{}
	for _, l := range strings.Split(s, "\n") {
		if m := kvLine.FindStringSubmatch(strings.TrimSpace(l)); m != nil {
			out[m[1]] = m[2]
		}
	}
	return out
}
