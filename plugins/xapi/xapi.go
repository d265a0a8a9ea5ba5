// Package xapi is a small XenAPI client over JSON-RPC 2.0 on xapi's local
// unix socket, built on ybbus/jsonrpc/v3. The plugin uses it for one thing
// xapi-storage-script cannot do for it: device-config keys ending in
// "password" reach SR.create as "<key>_secret" = <uuid of a Secret object>,
// and only XenAPI turns that uuid into the value (secret.get_value).
package xapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/ybbus/jsonrpc/v3"

	"github.com/luksext/luksext/plugins/secret"
)

// DefaultSocket is xapi's local socket on an XCP-ng host; root logs in
// there without a password.
const DefaultSocket = "/var/lib/xcp/xapi"

// Error kinds.
var (
	// ErrUnreachable: xapi did not answer on its socket.
	ErrUnreachable = errors.New("xapi is not reachable on its local socket")
	// ErrSecretNotFound: no Secret object has this uuid.
	ErrSecretNotFound = errors.New("xapi has no secret with this uuid")
)

// APIError is a XenAPI error: an error code and its parameters.
type APIError struct {
	Code   string
	Params []string
}

func (e *APIError) Error() string { return fmt.Sprintf("XenAPI error %s %v", e.Code, e.Params) }

// Client talks to one xapi.
type Client struct {
	rpc jsonrpc.RPCClient
}

// New returns a client for the xapi listening on socket (DefaultSocket if
// empty). Each request is bounded by timeout.
func New(socket string, timeout time.Duration) *Client {
	if socket == "" {
		socket = DefaultSocket
	}
	hc := &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		},
	}
	// The host part is ignored by the unix dialer; xapi serves /jsonrpc.
	return &Client{rpc: jsonrpc.NewClientWithOpts("http://localhost/jsonrpc", &jsonrpc.RPCClientOpts{HTTPClient: hc})}
}

// call runs method and decodes its result into out.
func (c *Client) call(ctx context.Context, out any, method string, params ...any) error {
	resp, err := c.rpc.Call(ctx, method, params...)
	if err != nil {
		var he *jsonrpc.HTTPError
		if errors.As(err, &he) {
			return fmt.Errorf("xapi %s: HTTP %d: %w", method, he.Code, ErrUnreachable)
		}
		return fmt.Errorf("xapi %s: %v: %w", method, err, ErrUnreachable)
	}
	if resp.Error != nil {
		ae := &APIError{Code: resp.Error.Message}
		if data, ok := resp.Error.Data.([]any); ok {
			for _, d := range data {
				ae.Params = append(ae.Params, fmt.Sprint(d))
			}
		}
		return ae
	}
	if out == nil {
		return nil
	}
	return resp.GetObject(out)
}

// session logs in as the local superuser and returns a logout func.
func (c *Client) session(ctx context.Context) (string, func(), error) {
	var ref string
	if err := c.call(ctx, &ref, "session.login_with_password", "root", "", "1.0", "luksext"); err != nil {
		return "", nil, err
	}
	return ref, func() { _ = c.call(context.Background(), nil, "session.logout", ref) }, nil
}

// SecretValue returns the value of the Secret object with this uuid.
func (c *Client) SecretValue(ctx context.Context, uuid string) (secret.Bytes, error) {
	s, logout, err := c.session(ctx)
	if err != nil {
		return secret.Bytes{}, err
	}
	defer logout()
	ref, err := c.secretRef(ctx, s, uuid)
	if err != nil {
		return secret.Bytes{}, err
	}
	var v string
	if err := c.call(ctx, &v, "secret.get_value", s, ref); err != nil {
		return secret.Bytes{}, err
	}
	return secret.FromString(v), nil
}

// DestroySecret removes the Secret object with this uuid; an absent one is
// success (converge).
func (c *Client) DestroySecret(ctx context.Context, uuid string) error {
	s, logout, err := c.session(ctx)
	if err != nil {
		return err
	}
	defer logout()
	ref, err := c.secretRef(ctx, s, uuid)
	if errors.Is(err, ErrSecretNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return c.call(ctx, nil, "secret.destroy", s, ref)
}

func (c *Client) secretRef(ctx context.Context, session, uuid string) (string, error) {
	var ref string
	err := c.call(ctx, &ref, "secret.get_by_uuid", session, uuid)
	var ae *APIError
	if errors.As(err, &ae) && ae.Code == "UUID_INVALID" {
		return "", fmt.Errorf("secret %s: %w", uuid, ErrSecretNotFound)
	}
	return ref, err
}

// PostMessage creates a XAPI message (message.create) about the object
// of class cls ("SR", "Host", ...) with this uuid. priority is xapi's scale,
// 1 critical to 5 informational (xen-api ocaml/xapi-consts/api_messages.ml);
// Xen Orchestra and XenCenter show such messages as notifications.
func (c *Client) PostMessage(ctx context.Context, name string, priority int, cls, objUUID, body string) error {
	s, logout, err := c.session(ctx)
	if err != nil {
		return err
	}
	defer logout()
	return c.call(ctx, nil, "message.create", s, name, priority, cls, objUUID, body)
}
