package clevis

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/luksext/luksext/plugins/clevis/jose"
	"github.com/luksext/luksext/plugins/secret"
)

// tangHeader is clevis.tang in the protected header: the server URL and
// the advertised JWK set (not the JWS) at binding time.
type tangHeader struct {
	Adv json.RawMessage `json:"adv"`
	URL string          `json:"url"`
}

// maxTangReply bounds what we read from a Tang server; an advertisement
// with a few P-521 keys is about 2 KiB.
const maxTangReply = 64 << 10

func (c *Client) tangGet(ctx context.Context, url string) ([]byte, int, error) {
	return c.tangDo(ctx, http.MethodGet, url, nil)
}

func (c *Client) tangDo(ctx context.Context, method, url string, body []byte) ([]byte, int, error) {
	ctx, cancel := context.WithTimeout(ctx, TangTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
	if err != nil {
		return nil, 0, fmt.Errorf("%w: %s: %v", ErrTangUnreachable, url, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/jwk+json")
	}
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: TangTimeout}
	}
	rsp, err := hc.Do(req)
	if err != nil {
		return nil, 0, fmt.Errorf("%w: %s %s: %v", ErrTangUnreachable, method, url, err)
	}
	defer rsp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(rsp.Body, maxTangReply))
	if err != nil {
		return nil, rsp.StatusCode, fmt.Errorf("%w: reading reply from %s: %v", ErrTangUnreachable, url, err)
	}
	return data, rsp.StatusCode, nil
}

// advertisement fetches (or takes from cfg) and verifies a Tang
// advertisement, and checks that it is trusted per cfg.
func (c *Client) advertisement(ctx context.Context, cfg TangConfig) (jose.JWKSet, []byte, error) {
	base := strings.TrimRight(cfg.URL, "/")
	raw := []byte(cfg.Adv)
	if len(raw) == 0 {
		data, status, err := c.tangGet(ctx, base+"/adv")
		if err != nil {
			return jose.JWKSet{}, nil, err
		}
		if status != http.StatusOK {
			return jose.JWKSet{}, nil, fmt.Errorf("%w: GET %s/adv answered HTTP %d: is this a Tang server?", ErrTangUnreachable, base, status)
		}
		raw = data
	}
	jws, err := jose.ParseJWS(raw)
	if err != nil {
		return jose.JWKSet{}, nil, fmt.Errorf("tang: advertisement from %s: %w", base, err)
	}
	payload, err := jws.PayloadBytes()
	if err != nil {
		return jose.JWKSet{}, nil, fmt.Errorf("tang: advertisement from %s: %w", base, err)
	}
	var set jose.JWKSet
	if err := json.Unmarshal(payload, &set); err != nil {
		return jose.JWKSet{}, nil, fmt.Errorf("tang: %w: advertisement payload from %s is not a JWK set", ErrMalformed, base)
	}
	// Every signing key in the set must have signed it (jose jws ver -a),
	// so a key cannot be smuggled into a set signed by another.
	var verifiers []jose.JWK
	for _, k := range set.Keys {
		if k.HasOp("verify") {
			if !jws.VerifiedBy(k) {
				return jose.JWKSet{}, nil, fmt.Errorf("tang: %w: advertisement from %s is not signed by its own signing key", jose.ErrSignature, base)
			}
			verifiers = append(verifiers, k)
		}
	}
	if len(verifiers) == 0 {
		return jose.JWKSet{}, nil, fmt.Errorf("tang: %w: advertisement from %s has no signing key", ErrMalformed, base)
	}
	if cfg.Thp != "" {
		trusted := false
		for _, k := range verifiers {
			trusted = trusted || k.MatchesThumbprint(cfg.Thp)
		}
		if !trusted {
			return jose.JWKSet{}, nil, fmt.Errorf("tang: %w: %s is not signed by key %s; check the thumbprint with tang-show-keys on the server", ErrThumbprintMismatch, base, cfg.Thp)
		}
	} else if len(cfg.Adv) == 0 && !cfg.Trust {
		// Validate already refuses this; kept here so no path trusts silently.
		return jose.JWKSet{}, nil, fmt.Errorf("%w: tang: no thumbprint given and trust not granted", ErrInvalidConfig)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, payload); err != nil {
		return jose.JWKSet{}, nil, fmt.Errorf("tang: %w: %v", ErrMalformed, err)
	}
	return set, compact.Bytes(), nil
}

