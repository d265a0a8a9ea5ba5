package clevis

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/luksext/luksext/plugins/clevis/jose"
	"github.com/luksext/luksext/plugins/secret"
	"github.com/luksext/luksext/plugins/tpm"
)

// tpm2Header is clevis.tpm2 in the protected header, members sorted as
// jose writes them. jwk_pub/jwk_priv are the marshalled TPM2B_PUBLIC and
// TPM2B_PRIVATE of the sealed object, size prefix included.
type tpm2Header struct {
	Hash    string  `json:"hash,omitempty"`
	JWKPriv string  `json:"jwk_priv"`
	JWKPub  string  `json:"jwk_pub"`
	Key     string  `json:"key,omitempty"`
	PCRBank string  `json:"pcr_bank,omitempty"`
	PCRIDs  PCRList `json:"pcr_ids,omitempty"`
}

var hashAlgs = map[string]tpm2.TPMIAlgHash{
	"sha1":   tpm2.TPMAlgSHA1,
	"sha256": tpm2.TPMAlgSHA256,
	"sha384": tpm2.TPMAlgSHA384,
	"sha512": tpm2.TPMAlgSHA512,
}

// primaryTemplate is tpm2_createprimary's default template, which clevis
// uses: the same in tpm2-tools 3.x to 5.x. It differs from go-tpm's TCG
// SRK templates (no noDA, empty unique): with those, Load of a clevis
// object fails with TPM_RC_INTEGRITY because the primary is another key.
func primaryTemplate(key string, nameAlg tpm2.TPMIAlgHash) tpm2.TPMTPublic {
	attrs := tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
		UserWithAuth: true, Restricted: true, Decrypt: true,
	}
	sym := tpm2.TPMTSymDefObject{
		Algorithm: tpm2.TPMAlgAES,
		KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(128)),
		Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
	}
	if key == "rsa" {
		return tpm2.TPMTPublic{
			Type: tpm2.TPMAlgRSA, NameAlg: nameAlg, ObjectAttributes: attrs,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
				Symmetric: sym, Scheme: tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull}, KeyBits: 2048,
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{}),
		}
	}
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: nameAlg, ObjectAttributes: attrs,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: sym,
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// sealedTemplate is what `tpm2_create -a fixedtpm|fixedparent|noda|
// adminwithpolicy[|userwithauth]` sends. Without a PCR policy userWithAuth
// lets an empty password unseal; with one it must be absent, or the policy
// could be bypassed (the anatol/clevis.go bug).
func sealedTemplate(nameAlg tpm2.TPMIAlgHash, policy []byte) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgKeyedHash, NameAlg: nameAlg,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM: true, FixedParent: true, NoDA: true, AdminWithPolicy: true,
			UserWithAuth: len(policy) == 0,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash, &tpm2.TPMSKeyedHashParms{
			Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgKeyedHash, &tpm2.TPM2BDigest{}),
	}
}

func pcrSelection(bank tpm2.TPMIAlgHash, ids []int) tpm2.TPMLPCRSelection {
	u := make([]uint, len(ids))
	for i, id := range ids {
		u[i] = uint(id)
	}
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: bank, PCRSelect: tpm2.PCClientCompatible.PCRs(u...),
	}}}
}

// PCRPolicyDigest is the authPolicy of an object bound to the given PCR
// values (raw concatenation, ascending PCR order, as tpm2_pcrread -o
// writes them): H(0.. ‖ TPM_CC_PolicyPCR ‖ selection ‖ H(values)).
func PCRPolicyDigest(hash string, bank string, ids []int, values []byte) ([]byte, error) {
	h, ok := hashAlgs[hash]
	if !ok {
		return nil, fmt.Errorf("%w: hash %q", ErrInvalidConfig, hash)
	}
	b, ok := hashAlgs[bank]
	if !ok {
		return nil, fmt.Errorf("%w: pcr_bank %q", ErrInvalidConfig, bank)
	}
	ch, _ := h.Hash()
	vh := ch.New()
	vh.Write(values)
	calc, err := tpm2.NewPolicyCalculator(h)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: vh.Sum(nil)}, Pcrs: pcrSelection(b, ids)}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}

