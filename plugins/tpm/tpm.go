// Package tpm is the one place luksext opens a TPM 2.0: the kernel's
// resource-managed device on a host, or a swtpm reached over TCP in tests.
// It also turns TPM response codes into error kinds a caller can act on
// (absent, lockout, policy mismatch, wrong TPM) and retries the transient
// ones a bounded number of times.
//
// Which TPM is used is decided by a Spec, parsed from a string such as
// "device" (default), "device:/dev/tpmrm0" or "swtpm:tcp:127.0.0.1:2321".
// SpecFromEnv is the only place that reads the environment; nothing in this
// package keeps global state.
package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// EnvVar selects the TPM for tools and tests; empty means the host device.
const EnvVar = "LUKSEXT_TPM"

// DevicePaths are tried in order when no explicit device is named. The
// resource manager (tpmrm0) is preferred: without it, concurrent users of
// /dev/tpm0 would trample each other's transient objects and sessions.
var DevicePaths = []string{"/dev/tpmrm0", "/dev/tpm0"}

// Opener gives access to a TPM. Callers open per operation and close when
// done, so no handle outlives one unlock or enrolment.
type Opener interface {
	Open(ctx context.Context) (transport.TPMCloser, error)
}

// Kind of TPM connection.
const (
	KindDevice = "device"
	KindSWTPM  = "swtpm"
)

// Spec says which TPM to open. It implements Opener.
type Spec struct {
	Kind string // KindDevice or KindSWTPM
	// Path of the character device; empty means try DevicePaths.
	Path string
	// Addr is host:port of swtpm's --server (raw TPM command) socket.
	Addr string
}

// ParseSpec reads "", "device", "device:/dev/tpmX" or "swtpm:tcp:HOST:PORT".
func ParseSpec(s string) (Spec, error) {
	switch {
	case s == "" || s == KindDevice:
		return Spec{Kind: KindDevice}, nil
	case strings.HasPrefix(s, KindDevice+":"):
		p := strings.TrimPrefix(s, KindDevice+":")
		if !strings.HasPrefix(p, "/") {
			return Spec{}, fmt.Errorf("TPM spec %q: device path must be absolute: %w", s, ErrBadSpec)
		}
		return Spec{Kind: KindDevice, Path: p}, nil
	case strings.HasPrefix(s, KindSWTPM+":tcp:"):
		addr := strings.TrimPrefix(s, KindSWTPM+":tcp:")
		host, port, err := net.SplitHostPort(addr)
		if err != nil || host == "" {
			return Spec{}, fmt.Errorf("TPM spec %q: want swtpm:tcp:HOST:PORT: %w", s, ErrBadSpec)
		}
		if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
			return Spec{}, fmt.Errorf("TPM spec %q: bad port: %w", s, ErrBadSpec)
		}
		return Spec{Kind: KindSWTPM, Addr: addr}, nil
	}
	return Spec{}, fmt.Errorf("TPM spec %q: want \"device\", \"device:/dev/tpmX\" or \"swtpm:tcp:HOST:PORT\": %w", s, ErrBadSpec)
}

// SpecFromEnv parses $LUKSEXT_TPM (empty: the host device).
func SpecFromEnv() (Spec, error) { return ParseSpec(os.Getenv(EnvVar)) }

// String is the inverse of ParseSpec.
func (s Spec) String() string {
	switch {
	case s.Kind == KindSWTPM:
		return KindSWTPM + ":tcp:" + s.Addr
	case s.Path != "":
		return KindDevice + ":" + s.Path
	}
	return KindDevice
}

// Open implements Opener.
func (s Spec) Open(ctx context.Context) (transport.TPMCloser, error) {
	switch s.Kind {
	case KindDevice, "":
		return openDevice(ctx, s.Path)
	case KindSWTPM:
		return dialSWTPM(ctx, s.Addr)
	}
	return nil, fmt.Errorf("TPM spec kind %q: %w", s.Kind, ErrBadSpec)
}

func openDevice(ctx context.Context, path string) (transport.TPMCloser, error) {
	paths := DevicePaths
	if path != "" {
		paths = []string{path}
	}
	var errs []error
	for _, p := range paths {
		t, err := waitWhileBusy(ctx, BusyWait, func() (transport.TPMCloser, error) { return linuxtpm.Open(p) })
		if err == nil {
			return t, nil
		}
		if errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("%s does not exist", p))
			continue
		}
		// Present but unusable (permissions, busy /dev/tpm0): say so rather
		// than pretending there is no TPM.
		return nil, fmt.Errorf("opening TPM %s: %w", p, err)
	}
	return nil, fmt.Errorf("%w (%w)", ErrAbsent, errors.Join(errs...))
}

// BusyWait bounds how long Open waits for a TPM device that another
// process holds open. The kernel allows one open of /dev/tpm0 at a time
// (EBUSY otherwise); xapi runs SMAPI calls in parallel and sss policies
// unseal their tpm2 shares concurrently, so on a host without the resource
// manager (/dev/tpmrm0) users queue here instead of failing. Each holder
// keeps the device for one unseal, well under a second.
const BusyWait = 30 * time.Second

// waitWhileBusy calls open until it stops failing with EBUSY, the context
// ends, or maxWait has passed.
func waitWhileBusy(ctx context.Context, maxWait time.Duration, open func() (transport.TPMCloser, error)) (transport.TPMCloser, error) {
	deadline := time.Now().Add(maxWait)
	pause := 10 * time.Millisecond
	for {
		t, err := open()
		if err == nil || !errors.Is(err, syscall.EBUSY) {
			return t, err
		}
		if time.Now().Add(pause).After(deadline) {
			return nil, fmt.Errorf("%w: the TPM device stayed in use by another process for %s: %w", ErrBusy, maxWait, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for the TPM device: %w: %w", ctx.Err(), err)
		case <-time.After(pause):
		}
		if pause < 200*time.Millisecond {
			pause *= 2
		}
	}
}

// commandTimeout bounds one TPM command on a TCP connection. Key generation
// on a software TPM takes well under a second; this only catches a hung peer.
const commandTimeout = 60 * time.Second

func dialSWTPM(ctx context.Context, addr string) (transport.TPMCloser, error) {
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%w: connecting to swtpm at %s: %w", ErrAbsent, addr, err)
	}
	return &streamTPM{conn: c}, nil
}

// streamTPM speaks raw TPM commands over a stream socket, which is what
// swtpm's --server port expects. go-tpm's transport/tcp speaks the MS
// simulator protocol instead, and its generic wrapper assumes one read
// returns the whole response, which TCP does not promise.
type streamTPM struct {
	mu   sync.Mutex
	conn net.Conn
}

const tpmHeaderSize = 10

func (s *streamTPM) Send(cmd []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_ = s.conn.SetDeadline(time.Now().Add(commandTimeout))
	if _, err := s.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("sending TPM command: %w", err)
	}
	hdr := make([]byte, tpmHeaderSize)
	if _, err := io.ReadFull(s.conn, hdr); err != nil {
		return nil, fmt.Errorf("reading TPM response header: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < tpmHeaderSize || size > 1<<20 {
		return nil, fmt.Errorf("TPM response claims %d bytes", size)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(s.conn, rsp[tpmHeaderSize:]); err != nil {
		return nil, fmt.Errorf("reading TPM response body: %w", err)
	}
	return rsp, nil
}

func (s *streamTPM) Close() error { return s.conn.Close() }
