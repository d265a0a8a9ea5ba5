package smapi

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// srTable is a one-method table whose handler records the sr it was given.
func srTable(got *[]string) Table {
	return VolumeIDL().With(Handle("SR.stat", ResultUnit, func(_ context.Context, p SRParams) (Unit, error) {
		*got = append(*got, p.SR)
		return Unit{}, nil
	}))
}

func callMain(t *testing.T, table Table, stdin io.Reader) (errorName string, logs string) {
	t.Helper()
	var out, logBuf bytes.Buffer
	log := logrus.New()
	log.SetOutput(&logBuf)
	Main(context.Background(), Plugin{Kind: "volume", Table: table, Log: log}, Invocation{Args: []string{"SR.stat"}, Stdin: stdin, Stdout: &out})
	var rec struct {
		Code   string   `json:"code"`
		Params []string `json:"params"`
	}
	if json.Unmarshal(out.Bytes(), &rec) == nil && rec.Code != "" {
		require.Len(t, rec.Params, 2)
		return rec.Params[0] + ": " + rec.Params[1], logBuf.String()
	}
	return "", logBuf.String()
}

// Issue 13 item 14: a 200 MB dbg made a 1.25 GB process and a 200 MB log
// line. The params are read up to MaxParamsSize and refused past it.
func TestMainRefusesOversizedParams(t *testing.T) {
	var got []string
	big := io.MultiReader(strings.NewReader(`{"sr":"/x","dbg":"`), io.LimitReader(repeat('a'), 200<<20), strings.NewReader(`"}`))
	name, logs := callMain(t, srTable(&got), big)
	assert.True(t, strings.HasPrefix(name, "Invalid_parameters: "), name)
	assert.Contains(t, name, "larger than 4 MiB")
	assert.Empty(t, got, "the handler must not run")
	assert.Less(t, len(logs), 64<<10, "the junk must not reach the log")

	name, _ = callMain(t, srTable(&got), strings.NewReader(`{"sr":"/x","dbg":"`+strings.Repeat("a", 1<<20)+`"}`))
	assert.Empty(t, name, "a 1 MiB call is still fine")
	assert.Equal(t, []string{"/x"}, got)
}

type repeat byte

func (r repeat) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

// Issue 13 item 13: {"sr":"/etc","SR":"<real>"} acted on the real SR while
// the logs said sr=/etc. Keys differing only in case are refused, at the
// top level and inside an envelope.
func TestMainRefusesKeysDifferingInCase(t *testing.T) {
	for _, in := range []string{
		`{"dbg":"d","sr":"/etc","SR":"/var/run/sr-mount/real"}`,
		`{"method":"SR.stat","params":{"dbg":"d","Sr":"/etc","sR":"/real"}}`,
	} {
		var got []string
		name, _ := callMain(t, srTable(&got), strings.NewReader(in))
		assert.True(t, strings.HasPrefix(name, "Invalid_parameters: "), "%s: %s", in, name)
		assert.Contains(t, name, "differ only in case")
		assert.Empty(t, got, in)
	}
	var p SRParams
	err := DecodeParams([]byte(`{"dbg":"d","sr":"/etc","SR":"/real"}`), &p)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `"SR" and "sr"`)
	require.NoError(t, DecodeParams([]byte(`{"DBG":"d","Sr":"/real"}`), &p), "one spelling, any case, is fine")
	assert.Equal(t, "/real", p.SR)
}
