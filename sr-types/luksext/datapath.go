package luksext

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/smapi"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
)

// DatapathDeps are the edges of the datapath handlers (Datapath.*). The
// zero value is the production setup: tap-ctl from Deps.Paths, state in
// attachment.DefaultDir.
type DatapathDeps struct {
	// Runner runs tap-ctl; nil means run.Exec with Deps.Paths.
	Runner run.Runner
	// StateDir holds the per-volume records; empty means
	// attachment.DefaultDir (/run/luksext/datapath).
	StateDir string
}

// ErrBadURI is wrapped when a Datapath call names something that is not a
// luksext volume URI.
var ErrBadURI = errors.New("not a luksext volume URI")

// imageTypes maps a volume file's extension to the tapdisk driver.
var imageTypes = map[string]string{".vhd": "vhd", ".qcow2": "qcow2"}

// VolumeURI is the URI the volume plugin gives for the image file at path.
func VolumeURI(path string) string { return URIScheme + "://" + path }

// ParseVolumeURI turns luksext:///abs/path/<key>.vhd|.qcow2 into what
// tap-ctl open needs.
func ParseVolumeURI(uri string) (tapdisk.Image, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return tapdisk.Image{}, fmt.Errorf("%q: %w", uri, ErrBadURI)
	}
	if u.Scheme != URIScheme || u.Host != "" || u.RawQuery != "" || u.Fragment != "" {
		return tapdisk.Image{}, fmt.Errorf("%q (want %s:///<absolute path of a .vhd or .qcow2 file>): %w", uri, URIScheme, ErrBadURI)
	}
	// Clean paths only: the path names a file tapdisk will write to.
	if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path {
		return tapdisk.Image{}, fmt.Errorf("%q: the path must be absolute and clean: %w", uri, ErrBadURI)
	}
	typ, ok := imageTypes[strings.ToLower(filepath.Ext(u.Path))]
	if !ok {
		return tapdisk.Image{}, fmt.Errorf("%q: unknown image type (want .vhd or .qcow2): %w", uri, ErrBadURI)
	}
	return tapdisk.Image{Type: typ, Path: u.Path}, nil
}

type datapath struct {
	paths   run.Paths
	deps    DatapathDeps
	volumes VolumeDeps
}

func (dp datapath) manager(ctx context.Context) *attachment.Manager {
	r := dp.deps.Runner
	if r == nil {
		r = &run.Exec{Paths: dp.paths, Log: smapi.Logger(ctx)}
	}
	m := &attachment.Manager{Ctl: tapdisk.Ctl{Runner: r}, Dir: dp.deps.StateDir, Log: smapi.Logger(ctx)}
	// A tapdisk left paused by a volume call that died is unpaused by
	// finishing that call's journalled operation (volume_live.go), with
	// this same datapath state.
	vd := dp.volumes
	vd.Datapath = m
	m.Recover = recoverForDatapath(vd)
	// tapdisk may have grown the image: SR.ls's cached allocations of
	// its SR are stale once the record that made SR.ls stat it is gone
	// (volume_ls.go).
	m.Closed = ImageClosed
	return m
}

func (dp datapath) attach(ctx context.Context, p smapi.DatapathParams) (smapi.Backend, error) {
	img, err := ParseVolumeURI(p.URI)
	if err != nil {
		return smapi.Backend{}, err
	}
	if _, err := os.Stat(img.Path); err != nil {
		return smapi.Backend{}, smapi.Errorf(smapi.KindVolumeDoesNotExist, "volume file %s: %v (is the SR attached?)", img.Path, err)
	}
	dev, err := dp.manager(ctx).Attach(ctx, img, p.Domain)
	if err != nil {
		return smapi.Backend{}, err
	}
	// xenopsd needs the XenDisk for a guest VBD and takes the device from
	// the BlockDevice; dom0 (import/export, loopback VBDs) uses the
	// BlockDevice directly (xen-api xenops_server_xen.ml params_of_backend,
	// xapi_vbd.ml plug).
	return smapi.Backend{Implementations: []smapi.Implementation{
		{XenDisk: &smapi.XenDisk{Params: dev, Extra: map[string]string{}, BackendType: "vbd3"}},
		{BlockDevice: &smapi.PathImpl{Path: dev}},
	}}, nil
}

func (dp datapath) activate(readOnly bool) func(context.Context, smapi.DatapathParams) (smapi.Unit, error) {
	return func(ctx context.Context, p smapi.DatapathParams) (smapi.Unit, error) {
		img, err := ParseVolumeURI(p.URI)
		if err != nil {
			return smapi.Unit{}, err
		}
		return smapi.Unit{}, dp.manager(ctx).Activate(ctx, img, p.Domain, readOnly)
	}
}

func (dp datapath) deactivate(ctx context.Context, p smapi.DatapathParams) (smapi.Unit, error) {
	img, err := ParseVolumeURI(p.URI)
	if err != nil {
		return smapi.Unit{}, err
	}
	return smapi.Unit{}, dp.manager(ctx).Deactivate(ctx, img, p.Domain)
}

func (dp datapath) detach(ctx context.Context, p smapi.DatapathParams) (smapi.Unit, error) {
	img, err := ParseVolumeURI(p.URI)
	if err != nil {
		return smapi.Unit{}, err
	}
	return smapi.Unit{}, dp.manager(ctx).Detach(ctx, img, p.Domain)
}

// datapathMethods are the Datapath.* implementations. Datapath.open/close
// stay unimplemented: we do not declare NONPERSISTENT, so the daemon never
// calls them and implements reset-on-boot with Volume.clone instead.
func datapathMethods(d Deps) []smapi.Method {
	dp := datapath{paths: d.Paths, deps: d.Datapath, volumes: d.Volumes}
	return []smapi.Method{
		smapi.Handle("Datapath.attach", smapi.ResultBackend, dp.attach),
		smapi.Handle("Datapath.activate", smapi.ResultUnit, dp.activate(false)),
		smapi.Handle("Datapath.activate_readonly", smapi.ResultUnit, dp.activate(true)),
		smapi.Handle("Datapath.deactivate", smapi.ResultUnit, dp.deactivate),
		smapi.Handle("Datapath.detach", smapi.ResultUnit, dp.detach),
	}
}
