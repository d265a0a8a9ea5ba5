package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
)

// The NBD protocol (github.com/NetworkBlockDevice/nbd doc/proto.md), the
// small part a block device needs: the fixed-newstyle handshake (server
// side for unix-socket clients such as qemu-io; client side to reach a
// qemu-nbd serving a qcow2 image) and the transmission phase with simple
// replies. The kernel's nbd driver, configured by ioctl, starts directly
// in the transmission phase.
const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic     = 0x49484156454f5054 // "IHAVEOPT"
	nbdRepMagic     = 0x3e889045565a9
	nbdReqMagic     = 0x25609513
	nbdSimpleReply  = 0x67446698
	nbdFlagFixed    = 1 // handshake flags
	nbdFlagNoZeroes = 2
	nbdOptExport    = 1
	nbdOptAbort     = 2
	nbdOptGo        = 7
	nbdRepAck       = 1
	nbdRepInfo      = 3
	nbdRepErrUnsup  = 0x80000001
	nbdCmdRead      = 0
	nbdCmdWrite     = 1
	nbdCmdDisc      = 2
	nbdCmdFlush     = 3
	nbdFlagHasFlags = 1 // transmission flags
	nbdFlagReadOnly = 2
	nbdFlagFlush    = 4
	nbdEIO          = 5
	nbdEPERM        = 1
	nbdEINVAL       = 22
	nbdENOSPC       = 28
)

// blockIO is what a served image offers: sector-aligned reads and writes.
type blockIO interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Sync() error
	Size() int64
	Close() error
}

// transmissionFlags are the flags a server announces for a device.
func transmissionFlags(readOnly bool) uint16 {
	f := uint16(nbdFlagHasFlags | nbdFlagFlush)
	if readOnly {
		f |= nbdFlagReadOnly
	}
	return f
}

// serverHandshake runs the fixed-newstyle handshake for a client on conn,
// offering one export (any name) of size bytes.
func serverHandshake(conn io.ReadWriter, size int64, flags uint16) error {
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], nbdOptMagic)
	binary.BigEndian.PutUint16(hello[16:], nbdFlagFixed|nbdFlagNoZeroes)
	if _, err := conn.Write(hello[:]); err != nil {
		return err
	}
	var cflags uint32
	if err := binary.Read(conn, binary.BigEndian, &cflags); err != nil {
		return err
	}
	reply := func(opt, typ uint32, data []byte) error {
		var h [20]byte
		binary.BigEndian.PutUint64(h[0:], nbdRepMagic)
		binary.BigEndian.PutUint32(h[8:], opt)
		binary.BigEndian.PutUint32(h[12:], typ)
		binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
		_, err := conn.Write(append(h[:], data...))
		return err
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(conn, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(h[0:]) != nbdOptMagic {
			return errors.New("nbd: bad option magic")
		}
		opt, n := binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:])
		if n > 1<<16 {
			return errors.New("nbd: option too long")
		}
		if _, err := io.ReadFull(conn, make([]byte, n)); err != nil {
			return err
		}
		switch opt {
		case nbdOptExport:
			var r [10 + 124]byte
			binary.BigEndian.PutUint64(r[0:], uint64(size))
			binary.BigEndian.PutUint16(r[8:], flags)
			out := r[:]
			if cflags&nbdFlagNoZeroes != 0 {
				out = r[:10]
			}
			_, err := conn.Write(out)
			return err
		case nbdOptGo:
			var info [12]byte // NBD_INFO_EXPORT
			binary.BigEndian.PutUint64(info[2:], uint64(size))
			binary.BigEndian.PutUint16(info[10:], flags)
			if err := reply(opt, nbdRepInfo, info[:]); err != nil {
				return err
			}
			return reply(opt, nbdRepAck, nil)
		case nbdOptAbort:
			_ = reply(opt, nbdRepAck, nil)
			return io.EOF
		default:
			if err := reply(opt, nbdRepErrUnsup, nil); err != nil {
				return err
			}
		}
	}
}

