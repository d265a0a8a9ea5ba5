package operator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/luksext/luksext/plugins/secret"
)

// Terminal asks the person at the console. It is an edge so that tests can
// answer without a terminal.
type Terminal interface {
	// ReadSecret shows prompt and reads one line with echo off.
	ReadSecret(prompt string) (secret.Bytes, error)
	// ReadLine shows prompt and reads one line (a confirmation).
	ReadLine(prompt string) (string, error)
}

// ErrNoTerminal: there is nobody to ask (cron, ssh without -t, a pipe).
var ErrNoTerminal = errors.New("no terminal to ask on")

// maxPassphrase bounds what we read as one passphrase; cryptsetup itself
// reads at most 512 characters interactively.
const maxPassphrase = 4096

// TTY is the real Terminal: /dev/tty, so that a passphrase prompt works
// even when stdin/stdout are redirected, and never reads a pipe by mistake.
type TTY struct{}

func (TTY) open() (*os.File, error) {
	f, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("%w (%v): use --key-file - to pass the passphrase on stdin", ErrNoTerminal, err)
	}
	return f, nil
}

// ReadSecret turns echo off with the TCGETS/TCSETS ioctls (what
// golang.org/x/term does; that module is not a dependency of ours) and
// restores it even when the person presses Ctrl-C.
func (t TTY) ReadSecret(prompt string) (secret.Bytes, error) {
	f, err := t.open()
	if err != nil {
		return secret.Bytes{}, err
	}
	defer f.Close()
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("%w (%v): use --key-file -", ErrNoTerminal, err)
	}
	noEcho := *old
	noEcho.Lflag &^= unix.ECHO
	noEcho.Lflag |= unix.ICANON | unix.ISIG
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &noEcho); err != nil {
		return secret.Bytes{}, fmt.Errorf("turning terminal echo off: %w", err)
	}
	restore := func() { _ = unix.IoctlSetTermios(fd, unix.TCSETS, old) }
	sigs := make(chan os.Signal, 1)
	done := make(chan struct{})
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		select {
		case <-sigs:
			restore()
			fmt.Fprintln(f)
			os.Exit(130)
		case <-done:
		}
	}()
	defer func() {
		signal.Stop(sigs)
		close(done)
		restore()
		fmt.Fprintln(f)
	}()
	fmt.Fprint(f, prompt)
	return readSecretLine(f)
}

// ReadLine reads a visible answer.
func (t TTY) ReadLine(prompt string) (string, error) {
	f, err := t.open()
	if err != nil {
		return "", err
	}
	defer f.Close()
	fmt.Fprint(f, prompt)
	line, err := readSecretLine(f)
	defer line.Wipe()
	return string(line.Expose()), err
}

// readSecretLine reads up to a newline into one fixed buffer, so that no
// resized copy of the passphrase is left behind in memory.
func readSecretLine(r io.Reader) (secret.Bytes, error) {
	buf := make([]byte, maxPassphrase)
	n := 0
	one := make([]byte, 1)
	for {
		k, err := r.Read(one)
		if k == 1 {
			if one[0] == '\n' {
				break
			}
			if n == len(buf) {
				wipeBytes(buf)
				return secret.Bytes{}, fmt.Errorf("passphrase longer than %d bytes", maxPassphrase)
			}
			buf[n] = one[0]
			n++
			continue
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			wipeBytes(buf)
			return secret.Bytes{}, err
		}
	}
	one[0] = 0
	line := bytes.TrimSuffix(buf[:n], []byte("\r"))
	out := secret.New(append([]byte(nil), line...))
	wipeBytes(buf)
	return out, nil
}

// readKeyFile reads a passphrase from path, or from stdin for "-". One
// trailing newline is dropped, so that `echo "$PASS" |` works; cryptsetup
// would keep it, but a passphrase typed at a prompt never has one.
//
// A named key file must be a regular file: it is opened without blocking
// (a FIFO with no writer would otherwise hang the open forever) and a
// FIFO, directory, device or socket is refused. Stdin is read until
// KeyFileTimeout or until ctx ends (SIGTERM), whichever comes first.
func readKeyFile(ctx context.Context, path string, stdin io.Reader) (secret.Bytes, error) {
	var r io.Reader = stdin
	if path != "-" {
		f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return secret.Bytes{}, fmt.Errorf("%w: cannot read the key file: %v", ErrUsage, err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return secret.Bytes{}, fmt.Errorf("%w: cannot read the key file: %v", ErrUsage, err)
		}
		if !st.Mode().IsRegular() {
			return secret.Bytes{}, usageErr("the key file %s is a %s, not a regular file; to pipe a passphrase use --key-file - (stdin)", path, fileKind(st.Mode()))
		}
		r = f
	} else if stdin == nil {
		return secret.Bytes{}, usageErr("--key-file - needs the passphrase on stdin")
	}
	buf := make([]byte, maxPassphrase+1)
	n, err := readFullBefore(ctx, r, buf, KeyFileTimeout)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		wipeBytes(buf)
		return secret.Bytes{}, fmt.Errorf("reading the key file: %w", err)
	}
	if n > maxPassphrase {
		wipeBytes(buf)
		return secret.Bytes{}, usageErr("the key file holds more than %d bytes; it should hold one passphrase", maxPassphrase)
	}
	line := bytes.TrimSuffix(bytes.TrimSuffix(buf[:n], []byte("\n")), []byte("\r"))
	out := secret.New(append([]byte(nil), line...))
	wipeBytes(buf)
	if out.IsEmpty() {
		return secret.Bytes{}, usageErr("the key file is empty")
	}
	return out, nil
}

// KeyFileTimeout bounds the wait for a passphrase on a key file or stdin.
var KeyFileTimeout = 30 * time.Second

// readFullBefore is io.ReadFull that gives up after timeout or when ctx
// ends. The abandoned read may still fill buf later; the caller wipes buf
// only after a completed read, and the process is about to exit anyway.
func readFullBefore(ctx context.Context, r io.Reader, buf []byte, timeout time.Duration) (int, error) {
	type res struct {
		n   int
		err error
	}
	done := make(chan res, 1)
	tmp := make([]byte, len(buf))
	go func() {
		n, err := io.ReadFull(r, tmp)
		done <- res{n, err}
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case x := <-done:
		copy(buf, tmp[:x.n])
		wipeBytes(tmp)
		return x.n, x.err
	case <-t.C:
		return 0, usageErr("no passphrase arrived within %s (is anything writing to it?)", timeout)
	case <-ctx.Done():
		return 0, fmt.Errorf("reading the key file: %w", ctx.Err())
	}
}

func fileKind(m os.FileMode) string {
	switch {
	case m&os.ModeNamedPipe != 0:
		return "FIFO"
	case m.IsDir():
		return "directory"
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeDevice != 0:
		return "device"
	}
	return "special file"
}

func wipeBytes(b []byte) {
	for i := range b {
		b[i] = 0
	}
}
