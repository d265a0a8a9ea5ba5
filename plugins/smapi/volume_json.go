package smapi

import (
	"encoding/json"
	"io"
	"sort"
	"strconv"
)

// SR.ls at 10 000 volumes replies with ~3.5 MB of volume records; through
// encoding/json's reflection that is ~30 ms. appendVolume writes exactly
// the bytes json.Marshal writes for a Volume (same field order, same
// string escaping, map keys sorted), by hand.

// StreamResult is a result its handler writes straight to stdout, for
// replies of megabytes (SR.ls at thousands of volumes) that need not sit
// in memory whole. It must write exactly one JSON value and fail only
// when w does: whatever else can fail belongs before the handler returns
// it, since an error record can no longer replace a half-written reply.
type StreamResult func(w io.Writer) error

// AppendVolume appends v's JSON encoding to b: json.Marshal(v), faster.
func AppendVolume(b []byte, v *Volume) []byte { return appendVolume(b, v, "") }

// AppendVolumeKeysJSON is AppendVolume with v.Keys replaced by keys, a
// JSON object already encoded (as encoding/json encodes the map: the
// store keeps the keys of every volume so for SR.ls).
func AppendVolumeKeysJSON(b []byte, v *Volume, keys string) []byte { return appendVolume(b, v, keys) }

// AppendVolumeKeysJSONAt is AppendVolumeKeysJSON that also returns the
// offset in the result of the digits of physical_utilisation, which SR.ls
// replaces in a cached reply.
func AppendVolumeKeysJSONAt(b []byte, v *Volume, keys string) ([]byte, int) {
	return appendVolumeAt(b, v, keys)
}

// appendVolumes appends the JSON array of vs.
func appendVolumes(b []byte, vs []Volume) []byte {
	if vs == nil {
		return append(b, "null"...)
	}
	b = append(b, '[')
	for i := range vs {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendVolume(b, &vs[i], "")
	}
	return append(b, ']')
}

func appendVolume(b []byte, v *Volume, rawKeys string) []byte {
	b, _ = appendVolumeAt(b, v, rawKeys)
	return b
}

func appendVolumeAt(b []byte, v *Volume, rawKeys string) ([]byte, int) {
	b = append(b, `{"key":`...)
	b = appendString(b, v.Key)
	if v.UUID != nil {
		b = append(b, `,"uuid":`...)
		b = appendString(b, *v.UUID)
	}
	b = append(b, `,"name":`...)
	b = appendString(b, v.Name)
	b = append(b, `,"description":`...)
	b = appendString(b, v.Description)
	b = append(b, `,"read_write":`...)
	b = strconv.AppendBool(b, v.ReadWrite)
	b = append(b, `,"sharable":`...)
	b = strconv.AppendBool(b, v.Sharable)
	b = append(b, `,"virtual_size":`...)
	b = strconv.AppendInt(b, v.VirtualSize, 10)
	b = append(b, `,"physical_utilisation":`...)
	phys := len(b)
	b = strconv.AppendInt(b, v.PhysicalUtilisation, 10)
	b = append(b, `,"uri":`...)
	if v.URI == nil {
		b = append(b, "null"...)
	} else {
		b = append(b, '[')
		for i, u := range v.URI {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, u)
		}
		b = append(b, ']')
	}
	b = append(b, `,"keys":`...)
	if rawKeys != "" {
		b = append(b, rawKeys...)
	} else {
		b = appendStringMap(b, v.Keys)
	}
	if v.VolumeType != nil {
		b = append(b, `,"volume_type":`...)
		b = appendString(b, *v.VolumeType)
	}
	if v.CBTEnabled != nil {
		b = append(b, `,"cbt_enabled":`...)
		b = strconv.AppendBool(b, *v.CBTEnabled)
	}
	return append(b, '}'), phys
}

func appendStringMap(b []byte, m map[string]string) []byte {
	if m == nil {
		return append(b, "null"...)
	}
	b = append(b, '{')
	switch len(m) {
	case 0:
	case 1:
		for k, v := range m {
			b = appendString(b, k)
			b = append(b, ':')
			b = appendString(b, v)
		}
	default:
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, k)
			b = append(b, ':')
			b = appendString(b, m[k])
		}
	}
	return append(b, '}')
}

// appendString quotes s as encoding/json does: plain printable ASCII is
// copied; anything else (escapes, HTML characters, control characters,
// non-ASCII, invalid UTF-8) is left to encoding/json itself, so the rare
// case can never differ from it.
func appendString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s) // a string always marshals
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