// serve runs the transmission phase on conn until the client disconnects,
// one request at a time, each through io (which blocks while the device
// is paused).
func serve(conn io.ReadWriter, dev *vbd) error {
	var h [28]byte
	for {
		if _, err := io.ReadFull(conn, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint32(h[0:]) != nbdReqMagic {
			return errors.New("nbd: bad request magic")
		}
		typ := binary.BigEndian.Uint16(h[6:])
		handle := h[8:16]
		off := int64(binary.BigEndian.Uint64(h[16:]))
		n := binary.BigEndian.Uint32(h[24:])
		var data []byte
		if typ == nbdCmdWrite {
			data = make([]byte, n)
			if _, err := io.ReadFull(conn, data); err != nil {
				return err
			}
		}
		if typ == nbdCmdDisc {
			return nil
		}
		if typ == nbdCmdRead {
			data = make([]byte, n)
		}
		errno := dev.do(typ, data, off)
		var r [16]byte
		binary.BigEndian.PutUint32(r[0:], nbdSimpleReply)
		binary.BigEndian.PutUint32(r[4:], errno)
		copy(r[8:], handle)
		out := r[:]
		if typ == nbdCmdRead && errno == 0 {
			out = append(out, data...)
		}
		if _, err := conn.Write(out); err != nil {
			return err
		}
	}
}

// nbdClient is a qemu-nbd export reached over a unix socket (how the fake
// reads and writes qcow2: qemu-nbd opens the file once and holds it).
type nbdClient struct {
	conn   net.Conn
	size   int64
	handle uint64
}

func dialNBD(sock string) (*nbdClient, error) {
	conn, err := net.Dial("unix", sock)
	if err != nil {
		return nil, err
	}
	c := &nbdClient{conn: conn}
	if err := c.handshake(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("nbd handshake with %s: %w", sock, err)
	}
	return c, nil
}

func (c *nbdClient) handshake() error {
	var hello [18]byte
	if _, err := io.ReadFull(c.conn, hello[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != nbdOptMagic {
		return errors.New("not a newstyle NBD server")
	}
	sflags := binary.BigEndian.Uint16(hello[16:])
	cflags := uint32(nbdFlagFixed) | uint32(sflags&nbdFlagNoZeroes)
	var req [4 + 16]byte
	binary.BigEndian.PutUint32(req[0:], cflags)
	binary.BigEndian.PutUint64(req[4:], nbdOptMagic)
	binary.BigEndian.PutUint32(req[12:], nbdOptExport)
	if _, err := c.conn.Write(req[:]); err != nil { // export name "" (length 0)
		return err
	}
	r := make([]byte, 10)
	if cflags&nbdFlagNoZeroes == 0 {
		r = make([]byte, 134)
	}
	if _, err := io.ReadFull(c.conn, r); err != nil {
		return err
	}
	c.size = int64(binary.BigEndian.Uint64(r[0:]))
	return nil
}

func (c *nbdClient) request(typ uint16, off int64, data []byte, n int) error {
	c.handle++
	var h [28]byte
	binary.BigEndian.PutUint32(h[0:], nbdReqMagic)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], c.handle)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], uint32(n))
	if _, err := c.conn.Write(append(h[:], data...)); err != nil {
		return err
	}
	var r [16]byte
	if _, err := io.ReadFull(c.conn, r[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint32(r[0:]) != nbdSimpleReply || binary.BigEndian.Uint64(r[8:]) != c.handle {
		return errors.New("nbd: unexpected reply")
	}
	if e := binary.BigEndian.Uint32(r[4:]); e != 0 {
		return syscall.Errno(e)
	}
	return nil
}

func (c *nbdClient) ReadAt(p []byte, off int64) (int, error) {
	if err := c.request(nbdCmdRead, off, nil, len(p)); err != nil {
		return 0, err
	}
	return io.ReadFull(c.conn, p)
}

func (c *nbdClient) WriteAt(p []byte, off int64) (int, error) {
	if err := c.request(nbdCmdWrite, off, p, len(p)); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *nbdClient) Sync() error  { return c.request(nbdCmdFlush, 0, nil, 0) }
func (c *nbdClient) Size() int64  { return c.size }
func (c *nbdClient) Close() error { _ = c.request(nbdCmdDisc, 0, nil, 0); return c.conn.Close() }

// Kernel nbd driver ioctls (linux/nbd.h).
const (
	nbdSetSock    = 0xab00
	nbdSetBlksize = 0xab01
	nbdSetSize    = 0xab02
	nbdDoIt       = 0xab03
	nbdClearSock  = 0xab04
	nbdClearQue   = 0xab05
	nbdDisconnect = 0xab08
	nbdSetFlags   = 0xab0a
)

func ioctl(fd uintptr, req, arg uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, req, arg); e != 0 {
		return e
	}
	return nil
}

