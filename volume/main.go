// Command volume is the luksext SMAPIv3 volume plugin: one static binary
// that xapi-storage-script runs through symlinks named after each method
// (SR.create, Volume.stat, ...) in
// /usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.luksext/.
// The same binary is the operator command (/usr/sbin/luksext) and the SR
// garbage collector (`volume gc <sr>`): entrypoint.Volume dispatches.
package main

import (
	"os"

	"github.com/luksext/luksext/sr-types/luksext/entrypoint"
)

func main() {
	os.Exit(entrypoint.Volume(entrypoint.Invocation{Args: os.Args, Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr}))
}
