package luksext

import (
	"context"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// attachSteps times SR.attach's steps (find device, unseal, open, fsck,
// mount, GC start) for the "SR attached" log line, which `make bench`
// reads (tests/e2e bench) to print the breakdown.
type attachSteps struct {
	mu sync.Mutex
	ms map[string]float64
}

type attachStepsKey struct{}

func withAttachSteps(ctx context.Context) (context.Context, *attachSteps) {
	s := &attachSteps{ms: map[string]float64{}}
	return context.WithValue(ctx, attachStepsKey{}, s), s
}

// attachStepsOf is nil outside SR.attach; a nil *attachSteps records nothing.
func attachStepsOf(ctx context.Context) *attachSteps {
	s, _ := ctx.Value(attachStepsKey{}).(*attachSteps)
	return s
}

// since adds the time elapsed since t0 to step.
func (s *attachSteps) since(step string, t0 time.Time) {
	if s == nil {
		return
	}
	s.mu.Lock()
	s.ms[step] += float64(time.Since(t0).Microseconds()) / 1000
	s.mu.Unlock()
}

// fields are the log fields, "ms_<step>".
func (s *attachSteps) fields() logrus.Fields {
	f := logrus.Fields{}
	if s == nil {
		return f
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, v := range s.ms {
		f["ms_"+k] = v
	}
	return f
}
