package luksext

import (
	"fmt"

	"github.com/luksext/luksext/plugins/store"
)

// validate checks a snapshot journal read from the SR before any id in it
// becomes a path: ids are uuids (store.ValidID), all distinct.
func (j snapshotJournal) validate() error {
	for _, f := range []struct{ name, id string }{{"vdi", j.VDI}, {"base", j.Base}, {"new", j.New}} {
		if !store.ValidID(f.id) {
			return fmt.Errorf("%s %q is not a uuid", f.name, f.id)
		}
	}
	if j.OrigParent != "" && !store.ValidID(j.OrigParent) {
		return fmt.Errorf("orig_parent %q is not a uuid", j.OrigParent)
	}
	if j.VDI == j.Base || j.VDI == j.New || j.Base == j.New {
		return fmt.Errorf("vdi, base and new are not distinct")
	}
	return nil
}
