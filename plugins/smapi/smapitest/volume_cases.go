package smapitest

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/luksext/luksext/plugins/smapi"
)

// VolumeCases are generic SMAPIv3 checks of the Volume.* methods and SR.ls
// for any plugin, against an attached SR. sr returns the SR handle (what
// SR.attach returned) for a case; size is the volume size to use (small:
// the plugin creates real images).
func VolumeCases(sr func(c *Ctx) string, size int64) []Case {
	v := volumeSuite{sr: sr, size: size}
	return []Case{
		{"VolumeLifecycle", v.lifecycle},
		{"VolumeIdempotency", v.idempotency},
		{"VolumeUnknownKey", v.unknownKey},
		{"VolumeShrinkRefused", v.shrinkRefused},
		{"VolumeSnapshotAndClone", v.snapshotClone},
		{"VolumeConcurrentCreate", v.concurrentCreate},
		{"VolumeStatDuringCreate", v.statDuringCreate},
	}
}

type volumeSuite struct {
	sr   func(c *Ctx) string
	size int64
}

func (s volumeSuite) params(c *Ctx, kv ...any) map[string]any {
	m := map[string]any{"dbg": "smapitest", "sr": s.sr(c)}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	return m
}

func (s volumeSuite) create(c *Ctx, name string) smapi.Volume {
	c.T.Helper()
	var v smapi.Volume
	c.MustSucceed("Volume.create", s.params(c, "name", name, "description", "made by smapitest", "size", s.size, "sharable", false), &v)
	return v
}

func (s volumeSuite) ls(c *Ctx) map[string]smapi.Volume {
	c.T.Helper()
	var l []smapi.Volume
	c.MustSucceed("SR.ls", s.params(c), &l)
	out := map[string]smapi.Volume{}
	for _, v := range l {
		out[v.Key] = v
	}
	return out
}

func (s volumeSuite) lifecycle(c *Ctx) {
	v := s.create(c, "smapitest-lifecycle")
	if v.Key == "" || v.UUID == nil || *v.UUID != v.Key {
		c.T.Errorf("Volume.create: key %q and uuid %v should be the same fresh UUID (xapi uses key as location, uuid as VDI uuid)", v.Key, v.UUID)
	}
	if v.Name != "smapitest-lifecycle" || v.Description != "made by smapitest" || !v.ReadWrite {
		c.T.Errorf("Volume.create returned %+v", v)
	}
	if v.VirtualSize < s.size {
		c.T.Errorf("virtual_size %d < requested %d (size is a minimum)", v.VirtualSize, s.size)
	}
	if len(v.URI) == 0 {
		c.T.Errorf("Volume.create: no uri, the daemon could not choose a datapath")
	}
	key := v.Key
	kp := func(kv ...any) map[string]any { return s.params(c, append([]any{"key", key}, kv...)...) }

	var st smapi.Volume
	c.MustSucceed("Volume.stat", kp(), &st)
	if st.Key != key || st.VirtualSize != v.VirtualSize {
		c.T.Errorf("Volume.stat = %+v, want the created volume", st)
	}
	c.MustSucceed("Volume.set", kp("k", "vdi-type", "v", "user"), nil)
	c.MustSucceed("Volume.set", kp("k", "odd key/with=chars", "v", "värde \"quoted\""), nil)
	c.MustSucceed("Volume.set_name", kp("new_name", "renamed"), nil)
	c.MustSucceed("Volume.set_description", kp("new_description", "described"), nil)
	c.MustSucceed("Volume.stat", kp(), &st)
	if st.Keys["vdi-type"] != "user" || st.Keys["odd key/with=chars"] != "värde \"quoted\"" {
		c.T.Errorf("keys not returned verbatim: %v", st.Keys)
	}
	if st.Name != "renamed" || st.Description != "described" {
		c.T.Errorf("name/description not updated: %q %q", st.Name, st.Description)
	}
	c.MustSucceed("Volume.unset", kp("k", "vdi-type"), nil)
	st = smapi.Volume{} // decoding into a used value would merge the keys maps
	c.MustSucceed("Volume.stat", kp(), &st)
	if _, ok := st.Keys["vdi-type"]; ok {
		c.T.Errorf("Volume.unset left the key: %v", st.Keys)
	}

	grown := v.VirtualSize * 2
	c.MustSucceed("Volume.resize", kp("new_size", grown), nil)
	c.MustSucceed("Volume.stat", kp(), &st)
	if st.VirtualSize < grown {
		c.T.Errorf("after resize to %d, virtual_size is %d", grown, st.VirtualSize)
	}

	if _, ok := s.ls(c)[key]; !ok {
		c.T.Errorf("SR.ls does not list volume %s", key)
	}
	c.MustSucceed("Volume.destroy", kp(), nil)
	c.ExpectError("Volume.stat", kp(), "Volume_does_not_exist")
	if _, ok := s.ls(c)[key]; ok {
		c.T.Errorf("SR.ls still lists destroyed volume %s", key)
	}
}

