// Command datapath is the luksext SMAPIv3 datapath plugin: one static binary
// that xapi-storage-script runs through symlinks named after each method
// (Datapath.attach, ...) in
// /usr/libexec/xapi-storage-script/datapath/luksext/ (the directory name is the URI scheme).
package main

import (
	"os"

	"github.com/luksext/luksext/sr-types/luksext/entrypoint"
)

func main() {
	os.Exit(entrypoint.Datapath(entrypoint.Invocation{Args: os.Args, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}))
}
