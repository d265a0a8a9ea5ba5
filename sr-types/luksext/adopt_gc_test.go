package luksext_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/store"
	"github.com/luksext/luksext/plugins/vhd"
	"github.com/luksext/luksext/sr-types/luksext"
	"github.com/luksext/luksext/sr-types/luksext/luksexttest"
)

// The GC deletes uuid-named VHDs without a record once they are 10
// minutes old. During luksext adopt every SMAPIv1 VHD is such a file
// until its record is written: neither StartGC nor a collector pass may
// run while the adopt journal exists. The same SR without the journal
// loses the file, which proves the guard is what kept it.
func TestGCRefusesHalfAdoptedSR(t *testing.T) {
	sr := luksexttest.NewSR(t).Path
	old := filepath.Join(sr, "22222222-2222-4222-8222-222222222222.vhd")
	if err := vhd.Create(old, 2<<20, vhd.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-time.Hour)
	if err := os.Chtimes(old, past, past); err != nil {
		t.Fatal(err)
	}
	// the store's directories, as SR.attach makes them
	for _, d := range []string{"locks", "gc"} {
		if err := os.MkdirAll(filepath.Join(sr, store.MetaDir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	journal := filepath.Join(sr, store.MetaDir, "adopt.json")
	if err := os.WriteFile(journal, []byte(`{"schema":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	d := luksext.VolumeDeps{Images: image.Files{Runner: run.NewExec(log)}}

	if err := luksext.StartGCFrom("/bin/false", sr); !errors.Is(err, luksext.ErrAdoptionPending) {
		t.Fatalf("StartGC on a half-adopted SR: %v", err)
	}
	if err := luksext.CollectOnce(context.Background(), sr, d, nil, log); !errors.Is(err, luksext.ErrAdoptionPending) {
		t.Fatalf("a GC pass on a half-adopted SR: %v", err)
	}
	if _, err := os.Stat(old); err != nil {
		t.Fatalf("the GC touched an unrecorded VHD of a half-adopted SR: %v", err)
	}

	if err := os.Remove(journal); err != nil {
		t.Fatal(err)
	}
	if err := luksext.CollectOnce(context.Background(), sr, d, nil, log); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(old); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("without the journal the GC keeps an unrecorded old VHD (%v): the guard above proved nothing", err)
	}
}

// A running collector (`volume gc <sr>`, not -once) asks the same
// question between passes: it exits when an adoption starts on its SR
// (the adopt journal appears) and when the SR is no longer attached
// (its record is gone).
func TestRunningGCExitsWhenSRMayNotBeCollected(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cause func(t *testing.T, sr string)
	}{
		{"adoption started", func(t *testing.T, sr string) {
			if err := os.WriteFile(filepath.Join(sr, store.MetaDir, "adopt.json"), []byte(`{"schema":1}`), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"SR detached", func(t *testing.T, sr string) {
			if err := os.Remove(filepath.Join(sr, luksext.SRMetaFile)); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sr := luksexttest.NewSR(t).Path
			for _, d := range []string{"locks", "gc"} {
				if err := os.MkdirAll(filepath.Join(sr, store.MetaDir, d), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			done := make(chan int, 1)
			go func() { done <- luksext.RunGC([]string{sr, "-interval", "20ms"}) }()
			select {
			case rc := <-done:
				t.Fatalf("the collector of an attached SR exited (%d) before anything changed", rc)
			case <-time.After(300 * time.Millisecond):
			}
			tc.cause(t, sr)
			select {
			case rc := <-done:
				if rc != 0 {
					t.Fatalf("collector exit code %d", rc)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the collector still runs")
			}
		})
	}
}
