package luksext

import (
	"errors"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
)

type classification struct {
	kind  smapi.Kind
	match func(error) bool
}

func is(target error) func(error) bool { return func(err error) bool { return errors.Is(err, target) } }

// classifications maps domain sentinels to kinds, most specific first.
// Later layers (luks, clevis, tpm, volumes) add their rows here.
var classifications = []classification{
	{smapi.KindToolMissing, is(run.ErrToolMissing)},
}
