// Command fakexapi serves the XenAPI calls the luksext plugin makes
// (secret lookups) on a unix socket, for VM tests where no xapi runs.
// Secrets arrive on stdin as "uuid=value" lines, so they are never in argv
// or in a file.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/luksext/luksext/plugins/xapi/xapitest"
)

func main() {
	socket := flag.String("socket", "/var/lib/xcp/xapi", "unix socket to listen on")
	calls := flag.String("calls", "", "append the method name of every call to this file")
	messages := flag.String("messages", "", "append every message.create as a JSON line to this file")
	flag.Parse()
	secrets := map[string]string{}
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			secrets[k] = v
		}
	}
	_ = os.Remove(*socket)
	srv, err := xapitest.New(*socket, secrets)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakexapi:", err)
		os.Exit(1)
	}
	if *calls != "" {
		f, err := os.OpenFile(*calls, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fakexapi:", err)
			os.Exit(1)
		}
		srv.SetCallLog(f)
	}
	if *messages != "" {
		f, err := os.OpenFile(*messages, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, "fakexapi:", err)
			os.Exit(1)
		}
		srv.SetMessageLog(f)
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	<-sig
	_ = srv.Close()
}