// kernelDevice is /dev/nbdN bound to one end of a socketpair whose other
// end this process serves: the block device's I/O is this process's.
type kernelDevice struct {
	f    *os.File
	done chan error
}

// connectKernel binds /dev/nbdN to a new socketpair and returns the end
// to serve. NBD_DO_IT blocks for the device's lifetime, in its own thread.
func connectKernel(n int, size int64, readOnly bool) (*kernelDevice, *os.File, error) {
	// CLOEXEC: a qemu-nbd spawned later (qcow2 unpause) must not inherit
	// our end; a copy it held kept the kernel from seeing our close, so
	// NBD_DO_IT never returned and tap-ctl close hung.
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	kernelEnd := os.NewFile(uintptr(fds[0]), "nbd-kernel")
	ours := os.NewFile(uintptr(fds[1]), "nbd-server")
	f, err := os.OpenFile(fmt.Sprintf("/dev/nbd%d", n), os.O_RDWR, 0)
	if err != nil {
		kernelEnd.Close()
		ours.Close()
		return nil, nil, err
	}
	fd := f.Fd()
	setup := [][2]uintptr{
		{nbdClearSock, 0},
		{nbdSetBlksize, 512},
		{nbdSetSize, uintptr(size)},
		{nbdSetFlags, uintptr(transmissionFlags(readOnly))},
		{nbdSetSock, kernelEnd.Fd()},
	}
	for _, s := range setup {
		if err := ioctl(fd, s[0], s[1]); err != nil {
			f.Close()
			kernelEnd.Close()
			ours.Close()
			return nil, nil, fmt.Errorf("/dev/nbd%d ioctl %#x: %w", n, s[0], err)
		}
	}
	// BLKROSET: a read-only device refuses writes before they reach us.
	// Set it both ways: the flag outlives the connection, and the next
	// open of this minor may be read-write.
	ro := 0
	if readOnly {
		ro = 1
	}
	if err := ioctl(fd, 0x125d, uintptrOf(&ro)); err != nil {
		f.Close()
		kernelEnd.Close()
		ours.Close()
		return nil, nil, fmt.Errorf("/dev/nbd%d BLKROSET: %w", n, err)
	}
	k := &kernelDevice{f: f, done: make(chan error, 1)}
	go func() {
		runtime.LockOSThread()
		err := ioctl(fd, nbdDoIt, 0)
		_ = ioctl(fd, nbdClearQue, 0)
		_ = ioctl(fd, nbdClearSock, 0)
		kernelEnd.Close()
		k.done <- err
	}()
	return k, ours, nil
}

// disconnect asks the kernel to flush and drop the device, and waits for
// NBD_DO_IT to return.
func (k *kernelDevice) disconnect() {
	_ = ioctl(k.f.Fd(), nbdDisconnect, 0)
	<-k.done
	k.f.Close()
}
