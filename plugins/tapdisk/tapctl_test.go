package tapdisk

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/run/runfake"
)

func TestParseList(t *testing.T) {
	out := "pid=412 minor=0 state=0 args=vhd:/var/run/sr-mount/a b/x:y.vhd\n" + // path with ':' kept whole
		"pid=413\n" +
		"minor=3\n" +
		"pid=414 minor=1 state=0x2\n"
	_, err := ParseList(out)
	require.ErrorIs(t, err, ErrBadOutput, "a path with a space splits into a field without '='")

	out = "pid=412 minor=0 state=0 args=vhd:/var/run/sr-mount/s/x:y.vhd\npid=413\nminor=3\npid=414 minor=1 state=0x2\n\n"
	got, err := ParseList(out)
	require.NoError(t, err)
	assert.Equal(t, []Entry{
		{PID: 412, Minor: 0, State: 0, Type: "vhd", Path: "/var/run/sr-mount/s/x:y.vhd"},
		{PID: 413, Minor: -1, State: -1},
		{PID: -1, Minor: 3, State: -1},
		{PID: 414, Minor: 1, State: 2},
	}, got)
	assert.True(t, got[0].Open())
	assert.False(t, got[3].Open())

	for _, bad := range []string{"pid=x", "minor=", "args=novolon", "state=zz"} {
		_, err := ParseList(bad)
		assert.ErrorIs(t, err, ErrBadOutput, bad)
	}
}

func TestCommandLines(t *testing.T) {
	f := runfake.New()
	f.Handle(Tool, func(c runfake.Call) (run.Result, error) {
		switch c.Args[0] {
		case "spawn":
			return run.Result{Stdout: []byte("4242\n")}, nil
		case "allocate":
			return run.Result{Stdout: []byte("/dev/xen/blktap-2/tapdev7\n")}, nil
		}
		return run.Result{}, nil
	})
	ctl := Ctl{Runner: f}
	ctx := context.Background()
	pid, err := ctl.Spawn(ctx)
	require.NoError(t, err)
	assert.Equal(t, 4242, pid)
	minor, dev, err := ctl.Allocate(ctx)
	require.NoError(t, err)
	assert.Equal(t, 7, minor)
	assert.Equal(t, "/dev/xen/blktap-2/tapdev7", dev)
	assert.Equal(t, dev, DevicePath(7))
	require.NoError(t, ctl.Attach(ctx, pid, minor))
	require.NoError(t, ctl.Open(ctx, pid, minor, Image{"vhd", "/sr/a.vhd"}, OpenOptions{}))
	require.NoError(t, ctl.Open(ctx, pid, minor, Image{"qcow2", "/sr/b.qcow2"}, OpenOptions{ReadOnly: true}))
	require.NoError(t, ctl.Close(ctx, pid, minor))
	require.NoError(t, ctl.Detach(ctx, pid, minor))
	require.NoError(t, ctl.Free(ctx, minor))

	var lines []string
	for _, c := range f.Calls() {
		lines = append(lines, c.Line())
	}
	assert.Equal(t, []string{
		"tap-ctl spawn",
		"tap-ctl allocate",
		"tap-ctl attach -p 4242 -m 7",
		"tap-ctl open -p 4242 -m 7 -a vhd:/sr/a.vhd",
		"tap-ctl open -p 4242 -m 7 -a qcow2:/sr/b.qcow2 -R",
		"tap-ctl close -p 4242 -m 7",
		"tap-ctl detach -p 4242 -m 7",
		"tap-ctl free -m 7",
	}, lines)
}

func TestErrors(t *testing.T) {
	ctx := context.Background()
	missing := Ctl{Runner: runfake.New()} // no handler: the tool is missing
	_, err := missing.Spawn(ctx)
	require.ErrorIs(t, err, run.ErrToolMissing)
	assert.Contains(t, err.Error(), "tap-ctl")

	f := runfake.New()
	f.Handle(Tool, func(c runfake.Call) (run.Result, error) {
		if c.Args[0] == "close" {
			return run.Result{}, &run.CommandError{Path: "/usr/sbin/tap-ctl", Args: c.Args, ExitCode: 16, Stderr: "Device or resource busy"}
		}
		return run.Result{Stdout: []byte("tapdisk spawned with pid 12\n")}, nil
	})
	ctl := Ctl{Runner: f}
	err = ctl.Close(ctx, 1, 2)
	require.ErrorIs(t, err, ErrTapCtl)
	assert.Equal(t, 16, run.ExitCode(err))
	assert.Contains(t, err.Error(), "busy")
	_, err = ctl.Spawn(ctx)
	require.ErrorIs(t, err, ErrBadOutput, "tty-style output is not what a pipe gets")
	_, _, err = ctl.Allocate(ctx)
	require.ErrorIs(t, err, ErrBadOutput)
	assert.Contains(t, fmt.Sprint(err), "tapdev")
}

func TestPauseUnpauseCommandLines(t *testing.T) {
	f := runfake.New()
	f.Handle(Tool, func(runfake.Call) (run.Result, error) { return run.Result{}, nil })
	c := Ctl{Runner: f}
	ctx := context.Background()
	require.NoError(t, c.Pause(ctx, 412, 3, 0))
	require.NoError(t, c.Unpause(ctx, 412, 3, nil))
	require.NoError(t, c.Unpause(ctx, 412, 3, &Image{Type: "vhd", Path: "/sr/n.vhd"}))
	var lines []string
	for _, call := range f.Calls() {
		lines = append(lines, call.Line())
	}
	assert.Equal(t, []string{"tap-ctl pause -p 412 -m 3", "tap-ctl unpause -p 412 -m 3", "tap-ctl unpause -p 412 -m 3 -a vhd:/sr/n.vhd"}, lines)

	got, err := ParseList("pid=1 minor=0 state=0x20 args=vhd:/a.vhd\npid=1 minor=1 state=0x10 args=vhd:/b.vhd\npid=1 minor=2 state=0x2\npid=2\n")
	require.NoError(t, err)
	assert.True(t, got[0].Paused() && got[0].Open(), "a paused tapdisk still lists its image")
	assert.True(t, got[1].Paused(), "pause requested: draining")
	assert.False(t, got[2].Paused())
	assert.False(t, got[3].Paused(), "no state")
}
