package clevis

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"sort"
	"strconv"
	"strings"
)

// Pin names.
const (
	PinTPM2 = "tpm2"
	PinTang = "tang"
	PinSSS  = "sss"
)

// Config is one clevis policy: a pin and its configuration, as given to
// `clevis encrypt PIN 'CONFIG'`. Exactly the member named by Pin is set.
// ParseConfig and JSON convert from and to clevis' JSON; Validate holds
// every rule in one place.
type Config struct {
	Pin  string
	TPM2 *TPM2Config
	Tang *TangConfig
	SSS  *SSSConfig
}

// TPM2Config is the tpm2 pin's configuration.
type TPM2Config struct {
	// Hash is the name algorithm of the primary, the sealed object and the
	// policy. Only "sha256" is accepted: clevis 19 cannot decrypt its own
	// sha1+PCR JWEs. Empty means sha256.
	Hash string `json:"hash,omitempty"`
	// Key is the primary key type, "ecc" (default; fast on hardware) or "rsa".
	Key string `json:"key,omitempty"`
	// PCRBank is the PCR bank ("sha256", "sha1", ...). Defaults to sha256
	// when PCRIDs is set, and is always written out: clevis' own default
	// differs between versions.
	PCRBank string `json:"pcr_bank,omitempty"`
	// PCRIDs are the PCRs the key is bound to; empty means no PCR policy
	// (the key is only tied to this TPM).
	PCRIDs PCRList `json:"pcr_ids,omitempty"`
	// PCRDigest (base64url of the concatenated expected PCR values) binds to
	// predicted values instead of the current ones, e.g. before an update.
	PCRDigest string `json:"pcr_digest,omitempty"`
}

// TangConfig is the tang pin's configuration.
type TangConfig struct {
	URL string `json:"url"`
	// Thp is the trusted signing key's thumbprint (S256, or S1 for old
	// servers), as printed by `tang-show-keys` or `jose jwk thp`.
	Thp string `json:"thp,omitempty"`
	// Adv is a trusted advertisement (the JWS served at /adv), as an
	// alternative to Thp.
	Adv json.RawMessage `json:"adv,omitempty"`
	// Trust accepts whatever keys the server advertises. It must be set
	// explicitly: there is no silent trust on first use. Not a clevis
	// option (clevis prompts instead), so it is never written to clevis.
	Trust bool `json:"trust,omitempty"`
}

// SSSConfig is the sss pin's configuration: T of the Pins must unlock.
type SSSConfig struct {
	T    int
	Pins []Config
}

// PCRList is a set of PCR indices. clevis writes it as a comma-separated
// string ("0,7"); a JSON array is accepted too.
type PCRList []int

// MarshalJSON writes the clevis string form.
func (l PCRList) MarshalJSON() ([]byte, error) { return json.Marshal(l.String()) }

// String is "0,7".
func (l PCRList) String() string {
	s := make([]string, len(l))
	for i, v := range l {
		s[i] = strconv.Itoa(v)
	}
	return strings.Join(s, ",")
}

// UnmarshalJSON accepts "0,7", "0, 7", [0,7] or ["0","7"].
func (l *PCRList) UnmarshalJSON(b []byte) error {
	var parts []string
	var s string
	var nums []int
	var strs []string
	switch {
	case json.Unmarshal(b, &s) == nil:
		if strings.TrimSpace(s) != "" {
			parts = strings.Split(s, ",")
		}
	case json.Unmarshal(b, &nums) == nil:
		*l = nums
		return nil
	case json.Unmarshal(b, &strs) == nil:
		parts = strs
	default:
		return fmt.Errorf("pcr_ids must be a string like \"0,7\" or an array")
	}
	out := make(PCRList, 0, len(parts))
	for _, p := range parts {
		n, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil {
			return fmt.Errorf("pcr_ids: %q is not a number", p)
		}
		out = append(out, n)
	}
	*l = out
	return nil
}

// MaxDepth limits sss nesting, in encrypt and decrypt, so that a crafted
// JWE cannot make us recurse without end.
const MaxDepth = 20

// ParseConfig reads clevis' JSON configuration for pin and validates it.
func ParseConfig(pin string, cfg []byte) (Config, error) {
	c, err := parseConfig(pin, cfg, 0)
	if err != nil {
		return Config{}, err
	}
	return c, c.Validate()
}

func parseConfig(pin string, cfg []byte, depth int) (Config, error) {
	if depth > MaxDepth {
		return Config{}, fmt.Errorf("%w: sss nested deeper than %d levels", ErrInvalidConfig, MaxDepth)
	}
	if len(bytes.TrimSpace(cfg)) == 0 {
		cfg = []byte("{}")
	}
	c := Config{Pin: pin}
	var err error
	switch pin {
	case PinTPM2:
		c.TPM2 = &TPM2Config{}
		err = json.Unmarshal(cfg, c.TPM2)
	case PinTang:
		c.Tang = &TangConfig{}
		err = json.Unmarshal(cfg, c.Tang)
	case PinSSS:
		c.SSS, err = parseSSS(cfg, depth)
	default:
		return Config{}, fmt.Errorf("%w: %q (supported: tpm2, tang, sss)", ErrUnsupportedPin, pin)
	}
	if err != nil {
		return Config{}, fmt.Errorf("%w: %s: %w", ErrInvalidConfig, pin, err)
	}
	return c, nil
}

