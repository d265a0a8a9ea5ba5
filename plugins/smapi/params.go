package smapi

// Parameter records of every v5 method, as xapi-storage-script sends them
// on stdin (a single object with named fields). Fields without omitempty are
// required: Decode rejects a call that lacks one (the daemon itself would
// answer INCORRECT_PARAMETERS). Unknown fields are tolerated, as rpclib does.

// DbgParams is for methods whose only parameter is dbg.
type DbgParams struct {
	Dbg string `json:"dbg"`
}

// SRProbeParams is SR.probe's input.
type SRProbeParams struct {
	Dbg           string            `json:"dbg"`
	Configuration map[string]string `json:"configuration"`
}

// SRCreateParams is SR.create's input.
type SRCreateParams struct {
	Dbg           string            `json:"dbg"`
	UUID          string            `json:"uuid"`
	Configuration map[string]string `json:"configuration"`
	Name          string            `json:"name"`
	Description   string            `json:"description"`
}

// SRAttachParams is SR.attach's input.
type SRAttachParams struct {
	Dbg           string            `json:"dbg"`
	Configuration map[string]string `json:"configuration"`
}

// SRParams is for SR.detach, destroy, stat and ls.
type SRParams struct {
	Dbg string `json:"dbg"`
	SR  string `json:"sr"`
}

// SRSetNameParams is SR.set_name's input.
type SRSetNameParams struct {
	Dbg     string `json:"dbg"`
	SR      string `json:"sr"`
	NewName string `json:"new_name"`
}

// SRSetDescriptionParams is SR.set_description's input.
type SRSetDescriptionParams struct {
	Dbg            string `json:"dbg"`
	SR             string `json:"sr"`
	NewDescription string `json:"new_description"`
}

// VolumeCreateParams is Volume.create's input.
type VolumeCreateParams struct {
	Dbg         string `json:"dbg"`
	SR          string `json:"sr"`
	Name        string `json:"name"`
	Description string `json:"description"`
	Size        int64  `json:"size"`
	Sharable    bool   `json:"sharable"`
}

// VolumeParams is for Volume.snapshot, clone, destroy, stat, similar_content,
// enable_cbt, disable_cbt and data_destroy.
type VolumeParams struct {
	Dbg string `json:"dbg"`
	SR  string `json:"sr"`
	Key string `json:"key"`
}

// VolumeCopyParams is Volume.copy's input.
type VolumeCopyParams struct {
	Dbg    string `json:"dbg"`
	SR     string `json:"sr"`
	Key    string `json:"key"`
	DestSR string `json:"dest_sr"`
}

// VolumeRevertParams is Volume.revert's input (xapi >= 26.16 only).
type VolumeRevertParams struct {
	Dbg      string `json:"dbg"`
	SR       string `json:"sr"`
	Snapshot string `json:"snapshot"`
	Key      string `json:"key"`
}

// VolumeSetNameParams is Volume.set_name's input.
type VolumeSetNameParams struct {
	Dbg     string `json:"dbg"`
	SR      string `json:"sr"`
	Key     string `json:"key"`
	NewName string `json:"new_name"`
}

// VolumeSetDescriptionParams is Volume.set_description's input.
type VolumeSetDescriptionParams struct {
	Dbg            string `json:"dbg"`
	SR             string `json:"sr"`
	Key            string `json:"key"`
	NewDescription string `json:"new_description"`
}

// VolumeSetParams is Volume.set's input.
type VolumeSetParams struct {
	Dbg string `json:"dbg"`
	SR  string `json:"sr"`
	Key string `json:"key"`
	K   string `json:"k"`
	V   string `json:"v"`
}

// VolumeUnsetParams is Volume.unset's input.
type VolumeUnsetParams struct {
	Dbg string `json:"dbg"`
	SR  string `json:"sr"`
	Key string `json:"key"`
	K   string `json:"k"`
}

// VolumeResizeParams is Volume.resize's input.
type VolumeResizeParams struct {
	Dbg     string `json:"dbg"`
	SR      string `json:"sr"`
	Key     string `json:"key"`
	NewSize int64  `json:"new_size"`
}

// VolumePairParams is for Volume.compare and Volume.compose.
type VolumePairParams struct {
	Dbg  string `json:"dbg"`
	SR   string `json:"sr"`
	Key  string `json:"key"`
	Key2 string `json:"key2"`
}

// VolumeChangedBlocksParams is Volume.list_changed_blocks' input.
type VolumeChangedBlocksParams struct {
	Dbg    string `json:"dbg"`
	SR     string `json:"sr"`
	Key    string `json:"key"`
	Key2   string `json:"key2"`
	Offset int64  `json:"offset"`
	Length int64  `json:"length"`
}

// DatapathParams is for Datapath.attach, activate, activate_readonly,
// deactivate, detach and import_activate.
type DatapathParams struct {
	Dbg    string `json:"dbg"`
	URI    string `json:"uri"`
	Domain string `json:"domain"`
}

// DatapathOpenParams is Datapath.open's input.
type DatapathOpenParams struct {
	Dbg        string `json:"dbg"`
	URI        string `json:"uri"`
	Persistent bool   `json:"persistent"`
}

// DatapathCloseParams is Datapath.close's input.
type DatapathCloseParams struct {
	Dbg string `json:"dbg"`
	URI string `json:"uri"`
}

// DataCopyParams is Data.copy's input.
type DataCopyParams struct {
	Dbg       string    `json:"dbg"`
	URI       string    `json:"uri"`
	Domain    string    `json:"domain"`
	Remote    string    `json:"remote"`
	Blocklist Blocklist `json:"blocklist"`
}

// DataMirrorParams is Data.mirror's input.
type DataMirrorParams struct {
	Dbg    string `json:"dbg"`
	URI    string `json:"uri"`
	Domain string `json:"domain"`
	Remote string `json:"remote"`
}

// DataOperationParams is for Data.stat, cancel and destroy.
type DataOperationParams struct {
	Dbg       string  `json:"dbg"`
	Operation rawJSON `json:"operation"`
}
