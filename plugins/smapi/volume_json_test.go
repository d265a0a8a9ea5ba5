package smapi

import (
	"encoding/json"
	"math/rand"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"
)

// The hand-written volume encoder must write exactly what encoding/json
// writes, for every string xapi or a user can put in a name, description,
// key or value.
func TestVolumeEncodingIsEncodingJSON(t *testing.T) {
	pieces := []string{"", "a", "vol-1", `"`, `\`, "<", ">", "&", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "日本",
		"\u2028", "\u2029", "\xff", "\xc3", "😀", " ", "/var/run/sr-mount/x", "{}", "null"}
	r := rand.New(rand.NewSource(1))
	str := func() string {
		s := ""
		for i := r.Intn(4); i > 0; i-- {
			s += pieces[r.Intn(len(pieces))]
		}
		return s
	}
	for i := 0; i < 3000; i++ {
		v := Volume{Key: str(), Name: str(), Description: str(), ReadWrite: r.Intn(2) == 0, Sharable: r.Intn(2) == 0,
			VirtualSize: r.Int63() - r.Int63(), PhysicalUtilisation: r.Int63()}
		if r.Intn(2) == 0 {
			u := str()
			v.UUID = &u
		}
		if r.Intn(5) > 0 {
			v.URI = []string{}
			for j := r.Intn(3); j > 0; j-- {
				v.URI = append(v.URI, str())
			}
		}
		if r.Intn(5) > 0 {
			v.Keys = map[string]string{}
			for j := r.Intn(4); j > 0; j-- {
				v.Keys[str()] = str()
			}
		}
		if r.Intn(3) == 0 {
			s := str()
			v.VolumeType = &s
		}
		if r.Intn(3) == 0 {
			b := r.Intn(2) == 0
			v.CBTEnabled = &b
		}
		want, err := json.Marshal(v)
		require.NoError(t, err)
		got, err := EncodeResult(v)
		require.NoError(t, err)
		require.Equal(t, string(want)+"\n", string(got))
		if v.Keys != nil {
			keys, _ := json.Marshal(v.Keys)
			got = AppendVolumeKeysJSON(nil, &Volume{Key: v.Key, UUID: v.UUID, Name: v.Name, Description: v.Description,
				ReadWrite: v.ReadWrite, Sharable: v.Sharable, VirtualSize: v.VirtualSize, PhysicalUtilisation: v.PhysicalUtilisation,
				URI: v.URI, VolumeType: v.VolumeType, CBTEnabled: v.CBTEnabled}, string(keys))
			require.Equal(t, string(want), string(got), "keys given as JSON")
			at, off := AppendVolumeKeysJSONAt([]byte("x"), &v, string(keys))
			require.Equal(t, "x"+string(want), string(at))
			digits := strconv.FormatInt(v.PhysicalUtilisation, 10)
			require.Equal(t, `,"physical_utilisation":`+digits, string(at[off-len(`,"physical_utilisation":`):off+len(digits)]), "the offset of the digits")
		}
		list := []Volume{v, v}
		want, _ = json.Marshal(list)
		got, _ = EncodeResult(list)
		require.Equal(t, string(want)+"\n", string(got))
	}
	for _, list := range [][]Volume{nil, {}} {
		want, _ := json.Marshal(list)
		got, _ := EncodeResult(list)
		require.Equal(t, string(want)+"\n", string(got))
	}
}
