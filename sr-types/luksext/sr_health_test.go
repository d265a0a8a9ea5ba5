package luksext

import (
	"context"
	"encoding/json"
	"github.com/luksext/luksext/plugins/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/xapi"
	"github.com/luksext/luksext/plugins/xapi/xapitest"
)

// The degraded-health record as SR.stat reports it, and the XAPI messages
// it posts, over the real JSON-RPC wire to the xapitest server.
func TestAutoUnlockHealthAndMessages(t *testing.T) {
	const srUUID = "6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b11"
	dir := t.TempDir()
	sock := filepath.Join(dir, "xapi")
	srv, err := xapitest.New(sock, nil)
	require.NoError(t, err)
	defer srv.Close()
	root := filepath.Join(dir, "sr-mount")
	// SR.stat checks the SR handle: the SR listed as mounted from its
	// mapping in a mountinfo-format file, as the kernel would show it.
	mountinfo := filepath.Join(dir, "mountinfo")
	s := &srService{SRDeps{MountRoot: root, StateDir: filepath.Join(dir, "run"), Notify: xapi.New(sock, 5*time.Second),
		FS: &fs.FS{MountInfo: mountinfo}}.withDefaults()}
	mnt := filepath.Join(root, srUUID)
	require.NoError(t, writeSRMetaForTest(mnt, srUUID))
	require.NoError(t, os.WriteFile(mountinfo, []byte("100 25 254:0 / "+mnt+" rw,relatime shared:80 - ext4 /dev/mapper/luksext-"+srUUID+" rw\n"), 0o600))
	ctx := context.Background()
	stat := func() smapi.Health {
		st, err := s.stat(ctx, smapi.SRParams{SR: mnt})
		require.NoError(t, err)
		return st.Health
	}

	assert.Equal(t, smapi.Healthy(), stat())
	s.markAutoUnlockWorking(ctx, srUUID)
	assert.Empty(t, srv.Messages(), "nothing to repair: no message")

	s.markAutoUnlockBroken(ctx, srUUID, "was opened with the recovery passphrase kept in xapi because automatic unlock failed (keyslot 0 (tpm2): PCR 7 changed)")
	h := stat()
	assert.Equal(t, "Healthy", h.State, "a working SR stays scannable")
	assert.Equal(t, "Degraded: was opened with the recovery passphrase kept in xapi because automatic unlock failed (keyslot 0 (tpm2): PCR 7 changed)", h.Reason)
	wire, err := json.Marshal(h)
	require.NoError(t, err)
	assert.JSONEq(t, `["Healthy","Degraded: was opened with the recovery passphrase kept in xapi because automatic unlock failed (keyslot 0 (tpm2): PCR 7 changed)"]`, string(wire))
	msgs := srv.Messages()
	require.Len(t, msgs, 1)
	assert.Equal(t, "LUKSEXT_AUTO_UNLOCK_BROKEN", msgs[0].Name)
	assert.Equal(t, float64(3), msgs[0].Priority)
	assert.Equal(t, "SR", msgs[0].Class)
	assert.Equal(t, srUUID, msgs[0].ObjUUID)
	assert.Equal(t, "SR "+srUUID+" was opened with the recovery passphrase kept in xapi because automatic unlock failed (keyslot 0 (tpm2): PCR 7 changed). Automatic unlock at the next boot is not assured: on this host run 'luksext status "+srUUID+"', then 'luksext rebind "+srUUID+" SLOT' for each binding that does not unseal.", msgs[0].Body)

	s.markAutoUnlockBroken(ctx, srUUID, "has key bindings that no longer unseal (keyslot 0 tpm2: PCR 7 changed)")
	assert.Len(t, srv.Messages(), 1, "still broken: no second message")
	assert.Equal(t, "Degraded: has key bindings that no longer unseal (keyslot 0 tpm2: PCR 7 changed)", stat().Reason, "the latest reason is shown")

	s.markAutoUnlockWorking(ctx, srUUID)
	assert.Equal(t, smapi.Healthy(), stat())
	msgs = srv.Messages()
	require.Len(t, msgs, 2)
	assert.Equal(t, xapitest.Message{Name: "LUKSEXT_AUTO_UNLOCK_REPAIRED", Priority: 4, Class: "SR", ObjUUID: srUUID, Body: "SR " + srUUID + ": every key binding unseals again; automatic unlock works."}, msgs[1])
}

// xapi unreachable: the record is still kept; nothing fails.
func TestAutoUnlockWithoutXAPI(t *testing.T) {
	const srUUID = "6f1c3b7e-1b1e-4c4d-9d5e-2a7f0c1e8b12"
	dir := t.TempDir()
	s := &srService{SRDeps{MountRoot: dir, StateDir: filepath.Join(dir, "run"), Notify: xapi.New(filepath.Join(dir, "none"), time.Second)}.withDefaults()}
	s.markAutoUnlockBroken(context.Background(), srUUID, "reason")
	assert.Contains(t, s.health(srUUID).Reason, "Degraded: reason")
}

func writeSRMetaForTest(mnt, srUUID string) error {
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return err
	}
	return writeSRMeta(mnt, SRMeta{Schema: 1, UUID: srUUID, Name: "Encrypted local SR"})
}
