package luksext

import "github.com/luksext/luksext/plugins/smapi"

// VolumeDeps are the edges of the volume handlers (Volume.*, SR.ls).
type VolumeDeps struct{}

// volumeMethods are the Volume.* implementations and SR.ls.
func volumeMethods(d Deps) []smapi.Method { return nil }
