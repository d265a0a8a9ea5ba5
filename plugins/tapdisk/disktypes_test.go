package tapdisk

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/testenv"
)

// disktypeC is the shape of blktap's drivers/tapdisk-disktype.c table:
// {name, description, flags} entries referenced from an array that
// tapdisk_disktype_find walks with strcmp. QCOW_NAME/QCOW_DESC are what
// upstream 3.55.5 ("qcow", driver #if 0) and XCP-ng's qcow2 build
// ("qcow2") put in the qcow slot.
const disktypeC = `
#include <stdio.h>
#include <string.h>
typedef struct { const char *name; const char *desc; int flags; } disk_info_t;
static const disk_info_t aio_disk = { "aio", "raw image (aio)", 0 };
static const disk_info_t vhd_disk = { "vhd", "virtual server image (vhd)", 0 };
static const disk_info_t qcow_disk = { QCOW_NAME, QCOW_DESC, 0 };
static const disk_info_t nbd_disk = { "nbd", "export to a NBD server", 0 };
const disk_info_t *types[] = { &aio_disk, &vhd_disk, &qcow_disk, &nbd_disk, 0 };
int main(int argc, char **argv) {
	for (int i = 0; types[i]; i++)
		if (argc > 1 && !strcmp(argv[1], types[i]->name)) { puts(types[i]->desc); return 0; }
	return 2; /* -ENOENT */
}
`

func buildTapdisk(t *testing.T, name, desc string) string {
	t.Helper()
	gcc := testenv.Tools(t, "gcc")["gcc"]
	dir := t.TempDir()
	src := filepath.Join(dir, "disktype.c")
	require.NoError(t, os.WriteFile(src, []byte(disktypeC), 0o644))
	bin := filepath.Join(dir, "tapdisk")
	out, err := exec.Command(gcc, "-O2", "-o", bin, "-DQCOW_NAME=\""+name+"\"", "-DQCOW_DESC=\""+desc+"\"", src).CombinedOutput()
	require.NoError(t, err, "%s", out)
	return bin
}

func TestSupportsDiskTypeReadsTheTapdiskTable(t *testing.T) {
	upstream := buildTapdisk(t, "qcow", "qcow disk (qcow)")
	xcpng := buildTapdisk(t, "qcow2", "QEMU copy-on-write disk (qcow2)")
	// The compiled tables answer as tapdisk would.
	assert.Error(t, exec.Command(upstream, "qcow2").Run(), "upstream tapdisk has no qcow2")
	assert.NoError(t, exec.Command(xcpng, "qcow2").Run())

	err := SupportsDiskType([]string{"/nonexistent/tapdisk", upstream}, "qcow2")
	require.ErrorIs(t, err, ErrDiskTypeUnsupported)
	assert.Contains(t, err.Error(), upstream)
	require.NoError(t, SupportsDiskType([]string{xcpng}, "qcow2"))
	require.NoError(t, SupportsDiskType([]string{upstream}, "vhd"))
	require.NoError(t, SupportsDiskType([]string{upstream}, "qcow"), "a name is found whole")
	require.ErrorIs(t, SupportsDiskType([]string{upstream}, "cow"), ErrDiskTypeUnsupported, "not a substring")
	require.ErrorIs(t, SupportsDiskType([]string{"/nonexistent/tapdisk"}, "qcow2"), ErrNoTapdisk)
}
