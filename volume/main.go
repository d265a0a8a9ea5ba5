// Command volume is the luksext SMAPIv3 volume plugin: one static binary
// that xapi-storage-script runs through symlinks named after each method
// (SR.create, Volume.stat, ...) in
// /usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.luksext/.
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/sr-types/luksext"
)

func main() {
	// Invoked as /usr/sbin/luksext (a symlink to this binary): the
	// operator command for key management, which SMAPIv3 has no verb for.
	if filepath.Base(os.Args[0]) == luksext.AdminCommand {
		os.Exit(luksext.AdminMain(luksext.AdminInvocation{Args: os.Args, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}))
	}
	log := logging.New(logging.Options{Plugin: "volume", Syslog: true})
	table := luksext.VolumeTable(luksext.RealDeps(log))
	if len(os.Args) > 1 && os.Args[1] == "--list-methods" {
		fmt.Println(strings.Join(table.Names(), "\n"))
		return
	}
	os.Exit(smapi.Main(context.Background(), smapi.Plugin{Kind: "volume", Table: table, Classify: luksext.Classify, Log: log},
		smapi.Invocation{Args: os.Args, Stdin: os.Stdin, Stdout: os.Stdout}))
}
