package operator

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// adopt's command-line mistakes exit 2 before any disk is read.
func TestAdminAdoptUsage(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "names.txt")
	if err := os.WriteFile(bad, []byte("this is not xe output\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"adopt"}, "needs 1 argument"},
		{[]string{"adopt", "5f0e7a2c-1b3d-4e5f-8a9b-0c1d2e3f4a5b"}, "device's path"},
		{[]string{"adopt", "/dev/sdb", "--names", "-", "--key-file", "-"}, "cannot both read stdin"},
		{[]string{"adopt", "/dev/sdb", "--names", bad}, "line 1"},
		{[]string{"adopt", "/dev/sdb", "--names", filepath.Join(t.TempDir(), "missing")}, "no such file"},
		{[]string{"adopt", "/dev/sdb", "--force"}, "does not take --force"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, stderr, code := runCLI(t, Deps{}, "", tc.args...)
			if code != ExitUsage || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want %d and %q", code, stderr, ExitUsage, tc.want)
			}
		})
	}
}
