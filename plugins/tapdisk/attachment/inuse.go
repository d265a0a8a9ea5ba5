package attachment

import (
	"encoding/json"
	"errors"
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
