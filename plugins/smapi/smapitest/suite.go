package smapitest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/luksext/luksext/plugins/smapi"
)

// Config tells the suite what it is testing.
type Config struct {
	Invoker Invoker
	// Table is the plugin's method table: the methods that must exist, with
	// their params and result types.
	Table smapi.Table
	// Plugin is the expected Plugin.Query "plugin" (the SR type); for a
	// datapath plugin, leave empty or set it to the volume plugin's name.
	Plugin string
	// Exec is set when Invoker runs installed files; enables file checks.
	Exec *Exec
	// Timeout per call (default 2 minutes).
	Timeout time.Duration
	// Lifecycle, when set, is run after the protocol cases with the same
	// Ctx: SR-type specific cases (create/attach/volumes) plug in here.
	Lifecycle []Case
}

// TB is the part of testing.TB the cases use; the self-test substitutes a
// recorder to prove the suite reports malformed plugins.
type TB interface {
	Helper()
	Errorf(format string, args ...any)
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
}

// Ctx is what a case gets.
type Ctx struct {
	T   TB
	Cfg Config
}

// Case is one named conformance check.
type Case struct {
	Name string
	Run  func(c *Ctx)
}

// Call invokes method with params, validates the reply shape against the
// table's result type, and returns the reply, the decoded error record (nil
// on success) and the parsed result.
func (c *Ctx) Call(method string, params any) (Reply, *smapi.ErrorRecord) {
	c.T.Helper()
	b, err := json.Marshal(params)
	if err != nil {
		c.T.Fatalf("%s: marshalling params: %v", method, err)
	}
	return c.CallRaw(method, b)
}

