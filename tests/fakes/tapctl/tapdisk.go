package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/luksext/luksext/plugins/tapdisk/tapdiskfake"
	"github.com/luksext/luksext/plugins/vhd"
)

func uintptrOf(p *int) uintptr { return uintptr(unsafe.Pointer(p)) }

// tdLog is the fake tapdisk's log (TAPCTL_FAKE_STATE/tapdisk<pid>.log;
// real tapdisk logs to syslog). Its stdio stays on /dev/null.
var tdLog *os.File

func logf(format string, args ...any) {
	if tdLog != nil {
		fmt.Fprintf(tdLog, "%s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
	}
}

// ctlRequest is one message of tap-ctl to its tapdisk (real tapdisk:
// tapdisk_message_t over /var/run/blktap-control/ctl<pid>).
type ctlRequest struct {
	Op       string // open, close, pause, unpause
	Minor    int
	Type     string `json:",omitempty"`
	Path     string `json:",omitempty"`
	ReadOnly bool   `json:",omitempty"`
	Kernel   bool   `json:",omitempty"` // bind /dev/nbd<Minor>
}

type ctlResponse struct {
	Errno int    `json:",omitempty"`
	Msg   string `json:",omitempty"`
}

func ctlSocket(pid int) string { return filepath.Join(stateDir, fmt.Sprintf("ctl%d", pid)) }

// nbdSocket is where a tapdisk serves minor n over NBD to user-space
// clients (qemu-io, tests), beside the kernel device.
func nbdSocket(n int) string { return filepath.Join(stateDir, fmt.Sprintf("nbd%d.sock", n)) }

// vbd is one open device of the fake tapdisk: an image, the clients it
// serves, and the pause state.
type vbd struct {
	mu       sync.Mutex
	cond     *sync.Cond
	typ      string
	path     string
	readOnly bool
	img      blockIO // nil while paused
	paused   bool
	closing  bool
	kernel   *kernelDevice
	bytes    int64 // the size clients were told
	listener net.Listener
	conns    sync.WaitGroup
	clients  map[net.Conn]bool
}

// do runs one block request. While the device is paused it waits, as
// tapdisk queues a paused VBD's requests until it is resumed.
func (d *vbd) do(typ uint16, data []byte, off int64) uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	for d.paused && !d.closing {
		d.cond.Wait()
	}
	if d.closing || d.img == nil {
		return nbdEIO
	}
	var err error
	switch typ {
	case nbdCmdRead:
		_, err = d.img.ReadAt(data, off)
	case nbdCmdWrite:
		if d.readOnly {
			return nbdEPERM
		}
		_, err = d.img.WriteAt(data, off)
	case nbdCmdFlush:
		err = d.img.Sync()
	default:
		return nbdEINVAL
	}
	if err != nil {
		logf("%s:%s request %d at %d: %v", d.typ, d.path, typ, off, err)
		return nbdEIO
	}
	return 0
}

// openImage opens path with the driver tapdisk would use for typ.
func openImage(typ, path string, readOnly bool, minor int) (blockIO, error) {
	switch typ {
	case "vhd":
		return openVHD(path, readOnly)
	case "qcow2":
		return openQcow2(path, readOnly, minor)
	case "aio":
		flag := os.O_RDWR
		if readOnly {
			flag = os.O_RDONLY
		}
		f, err := os.OpenFile(path, flag, 0)
		if err != nil {
			return nil, err
		}
		return rawFile{f}, nil
	}
	return nil, fail(syscall.EINVAL, "unknown disk type %q", typ)
}

type rawFile struct{ *os.File }

func (r rawFile) Size() int64 {
	st, err := r.Stat()
	if err != nil {
		return 0
	}
	return st.Size()
}

// vhdChain reads a VHD chain as tapdisk's vhd driver does (each sector
// from the nearest image that holds it, plugins/vhd.Chain) and writes to
// the leaf only.
type vhdChain struct {
	chain *vhd.Chain
	leaf  *vhd.Image
}

func openVHD(path string, readOnly bool) (blockIO, error) {
	c, err := vhd.OpenChain(path)
	if err != nil {
		return nil, err
	}
	v := &vhdChain{chain: c, leaf: c.Images[0]}
	if !readOnly {
		// Reopen the leaf writable in place of OpenChain's read-only
		// copy, so reads see the leaf's own writes (one block table).
		w, err := vhd.Open(path, true)
		if err != nil {
			c.Close()
			return nil, err
		}
		c.Images[0].Close()
		c.Images[0], v.leaf = w, w
	}
	return v, nil
}