func (s volumeSuite) idempotency(c *Ctx) {
	v := s.create(c, "smapitest-idempotency")
	kp := func(kv ...any) map[string]any { return s.params(c, append([]any{"key", v.Key}, kv...)...) }
	for i := 0; i < 3; i++ {
		c.MustSucceed("Volume.unset", kp("k", "never-set"), nil)
		c.MustSucceed("Volume.set", kp("k", "a", "v", "b"), nil)
		c.MustSucceed("Volume.resize", kp("new_size", v.VirtualSize), nil)
	}
	var st smapi.Volume
	c.MustSucceed("Volume.stat", kp(), &st)
	if len(st.Keys) != 1 || st.Keys["a"] != "b" {
		c.T.Errorf("keys after repeated set/unset: %v", st.Keys)
	}
	c.MustSucceed("Volume.destroy", kp(), nil)
}

func (s volumeSuite) unknownKey(c *Ctx) {
	for _, key := range []string{"00000000-0000-4000-8000-000000000000", "../../etc", ""} {
		p := s.params(c, "key", key)
		c.ExpectError("Volume.stat", p, "Volume_does_not_exist")
		c.ExpectError("Volume.destroy", p, "Volume_does_not_exist")
	}
}

func (s volumeSuite) shrinkRefused(c *Ctx) {
	v := s.create(c, "smapitest-shrink")
	kp := func(kv ...any) map[string]any { return s.params(c, append([]any{"key", v.Key}, kv...)...) }
	r, _ := c.Call("Volume.resize", kp("new_size", v.VirtualSize/2))
	if r.ExitCode == 0 {
		c.T.Errorf("Volume.resize to half the size succeeded; shrinking must be refused")
	}
	var st smapi.Volume
	c.MustSucceed("Volume.stat", kp(), &st)
	if st.VirtualSize != v.VirtualSize {
		c.T.Errorf("refused shrink changed the size: %d -> %d", v.VirtualSize, st.VirtualSize)
	}
	c.MustSucceed("Volume.destroy", kp(), nil)
}

func (s volumeSuite) snapshotClone(c *Ctx) {
	v := s.create(c, "smapitest-snap")
	kp := func(key string, kv ...any) map[string]any { return s.params(c, append([]any{"key", key}, kv...)...) }
	c.MustSucceed("Volume.set", kp(v.Key, "k", "vdi-type", "v", "user"), nil)
	var snap, clone smapi.Volume
	c.MustSucceed("Volume.snapshot", kp(v.Key), &snap)
	c.MustSucceed("Volume.clone", kp(v.Key), &clone)
	if snap.Key == v.Key || clone.Key == v.Key || snap.Key == clone.Key {
		c.T.Errorf("snapshot %s and clone %s must be new volumes distinct from %s", snap.Key, clone.Key, v.Key)
	}
	if snap.ReadWrite {
		c.T.Errorf("a snapshot must be read-only")
	}
	if !clone.ReadWrite {
		c.T.Errorf("a clone must be writable")
	}
	if snap.VirtualSize != v.VirtualSize || clone.VirtualSize != v.VirtualSize {
		c.T.Errorf("sizes differ: %d %d %d", v.VirtualSize, snap.VirtualSize, clone.VirtualSize)
	}
	var st smapi.Volume
	c.MustSucceed("Volume.stat", kp(v.Key), &st)
	if st.Keys["vdi-type"] != "user" || st.Name != v.Name {
		c.T.Errorf("the snapshotted volume changed: %+v", st)
	}
	if len(st.URI) == 0 || len(v.URI) == 0 || st.URI[0] != v.URI[0] {
		c.T.Errorf("the volume's uri changed across a snapshot (%v -> %v); a running VM would lose its disk", v.URI, st.URI)
	}
	l := s.ls(c)
	for _, k := range []string{v.Key, snap.Key, clone.Key} {
		if _, ok := l[k]; !ok {
			c.T.Errorf("SR.ls misses %s", k)
		}
	}
	// snapshot of a snapshot's source again, then destroy in any order
	c.MustSucceed("Volume.snapshot", kp(v.Key), &st)
	for _, k := range []string{snap.Key, v.Key, st.Key, clone.Key} {
		c.MustSucceed("Volume.destroy", kp(k), nil)
		c.ExpectError("Volume.stat", kp(k), "Volume_does_not_exist")
	}
}