// CallRaw is Call with a raw stdin body.
func (c *Ctx) CallRaw(method string, stdin []byte) (Reply, *smapi.ErrorRecord) {
	c.T.Helper()
	timeout := c.Cfg.Timeout
	if timeout == 0 {
		timeout = 2 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	r, err := c.Cfg.Invoker.Invoke(ctx, method, stdin)
	if err != nil {
		c.T.Fatalf("%s: invoking: %v", method, err)
	}
	result := smapi.ResultString
	if m, ok := c.Cfg.Table.Lookup(method); ok {
		result = m.Result
	}
	probs, rec := CheckReply(r, result)
	for _, p := range probs {
		c.T.Errorf("%s (exit %d): %s\nstdout: %s", method, r.ExitCode, p, truncate(r.Stdout))
	}
	return r, rec
}

// MustSucceed is Call that fails the case on an error record, and decodes
// the result into out (if non-nil).
func (c *Ctx) MustSucceed(method string, params any, out any) {
	c.T.Helper()
	r, rec := c.Call(method, params)
	if rec != nil {
		c.T.Fatalf("%s failed: %s %v", method, rec.Code, rec.Params)
	}
	if r.ExitCode != 0 {
		c.T.Fatalf("%s exited %d", method, r.ExitCode)
	}
	if out != nil {
		if err := json.Unmarshal(r.Stdout, out); err != nil {
			c.T.Fatalf("%s: decoding result: %v", method, err)
		}
	}
}

// ExpectError calls method and requires an error record whose params[0] is
// name (csi-sanity style: codes, never message text).
func (c *Ctx) ExpectError(method string, params any, name string) *smapi.ErrorRecord {
	c.T.Helper()
	r, rec := c.Call(method, params)
	if r.ExitCode == 0 {
		c.T.Errorf("%s: expected error %s, got success: %s", method, name, truncate(r.Stdout))
		return nil
	}
	if rec == nil {
		return nil // shape problem already reported
	}
	if len(rec.Params) == 0 || rec.Params[0] != name {
		c.T.Errorf("%s: expected error %s, got %s %v", method, name, rec.Code, rec.Params)
	}
	return rec
}

func truncate(b []byte) string {
	s := string(b)
	if len(s) > 600 {
		return s[:600] + "..."
	}
	return s
}

// Run runs the suite as subtests of t.
func Run(t *testing.T, cfg Config) {
	for _, cs := range Cases(cfg) {
		t.Run(cs.Name, func(t *testing.T) { cs.Run(&Ctx{T: t, Cfg: cfg}) })
	}
}

// Cases returns the protocol cases followed by cfg.Lifecycle.
func Cases(cfg Config) []Case {
	cases := []Case{
		{"Query", caseQuery},
		{"Diagnostics", caseDiagnostics},
		{"EveryMethodAnswersWellFormed", caseEveryMethod},
		{"UnknownMethodIsUnimplemented", caseUnknownMethod},
		{"UnknownFieldsTolerated", caseUnknownFields},
		{"EnvelopeAccepted", caseEnvelope},
		{"MissingParamIsAnError", caseMissingParam},
	}
	if cfg.Exec != nil {
		cases = append(cases, Case{"EveryMethodHasAnExecutable", caseFiles}, Case{"CaseInsensitiveLookup", caseCaseInsensitive})
	}
	return append(cases, cfg.Lifecycle...)
}

func dbg(c *Ctx) map[string]any { return map[string]any{"dbg": "smapitest"} }

func caseQuery(c *Ctx) {
	var q smapi.QueryResult
	c.MustSucceed("Plugin.Query", dbg(c), &q)
	if c.Cfg.Plugin != "" && q.Plugin != c.Cfg.Plugin {
		c.T.Errorf("Plugin.Query plugin = %q, want %q (it must equal the directory suffix)", q.Plugin, c.Cfg.Plugin)
	}
	if strings.Contains(q.Plugin, ".") || strings.ToLower(q.Plugin) != q.Plugin {
		c.T.Errorf("Plugin.Query plugin %q must be lower-case without dots (xapi takes the last dot-separated part)", q.Plugin)
	}
	if q.RequiredAPIVersion != "5.0" {
		c.T.Errorf("required_api_version = %q, want 5.0", q.RequiredAPIVersion)
	}
	for _, f := range q.Features {
		name, _, _ := strings.Cut(f, "/")
		if !knownFeatures[name] {
			c.T.Errorf("feature %q is unknown to xapi (it would be dropped)", f)
		}
	}
}

func caseDiagnostics(c *Ctx) {
	if _, ok := c.Cfg.Table.Lookup("Plugin.diagnostics"); !ok {
		return
	}
	var s string
	c.MustSucceed("Plugin.diagnostics", dbg(c), &s)
	if strings.TrimSpace(s) == "" {
		c.T.Errorf("Plugin.diagnostics returned an empty string")
	}
}

// placeholderParams fills a params record with values that name nothing
// real, so that any plugin answers without touching a disk.
func placeholderParams(p any) map[string]any {
	out := map[string]any{}
	b, _ := json.Marshal(p)
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	for k, v := range m {
		switch v.(type) {
		case string:
			out[k] = "smapitest-nonexistent-" + k
		case float64:
			out[k] = 0
		case bool:
			out[k] = false
		case map[string]any, nil: // a nil map in the zero record
			out[k] = map[string]any{}
		default:
			out[k] = v
		}
	}
	out["dbg"] = "smapitest"
	if _, ok := out["uri"]; ok {
		out["uri"] = "smapitest-nonexistent:///smapitest/nonexistent"
	}
	if _, ok := out["sr"]; ok {
		out["sr"] = "/smapitest/nonexistent-sr"
	}
	if _, ok := out["operation"]; ok {
		out["operation"] = []any{"CopyV1", "smapitest-nonexistent"}
	}
	return out
}

// Methods whose placeholder call could act on the host are skipped here;
// lifecycle cases exercise them with real arguments.
var mutatesWithoutArguments = map[string]bool{}

func caseEveryMethod(c *Ctx) {
	for _, m := range c.Cfg.Table {
		if mutatesWithoutArguments[strings.ToLower(m.Name)] {
			continue
		}
		r, rec := c.Call(m.Name, placeholderParams(m.Params))
		if !m.Implemented() {
			if r.ExitCode == 0 {
				c.T.Errorf("%s is declared unimplemented but succeeded", m.Name)
			} else if rec != nil && (len(rec.Params) == 0 || rec.Params[0] != "Unimplemented") {
				c.T.Errorf("%s is unimplemented but answered %v", m.Name, rec.Params)
			}
		}
	}
}

func caseUnknownMethod(c *Ctx) {
	c.ExpectError("Bogus.nonexistent_method", dbg(c), "Unimplemented")
}

func caseUnknownFields(c *Ctx) {
	c.MustSucceed("Plugin.Query", map[string]any{"dbg": "smapitest", "a_future_field": 42, "Another": []int{1}}, nil)
}

func caseEnvelope(c *Ctx) {
	c.MustSucceed("Plugin.Query", map[string]any{"method": "Plugin.Query", "params": map[string]any{"dbg": "smapitest"}}, nil)
}

func caseMissingParam(c *Ctx) {
	r, rec := c.CallRaw("Plugin.Query", []byte(`{}`))
	if r.ExitCode == 0 {
		c.T.Errorf("Plugin.Query without dbg succeeded; required parameters must be checked")
	}
	// xe shows the record's params: they must name what is missing, or the
	// administrator is left guessing.
	if rec != nil && !strings.Contains(strings.Join(rec.Params, " "), "dbg") {
		c.T.Errorf("Plugin.Query without dbg: the error %v does not name the missing parameter", rec.Params)
	}
}

func caseFiles(c *Ctx) {
	for _, m := range c.Cfg.Table {
		if _, err := c.Cfg.Exec.Path(m.Name); err != nil {
			c.T.Errorf("%s: %v", m.Name, err)
		}
	}
}

func caseCaseInsensitive(c *Ctx) {
	c.MustSucceed("plugin.query", dbg(c), nil)
	c.MustSucceed("PLUGIN.QUERY", dbg(c), nil)
}

// Recorder is a TB that records failures instead of failing a test; the
// self-test uses it to prove the suite catches malformed plugins.
type Recorder struct {
	Errors []string
}

type fatal struct{}

func (r *Recorder) Helper()             {}
func (r *Recorder) Logf(string, ...any) {}
func (r *Recorder) Errorf(format string, args ...any) {
	r.Errors = append(r.Errors, fmt.Sprintf(format, args...))
}
func (r *Recorder) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	panic(fatal{})
}

// RunRecorded runs every case against rec, each to completion or Fatalf.
func RunRecorded(rec *Recorder, cfg Config) {
	for _, cs := range Cases(cfg) {
		func() {
			defer func() {
				if p := recover(); p != nil {
					if _, ok := p.(fatal); !ok {
						panic(p)
					}
				}
			}()
			cs.Run(&Ctx{T: rec, Cfg: cfg})
		}()
	}
}
