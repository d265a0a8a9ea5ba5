// Command datapath is the luksext SMAPIv3 datapath plugin: one static binary
// that xapi-storage-script runs through symlinks named after each method
// (Datapath.attach, ...) in
// /usr/libexec/xapi-storage-script/datapath/luksext/ (the directory name is the URI scheme).
package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/luksext/luksext/plugins/logging"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/sr-types/luksext"
)

func main() {
	log := logging.New(logging.Options{Plugin: "datapath", Syslog: true})
	table := luksext.DatapathTable(luksext.RealDeps(log))
	if len(os.Args) > 1 && os.Args[1] == "--list-methods" {
		fmt.Println(strings.Join(table.Names(), "\n"))
		return
	}
	os.Exit(smapi.Main(context.Background(), smapi.Plugin{Kind: "datapath", Table: table, Classify: luksext.Classify, Log: log},
		smapi.Invocation{Args: os.Args, Stdin: os.Stdin, Stdout: os.Stdout}))
}
