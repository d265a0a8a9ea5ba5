package secret

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const canary = "CANARY-correct-horse-battery-staple"

func TestBytes_RedactedInEveryFormattingPath(t *testing.T) {
	s := FromString(canary)
	type holder struct {
		Name string
		Key  Bytes
		Ptr  *Bytes
	}
	h := holder{Name: "x", Key: s, Ptr: &s}
	outs := []string{
		fmt.Sprint(s), fmt.Sprintf("%v %s %q %x %X %#v %+v %d", s, s, s, s, s, s, s, s),
		fmt.Sprintf("%v %+v %#v", h, h, h), fmt.Sprintf("%v", &s), s.String(), s.GoString(),
	}
	j, err := json.Marshal(h)
	require.NoError(t, err)
	outs = append(outs, string(j))
	for _, o := range outs {
		assert.NotContains(t, o, canary)
		assert.NotContains(t, strings.ToLower(o), fmt.Sprintf("%x", canary))
		assert.Contains(t, o, Redacted)
	}
	assert.Equal(t, canary, string(s.Expose()))
}

func TestBytes_WipeZeroes(t *testing.T) {
	s := FromString(canary)
	alias := s.Expose()
	s.Wipe()
	for _, b := range alias {
		require.Zero(t, b)
	}
	Bytes{}.Wipe() // zero value must not panic
}

func TestRandomHex(t *testing.T) {
	a, err := RandomHex(32)
	require.NoError(t, err)
	b, err := RandomHex(32)
	require.NoError(t, err)
	assert.Equal(t, 64, a.Len())
	assert.False(t, a.Equal(b))
	c := a.Clone()
	a.Wipe()
	assert.False(t, a.Equal(c))
}

func TestUnmarshalRefused(t *testing.T) {
	var s Bytes
	assert.Error(t, json.Unmarshal([]byte(`"x"`), &s))
}
