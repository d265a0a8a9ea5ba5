package smapi

import (
	"context"
	"sort"
	"strings"
	"time"
)

// Method is one entry of a plugin's method table: the on-disk name of its
// executable (e.g. "SR.attach"), the handler, and a deadline. The same table
// drives dispatch, the install symlinks and the conformance suite.
type Method struct {
	Name string
	// Call decodes the params and runs the handler. Nil means the method is
	// part of the IDL but not implemented: it answers Unimplemented.
	Call func(ctx context.Context, stdin []byte) (any, error)
	// Timeout bounds the call; xapi-storage-script applies none of its own.
	Timeout time.Duration
	// Result names the IDL result type, for the conformance validator.
	Result ResultType
	// Params is a zero value of the params record, for the validator.
	Params any
}

// Implemented reports whether the method has a handler.
func (m Method) Implemented() bool { return m.Call != nil }

// ResultType names the shape a method returns.
type ResultType string

// Result shapes of the v5 IDL.
const (
	ResultUnit          ResultType = "unit"
	ResultString        ResultType = "string"
	ResultStringList    ResultType = "string list"
	ResultQuery         ResultType = "query_result"
	ResultSRStat        ResultType = "sr_stat"
	ResultProbe         ResultType = "probe_result list"
	ResultConfiguration ResultType = "configuration"
	ResultVolume        ResultType = "volume"
	ResultVolumeList    ResultType = "volume list"
	ResultBlocklist     ResultType = "blocklist"
	ResultChangedBlocks ResultType = "changed_blocks"
	ResultBackend       ResultType = "backend"
	ResultOperation     ResultType = "operation"
	ResultOperationList ResultType = "operation list"
	ResultDataStatus    ResultType = "data_status"
)

// DefaultTimeout bounds methods whose table entry sets none.
const DefaultTimeout = 10 * time.Minute

// Handle builds a table entry from a typed handler.
func Handle[P any, R any](name string, result ResultType, f func(context.Context, P) (R, error)) Method {
	var zero P
	return Method{
		Name:   name,
		Result: result,
		Params: zero,
		Call: func(ctx context.Context, stdin []byte) (any, error) {
			var p P
			if err := DecodeParams(stdin, &p); err != nil {
				return nil, Wrap(KindInvalidParameters, err)
			}
			return f(ctx, p)
		},
	}
}

// Declare builds an unimplemented table entry (answers Unimplemented).
func Declare[P any](name string, result ResultType) Method {
	var zero P
	return Method{Name: name, Result: result, Params: zero}
}

// Table is a plugin's set of methods.
type Table []Method

// Lookup finds a method case-insensitively, as xapi-storage-script does.
func (t Table) Lookup(name string) (Method, bool) {
	for _, m := range t {
		if strings.EqualFold(m.Name, name) {
			return m, true
		}
	}
	return Method{}, false
}

// Names lists the on-disk names, sorted.
func (t Table) Names() []string {
	out := make([]string, 0, len(t))
	for _, m := range t {
		out = append(out, m.Name)
	}
	sort.Strings(out)
	return out
}

// With returns a copy of t where entries named like ms are replaced by ms
// (and new names appended). Used to plug implementations into the IDL table.
func (t Table) With(ms ...Method) Table {
	out := append(Table(nil), t...)
	for _, m := range ms {
		replaced := false
		for i := range out {
			if strings.EqualFold(out[i].Name, m.Name) {
				out[i], replaced = m, true
			}
		}
		if !replaced {
			out = append(out, m)
		}
	}
	return out
}
