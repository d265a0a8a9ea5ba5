package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	_ "embed"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/testenv"
)

//go:embed guest/init2.sh
var stage2Init []byte

// Config describes a guest.
type Config struct {
	// Disks are the sizes in bytes of fresh sparse raw disks, seen as
	// /dev/vda, /dev/vdb, ... with serials luksext-disk0, luksext-disk1, ...
	Disks []int64
	// MemoryMiB defaults to 1024.
	MemoryMiB int
	// TPM attaches an swtpm vTPM with fresh state (/dev/tpm0, /dev/tpmrm0).
	TPM bool

	// CPUs defaults to 1. The fast (PVH, no ACPI) boot finds only one CPU
	// anyway, and on 2 shared host cores a second TCG thread per guest
	// mostly competes with the other guests.
	CPUs int
	// BootTimeout bounds each boot up to the agent; default 5 minutes
	// (about 4 s on an idle machine, much more when CI runs guests in
	// parallel on 2 cores).
	BootTimeout time.Duration
	// RunTimeout bounds each Run; default 10 minutes (crypto under TCG is
	// slow: about 1 MiB/s of AES, tens of seconds per clevis bind).
	RunTimeout time.Duration
	// WorkDir is the host directory shared read-write with the guest at
	// the same path; default a fresh directory of the machine's own.
	WorkDir string
	// Log receives boot progress and timings; default stderr (Start: the
	// test log).
	Log logrus.FieldLogger
}

const (
	defaultMemoryMiB   = 1024
	defaultCPUs        = 1
	defaultBootTimeout = 5 * time.Minute
	defaultRunTimeout  = 10 * time.Minute
	powerOffTimeout    = 2 * time.Minute
	consoleTailBytes   = 6000
	// persistDirs get writable overlays whose upper layers survive Reboot:
	// on a real host they are on disk (/mnt too: tests mount things there).
	persistDirs = "usr etc var opt root home srv mnt media"
	// hostRoot9p are the mount options of the read-only host root.
	// cache=loose lets the guest keep host binaries and libraries in its
	// page cache: every exec otherwise re-reads them over 9p, which made
	// boots 3x slower (udev alone went from ~6 s to ~19 s) and clevis's
	// many small processes crawl. The price: a file the host changes under
	// / while the guest runs may be seen stale; build into WorkDir (no
	// caching) instead, or drop the guest's caches. LUKSEXT_VM_9P overrides
	// these options for experiments.
	hostRoot9p = "msize=512000,cache=loose"
)

// Machine is a guest with its disks and vTPM; it can be booted many times.
type Machine struct {
	cfg     Config
	log     logrus.FieldLogger
	kernel  Kernel
	pvh     *os.File // unpacked kernel, nil: boot the bzImage
	qemuBin string
	tpmBin  string

	dir     string // disks, console log, control share
	sockDir string // short path for unix sockets (108-byte limit)
	ctlDir  string
	workDir string
	disks   []string
	initrd  string
	tpmGen  int // ReplaceTPM bumps it: a new state directory
	bootNum int
	nextID  int
	idMu    sync.Mutex
	bootMu  sync.Mutex
	cur     *boot
	closed  bool
}

