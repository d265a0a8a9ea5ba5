package luksext

import "github.com/luksext/luksext/plugins/smapi"

// SRDeps are the edges of the SR lifecycle handlers (SR.*).
type SRDeps struct{}

// srMethods are the SR.* implementations.
func srMethods(d Deps) []smapi.Method { return nil }
