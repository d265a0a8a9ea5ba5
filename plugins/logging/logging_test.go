package logging

import (
	"bytes"
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/assert"
)

func TestRedactHookBlanksSecretFields(t *testing.T) {
	var buf bytes.Buffer
	log := New(Options{Plugin: "volume", Stderr: &buf, Level: "debug"})
	log.WithFields(logrus.Fields{"recovery-password": "CANARY1", "passphrase": "CANARY2", "vol": "v1"}).Info("hello")
	out := buf.String()
	assert.NotContains(t, out, "CANARY")
	assert.Contains(t, out, "vol=v1")
	assert.Contains(t, out, "plugin=volume")
}

func TestLevelFromEnv(t *testing.T) {
	t.Setenv("LUKSEXT_LOG_LEVEL", "warn")
	var buf bytes.Buffer
	log := New(Options{Plugin: "volume", Stderr: &buf})
	log.Info("quiet")
	log.Warn("loud")
	assert.NotContains(t, buf.String(), "quiet")
	assert.Contains(t, buf.String(), "loud")
}
