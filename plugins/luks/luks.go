// Package luks is the plugin's LUKS layer: format a device (LUKS2 with
// 512-byte sectors, or LUKS1 where dom0's cryptsetup is 1.x), manage
// keyslots, store clevis bindings exactly where clevis keeps them (LUKS2
// token or LUKS1 luksmeta), open and close the dm-crypt mapping, identify
// "our" devices, and crypto-erase.
//
// Everything that changes a keyslot or maps a device goes through the
// cryptsetup CLI (behind run.Runner), with passphrases on stdin or an
// inherited pipe only. Header reads, LUKS2 token writes and luksmeta are
// done in Go, because dom0's cryptsetup may be too old to do them
// (dom0 runs cryptsetup 1.7.4, maybe 2.0.3: 1.7.x has no LUKS2, and the
// 2.0.3 CLI has no `token import`/`token export`).
package luks

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/run"
)

// Manager performs LUKS operations with the host's cryptsetup.
type Manager struct {
	run run.Runner
	log logrus.FieldLogger

	// TokenWriter chooses how LUKS2 tokens are written: TokenWriterAuto
	// uses `cryptsetup token import` when the installed cryptsetup has it
	// and the Go writer otherwise.
	TokenWriter TokenWriter
	// DevDir is where device nodes live ("/dev"); tests point it elsewhere.
	DevDir string
	// OpenWith chooses how Open maps a keyslot (OpenAuto: device-mapper
	// ioctls, cryptsetup as the fallback).
	OpenWith OpenMethod

	capsOnce sync.Mutex
	caps     *Capabilities
}

// TokenWriter selects the LUKS2 token writing method.
type TokenWriter int

const (
	// TokenWriterAuto picks cryptsetup when it can, Go otherwise.
	TokenWriterAuto TokenWriter = iota
	// TokenWriterGo always rewrites the LUKS2 JSON area from Go (what a
	// cryptsetup 2.0.3 host gets).
	TokenWriterGo
	// TokenWriterCryptsetup always uses `cryptsetup token import`.
	TokenWriterCryptsetup
)

// New returns a Manager using r to run cryptsetup.
func New(r run.Runner, log logrus.FieldLogger) *Manager {
	if log == nil {
		log = logrus.StandardLogger()
	}
	return &Manager{run: r, log: log, DevDir: "/dev"}
}

// Capabilities is what the installed cryptsetup can do.
type Capabilities struct {
	Version [3]int
	// LUKS2: luksFormat --type luks2, --sector-size, --label (2.0.0).
	LUKS2 bool
	// PBKDFOptions: --pbkdf, --pbkdf-force-iterations, --pbkdf-memory (2.0.0).
	PBKDFOptions bool
	// TokenImport: `cryptsetup token import/export` (2.0.4).
	TokenImport bool
	// MetadataSize: --luks2-metadata-size (2.1.0).
	MetadataSize bool
}

func (c Capabilities) atLeast(a, b, p int) bool {
	v := c.Version
	if v[0] != a {
		return v[0] > a
	}
	if v[1] != b {
		return v[1] > b
	}
	return v[2] >= p
}

// The cryptsetup versions this package is tested with: 1.7.4 (CentOS 7.5,
// XCP-ng 8.3's dom0), 2.0.3 (CentOS 7.6-7.9) and Debian 12's 2.6.1, each
// in the VM tier (tests/e2e dom0 matrix). Anything before 1.7 is untested
// (and predates XCP-ng 8's CentOS 7.5 base), and a 3.x may change the CLI
// contract; both are refused before anything is changed. A 2.x after 2.6
// keeps the 2.x CLI we use (cryptsetup's release notes only add options
// within 2.x), so it is accepted.
var (
	minCryptsetup = [3]int{1, 7, 0}
	maxMajor      = 2
)

// ErrUnsupportedCryptsetup: the installed cryptsetup is older or newer
// than the versions luksext supports. It wraps run.ErrToolMissing, so an
// SMAPIv3 caller gets Tool_missing with the version in the message.
var ErrUnsupportedCryptsetup = fmt.Errorf("this cryptsetup version is not supported: %w", run.ErrToolMissing)

func (c Capabilities) supported() error {
	if !c.atLeast(minCryptsetup[0], minCryptsetup[1], minCryptsetup[2]) {
		return fmt.Errorf("cryptsetup %s is older than 1.7.0, the oldest luksext works with (XCP-ng 8.3 has 1.7.4); nothing was changed: %w", c, ErrUnsupportedCryptsetup)
	}
	if c.Version[0] > maxMajor {
		return fmt.Errorf("cryptsetup %s is newer than any luksext was tested with (1.7.4, 2.0.3, 2.6.1); nothing was changed: %w", c, ErrUnsupportedCryptsetup)
	}
	return nil
}

// String is the version as cryptsetup prints it.
func (c Capabilities) String() string {
	return fmt.Sprintf("%d.%d.%d", c.Version[0], c.Version[1], c.Version[2])
}

// CapabilitiesFor derives the feature set from a version string such as
// "2.0.3" (exported for the SR layer's diagnostics and for tests).
func CapabilitiesFor(version string) (Capabilities, error) {
	var c Capabilities
	parts := strings.SplitN(strings.TrimSpace(version), ".", 3)
	if len(parts) < 2 {
		return c, fmt.Errorf("cannot understand cryptsetup version %q", version)
	}
	for i, p := range parts {
		// "2.0.3-rc1" style suffixes: keep the leading digits.
		end := 0
		for end < len(p) && p[end] >= '0' && p[end] <= '9' {
			end++
		}
		n, err := strconv.Atoi(p[:end])
		if err != nil {
			return c, fmt.Errorf("cannot understand cryptsetup version %q", version)
		}
		c.Version[i] = n
	}
	c.LUKS2 = c.atLeast(2, 0, 0)
	c.PBKDFOptions = c.LUKS2
	c.TokenImport = c.atLeast(2, 0, 4)
	c.MetadataSize = c.atLeast(2, 1, 0)
	return c, nil
}

// Capabilities runs `cryptsetup --version` once and caches the result.
func (m *Manager) Capabilities(ctx context.Context) (Capabilities, error) {
	m.capsOnce.Lock()
	defer m.capsOnce.Unlock()
	if m.caps != nil {
		return *m.caps, nil
	}
	res, err := m.run.Run(ctx, run.Cmd{Tool: "cryptsetup", Args: []string{"--version"}})
	if err != nil {
		return Capabilities{}, classify(err, "cryptsetup --version")
	}
	// "cryptsetup 2.6.1 flags: UDEV BLKID ..." or "cryptsetup 1.7.4"
	fields := strings.Fields(string(res.Stdout))
	if len(fields) < 2 || fields[0] != "cryptsetup" {
		return Capabilities{}, fmt.Errorf("unexpected output from cryptsetup --version: %q", strings.TrimSpace(string(res.Stdout)))
	}
	c, err := CapabilitiesFor(fields[1])
	if err != nil {
		return Capabilities{}, err
	}
	if err := c.supported(); err != nil {
		return Capabilities{}, err
	}
	m.log.WithField("cryptsetup_version", c.String()).Debug("detected cryptsetup")
	m.caps = &c
	return c, nil
}

// cryptsetup runs one cryptsetup command and classifies its failure.
func (m *Manager) cryptsetup(ctx context.Context, dev string, c run.Cmd) (run.Result, error) {
	c.Tool = "cryptsetup"
	res, err := m.run.Run(ctx, c)
	return res, classify(err, dev)
}
