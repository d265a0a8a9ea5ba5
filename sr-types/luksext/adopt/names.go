package adopt

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"strings"

	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/store"
)

// Names is what xapi knew of one VDI before `xe sr-forget` dropped it.
type Names struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	ReadOnly    bool   `json:"read_only"`
	Sharable    bool   `json:"sharable"`
}

// xeLine is one line of `xe ... params=all`: the key right-aligned, its
// access mode in parentheses (RO, RW, SRO, MRW, ...), possibly
// "[DEPRECATED]", then ": " and the value (xen-api ocaml/xe-cli
// cli_printer.ml pads the keys; values are printed as is).
var xeLine = regexp.MustCompile(`^\s*([A-Za-z0-9_-]+) \( ?[A-Z]+\)(?: \[DEPRECATED\])?\s*: ?(.*)$`)

// ParseNames reads the output of `xe vdi-list sr-uuid=<sr> params=all`
// (records separated by blank lines, each starting with its uuid) into
// names by VDI uuid. A line that is not of that shape is refused rather
// than guessed at, naming its line number.
func ParseNames(r io.Reader) (map[string]Names, error) {
	out := map[string]Names{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	var cur string
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := strings.TrimRight(sc.Text(), "\r")
		if strings.TrimSpace(line) == "" {
			cur = ""
			continue
		}
		m := xeLine.FindStringSubmatch(line)
		if m == nil {
			return nil, smapi.Errorf(smapi.KindInvalidParameters, "--names: line %d is not 'key ( RO): value' as xe vdi-list params=all prints it: %q", lineNo, trim(line))
		}
		key, val := m[1], m[2]
		if key == "uuid" {
			id := strings.ToLower(strings.TrimSpace(val))
			if !store.ValidID(id) {
				return nil, smapi.Errorf(smapi.KindInvalidParameters, "--names: line %d: %q is not a VDI uuid", lineNo, trim(val))
			}
			if _, dup := out[id]; dup {
				return nil, smapi.Errorf(smapi.KindInvalidParameters, "--names: VDI %s appears twice", id)
			}
			cur = id
			out[id] = Names{}
			continue
		}
		if cur == "" {
			return nil, smapi.Errorf(smapi.KindInvalidParameters, "--names: line %d (%s) comes before any 'uuid ( RO)' line", lineNo, key)
		}
		n := out[cur]
		switch key {
		case "name-label":
			n.Name = val
		case "name-description":
			n.Description = val
		case "read-only":
			n.ReadOnly = strings.TrimSpace(val) == "true"
		case "sharable":
			n.Sharable = strings.TrimSpace(val) == "true"
		}
		out[cur] = n
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading --names: %w", err)
	}
	return out, nil
}

func trim(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}