func (v *vhdChain) ReadAt(p []byte, off int64) (int, error)  { return v.chain.ReadAt(p, off) }
func (v *vhdChain) WriteAt(p []byte, off int64) (int, error) { return v.leaf.WriteAt(p, off) }
func (v *vhdChain) Sync() error                              { return v.leaf.Sync() }
func (v *vhdChain) Size() int64                              { return v.chain.VirtualSize() }
func (v *vhdChain) Close() error {
	err := v.leaf.Sync()
	v.chain.Close()
	return err
}

// qcow2Image is a qcow2 chain served by a private qemu-nbd (qemu's qcow2
// driver follows backing files), reached as an NBD client. qemu-nbd opens
// the files once, by path, and keeps them open: a rename does not move it.
type qcow2Image struct {
	*nbdClient
	cmd  *exec.Cmd
	sock string
}

func openQcow2(path string, readOnly bool, minor int) (blockIO, error) {
	sock := filepath.Join(stateDir, fmt.Sprintf("qemu%d-%d.sock", os.Getpid(), minor))
	_ = os.Remove(sock)
	if _, err := os.Stat(path); err != nil {
		return nil, fail(syscall.ENOENT, "%v", err)
	}
	// Default cache (writeback; O_DIRECT fails on tmpfs): Close flushes.
	args := []string{"-k", sock, "-f", "qcow2", path}
	if readOnly {
		// tapdisk takes no image locks; qemu does. A reader must not
		// stop the volume plugin from rewriting a chain it shares (a
		// backup attached in dom0 while the GC commits into the base):
		// force-share, inherited by the backing files.
		args = []string{"-k", sock, "--read-only", "--image-opts",
			"driver=qcow2,read-only=on,force-share=on,file.driver=file,file.filename=" + strings.ReplaceAll(path, ",", ",,")}
	}
	cmd := exec.Command("qemu-nbd", args...)
	log, err := os.OpenFile(filepath.Join(stateDir, fmt.Sprintf("qemu-nbd%d.log", minor)), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	for i := 0; i < 500; i++ {
		c, err := dialNBD(sock)
		if err == nil {
			return &qcow2Image{nbdClient: c, cmd: cmd, sock: sock}, nil
		}
		select {
		case <-exited:
			b, _ := os.ReadFile(log.Name())
			return nil, fmt.Errorf("qemu-nbd %s exited: %s", path, b)
		case <-time.After(20 * time.Millisecond):
		}
	}
	_ = cmd.Process.Kill()
	return nil, errors.New("qemu-nbd did not start serving " + path)
}

// Close flushes, disconnects and waits for qemu-nbd to exit (it serves
// one client), so the image is complete on disk when Close returns.
func (q *qcow2Image) Close() error {
	err := q.Sync()
	logf("qemu-nbd %d: flushed (%v), disconnecting", q.cmd.Process.Pid, err)
	_ = q.nbdClient.Close()
	done := make(chan struct{})
	go func() { _, _ = q.cmd.Process.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = q.cmd.Process.Kill()
		<-done
	}
	_ = os.Remove(q.sock)
	return err
}

// tapdiskServer is the fake tapdisk daemon's state.
type tapdiskServer struct {
	mu   sync.Mutex
	vbds map[int]*vbd
}

// tapdisk is the fake daemon: it serves its devices until told to stop,
// and answers tap-ctl on its control socket.
func tapdisk() {
	s := &tapdiskServer{vbds: map[int]*vbd{}}
	tdLog, _ = os.OpenFile(filepath.Join(stateDir, fmt.Sprintf("tapdisk%d.log", os.Getpid())), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	// The socket appears under its name only once it listens (bind, listen,
	// rename): tap-ctl spawn returns when the name exists, and a connect
	// between bind and listen would be refused.
	sock := ctlSocket(os.Getpid())
	_ = os.Remove(sock + ".new")
	l, err := net.Listen("unix", sock+".new")
	if err == nil {
		err = os.Rename(sock+".new", sock)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tapdisk:", err)
		os.Exit(1)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go s.control(c)
		}
	}()
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT)
	<-ch
	l.Close()
	_ = os.Remove(sock)
}