func parseSSS(cfg []byte, depth int) (*SSSConfig, error) {
	var raw struct {
		T    *int                       `json:"t"`
		Pins map[string]json.RawMessage `json:"pins"`
	}
	if err := json.Unmarshal(cfg, &raw); err != nil {
		return nil, err
	}
	s := &SSSConfig{T: 1} // clevis' default
	if raw.T != nil {
		s.T = *raw.T
	}
	// Sorted so that the same config always yields children in the same
	// order (JSON objects have none).
	names := make([]string, 0, len(raw.Pins))
	for n := range raw.Pins {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		v := bytes.TrimSpace(raw.Pins[name])
		var list []json.RawMessage
		if len(v) > 0 && v[0] == '{' {
			list = []json.RawMessage{v} // clevis accepts one object for one instance
		} else if err := json.Unmarshal(v, &list); err != nil {
			return nil, fmt.Errorf("pins.%s must be an object or an array of objects", name)
		}
		for _, item := range list {
			child, err := parseConfig(name, item, depth+1)
			if err != nil {
				return nil, err
			}
			s.Pins = append(s.Pins, child)
		}
	}
	return s, nil
}

// JSON is the configuration as clevis takes it on its command line.
func (c Config) JSON() ([]byte, error) {
	switch {
	case c.TPM2 != nil:
		return json.Marshal(c.TPM2.withDefaults())
	case c.Tang != nil:
		t := *c.Tang
		t.Trust = false
		return json.Marshal(t)
	case c.SSS != nil:
		var b bytes.Buffer
		fmt.Fprintf(&b, `{"pins":{`)
		groups, order := map[string][]json.RawMessage{}, []string{}
		for _, p := range c.SSS.Pins {
			j, err := p.JSON()
			if err != nil {
				return nil, err
			}
			if _, ok := groups[p.Pin]; !ok {
				order = append(order, p.Pin)
			}
			groups[p.Pin] = append(groups[p.Pin], j)
		}
		for i, name := range order {
			if i > 0 {
				b.WriteByte(',')
			}
			arr, _ := json.Marshal(groups[name])
			fmt.Fprintf(&b, "%q:%s", name, arr)
		}
		fmt.Fprintf(&b, `},"t":%d}`, c.SSS.T)
		return b.Bytes(), nil
	}
	return nil, fmt.Errorf("%w: empty configuration", ErrInvalidConfig)
}

// tpm2Defaults fills in what clevis-pin-tpm2 assumes when a tpm2
// configuration or JWE header leaves it out: sha256 name algorithm, an ECC
// primary, and the sha256 bank when PCRs are named (the shell pin has no
// default bank and fails instead). Binding and unlocking share it, so a
// JWE we write reads back with the same defaults.
func tpm2Defaults(hash, key, bank *string, hasPCRs bool) {
	if *hash == "" {
		*hash = "sha256"
	}
	if *key == "" {
		*key = "ecc"
	}
	if hasPCRs && *bank == "" {
		*bank = "sha256"
	}
}

func (t TPM2Config) withDefaults() TPM2Config {
	tpm2Defaults(&t.Hash, &t.Key, &t.PCRBank, len(t.PCRIDs) > 0)
	if len(t.PCRIDs) == 0 {
		t.PCRBank = ""
	}
	return t
}

// Validate checks the whole policy (recursively for sss).
func (c Config) Validate() error { return c.validate(0) }

func (c Config) validate(depth int) error {
	if depth > MaxDepth {
		return fmt.Errorf("%w: sss nested deeper than %d levels", ErrInvalidConfig, MaxDepth)
	}
	set := 0
	for _, p := range []bool{c.TPM2 != nil, c.Tang != nil, c.SSS != nil} {
		if p {
			set++
		}
	}
	want := map[string]bool{PinTPM2: c.TPM2 != nil, PinTang: c.Tang != nil, PinSSS: c.SSS != nil}
	if ok, known := want[c.Pin]; !known {
		return fmt.Errorf("%w: %q (supported: tpm2, tang, sss)", ErrUnsupportedPin, c.Pin)
	} else if !ok || set != 1 {
		return fmt.Errorf("%w: pin %q needs exactly its own configuration", ErrInvalidConfig, c.Pin)
	}
	fail := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrInvalidConfig, c.Pin, fmt.Sprintf(format, a...))
	}
	switch {
	case c.TPM2 != nil:
		t := c.TPM2.withDefaults()
		if t.Hash != "sha256" {
			return fail("hash %q: only sha256 is supported (clevis cannot unseal sha1 policies it writes)", t.Hash)
		}
		if t.Key != "ecc" && t.Key != "rsa" {
			return fail("key %q: want ecc or rsa", t.Key)
		}
		if _, ok := hashAlgs[t.PCRBank]; len(t.PCRIDs) > 0 && !ok {
			return fail("pcr_bank %q: want sha1, sha256, sha384 or sha512", t.PCRBank)
		}
		seen := map[int]bool{}
		for _, id := range t.PCRIDs {
			if id < 0 || id > 23 || seen[id] {
				return fail("pcr_ids %q: each PCR must be 0-23 and listed once", t.PCRIDs.String())
			}
			seen[id] = true
		}
		if t.PCRDigest != "" && len(t.PCRIDs) == 0 {
			return fail("pcr_digest needs pcr_ids")
		}
	case c.Tang != nil:
		u, err := url.Parse(c.Tang.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fail("url %q: want http://host[:port][/path]", c.Tang.URL)
		}
		if c.Tang.Thp == "" && len(c.Tang.Adv) == 0 && !c.Tang.Trust {
			return fail("the server's key must be trusted explicitly: give \"thp\" (see tang-show-keys on the server), an \"adv\", or \"trust\": true")
		}
	case c.SSS != nil:
		if c.SSS.T < 1 || c.SSS.T > len(c.SSS.Pins) {
			return fail("threshold t=%d must be between 1 and the number of pins (%d)", c.SSS.T, len(c.SSS.Pins))
		}
		for _, p := range c.SSS.Pins {
			if err := p.validate(depth + 1); err != nil {
				return err
			}
		}
	}
	return nil
}
