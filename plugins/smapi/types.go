package smapi

// Wire types of the SMAPIv3 v5 IDL (xapi's ocaml/xapi-storage/generator/lib:
// plugin.ml, control.ml, data.ml), encoded as rpclib encodes them:
//   - records are objects; every required field is always present;
//   - option fields are omitted when absent and NEVER null (rpclib would try
//     to decode null as the inner type and reject the whole record) — hence
//     pointers with omitempty for options;
//   - variants without an argument are "Name", with one ["Name", arg];
//   - (string * string) lists are objects; unit is null.

// Unit is the result of methods that return nothing; it encodes as null.
type Unit struct{}

// QueryResult is Plugin.Query's result. All fields are required.
type QueryResult struct {
	Plugin               string            `json:"plugin"`
	Name                 string            `json:"name"`
	Description          string            `json:"description"`
	Vendor               string            `json:"vendor"`
	Copyright            string            `json:"copyright"`
	Version              string            `json:"version"`
	RequiredAPIVersion   string            `json:"required_api_version"`
	Features             []string          `json:"features"`
	Configuration        map[string]string `json:"configuration"`
	RequiredClusterStack []string          `json:"required_cluster_stack"`
}

// Health is the sr_stat health variant; every constructor carries a string.
type Health struct {
	State  string // Healthy, Recovering, Unreachable or Unavailable
	Reason string
}

// Health constructors.
func Healthy() Health                  { return Health{State: "Healthy"} }
func Recovering(reason string) Health  { return Health{State: "Recovering", Reason: reason} }
func Unreachable(reason string) Health { return Health{State: "Unreachable", Reason: reason} }
func Unavailable(reason string) Health { return Health{State: "Unavailable", Reason: reason} }

// MarshalJSON encodes ["State", "reason"].
func (h Health) MarshalJSON() ([]byte, error) {
	return marshalVariant(h.State, h.Reason)
}

// UnmarshalJSON accepts ["State", "reason"].
func (h *Health) UnmarshalJSON(b []byte) error {
	var reason string
	name, err := unmarshalVariant(b, &reason)
	if err != nil {
		return err
	}
	h.State, h.Reason = name, reason
	return nil
}

// SRStat is SR.stat's result (and probe_result.sr).
type SRStat struct {
	SR          string   `json:"sr"`
	Name        string   `json:"name"`
	UUID        *string  `json:"uuid,omitempty"`
	Description string   `json:"description"`
	FreeSpace   int64    `json:"free_space"`
	TotalSpace  int64    `json:"total_space"`
	Datasources []string `json:"datasources"`
	Clustered   bool     `json:"clustered"`
	Health      Health   `json:"health"`
}

// ProbeResult is one element of SR.probe's result.
type ProbeResult struct {
	Configuration map[string]string `json:"configuration"`
	Complete      bool              `json:"complete"`
	SR            *SRStat           `json:"sr,omitempty"`
	ExtraInfo     map[string]string `json:"extra_info"`
}

// Volume is the volume record of SR.ls, Volume.stat, Volume.create, ...
type Volume struct {
	Key                 string            `json:"key"`
	UUID                *string           `json:"uuid,omitempty"`
	Name                string            `json:"name"`
	Description         string            `json:"description"`
	ReadWrite           bool              `json:"read_write"`
	Sharable            bool              `json:"sharable"`
	VirtualSize         int64             `json:"virtual_size"`
	PhysicalUtilisation int64             `json:"physical_utilisation"`
	URI                 []string          `json:"uri"`
	Keys                map[string]string `json:"keys"`
	VolumeType          *string           `json:"volume_type,omitempty"`
	CBTEnabled          *bool             `json:"cbt_enabled,omitempty"`
}

// Blocklist is Volume.compare's result.
type Blocklist struct {
	Blocksize int        `json:"blocksize"`
	Ranges    [][2]int64 `json:"ranges"`
}

// ChangedBlocks is Volume.list_changed_blocks' result.
type ChangedBlocks struct {
	Granularity int    `json:"granularity"`
	Bitmap      string `json:"bitmap"`
}

// Backend is Datapath.attach's result.
type Backend struct {
	Implementations []Implementation `json:"implementations"`
}

// Implementation is one way of reaching a volume; exactly one field is set.
type Implementation struct {
	XenDisk     *XenDisk
	BlockDevice *PathImpl
	File        *PathImpl
	Nbd         *NbdImpl
}

// XenDisk is what xenopsd needs for a guest VBD.
type XenDisk struct {
	Params      string            `json:"params"`
	Extra       map[string]string `json:"extra"`
	BackendType string            `json:"backend_type"` // vbd, vbd3 or qdisk
}

// PathImpl is the argument of BlockDevice and File.
type PathImpl struct {
	Path string `json:"path"`
}

// NbdImpl is the argument of Nbd.
type NbdImpl struct {
	URI string `json:"uri"`
}

// MarshalJSON encodes the variant as ["Name", {...}].
func (i Implementation) MarshalJSON() ([]byte, error) {
	switch {
	case i.XenDisk != nil:
		return marshalVariant("XenDisk", i.XenDisk)
	case i.BlockDevice != nil:
		return marshalVariant("BlockDevice", i.BlockDevice)
	case i.File != nil:
		return marshalVariant("File", i.File)
	case i.Nbd != nil:
		return marshalVariant("Nbd", i.Nbd)
	}
	return nil, errEmptyVariant
}

// UnmarshalJSON decodes ["Name", {...}].
func (i *Implementation) UnmarshalJSON(b []byte) error {
	var raw rawJSON
	name, err := unmarshalVariant(b, &raw)
	if err != nil {
		return err
	}
	switch name {
	case "XenDisk":
		i.XenDisk = &XenDisk{}
		return decodeStrict(raw, i.XenDisk)
	case "BlockDevice":
		i.BlockDevice = &PathImpl{}
		return decodeStrict(raw, i.BlockDevice)
	case "File":
		i.File = &PathImpl{}
		return decodeStrict(raw, i.File)
	case "Nbd":
		i.Nbd = &NbdImpl{}
		return decodeStrict(raw, i.Nbd)
	}
	return &variantError{name: name}
}

// Data-interface operation variant: ["CopyV1","id"] or ["MirrorV1","id"].
type Operation struct {
	Kind string
	ID   string
}

// MarshalJSON encodes ["Kind", "id"].
func (o Operation) MarshalJSON() ([]byte, error) { return marshalVariant(o.Kind, o.ID) }

// DataStatus is Data.stat's result.
type DataStatus struct {
	Failed   bool     `json:"failed"`
	Complete bool     `json:"complete"`
	Progress *float64 `json:"progress,omitempty"`
}
