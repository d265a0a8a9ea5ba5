package luks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	gluks "github.com/anatol/luks.go"
	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/secret"
)

// Binding is one clevis binding: the keyslot whose passphrase is the
// plaintext of JWE.
type Binding struct {
	Keyslot int
	// Token is the LUKS2 token id, or the luksmeta slot on LUKS1.
	Token int
	// JWE is the compact serialisation (what `clevis decrypt` reads).
	JWE string
}

// flatJWE is the flattened JSON serialisation clevis stores in LUKS2
// tokens (`jose jwe fmt -i <compact>`): exactly these five members.
type flatJWE struct {
	Ciphertext   string `json:"ciphertext"`
	EncryptedKey string `json:"encrypted_key"`
	IV           string `json:"iv"`
	Protected    string `json:"protected"`
	Tag          string `json:"tag"`
}

type clevisToken struct {
	Type     string   `json:"type"`
	Keyslots []string `json:"keyslots"`
	JWE      flatJWE  `json:"jwe"`
}

func flatten(compact string) (flatJWE, error) {
	p := strings.Split(strings.TrimSpace(compact), ".")
	if len(p) != 5 {
		return flatJWE{}, fmt.Errorf("a clevis JWE has 5 dot-separated parts, got %d", len(p))
	}
	return flatJWE{Protected: p[0], EncryptedKey: p[1], IV: p[2], Ciphertext: p[3], Tag: p[4]}, nil
}

func (f flatJWE) compact() string {
	return strings.Join([]string{f.Protected, f.EncryptedKey, f.IV, f.Ciphertext, f.Tag}, ".")
}

// Bindings returns the clevis bindings on dev, sorted by keyslot. Reads go
// through anatol/luks.go (LUKS2 tokens and LUKS1 luksmeta alike).
func (m *Manager) Bindings(dev string) ([]Binding, error) {
	// Our own header reader first: it tells a missing device and a device
	// that is not LUKS apart, which luks.go does not.
	if _, err := readHeader(dev); err != nil {
		return nil, err
	}
	return bindingsOf(dev)
}

// bindingsOf reads the clevis bindings of a device whose header has been
// read already.
func bindingsOf(dev string) ([]Binding, error) {
	d, err := gluks.Open(dev)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", dev, ErrNotLUKS, err)
	}
	defer d.Close()
	toks, err := d.Tokens()
	if err != nil {
		return nil, fmt.Errorf("reading clevis bindings on %s: %w", dev, err)
	}
	var out []Binding
	for _, t := range toks {
		if t.Type != "clevis" || len(t.Slots) != 1 {
			// clevis maps one token to one keyslot (it greps luksDump for
			// the line before "Keyslot: N"); anything else is not clevis'.
			continue
		}
		b := Binding{Keyslot: t.Slots[0], Token: t.ID}
		if d.Version() == 1 {
			b.JWE = strings.TrimSpace(string(t.Payload))
		} else {
			var ct clevisToken
			if err := json.Unmarshal(t.Payload, &ct); err != nil {
				return nil, fmt.Errorf("%s: clevis token %d is unreadable: %w", dev, t.ID, err)
			}
			b.JWE = ct.JWE.compact()
		}
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Keyslot < out[j].Keyslot })
	return out, nil
}

// Bind stores jwe as the clevis binding of keyslot, replacing any earlier
// binding of that keyslot, exactly where clevis would: a LUKS2 token
// {"type":"clevis","keyslots":["N"],"jwe":{...}} or, on LUKS1, luksmeta
// slot N with clevis' UUID. Binding the same JWE again changes nothing.
func (m *Manager) Bind(ctx context.Context, dev string, keyslot int, jwe string) error {
	h, err := readHeader(dev)
	if err != nil {
		return err
	}
	if !h.hasKeyslot(keyslot) {
		return fmt.Errorf("%s: cannot bind keyslot %d: it is not in use", dev, keyslot)
	}
	flat, err := flatten(jwe)
	if err != nil {
		return err
	}
	existing, err := m.Bindings(dev)
	if err != nil {
		return err
	}
	for _, b := range existing {
		if b.Keyslot == keyslot && b.JWE == flat.compact() {
			return nil
		}
	}
	log := m.log.WithFields(logrus.Fields{"dev": dev, "keyslot": keyslot})
	if h.version == 1 {
		if err := luksmetaWipe(dev, keyslot); err != nil {
			return err
		}
		log.Info("writing clevis binding to luksmeta")
		// No trailing newline: clevis decrypt fails on one (ref §1.6).
		return luksmetaSave(dev, keyslot, ClevisLuksmetaUUID, []byte(flat.compact()))
	}
	if err := m.Unbind(ctx, dev, keyslot); err != nil {
		return err
	}
	tok, err := json.Marshal(clevisToken{Type: "clevis", Keyslots: []string{strconv.Itoa(keyslot)}, JWE: flat})
	if err != nil {
		return err
	}
	log.Info("writing clevis token")
	return m.addToken(ctx, dev, tok)
}