// Launch prepares a machine in dir (which must exist and be empty-ish and
// is not removed: the caller owns it) and boots it. It is the error-
// returning core of Start, for the vmrun command.
func Launch(ctx context.Context, cfg Config, dir string) (*Machine, error) {
	m, err := newMachine(cfg, dir)
	if err != nil {
		return nil, err
	}
	if err := m.boot(ctx); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

func newMachine(cfg Config, dir string) (*Machine, error) {
	if cfg.MemoryMiB <= 0 {
		cfg.MemoryMiB = defaultMemoryMiB
	}
	if cfg.CPUs <= 0 {
		cfg.CPUs = defaultCPUs
	}
	if cfg.BootTimeout <= 0 {
		cfg.BootTimeout = defaultBootTimeout
	}
	if cfg.RunTimeout <= 0 {
		cfg.RunTimeout = defaultRunTimeout
	}
	m := &Machine{cfg: cfg, dir: dir, log: cfg.Log}
	if m.log == nil {
		l := logrus.New()
		l.SetOutput(os.Stderr)
		m.log = l
	}
	m.log = m.log.WithField("component", "vm")
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: QEMU's 9p passthrough of the host root and the kernel image need root", ErrUnavailable)
	}
	var err error
	if m.qemuBin, err = testenv.LookPath("qemu-system-x86_64"); err != nil {
		return nil, fmt.Errorf("%w: qemu-system-x86_64 not found (install qemu-system-x86)", ErrUnavailable)
	}
	if cfg.TPM {
		if m.tpmBin, err = testenv.LookPath("swtpm"); err != nil {
			return nil, fmt.Errorf("%w: swtpm not found (install swtpm)", ErrUnavailable)
		}
	}
	if m.kernel, err = FindKernel(); err != nil {
		return nil, err
	}
	if m.pvh, err = pvhKernel(m.kernel); err != nil {
		m.log.WithError(err).Info("booting the compressed kernel (slower)")
		m.pvh = nil
	}
	img, err := initramfs(m.kernel)
	if err != nil {
		return nil, err
	}
	m.ctlDir = filepath.Join(dir, "ctl")
	for _, d := range []string{m.ctlDir, filepath.Join(m.ctlDir, "q"), filepath.Join(m.ctlDir, "state")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	m.workDir = cfg.WorkDir
	if m.workDir == "" {
		m.workDir = filepath.Join(dir, "work")
	}
	if m.workDir, err = filepath.Abs(m.workDir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(m.workDir, 0o755); err != nil {
		return nil, err
	}
	m.initrd = filepath.Join(dir, "initramfs.cpio")
	if err := os.WriteFile(m.initrd, img, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(m.ctlDir, "init2.sh"), stage2Init, 0o755); err != nil {
		return nil, err
	}
	for i, size := range cfg.Disks {
		p := filepath.Join(dir, fmt.Sprintf("disk%d.img", i))
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return nil, err
		}
		err = f.Truncate(size)
		f.Close()
		if err != nil {
			return nil, err
		}
		m.disks = append(m.disks, p)
	}
	// Unix socket paths are limited to 108 bytes and test temp dirs carry
	// the test name, so the sockets live in a short directory of their own.
	if m.sockDir, err = os.MkdirTemp("", "lxvm"); err != nil {
		return nil, err
	}
	return m, nil
}

// DiskPath is the host path of disk image i.
func (m *Machine) DiskPath(i int) string { return m.disks[i] }

// WorkDir is the directory shared read-write with the guest; the guest
// sees it at the same path, and scripts start in it.
func (m *Machine) WorkDir() (host, guest string) { return m.workDir, m.workDir }

// replaceTPM gives the guest a new, empty TPM from the next boot on.
func (m *Machine) replaceTPM() {
	m.bootMu.Lock()
	defer m.bootMu.Unlock()
	m.tpmGen++
}

func (m *Machine) tpmStateDir() string {
	return filepath.Join(m.dir, fmt.Sprintf("tpm%d", m.tpmGen))
}

// ConsoleTail is the end of the guest's serial console log (all boots).
func (m *Machine) ConsoleTail() string {
	b, err := os.ReadFile(filepath.Join(m.dir, "console.log"))
	if err != nil {
		return "(no console log: " + err.Error() + ")"
	}
	if len(b) > consoleTailBytes {
		b = b[len(b)-consoleTailBytes:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	s := string(b)
	if q, err := os.ReadFile(filepath.Join(m.dir, "qemu.log")); err == nil && len(q) > 0 {
		s += "\n--- qemu stderr ---\n" + string(q)
	}
	return s
}

// boot is one power-on of the machine.
type boot struct {
	qemu     *exec.Cmd
	swtpm    *exec.Cmd
	exited   chan struct{} // closed when QEMU has exited
	exitErr  error
	tpmDone  chan struct{}
	agent    *agentConn
	listener interface{ Close() error }
}

func (m *Machine) boot(ctx context.Context) error {
	m.bootMu.Lock()
	defer m.bootMu.Unlock()
	if m.closed {
		return fmt.Errorf("%w: machine was shut down", ErrGuestStopped)
	}
	if m.cur != nil {
		return errors.New("vm: boot while running")
	}
	m.bootNum++
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, m.cfg.BootTimeout)
	defer cancel()

	env := fmt.Sprintf("WORKDIR=%s\nPERSIST_DIRS=%q\nBOOT=%d\n", shellQuote(m.workDir), persistDirs, m.bootNum)
	if err := os.WriteFile(filepath.Join(m.ctlDir, "boot.env"), []byte(env), 0o644); err != nil {
		return err
	}
	b := &boot{exited: make(chan struct{})}
	m.cur = b
	agentSock := filepath.Join(m.sockDir, "agent.sock")
	os.Remove(agentSock)
	ln, err := listenAgent(agentSock)
	if err != nil {
		return err
	}
	b.listener = ln
	args := m.qemuArgs(agentSock)
	if m.cfg.TPM {
		tpmSock := filepath.Join(m.sockDir, "tpm.sock")
		if err := m.startSwtpm(ctx, b, tpmSock); err != nil {
			m.stopLocked()
			return err
		}
		args = append(args,
			"-chardev", "socket,id=chrtpm,path="+tpmSock,
			"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
			"-device", "tpm-tis,tpmdev=tpm0")
	}
	qlog, err := os.Create(filepath.Join(m.dir, "qemu.log"))
	if err != nil {
		m.stopLocked()
		return err
	}
	b.qemu = exec.Command(m.qemuBin, args...)
	b.qemu.Stdout, b.qemu.Stderr = qlog, qlog
	if m.pvh != nil {
		b.qemu.ExtraFiles = []*os.File{m.pvh}
	}
	b.qemu.SysProcAttr = childAttr()
	if err := b.qemu.Start(); err != nil {
		qlog.Close()
		m.stopLocked()
		return fmt.Errorf("%w: start qemu: %v", ErrBoot, err)
	}
	go func() {
		b.exitErr = b.qemu.Wait()
		qlog.Close()
		close(b.exited)
	}()
	m.log.WithFields(logrus.Fields{"boot": m.bootNum, "pid": b.qemu.Process.Pid}).Debug("qemu started")

	b.agent, err = acceptAgent(ctx, ln, b.exited)
	if err == nil {
		err = b.agent.waitReady(ctx, b.exited)
	}
	if err != nil {
		m.stopLocked()
		return fmt.Errorf("%w: %v\n--- guest console (tail) ---\n%s", ErrBoot, err, m.ConsoleTail())
	}
	m.log.WithFields(logrus.Fields{"boot": m.bootNum, "seconds": time.Since(start).Seconds()}).Info("guest booted")
	return nil
}

func (m *Machine) qemuArgs(agentSock string) []string {
	opts9p := hostRoot9p
	if v := os.Getenv("LUKSEXT_VM_9P"); v != "" {
		opts9p = v
	}
	kimg := m.kernel.Image
	if m.pvh != nil {
		kimg = "/proc/self/fd/3" // cmd.ExtraFiles[0]
	}
	args := []string{
		"-nodefaults", "-no-user-config", "-display", "none",
		"-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
		"-smp", strconv.Itoa(m.cfg.CPUs), "-m", strconv.Itoa(m.cfg.MemoryMiB),
		"-no-reboot",
		"-kernel", kimg, "-initrd", m.initrd,
		"-append", strings.Join([]string{
			"console=ttyS0", "panic=-1", "loglevel=4", "printk.time=1",
			// Skip probing hardware the guest does not have: under TCG
			// every probe costs real seconds.
			"i8042.noaux", "i8042.nokbd", "i8042.nopnp", "8250.nr_uarts=1",
			// The kernel's crypto self-tests take ~3 s of TCG time
			// at every boot; the host kernel package ran them already.
			"cryptomgr.notests",
			"luksext.9p=" + opts9p,
		}, " ") + m.pvhCmdline(),
		"-chardev", "file,id=console,append=on,path=" + filepath.Join(m.dir, "console.log"),
		"-serial", "chardev:console",
		"-device", "virtio-rng-pci",
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
		"-virtfs", "local,path=" + m.ctlDir + ",mount_tag=luksextctl,security_model=passthrough,multidevs=remap",
		"-virtfs", "local,path=" + m.workDir + ",mount_tag=luksextwork,security_model=passthrough,multidevs=remap",
		"-chardev", "socket,id=agent,path=" + agentSock,
		"-device", "virtio-serial-pci",
		"-device", "virtserialport,chardev=agent,name=luksext.agent",
	}
	for i, d := range m.disks {
		args = append(args,
			"-drive", fmt.Sprintf("file=%s,if=none,id=disk%d,format=raw,cache=unsafe,discard=unmap", d, i),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=disk%d,serial=luksext-disk%d", i, i))
	}
	return args
}

// pvhCmdline works around QEMU 7.2 loading the initrd of a PVH boot over
// the top of SeaBIOS's ACPI tables when they exceed the 128 KiB QEMU
// reserves for them (a vTPM's event log makes them larger): the kernel then
// finds corrupt tables. The guest runs without ACPI (SMP from the MP table,
// virtio on MSI-X), finds the TPM at its fixed TIS address, and is powered
// off by the host after it has synced.
func (m *Machine) pvhCmdline() string {
	if m.pvh == nil {
		return ""
	}
	s := " acpi=off"
	if m.cfg.TPM {
		s += " tpm_tis.force=1"
	}
	return s
}

func (m *Machine) startSwtpm(ctx context.Context, b *boot, sock string) error {
	state := m.tpmStateDir()
	if err := os.MkdirAll(state, 0o700); err != nil {
		return err
	}
	os.Remove(sock)
	tlog, err := os.OpenFile(filepath.Join(m.dir, "swtpm.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	b.swtpm = exec.Command(m.tpmBin, "socket", "--tpm2",
		"--tpmstate", "dir="+state,
		"--ctrl", "type=unixio,path="+sock,
		"--flags", "startup-clear")
	b.swtpm.Stdout, b.swtpm.Stderr = tlog, tlog
	b.swtpm.SysProcAttr = childAttr()
	if err := b.swtpm.Start(); err != nil {
		tlog.Close()
		return fmt.Errorf("%w: start swtpm: %v", ErrBoot, err)
	}
	b.tpmDone = make(chan struct{})
	go func() {
		b.swtpm.Wait()
		tlog.Close()
		close(b.tpmDone)
	}()
	for {
		if _, err := os.Stat(sock); err == nil {
			return nil
		}
		select {
		case <-b.tpmDone:
			out, _ := os.ReadFile(filepath.Join(m.dir, "swtpm.log"))
			return fmt.Errorf("%w: swtpm exited at start: %s", ErrBoot, out)
		case <-ctx.Done():
			return fmt.Errorf("%w: swtpm socket did not appear", ErrBoot)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stopLocked kills whatever runs of the current boot and waits for it.
func (m *Machine) stopLocked() {
	b := m.cur
	if b == nil {
		return
	}
	m.cur = nil
	if b.listener != nil {
		b.listener.Close()
	}
	if b.agent != nil {
		b.agent.close()
	}
	if b.qemu != nil && b.qemu.Process != nil {
		select {
		case <-b.exited:
		default:
			b.qemu.Process.Kill()
			<-b.exited
		}
	}
	if b.swtpm != nil && b.swtpm.Process != nil {
		// SIGTERM lets swtpm write its state; the NV state it keeps
		// across boots is written as it changes anyway.
		b.swtpm.Process.Signal(syscall.SIGTERM)
		select {
		case <-b.tpmDone:
		case <-time.After(10 * time.Second):
			b.swtpm.Process.Kill()
			<-b.tpmDone
		}
	}
}

// Exec runs a bash script as root in the guest, streaming its combined
// output to out (may be nil) while it runs, and returns its exit code.
// Several Execs may run at once.
func (m *Machine) Exec(ctx context.Context, script string, out io.Writer) (int, error) {
	m.bootMu.Lock()
	b := m.cur
	m.bootMu.Unlock()
	if b == nil {
		return -1, fmt.Errorf("%w: the machine is not running", ErrGuestStopped)
	}
	if out == nil {
		out = io.Discard
	}
	ctx, cancel := context.WithTimeout(ctx, m.cfg.RunTimeout)
	defer cancel()
	m.idMu.Lock()
	m.nextID++
	id := fmt.Sprintf("%d-%d", m.bootNum, m.nextID)
	m.idMu.Unlock()
	scriptPath := filepath.Join(m.ctlDir, "q", id+".sh")
	outPath := filepath.Join(m.ctlDir, "q", id+".out")
	if err := os.WriteFile(scriptPath, []byte(script), 0o644); err != nil {
		return -1, err
	}
	defer os.Remove(scriptPath)
	defer os.Remove(outPath)
	done, err := b.agent.run(id)
	if err != nil {
		return -1, err
	}
	tail := &fileTail{path: outPath, w: out}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case rc := <-done:
			return rc, tail.pump()
		case <-tick.C:
			if err := tail.pump(); err != nil {
				return -1, err
			}
		case <-b.agent.closed:
			tail.pump()
			return -1, fmt.Errorf("%w while running a script", ErrGuestStopped)
		case <-b.exited:
			tail.pump()
			return -1, fmt.Errorf("%w while running a script (QEMU exited: %v)", ErrGuestStopped, b.exitErr)
		case <-ctx.Done():
			tail.pump()
			b.agent.forget(id)
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return -1, fmt.Errorf("%w (Config.RunTimeout is %s)", ErrTimeout, m.cfg.RunTimeout)
			}
			return -1, ctx.Err()
		}
	}
}

// RebootContext syncs, saves the overlay upper layers, powers the guest off
// and boots it again with the same disks and TPM state (or a new TPM after
// ReplaceTPM).
func (m *Machine) RebootContext(ctx context.Context) error {
	start := time.Now()
	if err := m.PowerOff(ctx); err != nil {
		return err
	}
	if err := m.boot(ctx); err != nil {
		return err
	}
	m.log.WithField("seconds", time.Since(start).Seconds()).Info("guest rebooted")
	return nil
}

// PowerOff saves what must survive a reboot and powers the guest off.
func (m *Machine) PowerOff(ctx context.Context) error {
	m.bootMu.Lock()
	defer m.bootMu.Unlock()
	b := m.cur
	if b == nil {
		return fmt.Errorf("%w: the machine is not running", ErrGuestStopped)
	}
	ctx, cancel := context.WithTimeout(ctx, powerOffTimeout)
	defer cancel()
	rc, err := b.agent.save(ctx, b.exited)
	if err == nil && rc != 0 {
		err = fmt.Errorf("saving /etc, /var, ... failed in the guest (exit %d)", rc)
	}
	if err != nil {
		m.stopLocked()
		return fmt.Errorf("%w: %v\n--- guest console (tail) ---\n%s", ErrGuestStopped, err, m.ConsoleTail())
	}
	// Without ACPI the guest cannot switch itself off: it syncs, says so,
	// and QEMU is asked to quit (SIGTERM makes QEMU close its disk images
	// cleanly).
	if err := b.agent.syncForPowerOff(ctx, b.exited); err != nil {
		m.log.WithError(err).Warn("guest did not confirm sync before power off")
	}
	b.qemu.Process.Signal(syscall.SIGTERM)
	select {
	case <-b.exited:
	case <-ctx.Done():
		m.log.Warn("QEMU did not exit in time; killing it")
	}
	m.stopLocked()
	return nil
}

// Close kills QEMU and swtpm (no saving) and removes the socket directory.
// Safe to call more than once.
func (m *Machine) Close() {
	m.bootMu.Lock()
	defer m.bootMu.Unlock()
	if m.closed {
		return
	}
	m.closed = true
	m.stopLocked()
	os.RemoveAll(m.sockDir)
}

// fileTail copies what a guest script appended to its output file so far.
type fileTail struct {
	path string
	w    io.Writer
	off  int64
}

func (f *fileTail) pump() error {
	fh, err := os.Open(f.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer fh.Close()
	if _, err := fh.Seek(f.off, io.SeekStart); err != nil {
		return err
	}
	n, err := io.Copy(f.w, fh)
	f.off += n
	return err
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// childAttr puts QEMU and swtpm in their own process group and kills them
// if the test process dies without cleaning up (a panic or go test's
// timeout), so no emulator outlives its test.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
