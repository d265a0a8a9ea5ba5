package vm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
)

// agentConn is the host end of the guest agent's virtio-serial port. QEMU
// connects to our listening socket when it starts, so nothing the guest
// says can be lost before the host is listening.
type agentConn struct {
	conn    net.Conn
	writeMu sync.Mutex
	mu      sync.Mutex
	pending map[string]chan int
	ready   chan struct{}
	saved   chan int
	synced  chan struct{}
	closed  chan struct{}
}

func listenAgent(path string) (*net.UnixListener, error) {
	return net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
}

// acceptAgent waits for QEMU to connect, or for QEMU to exit or ctx to end.
func acceptAgent(ctx context.Context, ln *net.UnixListener, exited <-chan struct{}) (*agentConn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	got := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		got <- result{c, err}
	}()
	select {
	case r := <-got:
		if r.err != nil {
			return nil, fmt.Errorf("agent channel: %w", r.err)
		}
		a := &agentConn{
			conn:    r.c,
			pending: map[string]chan int{},
			ready:   make(chan struct{}),
			saved:   make(chan int, 1),
			synced:  make(chan struct{}, 1),
			closed:  make(chan struct{}),
		}
		go a.read()
		return a, nil
	case <-exited:
		ln.Close()
		return nil, errors.New("QEMU exited before connecting the agent channel")
	case <-ctx.Done():
		ln.Close()
		return nil, fmt.Errorf("QEMU did not connect the agent channel: %w", ctx.Err())
	}
}

func (a *agentConn) read() {
	defer close(a.closed)
	sc := bufio.NewScanner(a.conn)
	readyClosed := false
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 1 && f[0] == "ready" && !readyClosed:
			readyClosed = true
			close(a.ready)
		case len(f) == 3 && f[0] == "done":
			rc, err := strconv.Atoi(f[2])
			if err != nil {
				rc = -1
			}
			a.mu.Lock()
			ch := a.pending[f[1]]
			delete(a.pending, f[1])
			a.mu.Unlock()
			if ch != nil {
				ch <- rc
			}
		case len(f) == 1 && f[0] == "synced":
			select {
			case a.synced <- struct{}{}:
			default:
			}
		case len(f) == 2 && f[0] == "saved":
			rc, err := strconv.Atoi(f[1])
			if err != nil {
				rc = -1
			}
			select {
			case a.saved <- rc:
			default:
			}
		}
	}
}

func (a *agentConn) waitReady(ctx context.Context, exited <-chan struct{}) error {
	select {
	case <-a.ready:
		return nil
	case <-a.closed:
		return errors.New("agent channel closed before the guest was ready")
	case <-exited:
		return errors.New("QEMU exited before the guest was ready")
	case <-ctx.Done():
		return fmt.Errorf("guest not ready: %w", ctx.Err())
	}
}

func (a *agentConn) send(line string) error {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	_, err := a.conn.Write([]byte(line + "\n"))
	if err != nil {
		return fmt.Errorf("%w: agent channel: %v", ErrGuestStopped, err)
	}
	return nil
}

// run asks the agent to run script id; the exit code arrives on the channel.
func (a *agentConn) run(id string) (<-chan int, error) {
	ch := make(chan int, 1)
	a.mu.Lock()
	a.pending[id] = ch
	a.mu.Unlock()
	if err := a.send("run " + id); err != nil {
		a.forget(id)
		return nil, err
	}
	return ch, nil
}

func (a *agentConn) forget(id string) {
	a.mu.Lock()
	delete(a.pending, id)
	a.mu.Unlock()
}

func (a *agentConn) save(ctx context.Context, exited <-chan struct{}) (int, error) {
	if err := a.send("save"); err != nil {
		return -1, err
	}
	select {
	case rc := <-a.saved:
		return rc, nil
	case <-a.closed:
		return -1, errors.New("agent channel closed while saving state")
	case <-exited:
		return -1, errors.New("QEMU exited while saving state")
	case <-ctx.Done():
		return -1, fmt.Errorf("saving state: %w", ctx.Err())
	}
}

// syncForPowerOff asks the guest to sync its disks before the host stops
// QEMU; it returns when the guest confirmed, or stopped by itself.
func (a *agentConn) syncForPowerOff(ctx context.Context, exited <-chan struct{}) error {
	if err := a.send("off"); err != nil {
		return err
	}
	select {
	case <-a.synced:
		return nil
	case <-exited:
		return nil
	case <-a.closed:
		return errors.New("agent channel closed before sync")
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (a *agentConn) close() { a.conn.Close() }
