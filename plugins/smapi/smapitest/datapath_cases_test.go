package smapitest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
)

// memDatapath is a tiny datapath plugin with switchable defects, to prove
// the datapath cases notice them.
type memDatapath struct {
	mu              sync.Mutex
	users           map[string]map[string]bool // uri -> domains
	noXenDisk       bool
	detachUnknownKO bool
	newDevPerAttach bool
	n               int
}

func (d *memDatapath) table() smapi.Table {
	backend := func(uri string) smapi.Backend {
		dev := "/dev/mem-" + strings.TrimPrefix(uri, "mem:///")
		if d.newDevPerAttach {
			d.n++
			dev = fmt.Sprintf("%s-%d", dev, d.n)
		}
		impls := []smapi.Implementation{{BlockDevice: &smapi.PathImpl{Path: dev}}}
		if !d.noXenDisk {
			impls = append(impls, smapi.Implementation{XenDisk: &smapi.XenDisk{Params: dev, Extra: map[string]string{}, BackendType: "vbd"}})
		}
		return smapi.Backend{Implementations: impls}
	}
	check := func(uri string) error {
		if !strings.HasPrefix(uri, "mem:///") {
			return smapi.Errorf(smapi.KindInvalidParameters, "bad uri %s", uri)
		}
		return nil
	}
	unit := func(f func(p smapi.DatapathParams) error) func(context.Context, smapi.DatapathParams) (smapi.Unit, error) {
		return func(_ context.Context, p smapi.DatapathParams) (smapi.Unit, error) {
			if err := check(p.URI); err != nil {
				return smapi.Unit{}, err
			}
			d.mu.Lock()
			defer d.mu.Unlock()
			return smapi.Unit{}, f(p)
		}
	}
	return smapi.DatapathIDL().With(
		smapi.Handle("Plugin.Query", smapi.ResultQuery, func(context.Context, smapi.DbgParams) (smapi.QueryResult, error) {
			return smapi.QueryResult{Plugin: "mem", Name: "n", Description: "d", Vendor: "v", Copyright: "c", Version: "1",
				RequiredAPIVersion: "5.0", Features: []string{}, Configuration: map[string]string{}, RequiredClusterStack: []string{}}, nil
		}),
		smapi.Handle("Plugin.diagnostics", smapi.ResultString, func(context.Context, smapi.DbgParams) (string, error) {
			return "mem datapath", nil
		}),
		smapi.Handle("Datapath.attach", smapi.ResultBackend, func(_ context.Context, p smapi.DatapathParams) (smapi.Backend, error) {
			if err := check(p.URI); err != nil {
				return smapi.Backend{}, err
			}
			d.mu.Lock()
			defer d.mu.Unlock()
			if d.users[p.URI] == nil {
				d.users[p.URI] = map[string]bool{}
			}
			d.users[p.URI][p.Domain] = true
			return backend(p.URI), nil
		}),
		smapi.Handle("Datapath.activate", smapi.ResultUnit, unit(func(p smapi.DatapathParams) error {
			if !d.users[p.URI][p.Domain] {
				return smapi.Errorf(smapi.KindInvalidParameters, "not attached")
			}
			return nil
		})),
		smapi.Handle("Datapath.deactivate", smapi.ResultUnit, unit(func(smapi.DatapathParams) error { return nil })),
		smapi.Handle("Datapath.detach", smapi.ResultUnit, unit(func(p smapi.DatapathParams) error {
			if d.detachUnknownKO && !d.users[p.URI][p.Domain] {
				return smapi.Errorf(smapi.KindInternal, "not attached")
			}
			delete(d.users[p.URI], p.Domain)
			return nil
		})),
	)
}

func runMem(d *memDatapath) []string {
	d.users = map[string]map[string]bool{}
	table := d.table()
	n := 0
	cfg := Config{Invoker: InProcess{Plugin: smapi.Plugin{Kind: "datapath", Table: table}}, Table: table,
		Lifecycle: DatapathCases(DatapathVolumes{NewURI: func(*Ctx) string { n++; return fmt.Sprintf("mem:///v%d", n) }})}
	var rec Recorder
	RunRecorded(&rec, cfg)
	return rec.Errors
}

func TestDatapathCasesPassOnAGoodPlugin(t *testing.T) {
	assert.Empty(t, runMem(&memDatapath{}))
}

func TestDatapathCasesCatchDefects(t *testing.T) {
	for name, tc := range map[string]struct {
		d    *memDatapath
		want string
	}{
		"no XenDisk":                    {&memDatapath{noXenDisk: true}, "no XenDisk"},
		"detach of unknown fails":       {&memDatapath{detachUnknownKO: true}, "Datapath.detach failed"},
		"attach is not idempotent":      {&memDatapath{newDevPerAttach: true}, "different backend"},
		"second domain loses its state": {&memDatapath{newDevPerAttach: true}, "second domain's backend changed"},
	} {
		t.Run(name, func(t *testing.T) {
			errs := runMem(tc.d)
			require.NotEmpty(t, errs, "the cases did not notice")
			assert.Contains(t, strings.Join(errs, "\n"), tc.want)
		})
	}
}