func (s *tapdiskServer) control(c net.Conn) {
	defer c.Close()
	var req ctlRequest
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		return
	}
	var resp ctlResponse
	logf("%s minor %d %s:%s ro=%v: start", req.Op, req.Minor, req.Type, req.Path, req.ReadOnly)
	err := s.handle(req)
	logf("%s minor %d: %v", req.Op, req.Minor, err)
	if err != nil {
		resp.Msg = err.Error()
		resp.Errno = int(syscall.EIO)
		var en *tapdiskfake.Errno
		var sys syscall.Errno
		switch {
		case errors.As(err, &en):
			resp.Errno = int(en.Code)
		case errors.As(err, &sys):
			resp.Errno = int(sys)
		}
	}
	_ = json.NewEncoder(c).Encode(resp)
}

func (s *tapdiskServer) handle(req ctlRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.vbds[req.Minor]
	switch req.Op {
	case "open":
		if d != nil {
			return fail(syscall.EBUSY, "minor %d is open", req.Minor)
		}
		return s.open(req)
	}
	if d == nil {
		return fail(syscall.ENODEV, "minor %d is not open in this tapdisk", req.Minor)
	}
	switch req.Op {
	case "close":
		delete(s.vbds, req.Minor)
		return d.close()
	case "pause":
		return d.pause()
	case "unpause":
		return d.unpause(req, req.Minor)
	}
	return fail(syscall.EINVAL, "unknown request %q", req.Op)
}

func (s *tapdiskServer) open(req ctlRequest) error {
	img, err := openImage(req.Type, req.Path, req.ReadOnly, req.Minor)
	if err != nil {
		return err
	}
	d := &vbd{typ: req.Type, path: req.Path, readOnly: req.ReadOnly, img: img, bytes: img.Size(), clients: map[net.Conn]bool{}}
	d.cond = sync.NewCond(&d.mu)
	sock := nbdSocket(req.Minor)
	_ = os.Remove(sock)
	if d.listener, err = net.Listen("unix", sock); err != nil {
		img.Close()
		return err
	}
	go func() {
		for {
			c, err := d.listener.Accept()
			if err != nil {
				return
			}
			d.mu.Lock()
			d.clients[c] = true
			d.mu.Unlock()
			d.conns.Add(1)
			go func() {
				defer d.conns.Done()
				defer c.Close()
				if serverHandshake(c, d.bytes, transmissionFlags(d.readOnly)) == nil {
					_ = serve(c, d)
				}
			}()
		}
	}()
	if req.Kernel {
		k, conn, err := connectKernel(req.Minor, img.Size(), req.ReadOnly)
		if err != nil {
			d.listener.Close()
			img.Close()
			return err
		}
		d.kernel = k
		go func() { _ = serve(conn, d); conn.Close() }()
	}
	s.vbds[req.Minor] = d
	return nil
}

// pause waits for the request in flight, flushes and closes the image;
// later requests wait in do until unpause. Pausing a paused device does
// nothing, as in tapdisk_vbd_pause.
func (d *vbd) pause() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.paused {
		return nil
	}
	d.paused = true
	var err error
	if d.img != nil {
		err = d.img.Close()
		d.img = nil
	}
	return err
}

// unpause reopens the image (the same path, or the one given) and lets
// the queued requests go. Like tapdisk_vbd_resume: EINVAL if the device
// is not paused, EMEDIUMTYPE if the size changed; a failed resume leaves
// the device paused with nothing open.
func (d *vbd) unpause(req ctlRequest, minor int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.paused {
		return fail(syscall.EINVAL, "resume request for unpaused vbd %d", minor)
	}
	typ, path := d.typ, d.path
	if req.Path != "" {
		typ, path = req.Type, req.Path
	}
	img, err := openImage(typ, path, d.readOnly, minor)
	if err != nil {
		return err
	}
	if img.Size() != d.bytes {
		img.Close()
		return fail(syscall.EMEDIUMTYPE, "%s:%s has size %d, the device %d", typ, path, img.Size(), d.bytes)
	}
	d.img, d.typ, d.path, d.paused = img, typ, path, false
	d.cond.Broadcast()
	return nil
}

// close drops the clients (the kernel flushes first) and closes the image.
func (d *vbd) close() error {
	d.mu.Lock()
	// Requests still waiting on a pause fail; there is no image to resume.
	d.closing = d.paused
	d.cond.Broadcast()
	d.mu.Unlock()
	if d.kernel != nil {
		logf("%s: disconnecting the kernel device", d.path)
		d.kernel.disconnect()
		logf("%s: kernel device disconnected", d.path)
	}
	d.mu.Lock()
	d.closing = true
	d.cond.Broadcast()
	for c := range d.clients {
		c.Close()
	}
	d.mu.Unlock()
	d.listener.Close()
	d.conns.Wait()
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.img != nil {
		err := d.img.Close()
		d.img = nil
		return err
	}
	return nil
}
