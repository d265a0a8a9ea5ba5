package attachment

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// InUseUnder lists the images below dir that some domain still has
// attached, from the records alone (no tap-ctl call, no lock: a snapshot
// for "may this SR be destroyed?"). A record that cannot be read counts as
// in use: refusing is the safe answer.
func (m *Manager) InUseUnder(dir string) ([]string, error) {
	entries, err := os.ReadDir(m.dir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	prefix := filepath.Clean(dir) + string(filepath.Separator)
	// Paths are compared as text and as directories (device and inode):
	// /run/sr-mount/<uuid> and /var/run/sr-mount/<uuid> are one SR.
	dirSt, _ := os.Stat(dir)
	var out []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(m.dir(), e.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		var rec Record
		if err != nil || json.Unmarshal(b, &rec) != nil {
			out = append(out, e.Name()+" (unreadable datapath record)")
			continue
		}
		if (strings.HasPrefix(rec.Image.Path, prefix) || sameDirAs(rec.Image.Path, dirSt)) && (len(rec.Domains) > 0 || rec.PID != 0) {
			out = append(out, filepath.Base(rec.Image.Path))
		}
	}
	sort.Strings(out)
	return out, nil
}

// sameDirAs: path's directory is the directory whose FileInfo is dir.
func sameDirAs(path string, dir os.FileInfo) bool {
	if dir == nil {
		return false
	}
	st, err := os.Stat(filepath.Dir(path))
	return err == nil && os.SameFile(st, dir)
}

// RecordedImages lists the base names of the images that have a datapath
// record, from the record files' names alone (no read, no lock: SR.ls
// calls it at every scan). A record is written before tapdisk opens its
// image and removed only after the image was closed for good and
// Manager.Closed ran, so an image without one is not open in any tapdisk
// of this boot. Every record counts, whatever its state (a detach that
// failed half way leaves one with no domain: its image may have changed).
func (m *Manager) RecordedImages() ([]string, error) {
	entries, err := os.ReadDir(m.dir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		stem, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		// name(img): <base>-<16 hex digits of the path's hash>
		i := strings.LastIndexByte(stem, '-')
		if i < 0 || len(stem)-i-1 != 16 {
			return nil, fmt.Errorf("%s: %w", e.Name(), ErrDamagedRecord)
		}
		out = append(out, stem[:i])
	}
	return out, nil
}
