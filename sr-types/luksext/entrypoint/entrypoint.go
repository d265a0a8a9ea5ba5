// Package entrypoint is the whole main of each luksext binary: volume/main.go
// and datapath/main.go call one function here and nothing else, and tests
// exec the built binaries, so no mode can work in a test and not in the
// product. It sits above the SR type (package luksext) and the operator
// command (package operator), the two rooms it dispatches to.
package entrypoint

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/operator"
)

// Invocation is a process's command line and standard streams.
type Invocation struct {
	Args           []string
	Stdin          io.Reader
	Stdout, Stderr io.Writer
}

// Volume is the whole main of the volume binary, which answers to
// three kinds of invocation:
//
//   - argv[0] basename "luksext" (the /usr/sbin/luksext symlink): the
//     operator command (operator.Main);
//   - argv[1] "gc": the SR's garbage collector, as StartGC spawns it
//     (luksext.RunGC);
//   - anything else: an SMAPIv3 method named by argv[0]'s basename
//     (SR.create, Volume.snapshot, ...), or --list-methods.
//
// volume/main.go calls only this (and datapath/main.go only Datapath), and
// tests exec the built binary rather than answering any of these modes
// themselves, so no mode can work in a test and not in the product.
func Volume(inv Invocation) int {
	if filepath.Base(inv.Args[0]) == operator.Command {
		return operator.Main(operator.Invocation(inv))
	}
	if len(inv.Args) > 1 && inv.Args[1] == luksext.GCCommand {
		return luksext.RunGC(inv.Args[2:])
	}
	return serve(inv, "volume", luksext.VolumeTable)
}

// Datapath is the whole main of the datapath binary: an SMAPIv3 Datapath.*
// method named by argv[0]'s basename, or --list-methods.
func Datapath(inv Invocation) int { return serve(inv, "datapath", luksext.DatapathTable) }

// serve answers one SMAPIv3 call of the plugin kind (or --list-methods,
// which the install layout and the RPM use to make the method symlinks).
func serve(inv Invocation, kind string, tableOf func(luksext.Deps) smapi.Table) int {
	log := logging.New(logging.Options{Plugin: kind, Stderr: inv.Stderr, Syslog: true})
	table := tableOf(luksext.RealDeps(log))
	if len(inv.Args) > 1 && inv.Args[1] == "--list-methods" {
		fmt.Fprintln(inv.Stdout, strings.Join(table.Names(), "\n"))
		return 0
	}
	return smapi.Main(context.Background(), smapi.Plugin{Kind: kind, Table: table, Classify: luksext.Classify, Log: log},
		smapi.Invocation{Args: inv.Args, Stdin: inv.Stdin, Stdout: inv.Stdout})
}
