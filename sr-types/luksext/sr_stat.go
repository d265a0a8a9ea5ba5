package luksext

import (
	"context"

	"github.com/luksext/luksext/plugins/fs"
	"github.com/luksext/luksext/plugins/smapi"
)

// stat reports the SR's name, sizes (statvfs) and health. xapi calls it
// right after attach and before every scan; a failure fails the plug.
func (s *srService) stat(ctx context.Context, p smapi.SRParams) (smapi.SRStat, error) {
	h, release, err := s.check().open(ctx, p.SR, 0)
	if err != nil {
		return smapi.SRStat{}, err
	}
	defer release()
	meta := h.Meta
	space, err := fs.Statvfs(h.Path)
	if err != nil {
		return smapi.SRStat{}, err
	}
	uuid := meta.UUID
	return smapi.SRStat{
		SR: p.SR, Name: meta.Name, Description: meta.Description, UUID: &uuid,
		TotalSpace: space.Total, FreeSpace: space.Free, Datasources: []string{}, Health: s.health(uuid),
	}, nil
}

func (s *srService) setName(ctx context.Context, p smapi.SRSetNameParams) (smapi.Unit, error) {
	return smapi.Unit{}, s.updateMeta(ctx, p.SR, func(m *SRMeta) { m.Name = p.NewName })
}

func (s *srService) setDescription(ctx context.Context, p smapi.SRSetDescriptionParams) (smapi.Unit, error) {
	return smapi.Unit{}, s.updateMeta(ctx, p.SR, func(m *SRMeta) { m.Description = p.NewDescription })
}

func (s *srService) updateMeta(ctx context.Context, sr string, change func(*SRMeta)) error {
	srUUID, mnt, err := s.check().parse(sr)
	if err != nil {
		return err
	}
	unlock, err := s.lockSR(ctx, srUUID)
	if err != nil {
		return err
	}
	defer unlock()
	h, err := s.check().verify(srUUID, mnt)
	if err != nil {
		return err
	}
	m := h.Meta
	change(&m)
	return writeSRMeta(mnt, m)
}