// readPCRs returns the concatenated current values of ids in bank. A TPM
// returns at most 8 digests per PCR_Read, so ask until all are in.
func readPCRs(t transport.TPM, bank tpm2.TPMIAlgHash, ids []int) ([]byte, error) {
	sorted := append([]int(nil), ids...)
	for i := range sorted {
		for j := i + 1; j < len(sorted); j++ {
			if sorted[j] < sorted[i] {
				sorted[i], sorted[j] = sorted[j], sorted[i]
			}
		}
	}
	var out []byte
	for _, id := range sorted {
		rsp, err := tpm2.PCRRead{PCRSelectionIn: pcrSelection(bank, []int{id})}.Execute(t)
		if err != nil {
			return nil, fmt.Errorf("reading PCR %d: %w", id, err)
		}
		if len(rsp.PCRValues.Digests) != 1 {
			return nil, fmt.Errorf("reading PCR %d: the TPM has no such PCR in this bank (is the bank enabled?)", id)
		}
		out = append(out, rsp.PCRValues.Digests[0].Buffer...)
	}
	return out, nil
}

func (c *Client) openTPM(ctx context.Context) (transport.TPMCloser, error) {
	if c.TPM == nil {
		return nil, fmt.Errorf("%w: no TPM configured", ErrTPMAbsent)
	}
	t, err := c.TPM.Open(ctx)
	if err != nil {
		return nil, tpm.Classify(err)
	}
	return t, nil
}

type primaryKey struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
}

func createPrimary(t transport.TPM, key string, nameAlg tpm2.TPMIAlgHash) (primaryKey, func(), error) {
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(primaryTemplate(key, nameAlg)),
	}.Execute(t)
	if err != nil {
		return primaryKey{}, nil, fmt.Errorf("creating the %s primary key under the owner hierarchy: %w", key, err)
	}
	flush := func() { _, _ = tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(t) }
	return primaryKey{rsp.ObjectHandle, rsp.Name}, flush, nil
}

func (c *Client) encryptTPM2(ctx context.Context, cfg TPM2Config, pt []byte) (*jose.JWE, error) {
	nameAlg := hashAlgs[cfg.Hash]
	cek, err := secret.Random(32)
	if err != nil {
		return nil, err
	}
	defer cek.Wipe()
	jwk := octJWK(cek.Expose())
	defer jwk.Wipe()

	var predicted []byte
	if cfg.PCRDigest != "" {
		if predicted, err = base64.RawURLEncoding.DecodeString(cfg.PCRDigest); err != nil {
			return nil, fmt.Errorf("%w: tpm2: pcr_digest is not base64url", ErrInvalidConfig)
		}
	}

	t, err := c.openTPM(ctx)
	if err != nil {
		return nil, err
	}
	defer t.Close()

	var created *tpm2.CreateResponse
	err = tpm.Retry(ctx, func() error {
		primary, flush, err := createPrimary(t, cfg.Key, nameAlg)
		if err != nil {
			return err
		}
		defer flush()
		var policy []byte
		if len(cfg.PCRIDs) > 0 {
			values := predicted
			if values == nil {
				if values, err = readPCRs(t, hashAlgs[cfg.PCRBank], cfg.PCRIDs); err != nil {
					return err
				}
			}
			if policy, err = PCRPolicyDigest(cfg.Hash, cfg.PCRBank, cfg.PCRIDs, values); err != nil {
				return err
			}
		}
		created, err = tpm2.Create{
			ParentHandle: tpm2.AuthHandle{Handle: primary.handle, Name: primary.name, Auth: tpm2.PasswordAuth(nil)},
			InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
				Data: tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: jwk.Expose()}),
			}},
			InPublic: tpm2.New2B(sealedTemplate(nameAlg, policy)),
		}.Execute(t)
		if err != nil {
			return fmt.Errorf("sealing the key: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("tpm2: %w", tpm.Classify(err))
	}
	h := tpm2Header{
		Hash: cfg.Hash, Key: cfg.Key,
		JWKPub:  base64.RawURLEncoding.EncodeToString(tpm2.Marshal(created.OutPublic)),
		JWKPriv: base64.RawURLEncoding.EncodeToString(tpm2.Marshal(created.OutPrivate)),
	}
	if len(cfg.PCRIDs) > 0 {
		h.PCRBank, h.PCRIDs = cfg.PCRBank, cfg.PCRIDs
	}
	c.log().WithFields(map[string]any{"pin": PinTPM2, "key": cfg.Key, "pcr_bank": h.PCRBank, "pcr_ids": h.PCRIDs.String()}).Debug("sealed a key to the TPM")
	return sealDir(clevisHeader{Pin: PinTPM2, TPM2: &h}, cek.Expose(), pt, nil)
}

