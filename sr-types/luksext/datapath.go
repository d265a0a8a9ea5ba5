package luksext

import "github.com/luksext/luksext/plugins/smapi"

// DatapathDeps are the edges of the datapath handlers (Datapath.*).
type DatapathDeps struct{}

// datapathMethods are the Datapath.* implementations.
func datapathMethods(d Deps) []smapi.Method { return nil }
