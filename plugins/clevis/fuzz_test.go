package clevis_test

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/tpm"
)

type offline struct{}

func (offline) RoundTrip(*http.Request) (*http.Response, error) {
	return nil, errors.New("fuzzing runs offline")
}

// Errors a caller can act on. Whatever a hostile or damaged JWE contains,
// Decrypt must fail with one of these (never panic, never succeed without
// the key, never an unclassified error the SMAPI layer cannot map).
var decryptKinds = []error{
	clevis.ErrMalformed, clevis.ErrDecrypt, clevis.ErrUnsupportedPin, clevis.ErrThresholdNotMet,
	clevis.ErrTPMAbsent, clevis.ErrTangUnreachable, clevis.ErrInvalidConfig,
}

// FuzzDecrypt feeds mutated clevis-shaped JWEs to Decrypt with no TPM and
// no network. `go test` runs the seeds; `go test -fuzz FuzzDecrypt
// ./plugins/clevis` explores further.
func FuzzDecrypt(f *testing.F) {
	for _, seed := range []string{
		"",
		"a.b.c.d.e",
		// sss with a prime of 1 byte and a child that is not a JWE
		"eyJhbGciOiJkaXIiLCJjbGV2aXMiOnsicGluIjoic3NzIiwic3NzIjp7InQiOjEsInAiOiJBUSIsImp3ZSI6WyJhLmIuYy5kLmUiXX19LCJlbmMiOiJBMjU2R0NNIn0..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA",
		// tpm2 with 3-byte jwk_pub/jwk_priv
		"eyJhbGciOiJkaXIiLCJjbGV2aXMiOnsicGluIjoidHBtMiIsInRwbTIiOnsiandrX3B1YiI6IkFBQUEiLCJqd2tfcHJpdiI6IkFBQUEifX0sImVuYyI6IkEyNTZHQ00ifQ..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA",
		// tang with an empty adv and an off-curve epk
		"eyJhbGciOiJFQ0RILUVTIiwiY2xldmlzIjp7InBpbiI6InRhbmciLCJ0YW5nIjp7InVybCI6Imh0dHA6Ly94IiwiYWR2Ijp7ImtleXMiOltdfX19LCJlbmMiOiJBMjU2R0NNIiwiZXBrIjp7Imt0eSI6IkVDIiwiY3J2IjoiUC01MjEiLCJ4IjoiQUEiLCJ5IjoiQUEifSwia2lkIjoiayJ9..AAAAAAAAAAAAAAAA.AA.AAAAAAAAAAAAAAAAAAAAAA",
	} {
		f.Add(seed)
	}
	c := clevis.New(tpm.Spec{Kind: tpm.KindDevice, Path: "/nonexistent/luksext-fuzz/tpmrm0"}, nil)
	c.HTTP = &http.Client{Transport: offline{}}
	f.Fuzz(func(t *testing.T, s string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		got, err := c.Decrypt(ctx, s)
		if err == nil {
			t.Fatalf("decrypted a JWE without any key source to %d bytes", got.Len())
		}
		for _, k := range decryptKinds {
			if errors.Is(err, k) {
				return
			}
		}
		t.Fatalf("unclassified error: %v", err)
	})
}