// octJWK builds the JWK clevis seals, {"alg":"A256GCM","k":..,"key_ops":
// ["encrypt","decrypt"],"kty":"oct"} (104 bytes: within the 128 bytes
// every TPM accepts), directly in a secret buffer.
func octJWK(k []byte) secret.Bytes {
	enc := base64.RawURLEncoding
	buf := make([]byte, 0, 64+enc.EncodedLen(len(k)))
	buf = append(buf, `{"alg":"A256GCM","k":"`...)
	kb := make([]byte, enc.EncodedLen(len(k)))
	enc.Encode(kb, k)
	buf = append(buf, kb...)
	wipe(kb)
	buf = append(buf, `","key_ops":["encrypt","decrypt"],"kty":"oct"}`...)
	return secret.New(buf)
}

// octKey extracts the raw key from a JWK JSON without passing it through a
// Go string (strings cannot be wiped). Trailing whitespace (clevis' shell
// pin seals the JWK with a newline) is fine.
func octKey(jwk []byte) ([]byte, error) {
	var m struct {
		Kty string          `json:"kty"`
		K   json.RawMessage `json:"k"`
	}
	if err := json.Unmarshal(jwk, &m); err != nil {
		return nil, fmt.Errorf("%w: the unsealed data is not a JWK", ErrMalformed)
	}
	defer wipe(m.K)
	if m.Kty != "oct" || len(m.K) < 2 || m.K[0] != '"' || m.K[len(m.K)-1] != '"' {
		return nil, fmt.Errorf("%w: the unsealed JWK is not a symmetric key", ErrMalformed)
	}
	raw := bytes.TrimRight(m.K[1:len(m.K)-1], "=")
	k := make([]byte, base64.RawURLEncoding.DecodedLen(len(raw)))
	n, err := base64.RawURLEncoding.Decode(k, raw)
	if err != nil {
		wipe(k)
		return nil, fmt.Errorf("%w: the unsealed JWK key is not base64url", ErrMalformed)
	}
	return k[:n], nil
}

