// Command vmrun runs a bash script as root in a fresh VM-tier guest (see
// package tests/vm) and streams its output, for `make demo` and for trying
// things by hand:
//
//	go run ./tests/vm/cmd/vmrun -tpm -disk 64M -- 'lsblk; ls /dev/tpmrm0'
//	go run ./tests/vm/cmd/vmrun -tpm -disk 64M -f demo.sh
//
// The host filesystem is visible read-only in the guest (binaries built on
// the host run there unchanged), -workdir is shared read-write at the same
// path and is the script's working directory. The exit status is the
// script's; 125 means the guest could not be run.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/tests/vm"
)

type diskSizes []int64

func (d *diskSizes) String() string { return fmt.Sprint(*d) }

func (d *diskSizes) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*d = append(*d, n)
	return nil
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q (use e.g. 64M)", s)
	}
	return n * mult, nil
}

func main() {
	os.Exit(run())
}

func run() int {
	var disks diskSizes
	tpm := flag.Bool("tpm", false, "attach a fresh swtpm vTPM")
	flag.Var(&disks, "disk", "add a fresh sparse disk of this size (64M, 1G); repeatable: /dev/vda, /dev/vdb, ...")
	mem := flag.Int("mem", 0, "guest memory in MiB (default 1024)")
	file := flag.String("f", "", "read the script from this file instead of the arguments")
	workdir := flag.String("workdir", "", "host directory to share read-write (default: a temporary one)")
	keep := flag.Bool("keep", false, "keep the temporary directory (disk images, console log)")
	timeout := flag.Duration("timeout", 30*time.Minute, "limit for the script")
	verbose := flag.Bool("v", false, "log boot progress")
	flag.Parse()

	log := logrus.New()
	log.SetOutput(os.Stderr)
	if !*verbose {
		log.SetLevel(logrus.WarnLevel)
	}
	script := strings.Join(flag.Args(), " ")
	if *file != "" {
		b, err := os.ReadFile(*file)
		if err != nil {
			log.WithError(err).Error("cannot read the script")
			return 125
		}
		script = string(b)
	}
	if strings.TrimSpace(script) == "" {
		fmt.Fprintln(os.Stderr, "usage: vmrun [-tpm] [-disk 64M]... [-f script.sh | -- 'script']")
		return 125
	}
	dir, err := os.MkdirTemp("", "vmrun")
	if err != nil {
		log.WithError(err).Error("cannot create a temporary directory")
		return 125
	}
	if *keep {
		log.WithField("dir", dir).Warn("keeping the machine directory")
	} else {
		defer os.RemoveAll(dir)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	m, err := vm.Launch(ctx, vm.Config{
		Disks: disks, TPM: *tpm, MemoryMiB: *mem, WorkDir: *workdir,
		RunTimeout: *timeout, Log: log,
	}, dir)
	if err != nil {
		log.WithError(err).Error("cannot start the guest")
		return 125
	}
	defer m.Close()
	rc, err := m.Exec(ctx, script, os.Stdout)
	if err != nil {
		if !errors.Is(err, context.Canceled) {
			fmt.Fprintf(os.Stderr, "--- guest console (tail) ---\n%s\n", m.ConsoleTail())
		}
		log.WithError(err).Error("the script did not finish")
		return 125
	}
	return rc
}