func (c *Client) encryptTang(ctx context.Context, cfg TangConfig, pt []byte) (*jose.JWE, error) {
	set, setJSON, err := c.advertisement(ctx, cfg)
	if err != nil {
		return nil, err
	}
	var exch *jose.JWK
	for i, k := range set.Keys {
		if k.HasOp("deriveKey") && (k.Alg == "" || k.Alg == "ECMR") {
			exch = &set.Keys[i]
			break
		}
	}
	if exch == nil {
		return nil, fmt.Errorf("tang: %w: advertisement from %s has no exchange (deriveKey) key", ErrMalformed, cfg.URL)
	}
	recipient := jose.JWK{Kty: exch.Kty, Crv: exch.Crv, X: exch.X, Y: exch.Y}
	kid, err := recipient.Thumbprint(jose.ThpS256)
	if err != nil {
		return nil, fmt.Errorf("tang: %w", err)
	}
	epk, cek, err := jose.ECDHESKey(recipient)
	if err != nil {
		return nil, fmt.Errorf("tang: %w", err)
	}
	defer wipe(cek)
	ch, err := json.Marshal(clevisHeader{Pin: PinTang, Tang: &tangHeader{Adv: setJSON, URL: cfg.URL}})
	if err != nil {
		return nil, err
	}
	c.log().WithFields(map[string]any{"pin": PinTang, "url": cfg.URL, "kid": kid}).Debug("bound a key to a Tang server")
	return jose.Seal(jose.Header{Alg: jose.AlgECDHES, Clevis: ch, EPK: &epk, Kid: kid}, cek, pt)
}

func (c *Client) decryptTang(ctx context.Context, j *jose.JWE, h tangHeader) (secret.Bytes, error) {
	if j.Header.Alg != jose.AlgECDHES || j.Header.EPK == nil || j.Header.Kid == "" {
		return secret.Bytes{}, fmt.Errorf("tang: %w: want alg ECDH-ES with epk and kid", ErrMalformed)
	}
	if h.URL == "" || len(h.Adv) == 0 {
		return secret.Bytes{}, fmt.Errorf("tang: %w: header lacks url or adv", ErrMalformed)
	}
	var set jose.JWKSet
	if err := json.Unmarshal(h.Adv, &set); err != nil {
		return secret.Bytes{}, fmt.Errorf("tang: %w: header adv is not a JWK set", ErrMalformed)
	}
	// The server's exchange key S, found by the kid the data was bound to.
	var srv *jose.JWK
	for i, k := range set.Keys {
		if k.MatchesThumbprint(j.Header.Kid) {
			srv = &set.Keys[i]
			break
		}
	}
	if srv == nil {
		return secret.Bytes{}, fmt.Errorf("tang: %w: kid %s is not a key of the embedded advertisement", ErrMalformed, j.Header.Kid)
	}
	curve, cx, cy, err := j.Header.EPK.Point()
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("tang: epk: %w", err)
	}
	scurve, sx, sy, err := srv.Point()
	if err != nil || scurve != curve {
		return secret.Bytes{}, fmt.Errorf("tang: %w: exchange key and epk are not on the same curve", ErrMalformed)
	}
	// McCallum-Relyea: blind C with a fresh E, let the server multiply by
	// its private s, then remove s·E. The server never sees C, and K never
	// crosses the network.
	e, err := jose.RandomScalar(curve)
	if err != nil {
		return secret.Bytes{}, err
	}
	defer wipe(e)
	ex, ey := jose.ScalarBaseMult(curve, e)
	xx, xy := jose.AddPoints(curve, cx, cy, ex, ey)
	req := jose.ECJWK(curve, xx, xy)
	req.Alg = "ECMR"
	body, _ := json.Marshal(req)
	base := strings.TrimRight(h.URL, "/")
	data, status, err := c.tangDo(ctx, http.MethodPost, base+"/rec/"+j.Header.Kid, body)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("tang: %w", err)
	}
	switch {
	case status == http.StatusOK:
	case status == http.StatusBadRequest || status == http.StatusNotFound:
		return secret.Bytes{}, fmt.Errorf("tang: %w: %s refused key %s (HTTP %d); recover with another pin or the recovery passphrase and re-bind", ErrTangKeyUnknown, base, j.Header.Kid, status)
	default:
		return secret.Bytes{}, fmt.Errorf("tang: %w: %s answered HTTP %d", ErrTangUnreachable, base, status)
	}
	var reply jose.JWK
	if err := json.Unmarshal(data, &reply); err != nil || reply.Kty != "EC" || reply.Crv != j.Header.EPK.Crv {
		return secret.Bytes{}, fmt.Errorf("tang: %w: invalid recovery reply from %s", ErrMalformed, base)
	}
	_, yx, yy, err := reply.Point()
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("tang: reply from %s: %w", base, err)
	}
	zx, zy := jose.ScalarMult(curve, sx, sy, e)
	kx, _ := jose.SubPoints(curve, yx, yy, zx, zy)
	z := jose.FieldBytes(curve, kx)
	defer wipe(z)
	cek := jose.DirectKDF(z)
	defer wipe(cek)
	pt, err := j.Open(cek)
	if err != nil {
		if errors.Is(err, jose.ErrDecrypt) {
			return secret.Bytes{}, fmt.Errorf("tang: %w (the server at %s answered with a different key)", err, base)
		}
		return secret.Bytes{}, fmt.Errorf("tang: %w", err)
	}
	return secret.New(pt), nil
}
