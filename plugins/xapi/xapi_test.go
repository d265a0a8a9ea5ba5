package xapi

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/xapi/xapitest"
)

func TestSecretResolution(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "xapi")
	srv, err := xapitest.New(sock, map[string]string{"5d5e...uuid": "CANARY-recovery-pass"})
	require.NoError(t, err)
	defer srv.Close()
	c := New(sock, 5*time.Second)
	ctx := context.Background()

	v, err := c.SecretValue(ctx, "5d5e...uuid")
	require.NoError(t, err)
	assert.Equal(t, "CANARY-recovery-pass", string(v.Expose()))
	assert.Equal(t, []string{"session.login_with_password", "secret.get_by_uuid", "secret.get_value", "session.logout"}, srv.Calls())

	_, err = c.SecretValue(ctx, "unknown-uuid")
	assert.True(t, errors.Is(err, ErrSecretNotFound), "%v", err)
	assert.NotContains(t, err.Error(), "CANARY")

	require.NoError(t, c.DestroySecret(ctx, "5d5e...uuid"))
	assert.False(t, srv.Has("5d5e...uuid"))
	require.NoError(t, c.DestroySecret(ctx, "5d5e...uuid"), "destroying twice converges")
}

func TestUnreachable(t *testing.T) {
	c := New(filepath.Join(t.TempDir(), "no-such-socket"), time.Second)
	_, err := c.SecretValue(context.Background(), "x")
	require.Error(t, err)
	assert.True(t, errors.Is(err, ErrUnreachable), "%v", err)
}

func TestPostMessage(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "xapi")
	srv, err := xapitest.New(sock, nil)
	require.NoError(t, err)
	defer srv.Close()
	c := New(sock, 5*time.Second)
	require.NoError(t, c.PostMessage(context.Background(), "LUKSEXT_AUTO_UNLOCK_BROKEN", 3, "SR", "6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b11", "SR 6f1c... opened with the recovery passphrase"))
	assert.Equal(t, []xapitest.Message{{Name: "LUKSEXT_AUTO_UNLOCK_BROKEN", Priority: 3, Class: "SR", ObjUUID: "6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b11", Body: "SR 6f1c... opened with the recovery passphrase"}}, srv.Messages())
	assert.Equal(t, []string{"session.login_with_password", "message.create", "session.logout"}, srv.Calls())

	err = c.PostMessage(context.Background(), "X", 3, "NotAClass", "u", "b")
	var ae *APIError
	require.True(t, errors.As(err, &ae), "%v", err)
	assert.Equal(t, "INVALID_VALUE", ae.Code)
}
