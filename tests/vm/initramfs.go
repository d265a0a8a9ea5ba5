package vm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	_ "embed"
)

// stage1Init is /init of the initramfs: load the 9p modules, mount the
// host root and the control share, switch_root into the host root.
//
//go:embed guest/init1.sh
var stage1Init []byte

// initramfsModules are what stage 1 needs to reach the host root over
// virtio-9p and lay overlays on it, plus the guest's other virtio devices:
// insmod from RAM is much cheaper than modprobe over 9p. Dependencies are
// added from modules.dep.
var initramfsModules = []string{"virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_blk", "virtio_console", "virtio_rng"}

// BusyboxPath is where busybox-static installs the binary.
var BusyboxPath = "/bin/busybox"

var initramfsOnce struct {
	sync.Once
	data []byte
	err  error
}

// initramfs returns the initramfs for k, built once per process and kept in
// memory (about 2 MB): each Machine writes its own copy into its temp dir,
// so nothing is left behind at a fixed path or after the process ends.
func initramfs(k Kernel) ([]byte, error) {
	initramfsOnce.Do(func() {
		initramfsOnce.data, initramfsOnce.err = buildInitramfs(k)
	})
	return initramfsOnce.data, initramfsOnce.err
}

func buildInitramfs(k Kernel) ([]byte, error) {
	if err := checkStatic(BusyboxPath); err != nil {
		return nil, err
	}
	bb, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return nil, fmt.Errorf("%w: read busybox: %v", ErrUnavailable, err)
	}
	mods, err := moduleLoadOrder(k.ModulesDir, initramfsModules)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	w := newCpioWriter(&buf)
	for _, d := range []string{"bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"} {
		w.dir(d, 0o755)
	}
	w.charDev("dev/console", 0o600, 5, 1)
	w.charDev("dev/null", 0o666, 1, 3)
	w.file("bin/busybox", 0o755, bb)
	w.file("init", 0o755, stage1Init)
	var order []string
	for _, m := range mods {
		data, err := readModule(filepath.Join(k.ModulesDir, m))
		if err != nil {
			return nil, err
		}
		name := moduleName(m)
		w.file("lib/modules/"+name+".ko", 0o644, data)
		order = append(order, name)
	}
	// Stage 1 insmods in this order: busybox insmod does not resolve
	// dependencies, so the order is the dependency order.
	w.file("lib/modules/order", 0o644, []byte(strings.Join(order, "\n")+"\n"))
	if err := w.close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// checkStatic refuses a dynamically linked busybox (Debian's "busybox"
// package, not "busybox-static"): the initramfs has no libc.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("%w: %s: %v (install busybox-static)", ErrUnavailable, path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%w: %s is dynamically linked (install busybox-static)", ErrUnavailable, path)
		}
	}
	return nil
}

// moduleName turns "kernel/fs/9p/9p.ko.xz" into "9p" and normalises '-' to
// '_' the way the kernel does.
func moduleName(path string) string {
	base := filepath.Base(path)
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return strings.ReplaceAll(base, "-", "_")
}

// moduleLoadOrder resolves targets and their dependencies from modules.dep
// into a load order (dependencies first), as paths relative to modsDir.
// Targets built into the kernel (modules.builtin) need nothing.
func moduleLoadOrder(modsDir string, targets []string) ([]string, error) {
	deps := map[string][]string{} // module path -> dependency paths
	byName := map[string]string{} // module name -> path
	f, err := os.Open(filepath.Join(modsDir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
		byName[moduleName(mod)] = mod
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(modsDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[moduleName(l)] = true
		}
	}
	var order []string
	seen := map[string]bool{}
	var visit func(p string)
	visit = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		for _, d := range deps[p] {
			visit(d)
		}
		order = append(order, p)
	}
	for _, t := range targets {
		p, ok := byName[strings.ReplaceAll(t, "-", "_")]
		if !ok {
			if builtin[t] {
				continue
			}
			return nil, fmt.Errorf("%w: kernel module %s not found in %s", ErrUnavailable, t, modsDir)
		}
		visit(p)
	}
	return order, nil
}

// readModule returns a module uncompressed: busybox insmod wants plain .ko.
func readModule(path string) ([]byte, error) {
	switch {
	case strings.HasSuffix(path, ".ko"):
		return os.ReadFile(path)
	case strings.HasSuffix(path, ".ko.gz"):
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		z, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		return io.ReadAll(z)
	case strings.HasSuffix(path, ".ko.xz"):
		return decompressWith("xz", path)
	case strings.HasSuffix(path, ".ko.zst"):
		return decompressWith("zstd", path)
	}
	return nil, fmt.Errorf("%w: unknown module compression: %s", ErrUnavailable, path)
}

func decompressWith(tool, path string) ([]byte, error) {
	bin, err := exec.LookPath(tool)
	if err != nil {
		return nil, fmt.Errorf("%w: %s is compressed and %s is not installed", ErrUnavailable, path, tool)
	}
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "-dc", path)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decompress %s: %w: %s", path, err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}