// concurrentCreate runs 16 Volume.create calls at once, as xapi may.
func (s volumeSuite) concurrentCreate(c *Ctx) {
	const n = 16
	sr := s.sr(c)
	keys := make([]string, n)
	errs := make([]string, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			r, err := Call(ctx, c.Cfg.Invoker, "Volume.create", map[string]any{"dbg": "smapitest", "sr": sr,
				"name": fmt.Sprintf("smapitest-parallel-%d", i), "description": "", "size": s.size, "sharable": false})
			var v smapi.Volume
			switch {
			case err != nil:
				errs[i] = err.Error()
			case r.ExitCode != 0:
				errs[i] = string(r.Stdout)
			case json.Unmarshal(r.Stdout, &v) != nil:
				errs[i] = "undecodable: " + string(r.Stdout)
			default:
				keys[i] = v.Key
			}
		}(i)
	}
	wg.Wait()
	seen := map[string]bool{}
	for i, k := range keys {
		if errs[i] != "" {
			c.T.Errorf("parallel Volume.create %d failed: %s", i, errs[i])
			continue
		}
		if seen[k] {
			c.T.Errorf("two parallel creates returned the same key %s", k)
		}
		seen[k] = true
	}
	l := s.ls(c)
	for k := range seen {
		v, ok := l[k]
		if !ok {
			c.T.Errorf("SR.ls misses parallel-created %s", k)
			continue
		}
		if v.Name == "" {
			c.T.Errorf("volume %s lost its name", k)
		}
	}
	for k := range seen {
		c.MustSucceed("Volume.destroy", s.params(c, "key", k), nil)
	}
}

// statDuringCreate stats an existing volume and lists the SR while
// creations run: readers never fail or see a half-made volume.
func (s volumeSuite) statDuringCreate(c *Ctx) {
	v := s.create(c, "smapitest-stat-during-create")
	sr := s.sr(c)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var problems []string
	created := []string{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; i < 6; i++ {
			r, err := Call(context.Background(), c.Cfg.Invoker, "Volume.create", map[string]any{"dbg": "smapitest", "sr": sr,
				"name": fmt.Sprintf("smapitest-bg-%d", i), "description": "", "size": s.size, "sharable": false})
			var nv smapi.Volume
			if err == nil && r.ExitCode == 0 && json.Unmarshal(r.Stdout, &nv) == nil {
				mu.Lock()
				created = append(created, nv.Key)
				mu.Unlock()
			}
		}
		close(stop)
	}()
	for done := false; !done; {
		select {
		case <-stop:
			done = true
		default:
		}
		r, err := Call(context.Background(), c.Cfg.Invoker, "Volume.stat", map[string]any{"dbg": "smapitest", "sr": sr, "key": v.Key})
		if err != nil || r.ExitCode != 0 {
			problems = append(problems, fmt.Sprintf("Volume.stat during create: %v %s", err, r.Stdout))
		}
		r, err = Call(context.Background(), c.Cfg.Invoker, "SR.ls", map[string]any{"dbg": "smapitest", "sr": sr})
		var l []smapi.Volume
		if err != nil || r.ExitCode != 0 || json.Unmarshal(r.Stdout, &l) != nil {
			problems = append(problems, fmt.Sprintf("SR.ls during create: %v %s", err, r.Stdout))
		}
		for _, x := range l {
			if x.Name == "" && x.Key != "" {
				problems = append(problems, "SR.ls returned a half-made volume "+x.Key)
			}
		}
	}
	wg.Wait()
	for _, p := range problems {
		c.T.Errorf("%s", p)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(created) != 6 {
		c.T.Errorf("background creates: %d of 6 succeeded", len(created))
	}
	for _, k := range append(created, v.Key) {
		c.MustSucceed("Volume.destroy", s.params(c, "key", k), nil)
	}
}
