//go:build bench

package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/tests/vm"
)

// TestBenchSRAttach: the installed SR.attach (whole process, exec'd as
// xapi-storage-script does) against `clevis luks unlock` of the same disk
// with the same vTPM, in one guest, dm-crypt warmed first; the attach's
// steps from its "SR attached" log line; then the first attach after a
// boot (dm-crypt cold), with the kernel's one-time costs measured by hand
// (modprobe dm_crypt, a first crypt table) and cryptsetup's cold open of
// another disk, to tell the kernel's share from ours.
//
// Both sides run from the guest's page cache, as on a host: clevis, jose,
// tpm2-tools and cryptsetup from the host root (9p with cache=loose,
// warmed by one unlock first), the plugins from a copy of their installed
// tree in the guest's tmpfs (the test tree itself is in the uncached work
// share, where every exec re-reads the 20 MB binary over 9p: ~1.3 s).
func TestBenchSRAttach(t *testing.T) {
	g := bootGuest(t, vm.Config{Disks: []int64{48 << 20, 40 << 20}, TPM: true})
	g.startXAPI(t, map[string]string{})
	g.pluginsInRAM(t)
	var cfg map[string]string
	g.ok(t, "SR.create", createParams(sr1, map[string]string{"device": "/dev/vda"}), &cfg)
	g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": "/var/run/sr-mount/" + sr1}, nil)
	// A LUKS2 disk with a known passphrase for cryptsetup's cold open.
	key := filepath.Join(g.work, "bench-key")
	require.NoError(t, os.WriteFile(key, []byte("bench passphrase"), 0o600))
	g.MustRun(t, "cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "+key+" /dev/vdb")

	// warm both sides' page caches
	g.timedAttach(t, cfg)
	g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": "/var/run/sr-mount/" + sr1}, nil)
	g.MustRun(t, "clevis luks unlock -d /dev/vda -n bench-clevis && cryptsetup close bench-clevis")

	const rounds = 3
	var ours, theirs float64
	steps := map[string]float64{}
	for i := 0; i < rounds; i++ {
		ms, st := g.timedAttach(t, cfg)
		ours += ms
		for k, v := range st {
			steps[k] += v
		}
		g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": "/var/run/sr-mount/" + sr1}, nil)
		theirs += g.timedMS(t, "clevis luks unlock -d /dev/vda -n bench-clevis")
		g.MustRun(t, "cryptsetup close bench-clevis")
	}
	ours, theirs = ours/rounds, theirs/rounds
	fmt.Printf("BENCH SR.attach (whole process, TCG guest, dm-crypt warm): luksext %.0f ms, clevis luks unlock %.0f ms, ratio %.1fx faster\n",
		ours, theirs, theirs/ours)
	// What any exec of the plugin costs in this guest (exec from the
	// tmpfs copy, Go start-up, logging set-up): the floor under SR.attach.
	g.MustRun(t, `echo '{"dbg":"t"}' >/run/bench-query.json`)
	var floor float64
	for i := 0; i < rounds; i++ {
		floor += g.timedMS(t, fmt.Sprintf("%s/Plugin.Query --json </run/bench-query.json >/dev/null", g.volume))
	}
	fmt.Printf("BENCH SR.attach exec floor (Plugin.Query in the same guest): luksext %.0f ms\n", floor/rounds)
	printSteps("SR.attach step", steps, rounds)

	// Cold: the kernel's one-time costs by hand, then cryptsetup's cold
	// open of vdb (kernel warm), then our attach.
	g.Reboot(t)
	g.startXAPI(t, map[string]string{})
	g.pluginsInRAM(t)
	g.MustRun(t, "lsmod | awk 'NR>1{print $1}' > /tmp/bench-mods0")
	mod := g.timedMS(t, "modprobe dm_crypt")
	fmt.Printf("BENCH first boot cost (kernel): modprobe dm_crypt: luksext %.0f ms\n", mod)
	// The guest's root is 9p, so ext4 is not loaded yet (dom0's root is
	// ext3 through the ext4 driver: loaded at boot there).
	ext4 := g.timedMS(t, "grep -qw ext4 /proc/filesystems || modprobe ext4")
	fmt.Printf("BENCH first boot cost (kernel): modprobe ext4: luksext %.0f ms\n", ext4)
	table := g.timedMS(t, "dmsetup create bench-cold --table \"0 8 crypt aes-xts-plain64 $(head -c 64 /dev/urandom | od -An -tx1 | tr -d ' \\n') 0 /dev/vdb 0\" && dmsetup remove bench-cold")
	fmt.Printf("BENCH first boot cost (kernel): first crypt table (xts(aes) instantiation, self-tests): luksext %.0f ms\n", table)
	csOpen := g.timedMS(t, "cryptsetup open --key-file "+key+" /dev/vdb bench-cs")
	t.Logf("modules loaded since boot's end (dm_crypt, its crypto, cryptsetup's): %s", g.MustRun(t, "lsmod | awk 'NR>1{print $1}' | grep -vxFf /tmp/bench-mods0 || true"))
	g.MustRun(t, "cryptsetup close bench-cs")
	fmt.Printf("BENCH open of a LUKS2 keyslot after the kernel's first crypt table (reference only; ours is the step open below): luksext -, cryptsetup open first %.0f ms\n", csOpen)
	csOpen2 := g.timedMS(t, "cryptsetup open --key-file "+key+" /dev/vdb bench-cs")
	g.MustRun(t, "cryptsetup close bench-cs")
	afterKernel, st := g.timedAttach(t, cfg)
	fmt.Printf("BENCH open of a LUKS2 keyslot, again (reference only): luksext -, cryptsetup open second %.0f ms\n", csOpen2)
	fmt.Printf("BENCH first SR.attach after boot, kernel warmed by hand: luksext %.0f ms\n", afterKernel)
	printSteps("first SR.attach (kernel warm) step", st, 1)
	g.ok(t, "SR.detach", map[string]any{"dbg": "t", "sr": "/var/run/sr-mount/" + sr1}, nil) // a clean reboot

	g.Reboot(t)
	g.startXAPI(t, map[string]string{})
	g.pluginsInRAM(t)
	cold, st := g.timedAttach(t, cfg)
	fmt.Printf("BENCH first SR.attach after boot, dm-crypt cold: luksext %.0f ms\n", cold)
	printSteps("first SR.attach (cold) step", st, 1)
}

