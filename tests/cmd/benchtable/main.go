// Command benchtable turns the BENCH lines of `make bench` (read on stdin)
// into one Markdown table: step, luksext, reference tool, ratio, goal.
// The bench tests print their figures in a few shapes; each is read here
// rather than changed there:
//
//	BENCH <step>: luksext 12.0 ms, python3 reference 40.1 ms, ratio 0.30
//	BENCH <step> ours=1.5 bzImage=1.2 ratio=1.25
//	BENCH <step> luksext_ms=1.0   (and further lines of the same step)
//
// A line of any other shape is kept whole in the step column, so nothing
// measured is dropped. Lines that are not BENCH lines (test verdicts) are
// passed through after the table.
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"strings"
)

type row struct{ step, ours, ref, ratio string }

// goals are the targets of the performance issue, by step prefix (and,
// where one prefix names several figures, a part the step must contain:
// the SR.ls goal is the steady per-call figure, not the first call after
// a change or a mount).
var goals = []struct{ prefix, contains, goal string }{
	{"SR.ls at", "(exec per call", "< 50 ms (wall, unloaded host)"},
	{"Volume.stat at", "", "not slower"},
	{"luks open", "", "≥ 10× faster than clevis"},
	{"SR.attach (whole", "", "≥ 10× faster than clevis"},
	{"plugin-exec-ms", "", "≤ 2× a plain ELF"},
	{"Plugin.Query exec vs", "", "≤ 2×"},
}

func goal(step string) string {
	for _, g := range goals {
		if strings.HasPrefix(step, g.prefix) && strings.Contains(step, g.contains) {
			return g.goal
		}
	}
	return ""
}

var kv = regexp.MustCompile(`^([A-Za-z0-9_.-]+)=(\S+)$`)

func parse(line string, rows *[]*row, byStep map[string]*row) {
	body := strings.TrimSpace(strings.TrimPrefix(line, "BENCH"))
	// The figures follow the last ": " (a step may name its own part:
	// "first boot cost (kernel): modprobe dm_crypt: luksext 150 ms").
	if i := strings.LastIndex(body, ": "); i >= 0 {
		step, rest := body[:i], body[i+2:]
		r := &row{step: step}
		for i, part := range strings.Split(rest, ", ") {
			part = strings.TrimSpace(part)
			switch {
			case strings.HasPrefix(part, "ratio "):
				r.ratio = strings.TrimPrefix(part, "ratio ")
			case i == 0:
				r.ours = part
			case r.ref == "":
				r.ref = part
			}
		}
		*rows = append(*rows, r)
		return
	}
	words := strings.Fields(body)
	var step []string
	var pairs [][2]string
	for _, w := range words {
		if m := kv.FindStringSubmatch(w); m != nil {
			pairs = append(pairs, [2]string{m[1], m[2]})
		} else if len(pairs) == 0 {
			step = append(step, w)
		}
	}
	if len(pairs) == 0 || len(step) == 0 {
		*rows = append(*rows, &row{step: body})
		return
	}
	name := strings.Join(step, " ")
	r := byStep[name]
	if r == nil {
		r = &row{step: name}
		byStep[name] = r
		*rows = append(*rows, r)
	}
	for _, p := range pairs {
		v := p[0] + "=" + p[1]
		switch {
		case strings.HasPrefix(p[0], "ratio"):
			r.ratio = v
		case r.ours == "":
			r.ours = v
		case r.ref == "":
			r.ref = v
		default:
			r.ref += " " + v
		}
	}
}

func main() {
	var rows []*row
	byStep := map[string]*row{}
	var other []string
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "BENCH ") {
			parse(line, &rows, byStep)
		} else if strings.TrimSpace(line) != "" {
			other = append(other, line)
		}
	}
	cell := func(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
	fmt.Println("| step | luksext | reference tool | ratio | goal |")
	fmt.Println("|---|---|---|---|---|")
	for _, r := range rows {
		fmt.Printf("| %s | %s | %s | %s | %s |\n", cell(r.step), cell(r.ours), cell(r.ref), cell(r.ratio), cell(goal(r.step)))
	}
	if len(other) > 0 {
		fmt.Println()
		for _, l := range other {
			fmt.Println(l)
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "benchtable:", err)
		os.Exit(1)
	}
}