// Unbind removes every clevis binding of keyslot (the keyslot itself
// stays). Unbinding a keyslot without binding succeeds.
func (m *Manager) Unbind(ctx context.Context, dev string, keyslot int) error {
	h, err := readHeader(dev)
	if err != nil {
		return err
	}
	if h.version == 1 {
		slots, err := luksmetaSlots(dev)
		if err != nil {
			return err
		}
		if slots[keyslot] == ClevisLuksmetaUUID {
			return luksmetaWipe(dev, keyslot)
		}
		return nil
	}
	bs, err := m.Bindings(dev)
	if err != nil {
		return err
	}
	for _, b := range bs {
		if b.Keyslot == keyslot {
			if err := m.removeToken(ctx, dev, b.Token); err != nil {
				return err
			}
		}
	}
	return nil
}

func (m *Manager) useCryptsetupTokens(ctx context.Context) (bool, error) {
	switch m.TokenWriter {
	case TokenWriterGo:
		return false, nil
	case TokenWriterCryptsetup:
		return true, nil
	}
	caps, err := m.Capabilities(ctx)
	if err != nil {
		return false, err
	}
	return caps.TokenImport, nil
}

// addToken stores a LUKS2 token (any type) under the lowest free id.
func (m *Manager) addToken(ctx context.Context, dev string, tok []byte) error {
	viaCLI, err := m.useCryptsetupTokens(ctx)
	if err != nil {
		return err
	}
	if viaCLI {
		// Not a secret, but Stdin is the only way to feed cryptsetup JSON
		// without a temporary file.
		_, err := m.cryptsetup(ctx, dev, run.Cmd{Args: []string{"token", "import", dev}, Stdin: secret.New(append([]byte(nil), tok...))})
		if err != nil {
			return fmt.Errorf("importing LUKS2 token into %s: %w", dev, err)
		}
		return nil
	}
	return updateTokens(dev, func(h *header, tokens map[string]json.RawMessage) error {
		if err := checkTokenKeyslots(h, tok); err != nil {
			return err
		}
		id, err := freeTokenID(tokens)
		if err != nil {
			return err
		}
		tokens[strconv.Itoa(id)] = tok
		return nil
	})
}

// checkTokenKeyslots refuses what cryptsetup's validator would refuse: a
// token pointing at a keyslot that does not exist makes the whole header
// invalid for cryptsetup.
func checkTokenKeyslots(h *header, tok []byte) error {
	var t struct {
		Type     string   `json:"type"`
		Keyslots []string `json:"keyslots"`
	}
	if err := json.Unmarshal(tok, &t); err != nil || t.Type == "" || t.Keyslots == nil {
		return errors.New("BUG: a LUKS2 token needs a type and a keyslots array")
	}
	for _, s := range t.Keyslots {
		n, err := strconv.Atoi(s)
		if err != nil || !h.hasKeyslot(n) {
			return fmt.Errorf("LUKS2 token refers to keyslot %q, which is not in use", s)
		}
	}
	return nil
}

func (m *Manager) removeToken(ctx context.Context, dev string, id int) error {
	viaCLI, err := m.useCryptsetupTokens(ctx)
	if err != nil {
		return err
	}
	if viaCLI {
		_, err := m.cryptsetup(ctx, dev, run.Cmd{Args: []string{"token", "remove", "--token-id", strconv.Itoa(id), dev}})
		if err != nil {
			return fmt.Errorf("removing LUKS2 token %d from %s: %w", id, dev, err)
		}
		return nil
	}
	return updateTokens(dev, func(_ *header, tokens map[string]json.RawMessage) error {
		delete(tokens, strconv.Itoa(id))
		return nil
	})
}
