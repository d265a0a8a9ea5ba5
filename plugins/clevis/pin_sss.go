package clevis

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"math/big"
	"sync"

	"github.com/luksext/luksext/plugins/clevis/jose"
	"github.com/luksext/luksext/plugins/secret"
)

// sssHeader is clevis.sss: the threshold, the prime (base64url, 32 bytes)
// and one compact JWE per share. The coefficients are not stored; e[0] is
// the content key of the outer JWE.
type sssHeader struct {
	JWE []string `json:"jwe"`
	P   string   `json:"p"`
	T   int      `json:"t"`
}

// sssKeyBytes is the size of the prime and of every share coordinate, as
// in clevis (sss_generate(32, t)): the outer key is an A256GCM key.
const sssKeyBytes = 32

func (c *Client) encryptSSS(ctx context.Context, cfg SSSConfig, pt []byte, depth int) (*jose.JWE, error) {
	// clevis asks OpenSSL for a safe prime; Go has no safe-prime generator
	// and Shamir's scheme only needs a prime field, so any 256-bit prime
	// works (clevis' decryptor makes no assumption about p either).
	p, err := rand.Prime(rand.Reader, sssKeyBytes*8)
	if err != nil {
		return nil, fmt.Errorf("sss: generating a prime: %w", err)
	}
	coeffs := make([]*big.Int, cfg.T)
	for i := range coeffs {
		if coeffs[i], err = rand.Int(rand.Reader, p); err != nil {
			return nil, fmt.Errorf("sss: %w", err)
		}
	}
	defer func() {
		for _, e := range coeffs {
			zeroBig(e)
		}
	}()
	h := sssHeader{P: base64.RawURLEncoding.EncodeToString(p.FillBytes(make([]byte, sssKeyBytes))), T: cfg.T}
	for i, child := range cfg.Pins {
		x, err := rand.Int(rand.Reader, p)
		if err != nil {
			return nil, fmt.Errorf("sss: %w", err)
		}
		// y = Σ e[i]·x^i mod p, evaluated by Horner's rule.
		y := new(big.Int)
		for k := len(coeffs) - 1; k >= 0; k-- {
			y.Mul(y, x).Add(y, coeffs[k]).Mod(y, p)
		}
		point := make([]byte, 2*sssKeyBytes)
		x.FillBytes(point[:sssKeyBytes])
		y.FillBytes(point[sssKeyBytes:])
		zeroBig(y)
		j, err := c.encrypt(ctx, child, point, depth+1)
		wipe(point)
		if err != nil {
			return nil, fmt.Errorf("sss: pin %d (%s): %w", i+1, child.Pin, err)
		}
		h.JWE = append(h.JWE, j.Compact())
	}
	cek := coeffs[0].FillBytes(make([]byte, sssKeyBytes))
	defer wipe(cek)
	return sealDir(clevisHeader{Pin: PinSSS, SSS: &h}, cek, pt, nil)
}

type shareResult struct {
	index int
	point secret.Bytes
	err   error
}

