// Package smapitest is a conformance suite for any SMAPIv3 (v5) plugin, in
// the spirit of csi-sanity for CSI drivers: it calls a plugin exactly as
// xapi-storage-script does and checks the process contract and the JSON
// shapes that xapi's rpclib will accept. Two invokers: InProcess (calls
// smapi.Main with in-memory I/O) and Exec (runs the installed executables
// with "--json" and the params on stdin).
package smapitest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/luksext/luksext/plugins/smapi"
)

// Reply is what one call produced.
type Reply struct {
	Stdout   []byte
	Stderr   []byte
	ExitCode int
}

// Invoker calls one method with a raw stdin body.
type Invoker interface {
	Invoke(ctx context.Context, method string, stdin []byte) (Reply, error)
}

// InProcess invokes a plugin's smapi.Main directly.
type InProcess struct {
	Plugin smapi.Plugin
}

// Invoke implements Invoker.
func (p InProcess) Invoke(ctx context.Context, method string, stdin []byte) (Reply, error) {
	var out bytes.Buffer
	code := smapi.Main(ctx, p.Plugin, smapi.Invocation{
		Args: []string{"/in-process/" + method, "--json"}, Stdin: bytes.NewReader(stdin), Stdout: &out,
	})
	return Reply{Stdout: out.Bytes(), ExitCode: code}, nil
}

// Exec runs the executables in Dir the way xapi-storage-script does:
// <Dir>/<Method> (matched case-insensitively), argv exactly [path, "--json"],
// stdin the params, then EOF; stdout and stderr read to the end.
type Exec struct {
	Dir     string
	Env     []string
	Timeout time.Duration
}

// ErrScriptMissing is what the daemon would answer (SCRIPT_MISSING).
var ErrScriptMissing = errors.New("no executable for this method in the plugin directory")

// Path finds the executable for method, as the daemon does.
func (x Exec) Path(method string) (string, error) {
	entries, err := os.ReadDir(x.Dir)
	if err != nil {
		return "", err
	}
	for _, e := range entries {
		if strings.EqualFold(e.Name(), method) {
			return filepath.Join(x.Dir, e.Name()), nil
		}
	}
	return "", fmt.Errorf("%s/%s: %w", x.Dir, method, ErrScriptMissing)
}

// Invoke implements Invoker. A method with no file is run through the
// binary behind Plugin.Query with argv[0] set to the method name, which is
// how a multi-call binary would see a call it does not know.
func (x Exec) Invoke(ctx context.Context, method string, stdin []byte) (Reply, error) {
	path, err := x.Path(method)
	argv0 := path
	if errors.Is(err, ErrScriptMissing) {
		q, qerr := x.Path("Plugin.Query")
		if qerr != nil {
			return Reply{}, err
		}
		path, argv0 = q, filepath.Join(x.Dir, method)
	} else if err != nil {
		return Reply{}, err
	}
	timeout := x.Timeout
	if timeout == 0 {
		timeout = 10 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, "--json")
	cmd.Args[0] = argv0
	cmd.Env = append(os.Environ(), x.Env...)
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	r := Reply{Stdout: out.Bytes(), Stderr: errb.Bytes()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
		r.ExitCode = ee.ExitCode()
	default:
		return r, fmt.Errorf("running %s: %w (stderr: %s)", argv0, err, errb.String())
	}
	return r, nil
}

// Call marshals params and invokes method.
func Call(ctx context.Context, inv Invoker, method string, params any) (Reply, error) {
	b, err := json.Marshal(params)
	if err != nil {
		return Reply{}, err
	}
	return inv.Invoke(ctx, method, b)
}
