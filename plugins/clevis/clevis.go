// Package clevis keeps disk keys the way clevis does, in Go, so that a
// luksext host needs neither clevis, jose nor tpm2-tools, and so that
// stock `clevis decrypt` reads our JWEs and we read clevis'.
//
// A key is encrypted under a policy (Config): "tpm2" seals it to this
// host's TPM (optionally to PCR values), "tang" binds it to a Tang server
// (McCallum-Relyea exchange), "sss" splits it t-of-n over other pins. The
// result is a compact JWE whose protected header names the pin and carries
// everything needed to decrypt.
//
//	c := clevis.New(tpmSpec, log)
//	jwe, err := c.Encrypt(ctx, cfg, key)
//	key, err := c.Decrypt(ctx, jwe) // errors.Is(err, clevis.ErrPCRMismatch) ...
//
// Plaintexts are secret.Bytes; they are never logged. Errors wrap the kinds
// in errors.go and read as advice to an administrator.
package clevis

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/clevis/jose"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/tpm"
)

// Client encrypts and decrypts clevis JWEs.
type Client struct {
	// TPM is where tpm2 pins seal and unseal; nil means no TPM.
	TPM tpm.Opener
	// HTTP reaches Tang servers. Its timeouts bound each request.
	HTTP *http.Client
	Log  logrus.FieldLogger
}

// TangTimeout bounds one Tang request. An unlock at boot or SR.attach must
// not hang on a dead server; an sss policy can still fall back to the TPM.
const TangTimeout = 10 * time.Second

// New returns a Client using opener for the TPM and a Tang HTTP client with
// bounded connect and response times (and no proxy from the environment:
// Tang servers are on the storage network, and an inherited proxy setting
// would silently route key recovery elsewhere).
func New(opener tpm.Opener, log logrus.FieldLogger) *Client {
	if log == nil {
		log = logrus.StandardLogger()
	}
	tr := &http.Transport{
		DialContext:            (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		TLSHandshakeTimeout:    5 * time.Second,
		ResponseHeaderTimeout:  TangTimeout,
		MaxResponseHeaderBytes: 16 << 10,
	}
	return &Client{TPM: opener, HTTP: &http.Client{Transport: tr, Timeout: TangTimeout}, Log: log}
}

// clevisHeader is the "clevis" member of the protected header.
type clevisHeader struct {
	Pin  string      `json:"pin"`
	SSS  *sssHeader  `json:"sss,omitempty"`
	Tang *tangHeader `json:"tang,omitempty"`
	TPM2 *tpm2Header `json:"tpm2,omitempty"`
}

// Encrypt encrypts plaintext under cfg and returns a compact JWE (no
// trailing newline). cfg is validated first.
func (c *Client) Encrypt(ctx context.Context, cfg Config, plaintext secret.Bytes) (string, error) {
	if err := cfg.Validate(); err != nil {
		return "", err
	}
	j, err := c.encrypt(ctx, cfg, plaintext.Expose(), 0)
	if err != nil {
		return "", err
	}
	return j.Compact(), nil
}

func (c *Client) encrypt(ctx context.Context, cfg Config, pt []byte, depth int) (*jose.JWE, error) {
	if depth > MaxDepth {
		return nil, fmt.Errorf("%w: sss nested deeper than %d levels", ErrInvalidConfig, MaxDepth)
	}
	switch cfg.Pin {
	case PinTPM2:
		return c.encryptTPM2(ctx, cfg.TPM2.withDefaults(), pt)
	case PinTang:
		return c.encryptTang(ctx, *cfg.Tang, pt)
	case PinSSS:
		return c.encryptSSS(ctx, *cfg.SSS, pt, depth)
	}
	return nil, fmt.Errorf("%w: %q", ErrUnsupportedPin, cfg.Pin)
}

// Decrypt decrypts a compact JWE written by clevis or by Encrypt.
func (c *Client) Decrypt(ctx context.Context, compact string) (secret.Bytes, error) {
	j, err := jose.Parse(compact)
	if err != nil {
		return secret.Bytes{}, err
	}
	return c.DecryptJWE(ctx, j)
}

// DecryptJWE decrypts an already parsed JWE (e.g. from a LUKS2 token's
// flattened form, jose.ParseFlattened).
func (c *Client) DecryptJWE(ctx context.Context, j *jose.JWE) (secret.Bytes, error) {
	return c.decrypt(ctx, j, 0)
}

func (c *Client) decrypt(ctx context.Context, j *jose.JWE, depth int) (secret.Bytes, error) {
	if depth > MaxDepth {
		return secret.Bytes{}, fmt.Errorf("%w: sss nested deeper than %d levels", ErrMalformed, MaxDepth)
	}
	h, err := pinOf(j)
	if err != nil {
		return secret.Bytes{}, err
	}
	switch {
	case h.Pin == PinTPM2 && h.TPM2 != nil:
		return c.decryptTPM2(ctx, j, *h.TPM2)
	case h.Pin == PinTang && h.Tang != nil:
		return c.decryptTang(ctx, j, *h.Tang)
	case h.Pin == PinSSS && h.SSS != nil:
		return c.decryptSSS(ctx, j, *h.SSS, depth)
	case h.Pin == PinTPM2 || h.Pin == PinTang || h.Pin == PinSSS:
		return secret.Bytes{}, fmt.Errorf("%w: clevis header for pin %q has no %q member", ErrMalformed, h.Pin, h.Pin)
	}
	return secret.Bytes{}, fmt.Errorf("%w: %q (supported: tpm2, tang, sss)", ErrUnsupportedPin, h.Pin)
}

// pinOf decodes the clevis member of a JWE's header.
func pinOf(j *jose.JWE) (*clevisHeader, error) {
	if len(j.Header.Clevis) == 0 {
		return nil, fmt.Errorf("%w: JWE has no \"clevis\" header member; it was not made by clevis", ErrMalformed)
	}
	var h clevisHeader
	if err := json.Unmarshal(j.Header.Clevis, &h); err != nil {
		return nil, fmt.Errorf("%w: clevis header: %v", ErrMalformed, err)
	}
	if h.Pin == "" {
		return nil, fmt.Errorf("%w: clevis header has no pin", ErrMalformed)
	}
	return &h, nil
}

// PinName returns the pin that made a compact JWE, without decrypting.
func PinName(compact string) (string, error) {
	j, err := jose.Parse(compact)
	if err != nil {
		return "", err
	}
	h, err := pinOf(j)
	if err != nil {
		return "", err
	}
	return h.Pin, nil
}

// sealDir encrypts pt as a "dir" A256GCM JWE with the given clevis header.
func sealDir(h clevisHeader, cek, pt []byte, extra func(*jose.Header)) (*jose.JWE, error) {
	ch, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("encoding clevis header: %w", err)
	}
	hdr := jose.Header{Alg: jose.AlgDir, Clevis: ch}
	if extra != nil {
		extra(&hdr)
	}
	return jose.Seal(hdr, cek, pt)
}

// log tolerates a Client built as a literal without a logger.
func (c *Client) log() logrus.FieldLogger {
	if c.Log == nil {
		return logrus.StandardLogger()
	}
	return c.Log
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}