// pluginsInRAM copies the installed plugin tree (method links and
// binaries, same relative layout) to the guest's tmpfs and calls it from
// there, as a host runs /usr/libexec from its page cache.
func (g *guest) pluginsInRAM(t *testing.T) {
	t.Helper()
	const ram = "/run/bench-root"
	root := filepath.Join(g.work, "root")
	from := root
	if strings.HasPrefix(g.volume, ram+"/") { // again, after a reboot
		from = ram
	}
	rel, err := filepath.Rel(from, g.volume)
	require.NoError(t, err)
	g.MustRun(t, fmt.Sprintf(`[ "$(findmnt -n -o FSTYPE --target /run)" = tmpfs ] || { echo "/run is not a tmpfs"; exit 1; }
rm -rf %[2]s && mkdir -p %[2]s && cp -a %[1]s/usr %[2]s/`, root, ram))
	g.volume = filepath.Join(ram, rel)
}

func printSteps(what string, steps map[string]float64, n int) {
	var names []string
	for k := range steps {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		fmt.Printf("BENCH %s %s: luksext %.1f ms\n", what, strings.TrimPrefix(k, "ms_"), steps[k]/float64(n))
	}
}

// timedMS runs script in the guest and returns its wall time there. The
// clock is bash's $EPOCHREALTIME, read without a fork: two `date` execs
// around the script (80-180 ms in a TCG guest) would add the same
// constant to both sides of every ratio. The script's own output goes to
// a file in the guest's tmpfs, as xapi-storage-script reads a pipe; not
// to the console or the 9p share.
func (g *guest) timedMS(t *testing.T, script string) float64 {
	t.Helper()
	out := g.MustRun(t, fmt.Sprintf(`t0=$EPOCHREALTIME; ( %s ) >>/run/bench-out.log 2>&1 || { tail -20 /run/bench-out.log; exit 1; }; t1=$EPOCHREALTIME
echo "US=$(( ${t1/./} - ${t0/./} ))"`, script))
	i := strings.LastIndex(out, "US=")
	require.GreaterOrEqual(t, i, 0, out)
	us, err := strconv.ParseFloat(strings.TrimSpace(out[i+3:]), 64)
	require.NoError(t, err, out)
	return us / 1e3
}

var stepField = regexp.MustCompile(`\b(ms_[a-z_]+)=([0-9.]+)`)

// timedAttach runs SR.attach as xapi-storage-script does and returns its
// wall time and the steps of its "SR attached" log line.
func (g *guest) timedAttach(t *testing.T, cfg map[string]string) (float64, map[string]float64) {
	t.Helper()
	// params and log in the guest's tmpfs: xapi-storage-script passes
	// pipes, not files on a 9p share
	in := filepath.Join(g.work, "params-bench-attach.json")
	require.NoError(t, os.WriteFile(in, []byte(fmt.Sprintf(`{"dbg":"t","configuration":{"device":%q,"sr_uuid":%q,"luks-uuid":%q}}`,
		cfg["device"], cfg["sr_uuid"], cfg["luks-uuid"])), 0o600))
	g.MustRun(t, "cp "+in+" /run/bench-attach.json")
	ms := g.timedMS(t, fmt.Sprintf("LUKSEXT_LOG_LEVEL=debug LUKSEXT_XAPI_SOCKET=/run/fakexapi.sock %s/SR.attach --json </run/bench-attach.json >/dev/null 2>/run/bench-attach.log", g.volume))
	b := []byte(g.MustRun(t, "cat /run/bench-attach.log"))
	t.Logf("SR.attach's log (%.0f ms):\n%s", ms, b)
	steps := map[string]float64{}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "SR attached") {
			for _, m := range stepField.FindAllStringSubmatch(l, -1) {
				v, _ := strconv.ParseFloat(m[2], 64)
				steps[m[1]] = v
			}
		}
	}
	require.NotEmpty(t, steps, "no step timings in the SR attached line:\n%s", b)
	return ms, steps
}
