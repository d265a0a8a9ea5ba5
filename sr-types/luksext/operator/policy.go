package operator

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/clevis/jose"
)

// policyView is a binding's policy as status shows it; it is rebuilt from
// the JWE's protected header (what clevis wrote at bind time), like
// stratisd does for its reports. It holds no secret.
type policyView struct {
	Pin string `json:"pin"`
	// tpm2
	PCRBank string `json:"pcr_bank,omitempty"`
	PCRIDs  string `json:"pcr_ids,omitempty"`
	Key     string `json:"key,omitempty"`
	// tang
	URL string `json:"url,omitempty"`
	Thp string `json:"thp,omitempty"`
	// sss
	Threshold int          `json:"threshold,omitempty"`
	Pins      []policyView `json:"pins,omitempty"`
}

func (p policyView) String() string {
	switch p.Pin {
	case clevis.PinTPM2:
		if p.PCRIDs == "" {
			return "tpm2 (no PCR policy)"
		}
		return fmt.Sprintf("tpm2 PCR %s (%s)", p.PCRIDs, p.PCRBank)
	case clevis.PinTang:
		return fmt.Sprintf("tang %s thp %s", p.URL, p.Thp)
	case clevis.PinSSS:
		var kids []string
		for _, c := range p.Pins {
			kids = append(kids, c.String())
		}
		return fmt.Sprintf("sss %d of {%s}", p.Threshold, strings.Join(kids, ", "))
	}
	return p.Pin
}

// clevisHeaderView is the "clevis" member of a JWE's protected header.
type clevisHeaderView struct {
	Pin  string `json:"pin"`
	TPM2 *struct {
		Hash    string         `json:"hash"`
		Key     string         `json:"key"`
		PCRBank string         `json:"pcr_bank"`
		PCRIDs  clevis.PCRList `json:"pcr_ids"`
	} `json:"tpm2"`
	Tang *struct {
		URL string          `json:"url"`
		Adv json.RawMessage `json:"adv"`
	} `json:"tang"`
	SSS *struct {
		T   int      `json:"t"`
		JWE []string `json:"jwe"`
	} `json:"sss"`
}

// policyOf rebuilds the clevis policy a JWE was made with, so that rebind
// seals the same policy again. A Tang binding is re-made against the
// thumbprint of the signing key in the advertisement it was bound with:
// if the server's keys changed, rebind refuses instead of trusting them.
func policyOf(compact string) (clevis.Config, policyView, error) {
	return policyAt(compact, 0)
}

func policyAt(compact string, depth int) (clevis.Config, policyView, error) {
	if depth > clevis.MaxDepth {
		return clevis.Config{}, policyView{}, fmt.Errorf("%w: sss nested deeper than %d", clevis.ErrMalformed, clevis.MaxDepth)
	}
	j, err := jose.Parse(compact)
	if err != nil {
		return clevis.Config{}, policyView{}, err
	}
	var h clevisHeaderView
	if err := json.Unmarshal(j.Header.Clevis, &h); err != nil || h.Pin == "" {
		return clevis.Config{}, policyView{}, fmt.Errorf("%w: the binding's JWE has no clevis header", clevis.ErrMalformed)
	}
	v := policyView{Pin: h.Pin}
	switch {
	case h.Pin == clevis.PinTPM2 && h.TPM2 != nil:
		cfg := clevis.TPM2Config{Hash: h.TPM2.Hash, Key: h.TPM2.Key, PCRIDs: h.TPM2.PCRIDs, PCRBank: h.TPM2.PCRBank}
		if len(cfg.PCRIDs) > 0 && cfg.PCRBank == "" {
			cfg.PCRBank = "sha256"
		}
		v.PCRBank, v.Key = cfg.PCRBank, cfg.Key
		if len(cfg.PCRIDs) > 0 {
			v.PCRIDs = cfg.PCRIDs.String()
		}
		return clevis.Config{Pin: clevis.PinTPM2, TPM2: &cfg}, v, nil
	case h.Pin == clevis.PinTang && h.Tang != nil:
		var set jose.JWKSet
		if err := json.Unmarshal(h.Tang.Adv, &set); err != nil {
			return clevis.Config{}, policyView{}, fmt.Errorf("%w: tang binding without a readable advertisement", clevis.ErrMalformed)
		}
		for _, k := range set.Keys {
			if k.HasOp("verify") {
				if v.Thp, err = k.Thumbprint(jose.ThpS256); err != nil {
					return clevis.Config{}, policyView{}, err
				}
				break
			}
		}
		if v.Thp == "" {
			return clevis.Config{}, policyView{}, fmt.Errorf("%w: tang advertisement without a signing key", clevis.ErrMalformed)
		}
		v.URL = h.Tang.URL
		return clevis.Config{Pin: clevis.PinTang, Tang: &clevis.TangConfig{URL: v.URL, Thp: v.Thp}}, v, nil
	case h.Pin == clevis.PinSSS && h.SSS != nil:
		cfg := clevis.SSSConfig{T: h.SSS.T}
		v.Threshold = h.SSS.T
		for _, child := range h.SSS.JWE {
			cc, cv, err := policyAt(child, depth+1)
			if err != nil {
				return clevis.Config{}, policyView{}, err
			}
			cfg.Pins = append(cfg.Pins, cc)
			v.Pins = append(v.Pins, cv)
		}
		return clevis.Config{Pin: clevis.PinSSS, SSS: &cfg}, v, nil
	}
	return clevis.Config{}, v, fmt.Errorf("%w: pin %q", clevis.ErrUnsupportedPin, h.Pin)
}
