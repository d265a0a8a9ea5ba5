// Package packaging builds the luksext RPM with `make rpm` (once per test
// run: it takes a while) and checks what an XCP-ng host would get from it:
// the file list against the method tables, the dependencies, the scriptlets,
// static binaries, and the SMAPIv3 conformance suite run against the
// payload itself.
package packaging

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/smapi/smapitest"
	"github.com/luksext/luksext/plugins/testenv"
	"github.com/luksext/luksext/sr-types/luksext"
)

const pluginRoot = "/usr/libexec/xapi-storage-script"

var (
	volumeDir   = pluginRoot + "/volume/" + luksext.VolumePluginDir
	datapathDir = pluginRoot + "/datapath/" + luksext.DatapathPluginDir
)

// shared holds the one build of this test run; TestMain removes its
// directory.
var shared struct {
	once   sync.Once
	dir    string
	rpm    string
	srpm   string
	output string
	err    error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

// realDeps are the dependencies the packaged binaries use: the suite's
// placeholder calls name nothing that exists, so they reach no disk, TPM or
// xapi.
func realDeps() luksext.Deps {
	return luksext.RealDeps(logging.New(logging.Options{Plugin: "test", Stderr: os.Stderr, Level: "warn"}))
}

func repoRoot(t testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	require.True(t, ok)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// builtRPM runs `make rpm` into a private directory the first time a test
// asks, and returns the binary and source RPM paths.
func builtRPM(t *testing.T) (rpm, srpm string) {
	t.Helper()
	testenv.Tools(t, "rpmbuild", "rpm", "rpm2cpio", "cpio", "make", "git")
	shared.once.Do(func() {
		dir, err := os.MkdirTemp("", "luksext-rpm-test-")
		if err != nil {
			shared.err = err
			return
		}
		shared.dir = dir
		out := filepath.Join(dir, "out")
		cmd := exec.Command("make", "-C", repoRoot(t), "rpm", "RPMDIR="+out)
		cmd.Env = append(os.Environ(), "TMPDIR="+dir)
		b, err := cmd.CombinedOutput()
		shared.output = string(b)
		if err != nil {
			shared.err = err
			return
		}
		rpms, _ := filepath.Glob(filepath.Join(out, "luksext-*.x86_64.rpm"))
		srpms, _ := filepath.Glob(filepath.Join(out, "luksext-*.src.rpm"))
		if len(rpms) != 1 || len(srpms) != 1 {
			shared.err = os.ErrNotExist
			return
		}
		shared.rpm, shared.srpm = rpms[0], srpms[0]
	})
	require.NoError(t, shared.err, "make rpm:\n%s", tail(shared.output, 4000))
	return shared.rpm, shared.srpm
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// rpmQuery runs rpm with args and returns its output lines.
func rpmQuery(t *testing.T, args ...string) []string {
	t.Helper()
	out, err := exec.Command("rpm", args...).CombinedOutput()
	require.NoError(t, err, "rpm %v: %s", args, out)
	return strings.Split(strings.TrimSpace(string(out)), "\n")
}

// extract unpacks the payload into a scratch root, as installing it would.
func extract(t *testing.T, rpm string) string {
	t.Helper()
	root := t.TempDir()
	cmd := exec.Command("sh", "-c", `rpm2cpio "$1" | cpio -idm --quiet`, "sh", rpm)
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "rpm2cpio | cpio: %s", out)
	return root
}

// entriesUnder returns the base names of the packaged paths directly in dir.
func entriesUnder(files []string, dir string) []string {
	var out []string
	for _, f := range files {
		if filepath.Dir(f) == dir {
			out = append(out, filepath.Base(f))
		}
	}
	sort.Strings(out)
	return out
}

func TestRPMListsEveryMethodOfBothTables(t *testing.T) {
	rpm, _ := builtRPM(t)
	files := rpmQuery(t, "-qlp", rpm)
	d := realDeps()

	// The tables compiled into this test and the tables compiled into the
	// packaged binaries (--list-methods) must both match the file list.
	root := extract(t, rpm)
	listed := func(bin string) []string {
		out, err := exec.Command(filepath.Join(root, "usr/libexec/luksext", bin), "--list-methods").Output()
		require.NoError(t, err)
		names := strings.Fields(string(out))
		sort.Strings(names)
		return names
	}
	for _, tc := range []struct {
		dir, bin string
		table    smapi.Table
	}{
		{volumeDir, "volume", luksext.VolumeTable(d)},
		{datapathDir, "datapath", luksext.DatapathTable(d)},
	} {
		got := entriesUnder(files, tc.dir)
		assert.Equal(t, tc.table.Names(), got, "%s: packaged symlinks vs the method table", tc.dir)
		assert.Equal(t, listed(tc.bin), got, "%s: packaged symlinks vs %s --list-methods", tc.dir, tc.bin)
		assert.Contains(t, got, "Plugin.Query")
		assert.Contains(t, files, tc.dir, "the package must own %s itself", tc.dir)
	}
	for _, f := range []string{
		"/usr/libexec/luksext", "/usr/libexec/luksext/volume", "/usr/libexec/luksext/datapath",
		"/usr/libexec/luksext/uninstall-check", "/etc/sysconfig/luksext", "/etc/rsyslog.d/luksext.conf",
		"/usr/sbin/luksext", "/var/lib/luksext",
	} {
		assert.Contains(t, files, f)
	}
	// The watched roots belong to xapi-storage-script: owning them would
	// conflict with it, and erasing luksext must never remove them.
	assert.NotContains(t, files, pluginRoot+"/volume")
	assert.NotContains(t, files, pluginRoot+"/datapath")
	for _, f := range files {
		assert.False(t, strings.HasPrefix(f, "/usr/lib/.build-id"), "unexpected %s", f)
	}

	configs := rpmQuery(t, "-qcp", rpm)
	assert.ElementsMatch(t, []string{"/etc/sysconfig/luksext", "/etc/rsyslog.d/luksext.conf"}, configs)
}

func TestRPMSymlinksPointAtTheBinaries(t *testing.T) {
	rpm, _ := builtRPM(t)
	root := extract(t, rpm)
	for dir, bin := range map[string]string{volumeDir: "volume", datapathDir: "datapath"} {
		entries, err := os.ReadDir(filepath.Join(root, dir))
		require.NoError(t, err)
		require.NotEmpty(t, entries)
		for _, e := range entries {
			p := filepath.Join(root, dir, e.Name())
			target, err := os.Readlink(p)
			require.NoError(t, err, "%s must be a symlink", p)
			// Relative, so the tree works wherever it is unpacked and the
			// binary is replaced (by rename) without touching the links.
			assert.Equal(t, "../../../luksext/"+bin, target, p)
		}
	}
}

func TestRPMRequiresDom0PackagesOnly(t *testing.T) {
	rpm, _ := builtRPM(t)
	reqs := rpmQuery(t, "-qp", "--requires", rpm)
	names := map[string]bool{}
	for _, r := range reqs {
		names[strings.Fields(r)[0]] = true
	}
	for _, want := range []string{"cryptsetup", "e2fsprogs", "blktap", "xapi-storage-script", "util-linux"} {
		assert.True(t, names[want], "Requires: %s missing in %v", want, reqs)
	}
	for _, r := range reqs {
		for _, banned := range []string{"clevis", "jose", "luksmeta", "tpm2", "tss2", "libc.so", "ld-linux", "golang"} {
			assert.NotContains(t, strings.ToLower(r), banned, "dom0 has no %s: %q must not be required", banned, r)
		}
	}
	arch := rpmQuery(t, "-qp", "--qf", "%{ARCH}", rpm)
	assert.Equal(t, []string{"x86_64"}, arch)
}

func TestRPMScriptlets(t *testing.T) {
	rpm, _ := builtRPM(t)
	scripts := strings.Join(rpmQuery(t, "-qp", "--scripts", rpm), "\n")
	for _, section := range []string{"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet", "posttrans scriptlet"} {
		assert.Contains(t, scripts, section)
	}
	assert.Contains(t, scripts, "/usr/libexec/luksext/uninstall-check")
	assert.Contains(t, scripts, "xe-toolstack-restart")
	assert.Contains(t, scripts, pluginRoot+"/datapath")
	// Restarting the storage daemon or the toolstack under running SRs is
	// the admin's call, never the package's.
	for _, disruptive := range []string{"restart xapi", "xapi-storage-script.service", "/opt/xensource/bin/xe-toolstack-restart", "systemctl restart", "systemctl stop"} {
		assert.NotContains(t, scripts, disruptive)
	}
}

func TestRPMBinariesAreStatic(t *testing.T) {
	rpm, _ := builtRPM(t)
	root := extract(t, rpm)
	for _, bin := range []string{"volume", "datapath"} {
		p := filepath.Join(root, "usr/libexec/luksext", bin)
		f, err := elf.Open(p)
		require.NoError(t, err)
		defer f.Close()
		assert.Equal(t, elf.EM_X86_64, f.Machine, bin)
		for _, prog := range f.Progs {
			assert.NotEqual(t, elf.PT_INTERP, prog.Type, "%s has a program interpreter: not static", bin)
			assert.NotEqual(t, elf.PT_DYNAMIC, prog.Type, "%s has a dynamic section: not static", bin)
		}
		libs, _ := f.ImportedLibraries()
		assert.Empty(t, libs, bin)
	}
}

// Version-Release come from git describe (rpm-version.sh, tested on its own
// below) and the same string is stamped into the binaries (Plugin.Query's
// version, what xe sm-list shows). Other engineers commit while the RPM
// builds, so the exact number is not compared with HEAD here; the commit it
// names must exist.
func TestRPMVersionIsStampedIntoTheBinaries(t *testing.T) {
	rpm, _ := builtRPM(t)
	got := rpmQuery(t, "-qp", "--qf", "%{VERSION} %{RELEASE}", rpm)
	require.Len(t, got, 1)
	version, release, ok := strings.Cut(got[0], " ")
	require.True(t, ok)
	assert.Regexp(t, `^[0-9]+\.[0-9]+\.[0-9]+$`, version)
	if m := regexp.MustCompile(`\.g([0-9a-f]{7,})`).FindStringSubmatch(release); m != nil {
		err := exec.Command("git", "-C", repoRoot(t), "cat-file", "-e", m[1]+"^{commit}").Run()
		assert.NoError(t, err, "release %s names commit %s, which is not in the repository", release, m[1])
	}

	root := extract(t, rpm)
	x := &smapitest.Exec{Dir: filepath.Join(root, volumeDir), Env: []string{"LUKSEXT_LOG_LEVEL=error"}}
	reply, err := smapitest.Call(t.Context(), x, "Plugin.Query", map[string]string{"dbg": "packaging"})
	require.NoError(t, err)
	require.Equal(t, 0, reply.ExitCode, "%s", reply.Stderr)
	var q struct {
		Version string `json:"version"`
	}
	require.NoError(t, json.Unmarshal(reply.Stdout, &q), "%s", reply.Stdout)
	assert.Equal(t, version+"-"+release, q.Version)
}

func TestRPMPayloadPassesExecConformance(t *testing.T) {
	rpm, _ := builtRPM(t)
	root := extract(t, rpm)
	d := realDeps()
	for _, tc := range []struct {
		name, dir string
		table     smapi.Table
	}{
		{"volume", volumeDir, luksext.VolumeTable(d)},
		{"datapath", datapathDir, luksext.DatapathTable(d)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			x := &smapitest.Exec{Dir: filepath.Join(root, tc.dir), Env: []string{"LUKSEXT_LOG_LEVEL=warn"}}
			smapitest.Run(t, smapitest.Config{Invoker: x, Exec: x, Table: tc.table, Plugin: luksext.PluginName})
		})
	}
}

// The source RPM alone must rebuild with no network and no module cache:
// that is how XCP-ng's build container would build it.
func TestSRPMRebuildsOffline(t *testing.T) {
	_, srpm := builtRPM(t)
	top := t.TempDir()
	cmd := exec.Command("rpmbuild", "--rebuild", "--nodeps", "--define", "_topdir "+top, srpm)
	cmd.Env = append(os.Environ(),
		"GOPROXY=off", "GOFLAGS=", "GONOSUMDB=", "GOMODCACHE="+t.TempDir(), "TMPDIR="+t.TempDir())
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "rpmbuild --rebuild:\n%s", tail(string(out), 4000))
	rebuilt, _ := filepath.Glob(filepath.Join(top, "RPMS/x86_64/luksext-*.rpm"))
	require.Len(t, rebuilt, 1)
	orig, _ := builtRPM(t)
	assert.Equal(t, filepath.Base(orig), filepath.Base(rebuilt[0]), "same name-version-release from the SRPM")
	assert.Equal(t, rpmQuery(t, "-qlp", orig), rpmQuery(t, "-qlp", rebuilt[0]))
	assert.True(t, bytes.Contains(out, []byte("-mod=vendor")), "the build must use the vendored modules")
}