func (c *Client) decryptTPM2(ctx context.Context, j *jose.JWE, h tpm2Header) (secret.Bytes, error) {
	if j.Header.Alg != jose.AlgDir {
		return secret.Bytes{}, fmt.Errorf("%w: tpm2 JWE with alg %q, want dir", ErrMalformed, j.Header.Alg)
	}
	tpm2Defaults(&h.Hash, &h.Key, &h.PCRBank, len(h.PCRIDs) > 0)
	nameAlg, ok := hashAlgs[h.Hash]
	bank, bankOK := hashAlgs[h.PCRBank]
	if !ok || (h.Key != "ecc" && h.Key != "rsa") || (len(h.PCRIDs) > 0 && !bankOK) {
		return secret.Bytes{}, fmt.Errorf("%w: tpm2 header has hash %q, key %q, pcr_bank %q", ErrMalformed, h.Hash, h.Key, h.PCRBank)
	}
	pubB, err1 := base64.RawURLEncoding.DecodeString(h.JWKPub)
	privB, err2 := base64.RawURLEncoding.DecodeString(h.JWKPriv)
	if err1 != nil || err2 != nil || len(pubB) == 0 || len(privB) == 0 {
		return secret.Bytes{}, fmt.Errorf("%w: tpm2 header jwk_pub/jwk_priv missing or not base64url", ErrMalformed)
	}
	pub, err1 := tpm2.Unmarshal[tpm2.TPM2BPublic](pubB)
	priv, err2 := tpm2.Unmarshal[tpm2.TPM2BPrivate](privB)
	if err1 != nil || err2 != nil {
		return secret.Bytes{}, fmt.Errorf("%w: tpm2 header jwk_pub/jwk_priv are not TPM2B structures", ErrMalformed)
	}
	if contents, err := pub.Contents(); err != nil || contents.Type != tpm2.TPMAlgKeyedHash {
		return secret.Bytes{}, fmt.Errorf("%w: tpm2 header jwk_pub is not a sealed data object", ErrMalformed)
	}

	t, err := c.openTPM(ctx)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("tpm2: %w", err)
	}
	defer t.Close()

	var unsealed []byte
	err = tpm.Retry(ctx, func() error {
		primary, flush, err := createPrimary(t, h.Key, nameAlg)
		if err != nil {
			return err
		}
		defer flush()
		loaded, err := tpm2.Load{
			ParentHandle: tpm2.AuthHandle{Handle: primary.handle, Name: primary.name, Auth: tpm2.PasswordAuth(nil)},
			InPrivate:    *priv, InPublic: *pub,
		}.Execute(t)
		if err != nil {
			return fmt.Errorf("loading the sealed key: %w", err)
		}
		defer func() { _, _ = tpm2.FlushContext{FlushHandle: loaded.ObjectHandle}.Execute(t) }()
		auth := tpm2.PasswordAuth(nil)
		if len(h.PCRIDs) > 0 {
			sess, closeSess, err := tpm2.PolicySession(t, nameAlg, 16)
			if err != nil {
				return fmt.Errorf("starting a policy session: %w", err)
			}
			defer func() { _ = closeSess() }()
			// Empty PcrDigest: the TPM compares its live PCR values.
			if _, err := (tpm2.PolicyPCR{PolicySession: sess.Handle(), Pcrs: pcrSelection(bank, h.PCRIDs)}).Execute(t); err != nil {
				return fmt.Errorf("applying the PCR policy: %w", err)
			}
			auth = sess
		}
		rsp, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: loaded.ObjectHandle, Name: loaded.Name, Auth: auth}}.Execute(t)
		if err != nil {
			return fmt.Errorf("unsealing: %w", err)
		}
		unsealed = rsp.OutData.Buffer
		return nil
	})
	if err != nil {
		err = tpm.Classify(err)
		if errors.Is(err, ErrPCRMismatch) {
			return secret.Bytes{}, fmt.Errorf("tpm2: PCR %s (%s) changed since the key was sealed (firmware, Secure Boot or boot loader update?): unlock with another pin or the recovery passphrase, then re-bind: %w", h.PCRIDs, h.PCRBank, err)
		}
		return secret.Bytes{}, fmt.Errorf("tpm2: %w", err)
	}
	defer wipe(unsealed)
	cek, err := octKey(unsealed)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("tpm2: %w", err)
	}
	defer wipe(cek)
	pt, err := j.Open(cek)
	if err != nil {
		return secret.Bytes{}, fmt.Errorf("tpm2: %w", err)
	}
	return secret.New(pt), nil
}
