package smapitest

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
)

// goodTable is a small, correct fake plugin.
func goodTable() smapi.Table {
	return smapi.VolumeIDL().With(
		smapi.Handle("Plugin.Query", smapi.ResultQuery, func(context.Context, smapi.DbgParams) (smapi.QueryResult, error) {
			return smapi.QueryResult{Plugin: "fake", Name: "n", Description: "d", Vendor: "v", Copyright: "c", Version: "1",
				RequiredAPIVersion: "5.0", Features: []string{"SR_PROBE"}, Configuration: map[string]string{"device": "the disk"},
				RequiredClusterStack: []string{}}, nil
		}),
		smapi.Handle("Plugin.diagnostics", smapi.ResultString, func(context.Context, smapi.DbgParams) (string, error) {
			return "all fine", nil
		}),
		smapi.Handle("SR.stat", smapi.ResultSRStat, func(_ context.Context, p smapi.SRParams) (smapi.SRStat, error) {
			u := "0b1c"
			return smapi.SRStat{SR: p.SR, Name: "n", UUID: &u, Datasources: []string{}, Health: smapi.Healthy()}, nil
		}),
		smapi.Handle("Volume.stat", smapi.ResultVolume, func(_ context.Context, p smapi.VolumeParams) (smapi.Volume, error) {
			return smapi.Volume{}, smapi.Errorf(smapi.KindVolumeDoesNotExist, "no volume %s", p.Key)
		}),
		smapi.Handle("SR.detach", smapi.ResultUnit, func(context.Context, smapi.SRParams) (smapi.Unit, error) {
			return smapi.Unit{}, nil
		}),
	)
}

func goodConfig() Config {
	table := goodTable()
	return Config{Invoker: InProcess{Plugin: smapi.Plugin{Kind: "volume", Table: table}}, Table: table, Plugin: "fake"}
}

func TestSuitePassesOnAGoodPlugin(t *testing.T) {
	var rec Recorder
	RunRecorded(&rec, goodConfig())
	assert.Empty(t, rec.Errors)
	Run(t, goodConfig()) // and as real subtests
}

// corrupting wraps an invoker and rewrites the stdout of one method.
type corrupting struct {
	inner  Invoker
	method string
	stdout string
	exit   int
}

func (c corrupting) Invoke(ctx context.Context, method string, stdin []byte) (Reply, error) {
	if strings.EqualFold(method, c.method) {
		return Reply{Stdout: []byte(c.stdout), ExitCode: c.exit}, nil
	}
	return c.inner.Invoke(ctx, method, stdin)
}

func TestSuiteCatchesMalformedPlugins(t *testing.T) {
	good := goodConfig()
	var q bytes.Buffer
	_ = smapi.Main(context.Background(), smapi.Plugin{Table: good.Table}, smapi.Invocation{
		Args: []string{"Plugin.Query"}, Stdin: strings.NewReader(`{"dbg":"x"}`), Stdout: &q})
	query := strings.TrimSpace(q.String())
	stat := `{"sr":"s","name":"n","description":"","total_space":1,"free_space":1,"datasources":[],"clustered":false,"health":["Healthy",""]`

	cases := []struct {
		name, method, stdout string
		exit                 int
		want                 string
	}{
		{"null option", "SR.stat", stat + `,"uuid":null}`, 0, `option field "uuid" is null`},
		{"numeric error code", "Volume.stat", `{"code":24,"params":["VDIInUse"],"backtrace":{"error":"","files":[],"lines":[]}}`, 1, "code must be a string"},
		{"two JSON values", "Plugin.Query", query + "\n" + query, 0, "more than one JSON value"},
		{"log line on stdout", "Plugin.Query", "starting up\n" + query, 0, "not JSON"},
		{"empty stdout", "SR.detach", "", 0, "stdout is empty"},
		{"unit not null", "SR.detach", "{}", 0, "unit result must be null"},
		{"health not a variant", "SR.stat", stat[:strings.Index(stat, `"health"`)] + `"health":"Healthy"}`, 0, "health must be a variant"},
		{"params not strings", "Volume.stat", `{"code":"SR_BACKEND_FAILURE","params":["x",1],"backtrace":{"error":"","files":[],"lines":[]}}`, 1, "params[1] must be a string"},
		{"backtrace lines not ints", "Volume.stat", `{"code":"SR_BACKEND_FAILURE","params":["x"],"backtrace":{"error":"","files":[],"lines":["12"]}}`, 1, "lines[0] must be an integer"},
		{"missing required field", "SR.stat", `{"sr":"s","name":"n","total_space":1,"free_space":1,"datasources":[],"clustered":false,"health":["Healthy",""]}`, 0, `required field "description" is missing`},
		{"error that does not name the missing parameter", "Plugin.Query", `{"code":"SR_BACKEND_FAILURE","params":["Invalid_parameters","bad call"],"backtrace":{"error":"","files":[],"lines":[]}}`, 1, "does not name the missing parameter"},
		{"wrong api version", "Plugin.Query", strings.Replace(query, `"5.0"`, `"4.0"`, 1), 0, "required_api_version"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			cfg.Invoker = corrupting{inner: good.Invoker, method: tc.method, stdout: tc.stdout, exit: tc.exit}
			var rec Recorder
			RunRecorded(&rec, cfg)
			require.NotEmpty(t, rec.Errors, "the suite did not notice")
			assert.Contains(t, strings.Join(rec.Errors, "\n"), tc.want)
		})
	}
}

func TestSuiteCatchesUnimplementedThatSucceeds(t *testing.T) {
	cfg := goodConfig()
	cfg.Invoker = corrupting{inner: cfg.Invoker, method: "Volume.clone", stdout: "null", exit: 0}
	var rec Recorder
	RunRecorded(&rec, cfg)
	assert.NotEmpty(t, rec.Errors)
}

func TestMainContract(t *testing.T) {
	table := goodTable().With(smapi.Handle("SR.ls", smapi.ResultVolumeList, func(context.Context, smapi.SRParams) ([]smapi.Volume, error) {
		panic("boom")
	}))
	var out bytes.Buffer
	code := smapi.Main(context.Background(), smapi.Plugin{Table: table}, smapi.Invocation{
		Args: []string{"/x/SR.ls", "--json"}, Stdin: strings.NewReader(`{"dbg":"d","sr":"s"}`), Stdout: &out})
	assert.Equal(t, 1, code)
	probs, rec := CheckReply(Reply{Stdout: out.Bytes(), ExitCode: code}, smapi.ResultVolumeList)
	require.Empty(t, probs)
	require.NotNil(t, rec)
	assert.Equal(t, "Internal_error", rec.Params[0])
	assert.NotContains(t, out.String(), "goroutine", "no Go stack on stdout")

	out.Reset()
	code = smapi.Main(context.Background(), smapi.Plugin{Table: table}, smapi.Invocation{
		Args: []string{"/x/SR.detach", "--json"}, Stdin: strings.NewReader(`{"dbg":"d","sr":"s"}`), Stdout: &out})
	assert.Equal(t, 0, code)
	assert.Equal(t, "null\n", out.String())

	var ev struct{ Sr string }
	out.Reset()
	_ = smapi.Main(context.Background(), smapi.Plugin{Table: table}, smapi.Invocation{
		Args: []string{"/x/SR.stat"}, Stdin: strings.NewReader(`{"method":"SR.stat","params":[{"dbg":"d","sr":"/a/b"}]}`), Stdout: &out})
	require.NoError(t, json.Unmarshal(out.Bytes(), &ev))
	assert.Equal(t, "/a/b", ev.Sr)
}
