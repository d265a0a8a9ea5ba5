package smapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
)

type rawJSON = json.RawMessage

var errEmptyVariant = errors.New("smapi: variant with no constructor set")

type variantError struct{ name string }

func (e *variantError) Error() string {
	return fmt.Sprintf("smapi: unknown variant constructor %q", e.name)
}

func marshalVariant(name string, arg any) ([]byte, error) {
	return json.Marshal([]any{name, arg})
}

// unmarshalVariant decodes ["Name", arg] into arg and returns Name.
func unmarshalVariant(b []byte, arg any) (string, error) {
	var parts []json.RawMessage
	if err := json.Unmarshal(b, &parts); err != nil {
		return "", fmt.Errorf("smapi: variant must be [\"Name\", arg]: %w", err)
	}
	if len(parts) != 2 {
		return "", fmt.Errorf("smapi: variant must have 2 elements, has %d", len(parts))
	}
	var name string
	if err := json.Unmarshal(parts[0], &name); err != nil {
		return "", fmt.Errorf("smapi: variant name must be a string: %w", err)
	}
	if bytes.Equal(bytes.TrimSpace(parts[1]), []byte("null")) {
		return "", fmt.Errorf("smapi: variant %s argument is null", name)
	}
	return name, json.Unmarshal(parts[1], arg)
}

func decodeStrict(b []byte, v any) error { return json.Unmarshal(b, v) }

// DecodeParams turns the bytes xapi-storage-script wrote on stdin into the
// method's params record. It accepts the bare params object (what the
// daemon sends), a {"method": ..., "params": {...}} envelope, and an
// envelope whose params is a one-element list (JSON-RPC 1.0 style). Field
// names match case-insensitively and unknown fields are ignored, as rpclib
// does; every field without omitempty must be present.
func DecodeParams(stdin []byte, into any) error {
	body := bytes.TrimSpace(stdin)
	if len(body) == 0 {
		body = []byte("{}")
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(body, &top); err != nil {
		return fmt.Errorf("params must be a JSON object: %w", err)
	}
	if err := foldDuplicates(top); err != nil {
		return err
	}
	if p, ok := lookupFold(top, "params"); ok {
		if _, hasMethod := lookupFold(top, "method"); hasMethod {
			p = bytes.TrimSpace(p)
			if len(p) > 0 && p[0] == '[' {
				var list []json.RawMessage
				if err := json.Unmarshal(p, &list); err != nil || len(list) != 1 {
					return fmt.Errorf("envelope params must be an object or a one-element list")
				}
				p = list[0]
			}
			body = p
			top = nil
			if err := json.Unmarshal(body, &top); err != nil {
				return fmt.Errorf("envelope params must be a JSON object: %w", err)
			}
			if err := foldDuplicates(top); err != nil {
				return err
			}
		}
	}
	if missing := missingRequired(top, into); len(missing) > 0 {
		return fmt.Errorf("missing required parameter(s): %s", strings.Join(missing, ", "))
	}
	if err := json.Unmarshal(body, into); err != nil {
		return fmt.Errorf("decoding parameters: %w", err)
	}
	return nil
}

// foldDuplicates refuses an object with two keys that differ only in case
// ({"sr": "/etc", "SR": "/var/run/sr-mount/<uuid>"}): field names match
// case-insensitively, so which one a decoder picks (encoding/json takes
// the exact match, the logs the first it sees) must never be a question.
func foldDuplicates(obj map[string]json.RawMessage) error {
	seen := make(map[string]string, len(obj))
	for k := range obj {
		low := strings.ToLower(k)
		if other, dup := seen[low]; dup {
			a, b := other, k
			if a > b {
				a, b = b, a
			}
			return fmt.Errorf("parameters %q and %q differ only in case; send each parameter once", a, b)
		}
		seen[low] = k
	}
	return nil
}

// CheckParams is DecodeParams' validation of the object's keys alone,
// for callers that peek at fields before decoding (the call's log fields).
func CheckParams(stdin []byte) error {
	var top map[string]json.RawMessage
	if json.Unmarshal(bytes.TrimSpace(stdin), &top) != nil {
		return nil // not an object: DecodeParams says so
	}
	if err := foldDuplicates(top); err != nil {
		return err
	}
	if p, ok := lookupFold(top, "params"); ok {
		var inner map[string]json.RawMessage
		if json.Unmarshal(p, &inner) == nil {
			return foldDuplicates(inner)
		}
	}
	return nil
}

func lookupFold(m map[string]json.RawMessage, key string) (json.RawMessage, bool) {
	for k, v := range m {
		if strings.EqualFold(k, key) {
			return v, true
		}
	}
	return nil, false
}

// missingRequired lists the json names of into's fields that have no
// omitempty and are absent (or null) in obj.
func missingRequired(obj map[string]json.RawMessage, into any) []string {
	t := reflect.TypeOf(into)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return nil
	}
	var missing []string
	for i := 0; i < t.NumField(); i++ {
		tag := t.Field(i).Tag.Get("json")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "" || name == "-" || strings.Contains(opts, "omitempty") {
			continue
		}
		v, ok := lookupFold(obj, name)
		if !ok || bytes.Equal(bytes.TrimSpace(v), []byte("null")) {
			missing = append(missing, name)
		}
	}
	return missing
}

// EncodeResult renders a handler's result as the single JSON value printed
// on stdout: null for Unit (and nil), the value otherwise.
func EncodeResult(v any) ([]byte, error) {
	switch v := v.(type) {
	case nil, Unit, *Unit:
		return []byte("null\n"), nil
	case []Volume:
		// by hand: SR.ls at thousands of volumes (volume_json.go)
		return append(appendVolumes(make([]byte, 0, 360*len(v)+2), v), '\n'), nil
	case Volume:
		return append(appendVolume(make([]byte, 0, 512), &v, ""), '\n'), nil
	}
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// DecodeLoose is json.Unmarshal, named for call sites that only peek.
func DecodeLoose(b []byte, v any) error { return json.Unmarshal(b, v) }
