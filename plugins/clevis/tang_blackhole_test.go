package clevis_test

import (
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
)

// A Tang server behind a firewall that drops packets accepts nothing and
// answers nothing, unlike a stopped server that refuses at once. An sss
// policy that the TPM can satisfy alone must not wait for it, and one
// that needs Tang must give up within the HTTP timeout, saying which
// server did not answer.
func TestTangSilentServer(t *testing.T) {
	f := newFixture(t, true)
	pt := newPlaintext(t)
	t1, t2 := f.sssTPMTang(t, 1, pt), f.sssTPMTang(t, 2, pt)

	// Replace tangd by a listener that accepts and then stays silent.
	f.tang.Stop()
	l, err := net.Listen("tcp", strings.TrimPrefix(f.tang.URL, "http://"))
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = c.Close() })
		}
	}()

	c := clevis.New(f.sw.Spec, nil)
	const timeout = 3 * time.Second
	c.HTTP = &http.Client{Timeout: timeout}

	start := time.Now()
	got, err := c.Decrypt(f.ctx(), t1)
	require.NoError(t, err)
	assert.True(t, pt.Equal(got))
	assert.Less(t, time.Since(start), timeout-500*time.Millisecond, "t=1 must not wait for the silent Tang server")

	start = time.Now()
	_, err = c.Decrypt(f.ctx(), t2)
	require.Error(t, err)
	assert.ErrorIs(t, err, clevis.ErrThresholdNotMet)
	assert.ErrorIs(t, err, clevis.ErrTangUnreachable)
	assert.Contains(t, err.Error(), f.tang.URL)
	assert.Less(t, time.Since(start), clevis.TangTimeout, "bounded by the HTTP client's timeout")
}
