package packaging

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

// rpm-version.sh against a scratch repository with known history.
func TestRPMVersionFromGitDescribe(t *testing.T) {
	testenv.Tools(t, "git")
	script := filepath.Join(repoRoot(t), "packaging/rpm-version.sh")
	repo := t.TempDir()
	git := func(args ...string) string {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-C", repo}, args...)...)
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@t", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@t",
			"GIT_CONFIG_GLOBAL=/dev/null", "GIT_CONFIG_NOSYSTEM=1")
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "git %v: %s", args, out)
		return strings.TrimSpace(string(out))
	}
	version := func() string {
		t.Helper()
		out, err := exec.Command(script, repo).Output()
		require.NoError(t, err)
		return strings.TrimSpace(string(out))
	}
	commit := func(content string) string {
		require.NoError(t, os.WriteFile(filepath.Join(repo, "f"), []byte(content), 0o644))
		git("add", "f")
		git("commit", "-q", "-m", content)
		return git("rev-parse", "--short=7", "HEAD")
	}

	assert.Equal(t, "0.0.0 0", version(), "not a repository yet")
	git("init", "-q")
	h := commit("one")
	assert.Equal(t, "0.0.0 0.1.g"+h, version(), "no tag")
	git("tag", "v1.2.3")
	assert.Equal(t, "1.2.3 1", version(), "on the tag")
	commit("two")
	h = commit("three")
	assert.Equal(t, "1.2.3 1.2.g"+h, version(), "two commits after the tag")
	require.NoError(t, os.WriteFile(filepath.Join(repo, "f"), []byte("edited"), 0o644))
	assert.Equal(t, "1.2.3 1.2.g"+h+".dirty", version(), "uncommitted change")
	git("checkout", "-q", "f")
	git("tag", "v2.0-rc1")
	assert.Equal(t, "2.0~rc1 1", version(), "RPM forbids - in Version; ~ sorts before the release")
	git("tag", "not-a-version")
	assert.Equal(t, "2.0~rc1 1", version(), "only v<digit> tags count")
}