func (c *Client) decryptSSS(ctx context.Context, j *jose.JWE, h sssHeader, depth int) (secret.Bytes, error) {
	if j.Header.Alg != jose.AlgDir {
		return secret.Bytes{}, fmt.Errorf("sss: %w: alg %q, want dir", ErrMalformed, j.Header.Alg)
	}
	pb, err := base64.RawURLEncoding.DecodeString(h.P)
	if err != nil || len(pb) == 0 || len(pb) > 64 {
		return secret.Bytes{}, fmt.Errorf("sss: %w: prime p missing or malformed", ErrMalformed)
	}
	p := new(big.Int).SetBytes(pb)
	// clevis always writes a (safe) prime. Anything else is a crafted
	// header: p = 0 would divide by zero in the interpolation, and a
	// composite modulus is no field, so the "key" would be meaningless.
	if p.Cmp(big.NewInt(2)) < 0 || !p.ProbablyPrime(20) {
		return secret.Bytes{}, fmt.Errorf("sss: %w: p is not a prime", ErrMalformed)
	}
	if h.T < 1 || h.T > len(h.JWE) {
		return secret.Bytes{}, fmt.Errorf("sss: %w: threshold %d with %d shares", ErrMalformed, h.T, len(h.JWE))
	}

	// Like clevis, try all children at once and stop when t succeeded: a
	// dead Tang server must not delay an unlock the TPM can do alone.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan shareResult, len(h.JWE))
	var wg sync.WaitGroup
	for i, s := range h.JWE {
		wg.Add(1)
		go func() {
			defer wg.Done()
			child, err := jose.Parse(s)
			if err != nil {
				results <- shareResult{index: i, err: err}
				return
			}
			pt, err := c.decrypt(ctx, child, depth+1)
			if err == nil && pt.Len() != 2*len(pb) {
				pt.Wipe()
				err = fmt.Errorf("%w: share is %d bytes, want %d", ErrMalformed, pt.Len(), 2*len(pb))
			}
			results <- shareResult{index: i, point: pt, err: err}
		}()
	}
	var points []secret.Bytes
	defer func() {
		for _, pt := range points {
			pt.Wipe()
		}
	}()
	var failures []PinFailure
	for range h.JWE {
		r := <-results
		if r.err != nil {
			pin, where := describeShare(h.JWE[r.index])
			failures = append(failures, PinFailure{Index: r.index, Pin: pin, Where: where, Err: r.err})
			continue
		}
		points = append(points, r.point)
		if len(points) == h.T {
			break
		}
	}
	cancel()
	// Children still running see the cancelled context; wait so that no
	// goroutine outlives the call, then wipe late results.
	go func() { wg.Wait(); close(results) }()
	for r := range results {
		r.point.Wipe()
	}
	if len(points) < h.T {
		return secret.Bytes{}, &ThresholdError{Need: h.T, Got: len(points), Failures: failures}
	}
	cek := lagrangeAtZero(p, len(pb), points)
	defer wipe(cek)
	pt, err := j.Open(cek)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("sss: %w", err)
	}
	return secret.New(pt), nil
}

// lagrangeAtZero recovers f(0) from t points (x‖y, each size bytes).
func lagrangeAtZero(p *big.Int, size int, points []secret.Bytes) []byte {
	k := new(big.Int)
	acc, tmp := new(big.Int), new(big.Int)
	defer zeroBig(acc)
	for i, pi := range points {
		xi := new(big.Int).SetBytes(pi.Expose()[:size])
		yi := new(big.Int).SetBytes(pi.Expose()[size:])
		acc.SetInt64(1)
		for j, pj := range points {
			if i == j {
				continue
			}
			xj := new(big.Int).SetBytes(pj.Expose()[:size])
			// acc *= (0 - xj) / (xi - xj)
			tmp.Neg(xj).Mod(tmp, p)
			acc.Mul(acc, tmp).Mod(acc, p)
			tmp.Sub(xi, xj).Mod(tmp, p)
			if tmp.ModInverse(tmp, p) == nil {
				// Two shares with the same x: corrupt input; the outer JWE
				// will then fail to authenticate.
				tmp.SetInt64(0)
			}
			acc.Mul(acc, tmp).Mod(acc, p)
		}
		acc.Mul(acc, yi).Mod(acc, p)
		k.Add(k, acc).Mod(k, p)
		zeroBig(yi)
	}
	out := k.FillBytes(make([]byte, size))
	zeroBig(k)
	return out
}

// describeShare names a child JWE's pin and where it points, for the
// administrator reading an sss failure.
func describeShare(compact string) (pin, where string) {
	j, err := jose.Parse(compact)
	if err != nil {
		return "", ""
	}
	h, err := pinOf(j)
	if err != nil {
		return "", ""
	}
	switch {
	case h.Tang != nil:
		return h.Pin, h.Tang.URL
	case h.TPM2 != nil && len(h.TPM2.PCRIDs) > 0:
		return h.Pin, fmt.Sprintf("PCR %s (%s)", h.TPM2.PCRIDs, h.TPM2.PCRBank)
	case h.SSS != nil:
		return h.Pin, fmt.Sprintf("%d of %d", h.SSS.T, len(h.SSS.JWE))
	}
	return h.Pin, ""
}

// zeroBig overwrites a big.Int's limbs; math/big offers no wipe of its own.
func zeroBig(x *big.Int) {
	if x == nil {
		return
	}
	w := x.Bits()
	for i := range w {
		w[i] = 0
	}
	x.SetInt64(0)
}
