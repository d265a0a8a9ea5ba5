package luks

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

const cookieHelperEnv = "LUKSEXT_TEST_COOKIE_HELPER"

// init turns the test binary, started by deadCookie, into the process
// that makes a cookie and dies without removing it, as an open killed
// before its resume ioctl does ("used": it also did a semop first, as
// libdevmapper does before its ioctl).
func init() {
	mode := os.Getenv(cookieHelperEnv)
	if mode == "" {
		return
	}
	c, err := newUdevCookie()
	if err != nil {
		os.Stderr.WriteString(err.Error())
		os.Exit(1)
	}
	if mode == "used" {
		op := struct {
			num       uint16
			op, flags int16
		}{op: 1}
		if _, _, errno := unix.Syscall(unix.SYS_SEMOP, uintptr(c.semid), uintptr(unsafe.Pointer(&op)), 1); errno != 0 {
			os.Stderr.WriteString(errno.Error())
			os.Exit(1)
		}
	}
	os.Stdout.WriteString("SEMID=" + strconv.Itoa(c.semid) + "\n")
	os.Exit(0)
}

func deadCookie(t *testing.T, mode string) int {
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), cookieHelperEnv+"="+mode)
	out, err := cmd.Output()
	require.NoError(t, err, "%s", out)
	i := strings.Index(string(out), "SEMID=")
	require.GreaterOrEqual(t, i, 0, string(out))
	id, err := strconv.Atoi(strings.TrimSpace(string(out[i+6:])))
	require.NoError(t, err)
	t.Cleanup(func() { unix.Syscall(unix.SYS_SEMCTL, uintptr(id), 0, unix.IPC_RMID) })
	return id
}

func semExists(id int) bool {
	const getval = 12
	_, _, errno := unix.Syscall(unix.SYS_SEMCTL, uintptr(id), 0, getval)
	return errno == 0
}

// A killed open's cookie is removed; a cookie whose creator lives (an
// open in progress, ours or libdevmapper's) or that was operated on (a
// libdevmapper cookie udev may still complete) is left alone.
func TestReapOrphanCookies(t *testing.T) {
	alive, err := newUdevCookie()
	require.NoError(t, err)
	defer alive.wait(0)
	orphan := deadCookie(t, "orphan")
	used := deadCookie(t, "used")

	assert.Equal(t, []int{orphan}, filterIDs(orphanCookies(), alive.semid, orphan, used))
	reapOrphanCookies(logrus.New())
	assert.False(t, semExists(orphan), "the orphan is removed")
	assert.True(t, semExists(alive.semid), "a live open's cookie stays")
	assert.True(t, semExists(used), "a cookie that was operated on stays")
}

// filterIDs keeps the ids among want (other processes on this machine
// may hold cookies of their own).
func filterIDs(ids []int, want ...int) []int {
	var out []int
	for _, id := range ids {
		for _, w := range want {
			if id == w {
				out = append(out, id)
			}
		}
	}
	return out
}
