package smapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
)

// Kind classifies an error for xapi. Name becomes params[0] of the error
// record (the IDL's exception names, and ours in the same Capitalised_snake
// style), Code the record's code. xe shows both to the administrator.
type Kind struct {
	Code string
	Name string
}

// BackendFailure is the code XCP-ng's SMAPIv3 plugins use for every error.
const BackendFailure = "SR_BACKEND_FAILURE"

// The kinds. The first six are the IDL's own exceptions (control.ml exns,
// common.ml); the rest are this project's, named so that an administrator
// reading `xe` output knows what to do.
var (
	KindUnimplemented        = Kind{BackendFailure, "Unimplemented"}
	KindVolumeDoesNotExist   = Kind{BackendFailure, "Volume_does_not_exist"}
	KindSRNotAttached        = Kind{BackendFailure, "Sr_not_attached"}
	KindSRDoesNotExist       = Kind{BackendFailure, "SR_does_not_exist"}
	KindCancelled            = Kind{BackendFailure, "Cancelled"}
	KindActivatedElsewhere   = Kind{BackendFailure, "Activated_on_another_host"}
	KindInvalidParameters    = Kind{BackendFailure, "Invalid_parameters"}
	KindInvalidConfiguration = Kind{BackendFailure, "Invalid_configuration"}
	KindAlreadyExists        = Kind{BackendFailure, "Already_exists"}
	KindDeviceNotFound       = Kind{BackendFailure, "Device_not_found"}
	KindDeviceNotBlank       = Kind{BackendFailure, "Device_not_blank"}
	KindKeyUnavailable       = Kind{BackendFailure, "Key_unavailable"}
	KindWrongPassphrase      = Kind{BackendFailure, "Wrong_passphrase"}
	KindTPMUnavailable       = Kind{BackendFailure, "TPM_unavailable"}
	KindInUse                = Kind{BackendFailure, "In_use"}
	KindNoSpace              = Kind{BackendFailure, "No_space_left"}
	KindToolMissing          = Kind{BackendFailure, "Tool_missing"}
	KindNeedsAttention       = Kind{BackendFailure, "Needs_attention"}
	KindInternal             = Kind{BackendFailure, "Internal_error"}

	// KindNotAdoptable: luksext adopt found something it does not take
	// over (files, layout, chain); nothing was changed.
	KindNotAdoptable = Kind{BackendFailure, "Not_adoptable"}
)

// Error is an error with a kind, a message for the administrator and the
// place it was raised. Build it with Errorf or Wrap.
type Error struct {
	Kind Kind
	// Msg is the human sentence: it becomes params[1] and backtrace.error.
	Msg   string
	Cause error
	file  string
	line  int
}

func (e *Error) Error() string { return e.Msg }
func (e *Error) Unwrap() error { return e.Cause }

// Errorf makes an *Error of kind k.
func Errorf(k Kind, format string, args ...any) *Error {
	err := fmt.Errorf(format, args...)
	e := &Error{Kind: k, Msg: err.Error(), Cause: errors.Unwrap(err)}
	e.file, e.line = caller()
	return e
}

// Wrap gives err the kind k; the message is err's.
func Wrap(k Kind, err error) *Error {
	e := &Error{Kind: k, Msg: err.Error(), Cause: err}
	e.file, e.line = caller()
	return e
}

func caller() (string, int) {
	_, file, line, ok := runtime.Caller(2)
	if !ok {
		return "", 0
	}
	return filepath.Base(file), line
}

// Classifier maps an error that is not an *Error to a kind (for example an
// SR type mapping its domain sentinels). It returns false when it has no
// opinion. Wired once per plugin, so all mapping sits in one table.
type Classifier func(error) (Kind, bool)

// ErrorRecord is what a failing call prints on stdout (lib.ml module Types):
// code a string, params a string list, backtrace with string files and int
// lines. Anything else makes the daemon answer an opaque SCRIPT_FAILED.
type ErrorRecord struct {
	Code      string    `json:"code"`
	Params    []string  `json:"params"`
	Backtrace Backtrace `json:"backtrace"`
}

// Backtrace is the error record's backtrace member.
type Backtrace struct {
	Error string   `json:"error"`
	Files []string `json:"files"`
	Lines []int    `json:"lines"`
}

// KindOf is the ONE rule that gives an error its kind: the outermost
// *Error in the chain, else classify, else context cancellation or
// deadline, else Internal_error. ToRecord and the operator command's exit
// codes both use it, so they never disagree.
func KindOf(err error, classify Classifier) Kind {
	var se *Error
	if errors.As(err, &se) {
		return se.Kind
	}
	if k, ok := classifyWith(classify, err); ok {
		return k
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return KindCancelled
	}
	return KindInternal
}

// ToRecord is the ONE place that turns a Go error into the record xapi
// shows, with the kind KindOf gives it.
func ToRecord(err error, classify Classifier) ErrorRecord {
	kind := KindOf(err, classify)
	msg := err.Error()
	files, lines := []string{}, []int{}
	var se *Error
	if errors.As(err, &se) && se.file != "" {
		files, lines = []string{se.file}, []int{se.line}
	}
	return ErrorRecord{
		Code:      kind.Code,
		Params:    []string{kind.Name, msg},
		Backtrace: Backtrace{Error: kind.Name + ": " + msg, Files: files, Lines: lines},
	}
}

func classifyWith(c Classifier, err error) (Kind, bool) {
	if c == nil {
		return Kind{}, false
	}
	return c(err)
}

// Encode renders the record as one line of JSON.
func (r ErrorRecord) Encode() []byte {
	b, err := json.Marshal(r)
	if err != nil { // cannot happen: only strings and ints
		b = []byte(`{"code":"SR_BACKEND_FAILURE","params":["Internal_error","unencodable error"],"backtrace":{"error":"","files":[],"lines":[]}}`)
	}
	return append(b, '\n')
}
