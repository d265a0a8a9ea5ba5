package smapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestToRecord(t *testing.T) {
	domain := errors.New("tpm2: PCR 7 changed")
	classify := func(err error) (Kind, bool) {
		if errors.Is(err, domain) {
			return KindKeyUnavailable, true
		}
		return Kind{}, false
	}
	cases := []struct {
		err      error
		wantName string
	}{
		{Errorf(KindVolumeDoesNotExist, "no volume %s", "k1"), "Volume_does_not_exist"},
		{fmt.Errorf("attach: %w", Errorf(KindSRNotAttached, "not attached")), "Sr_not_attached"},
		{fmt.Errorf("unlocking: %w", domain), "Key_unavailable"},
		{fmt.Errorf("waiting: %w", context.DeadlineExceeded), "Cancelled"},
		{errors.New("something odd"), "Internal_error"},
	}
	for _, c := range cases {
		rec := ToRecord(c.err, classify)
		assert.Equal(t, "SR_BACKEND_FAILURE", rec.Code)
		require.Len(t, rec.Params, 2)
		assert.Equal(t, c.wantName, rec.Params[0])
		assert.Equal(t, c.err.Error(), rec.Params[1])
		assert.NotNil(t, rec.Backtrace.Files)
		assert.NotNil(t, rec.Backtrace.Lines)
	}
	rec := ToRecord(Errorf(KindInUse, "busy"), nil)
	assert.Equal(t, []string{"smapi_test.go"}, rec.Backtrace.Files)
}

func TestDecodeParams(t *testing.T) {
	var p SRCreateParams
	require.NoError(t, DecodeParams([]byte(`{"DBG":"d","uuid":"u","configuration":{"device":"/dev/sdb"},"name":"n","description":"","extra":1}`), &p))
	assert.Equal(t, "d", p.Dbg)
	assert.Equal(t, "/dev/sdb", p.Configuration["device"])

	err := DecodeParams([]byte(`{"dbg":"d","uuid":"u","configuration":null,"name":"n"}`), &p)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "configuration")
	assert.Contains(t, err.Error(), "description")

	var q SRParams
	require.NoError(t, DecodeParams([]byte(`{"method":"SR.stat","params":{"dbg":"d","sr":"s"}}`), &q))
	assert.Equal(t, "s", q.SR)
	require.Error(t, DecodeParams([]byte(`[1,2]`), &q))
}

func TestEncodingRules(t *testing.T) {
	b, err := json.Marshal(Volume{Key: "k", URI: []string{}, Keys: map[string]string{}})
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(b, &m))
	for _, opt := range []string{"uuid", "volume_type", "cbt_enabled"} {
		_, present := m[opt]
		assert.False(t, present, "%s must be omitted when absent", opt)
	}
	assert.Contains(t, m, "sharable")

	b, _ = json.Marshal(Healthy())
	assert.JSONEq(t, `["Healthy",""]`, string(b))

	be := Backend{Implementations: []Implementation{
		{XenDisk: &XenDisk{Params: "/dev/xen/blktap-2/tapdev3", Extra: map[string]string{}, BackendType: "vbd3"}},
		{BlockDevice: &PathImpl{Path: "/dev/xen/blktap-2/tapdev3"}},
	}}
	b, err = json.Marshal(be)
	require.NoError(t, err)
	assert.JSONEq(t, `{"implementations":[["XenDisk",{"params":"/dev/xen/blktap-2/tapdev3","extra":{},"backend_type":"vbd3"}],["BlockDevice",{"path":"/dev/xen/blktap-2/tapdev3"}]]}`, string(b))
	var back Backend
	require.NoError(t, json.Unmarshal(b, &back))
	assert.Equal(t, be, back)

	out, _ := EncodeResult(Unit{})
	assert.Equal(t, "null\n", string(out))
}

func TestMethodName(t *testing.T) {
	assert.Equal(t, "SR.attach", MethodName([]string{"/usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.luksext/SR.attach", "--json"}))
	assert.Equal(t, "SR.stat", MethodName([]string{"./volume", "SR.stat", "--json"}))
	assert.Equal(t, "volume", MethodName([]string{"./volume", "--json"}))
}
