package operator

import (
	"context"
	"io"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Issue 13 item 9: `luksext unlock DEV --key-file FIFO` blocked forever in
// open(2) and ignored SIGTERM. A FIFO or a directory is refused at once,
// and a stdin that never delivers ends at the timeout or on SIGTERM.
func TestKeyFileRefusesSpecialFilesAndDoesNotHang(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))
	for _, p := range []string{fifo, dir, "/dev/null"} {
		done := make(chan error, 1)
		go func() { _, err := readKeyFile(context.Background(), p, nil); done <- err }()
		select {
		case err := <-done:
			require.ErrorIs(t, err, ErrUsage, p)
			assert.Contains(t, err.Error(), "not a regular file", p)
		case <-time.After(5 * time.Second):
			t.Fatalf("readKeyFile(%s) hangs", p)
		}
	}

	pr, pw := io.Pipe() // stdin that nobody writes to
	defer pw.Close()
	old := KeyFileTimeout
	KeyFileTimeout = 200 * time.Millisecond
	defer func() { KeyFileTimeout = old }()
	start := time.Now()
	_, err := readKeyFile(context.Background(), "-", pr)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "no passphrase arrived")
	assert.Less(t, time.Since(start), 5*time.Second)

	KeyFileTimeout = time.Hour
	ctx, cancel := context.WithCancel(context.Background()) // SIGTERM cancels the admin's context
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = readKeyFile(ctx, "-", pr)
	assert.ErrorIs(t, err, context.Canceled)
}
