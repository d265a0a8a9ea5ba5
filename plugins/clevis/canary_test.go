package clevis_test

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/secret"
)

// A recognisable key goes through every pin, at debug log level, through
// successful and failing unlocks; it must not appear, in any usual
// encoding, in the logs or in any error message.
func TestKeyNeverInLogsOrErrors(t *testing.T) {
	f := newFixture(t, true)
	var logs bytes.Buffer
	log := logrus.New()
	log.SetOutput(&logs)
	log.SetLevel(logrus.TraceLevel)
	c := clevis.New(f.sw.Spec, log)

	random, err := secret.RandomHex(16)
	require.NoError(t, err)
	canary := "CANARY-" + string(random.Expose())
	pt := secret.FromString(canary)
	tang := fmt.Sprintf(`{"url":%q,"thp":%q}`, f.tang.URL, f.tang.Thp)
	configs := map[string]string{
		"tpm2": `{"pcr_bank":"sha256","pcr_ids":"7"}`,
		"tang": tang,
		"sss":  fmt.Sprintf(`{"t":2,"pins":{"tpm2":{"pcr_bank":"sha256","pcr_ids":"7"},"tang":%s}}`, tang),
	}
	var texts []string
	jwes := map[string]string{}
	for pin, cfg := range configs {
		jwe, err := c.Encrypt(f.ctx(), f.config(pin, cfg), pt)
		require.NoError(t, err, pin)
		jwes[pin] = jwe
		got, err := c.Decrypt(f.ctx(), jwe)
		require.NoError(t, err, pin)
		require.True(t, pt.Equal(got), pin)
		texts = append(texts, fmt.Sprintf("%v %+v %#v %s", got, got, got, got))
	}
	// Failing paths: PCR changed, Tang down.
	f.extendPCR(7)
	f.tang.Stop()
	for pin, jwe := range jwes {
		_, err := c.Decrypt(f.ctx(), jwe)
		require.Error(t, err, pin)
		texts = append(texts, err.Error(), fmt.Sprintf("%+v %#v", err, err))
	}
	texts = append(texts, logs.String())
	require.NotEmpty(t, logs.String(), "the pins are expected to log something at debug level")

	raw := []byte(canary)
	forms := []string{canary, hex.EncodeToString(raw), base64.StdEncoding.EncodeToString(raw),
		base64.RawURLEncoding.EncodeToString(raw), base64.RawStdEncoding.EncodeToString(raw)}
	all := strings.Join(texts, "\n")
	for _, form := range forms {
		assert.NotContains(t, all, form)
	}
}
