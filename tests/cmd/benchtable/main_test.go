package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseEveryShape(t *testing.T) {
	var rows []*row
	by := map[string]*row{}
	for _, l := range []string{
		"BENCH SR.ls at 10000 volumes (exec per call, median of 7): luksext 322.4 ms, python3 reference 711.8 ms, ratio 0.45",
		"BENCH plugin-exec-ms ours-with-zip=3.1 plain-elf=2.9 ratio=1.07",
		"BENCH tpm2 luksext_ms=12.0",
		"BENCH tpm2 clevis_decrypt_ms=90.1",
		"BENCH tpm2 ratio_clevis_over_luksext=7.5",
		"BENCH something else entirely",
	} {
		parse(l, &rows, by)
	}
	require.Len(t, rows, 4)
	assert.Equal(t, row{"SR.ls at 10000 volumes (exec per call, median of 7)", "luksext 322.4 ms", "python3 reference 711.8 ms", "0.45"}, *rows[0])
	assert.Equal(t, "< 50 ms (wall, unloaded host)", goal(rows[0].step))
	assert.Equal(t, row{"plugin-exec-ms", "ours-with-zip=3.1", "plain-elf=2.9", "ratio=1.07"}, *rows[1])
	assert.Equal(t, row{"tpm2", "luksext_ms=12.0", "clevis_decrypt_ms=90.1", "ratio_clevis_over_luksext=7.5"}, *rows[2], "lines of one step merge")
	assert.Equal(t, "something else entirely", rows[3].step, "an unknown shape is kept whole")

	parse("BENCH Plugin.Query exec vs a bare static Go JSON echo (median of 60): luksext 25.0 ms, static Go echo 13.0 ms, ratio 1.92", &rows, by)
	assert.Equal(t, row{"Plugin.Query exec vs a bare static Go JSON echo (median of 60)", "luksext 25.0 ms", "static Go echo 13.0 ms", "1.92"}, *rows[4])
	assert.Equal(t, "≤ 2×", goal(rows[4].step))

	parse("BENCH SR.ls at 10000 volumes, first call after a fresh mount (median of 3): luksext 92.8 ms, python3 reference 850.8 ms, ratio 0.11", &rows, by)
	assert.Empty(t, goal(rows[5].step), "the goal is the steady per-call figure")
	parse("BENCH first boot cost (kernel): first crypt table (xts(aes) instantiation, self-tests): luksext 1079 ms", &rows, by)
	assert.Equal(t, row{"first boot cost (kernel): first crypt table (xts(aes) instantiation, self-tests)", "luksext 1079 ms", "", ""}, *rows[6], "figures after the last colon")
}
