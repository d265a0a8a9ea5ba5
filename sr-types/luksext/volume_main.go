package luksext

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/smapi"
)

// VolumeMain is the whole main of the volume binary, which answers to
// three kinds of invocation:
//
//   - argv[0] basename "luksext" (the /usr/sbin/luksext symlink): the
//     operator command (AdminMain);
//   - argv[1] "gc": the SR's garbage collector, as StartGC spawns it
//     (RunGC);
//   - anything else: an SMAPIv3 method named by argv[0]'s basename
//     (SR.create, Volume.snapshot, ...), or --list-methods.
//
// volume/main.go calls only this, and tests exec the built binary rather
// than answering any of these modes themselves, so no mode can work in a
// test and not in the product.
func VolumeMain(inv AdminInvocation) int {
	if filepath.Base(inv.Args[0]) == AdminCommand {
		return AdminMain(inv)
	}
	if len(inv.Args) > 1 && inv.Args[1] == GCCommand {
		return RunGC(inv.Args[2:])
	}
	log := logging.New(logging.Options{Plugin: "volume", Stderr: inv.Stderr, Syslog: true})
	table := VolumeTable(RealDeps(log))
	if len(inv.Args) > 1 && inv.Args[1] == "--list-methods" {
		fmt.Fprintln(inv.Stdout, strings.Join(table.Names(), "\n"))
		return 0
	}
	return smapi.Main(context.Background(), smapi.Plugin{Kind: "volume", Table: table, Classify: Classify, Log: log},
		smapi.Invocation{Args: inv.Args, Stdin: inv.Stdin, Stdout: inv.Stdout})
}
