package luksext

import (
	"os"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/luksext/luksext/plugins/blockdev"
	"github.com/luksext/luksext/plugins/clevis"
	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/image"
	"github.com/luksext/luksext/plugins/luks"
	"github.com/luksext/luksext/plugins/lvm"
	"github.com/luksext/luksext/plugins/run"
	"github.com/luksext/luksext/plugins/tapdisk"
	"github.com/luksext/luksext/plugins/tapdisk/attachment"
	"github.com/luksext/luksext/plugins/tpm"
	"github.com/luksext/luksext/plugins/xapi"
)

// XAPISocketEnv overrides xapi's local socket (tests run a fake XenAPI).
const XAPISocketEnv = "LUKSEXT_XAPI_SOCKET"

// RealDeps builds the host's real dependencies. It is the one place that
// reads the environment: LUKSEXT_TPM (plugins/tpm: which TPM) and
// LUKSEXT_XAPI_SOCKET.
func RealDeps(log logrus.FieldLogger) Deps {
	runner := run.NewExec(log)
	attached := (&attachment.Manager{}).InUseUnder // the datapath's records, /run/luksext/datapath
	spec, err := tpm.SpecFromEnv()
	if err != nil {
		log.WithError(err).Warn("ignoring " + tpm.EnvVar + "; using the host TPM")
		spec = tpm.Spec{Kind: tpm.KindDevice}
	}
	xapiClient := xapi.New(os.Getenv(XAPISocketEnv), 30*time.Second)
	return Deps{
		Paths: run.DefaultPaths,
		SR: SRDeps{
			LUKS:    luks.New(runner, log),
			Keys:    clevis.New(spec, log),
			Secrets: xapiClient,
			Notify:  xapiClient,
			FS:      fs.New(runner),
			Probe:   blockdev.Prober{Run: runner},
			GC:      processGC{},
			InUse:   attached,
			LVM:     lvm.LVM{Run: runner},
		},
		Volumes: VolumeDeps{Images: image.Files{Runner: runner}, InUse: attached,
			Datapath: &attachment.Manager{Ctl: tapdisk.Ctl{Runner: runner}, Log: log},
			QCOW2:    func() error { return tapdisk.SupportsDiskType(tapdisk.TapdiskPaths, "qcow2") }},
	}
}
