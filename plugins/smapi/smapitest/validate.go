package smapitest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"

	"github.com/luksext/luksext/plugins/smapi"
)

// OneJSONValue parses stdout, requiring exactly one JSON value (the daemon
// reads stdout to EOF and parses it whole).
func OneJSONValue(stdout []byte) (any, error) {
	if len(bytes.TrimSpace(stdout)) == 0 {
		return nil, fmt.Errorf("stdout is empty (the daemon says: bad json on stdout)")
	}
	dec := json.NewDecoder(bytes.NewReader(stdout))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("stdout is not JSON: %w", err)
	}
	var extra any
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, fmt.Errorf("stdout holds more than one JSON value")
	}
	return v, nil
}

// CheckReply validates a reply against the method's result type: on exit 0
// the result shape, otherwise the error-record shape. It returns the
// violations found (empty when conformant) and, for errors, the record.
func CheckReply(r Reply, result smapi.ResultType) ([]string, *smapi.ErrorRecord) {
	v, err := OneJSONValue(r.Stdout)
	if err != nil {
		return []string{err.Error()}, nil
	}
	if r.ExitCode != 0 {
		probs := checkErrorRecord(v)
		if len(probs) > 0 {
			return probs, nil
		}
		var rec smapi.ErrorRecord
		_ = json.Unmarshal(r.Stdout, &rec)
		return nil, &rec
	}
	var c checker
	c.value(string(result), v, result)
	return c.problems, nil
}

func checkErrorRecord(v any) []string {
	var c checker
	obj, ok := c.object("error record", v)
	if !ok {
		return c.problems
	}
	c.str("error record.code", obj, "code")
	c.strList("error record.params", obj, "params")
	if p, ok := obj["params"].([]any); ok && len(p) == 0 {
		c.add("error record.params is empty: params[0] must name the error")
	}
	if bt, ok := c.field("error record", obj, "backtrace"); ok {
		if bto, ok := c.object("error record.backtrace", bt); ok {
			c.str("backtrace.error", bto, "error")
			c.strList("backtrace.files", bto, "files")
			if lines, ok := c.field("backtrace", bto, "lines"); ok {
				if l, ok := c.list("backtrace.lines", lines); ok {
					for i, e := range l {
						c.integer(fmt.Sprintf("backtrace.lines[%d]", i), e)
					}
				}
			}
		}
	}
	return c.problems
}

type checker struct{ problems []string }

func (c *checker) add(format string, args ...any) {
	c.problems = append(c.problems, fmt.Sprintf(format, args...))
}

func (c *checker) object(what string, v any) (map[string]any, bool) {
	o, ok := v.(map[string]any)
	if !ok {
		c.add("%s must be an object, is %s", what, kind(v))
	}
	return o, ok
}

func (c *checker) list(what string, v any) ([]any, bool) {
	l, ok := v.([]any)
	if !ok {
		c.add("%s must be a list, is %s", what, kind(v))
	}
	return l, ok
}

// field returns a required member, reporting absence and null.
func (c *checker) field(what string, o map[string]any, name string) (any, bool) {
	v, ok := o[name]
	if !ok {
		c.add("%s: required field %q is missing", what, name)
		return nil, false
	}
	if v == nil {
		c.add("%s: field %q is null (rpclib rejects null)", what, name)
		return nil, false
	}
	return v, true
}

// optional checks an option member: absent is fine, null is not.
func (c *checker) optional(what string, o map[string]any, name string) (any, bool) {
	v, ok := o[name]
	if !ok {
		return nil, false
	}
	if v == nil {
		c.add("%s: option field %q is null; options must be omitted, never null", what, name)
		return nil, false
	}
	return v, true
}

func (c *checker) str(what string, o map[string]any, name string) {
	if v, ok := c.field(what, o, name); ok {
		if _, ok := v.(string); !ok {
			c.add("%s must be a string, is %s", what, kind(v))
		}
	}
}

func (c *checker) boolean(what string, o map[string]any, name string) {
	if v, ok := c.field(what, o, name); ok {
		if _, ok := v.(bool); !ok {
			c.add("%s must be a bool, is %s", what, kind(v))
		}
	}
}

func (c *checker) integer(what string, v any) {
	n, ok := v.(json.Number)
	if !ok {
		c.add("%s must be an integer, is %s", what, kind(v))
		return
	}
	if _, err := n.Int64(); err != nil {
		c.add("%s must be an integer, is %s", what, n)
	}
}

func (c *checker) int64Field(what string, o map[string]any, name string) {
	if v, ok := c.field(what, o, name); ok {
		c.integer(what, v)
	}
}

func (c *checker) strList(what string, o map[string]any, name string) {
	if v, ok := c.field(what, o, name); ok {
		c.strListValue(what, v)
	}
}

func (c *checker) strListValue(what string, v any) {
	if l, ok := c.list(what, v); ok {
		for i, e := range l {
			if _, ok := e.(string); !ok {
				c.add("%s[%d] must be a string, is %s", what, i, kind(e))
			}
		}
	}
}

func (c *checker) strMap(what string, o map[string]any, name string) {
	if v, ok := c.field(what, o, name); ok {
		c.strMapValue(what, v)
	}
}

func (c *checker) strMapValue(what string, v any) {
	if m, ok := c.object(what, v); ok {
		for k, e := range m {
			if _, ok := e.(string); !ok {
				c.add("%s[%q] must be a string, is %s", what, k, kind(e))
			}
		}
	}
}

// variant checks ["Name", arg] with Name in names; returns name and arg.
func (c *checker) variant(what string, v any, names ...string) (string, any, bool) {
	l, ok := v.([]any)
	if !ok || len(l) != 2 {
		c.add("%s must be a variant [\"Name\", arg], is %s", what, kind(v))
		return "", nil, false
	}
	name, ok := l[0].(string)
	if !ok {
		c.add("%s: variant name must be a string", what)
		return "", nil, false
	}
	known := false
	for _, n := range names {
		known = known || n == name
	}
	if !known {
		c.add("%s: unknown variant %q (want one of %v)", what, name, names)
		return "", nil, false
	}
	return name, l[1], true
}

func (c *checker) value(what string, v any, t smapi.ResultType) {
	switch t {
	case smapi.ResultUnit:
		if v != nil {
			c.add("%s: unit result must be null, is %s", what, kind(v))
		}
	case smapi.ResultString:
		if _, ok := v.(string); !ok {
			c.add("%s must be a string, is %s", what, kind(v))
		}
	case smapi.ResultStringList:
		c.strListValue(what, v)
	case smapi.ResultConfiguration:
		c.strMapValue(what, v)
	case smapi.ResultQuery:
		c.query(what, v)
	case smapi.ResultSRStat:
		c.srStat(what, v)
	case smapi.ResultProbe:
		if l, ok := c.list(what, v); ok {
			for i, e := range l {
				c.probe(fmt.Sprintf("%s[%d]", what, i), e)
			}
		}
	case smapi.ResultVolume:
		c.volume(what, v)
	case smapi.ResultVolumeList:
		if l, ok := c.list(what, v); ok {
			for i, e := range l {
				c.volume(fmt.Sprintf("%s[%d]", what, i), e)
			}
		}
	case smapi.ResultBackend:
		c.backend(what, v)
	case smapi.ResultBlocklist:
		if o, ok := c.object(what, v); ok {
			c.int64Field(what+".blocksize", o, "blocksize")
			if r, ok := c.field(what, o, "ranges"); ok {
				if l, ok := c.list(what+".ranges", r); ok {
					for i, e := range l {
						p, ok := e.([]any)
						if !ok || len(p) != 2 {
							c.add("%s.ranges[%d] must be a pair", what, i)
							continue
						}
						c.integer(fmt.Sprintf("%s.ranges[%d][0]", what, i), p[0])
						c.integer(fmt.Sprintf("%s.ranges[%d][1]", what, i), p[1])
					}
				}
			}
		}
	case smapi.ResultChangedBlocks:
		if o, ok := c.object(what, v); ok {
			c.int64Field(what+".granularity", o, "granularity")
			c.str(what+".bitmap", o, "bitmap")
		}
	case smapi.ResultOperation:
		c.variant(what, v, "CopyV1", "MirrorV1")
	case smapi.ResultOperationList:
		if l, ok := c.list(what, v); ok {
			for i, e := range l {
				c.variant(fmt.Sprintf("%s[%d]", what, i), e, "CopyV1", "MirrorV1")
			}
		}
	case smapi.ResultDataStatus:
		if o, ok := c.object(what, v); ok {
			c.boolean(what+".failed", o, "failed")
			c.boolean(what+".complete", o, "complete")
			if p, ok := c.optional(what, o, "progress"); ok {
				if _, ok := p.(json.Number); !ok {
					c.add("%s.progress must be a number", what)
				}
			}
		}
	default:
		c.add("%s: validator does not know result type %q", what, t)
	}
}

func (c *checker) query(what string, v any) {
	o, ok := c.object(what, v)
	if !ok {
		return
	}
	for _, f := range []string{"plugin", "name", "description", "vendor", "copyright", "version", "required_api_version"} {
		c.str(what+"."+f, o, f)
	}
	c.strList(what+".features", o, "features")
	c.strMap(what+".configuration", o, "configuration")
	c.strList(what+".required_cluster_stack", o, "required_cluster_stack")
	if v, ok := o["required_api_version"].(string); ok && v != "5.0" && v != "3.0" {
		c.add("%s.required_api_version %q is not accepted by xapi-storage-script (5.0 or 3.0)", what, v)
	}
}

func (c *checker) srStat(what string, v any) {
	o, ok := c.object(what, v)
	if !ok {
		return
	}
	c.str(what+".sr", o, "sr")
	c.str(what+".name", o, "name")
	c.str(what+".description", o, "description")
	if u, ok := c.optional(what, o, "uuid"); ok {
		if _, ok := u.(string); !ok {
			c.add("%s.uuid must be a string", what)
		}
	}
	c.int64Field(what+".free_space", o, "free_space")
	c.int64Field(what+".total_space", o, "total_space")
	c.strList(what+".datasources", o, "datasources")
	c.boolean(what+".clustered", o, "clustered")
	if h, ok := c.field(what, o, "health"); ok {
		if _, arg, ok := c.variant(what+".health", h, "Healthy", "Recovering", "Unreachable", "Unavailable"); ok {
			if _, ok := arg.(string); !ok {
				c.add("%s.health argument must be a string (e.g. [\"Healthy\", \"\"])", what)
			}
		}
	}
}

func (c *checker) probe(what string, v any) {
	o, ok := c.object(what, v)
	if !ok {
		return
	}
	c.strMap(what+".configuration", o, "configuration")
	c.boolean(what+".complete", o, "complete")
	c.strMap(what+".extra_info", o, "extra_info")
	cfg, _ := o["configuration"].(map[string]any)
	_, hasUUID := cfg["sr_uuid"]
	complete, _ := o["complete"].(bool)
	if hasUUID && !complete {
		c.add("%s: a configuration with sr_uuid must be complete (the daemon rejects it)", what)
	}
	if sr, ok := c.optional(what, o, "sr"); ok {
		c.srStat(what+".sr", sr)
		if !hasUUID {
			c.add("%s: sr is present but configuration has no sr_uuid (the daemon rejects it)", what)
		}
	}
}

func (c *checker) volume(what string, v any) {
	o, ok := c.object(what, v)
	if !ok {
		return
	}
	c.str(what+".key", o, "key")
	if u, ok := c.optional(what, o, "uuid"); ok {
		if _, ok := u.(string); !ok {
			c.add("%s.uuid must be a string", what)
		}
	}
	c.str(what+".name", o, "name")
	c.str(what+".description", o, "description")
	c.boolean(what+".read_write", o, "read_write")
	c.boolean(what+".sharable", o, "sharable")
	c.int64Field(what+".virtual_size", o, "virtual_size")
	c.int64Field(what+".physical_utilisation", o, "physical_utilisation")
	c.strList(what+".uri", o, "uri")
	c.strMap(what+".keys", o, "keys")
	if vt, ok := c.optional(what, o, "volume_type"); ok {
		if s, _ := vt.(string); s != "Data" && s != "CBT_Metadata" && s != "Data_and_CBT_Metadata" {
			c.add("%s.volume_type %v is not a volume_type variant", what, vt)
		}
	}
	if cbt, ok := c.optional(what, o, "cbt_enabled"); ok {
		if _, ok := cbt.(bool); !ok {
			c.add("%s.cbt_enabled must be a bool", what)
		}
	}
}

func (c *checker) backend(what string, v any) {
	o, ok := c.object(what, v)
	if !ok {
		return
	}
	impls, ok := c.field(what, o, "implementations")
	if !ok {
		return
	}
	l, ok := c.list(what+".implementations", impls)
	if !ok {
		return
	}
	for i, e := range l {
		w := fmt.Sprintf("%s.implementations[%d]", what, i)
		name, arg, ok := c.variant(w, e, "XenDisk", "BlockDevice", "File", "Nbd")
		if !ok {
			continue
		}
		ao, ok := c.object(w+"."+name, arg)
		if !ok {
			continue
		}
		switch name {
		case "XenDisk":
			c.str(w+".params", ao, "params")
			c.strMap(w+".extra", ao, "extra")
			c.str(w+".backend_type", ao, "backend_type")
		case "BlockDevice", "File":
			c.str(w+".path", ao, "path")
		case "Nbd":
			c.str(w+".uri", ao, "uri")
		}
	}
}

func kind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case string:
		return "a string"
	case bool:
		return "a bool"
	case json.Number:
		return "a number"
	case []any:
		return "a list"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}

// Known xapi feature names (smint.ml); others are dropped with a warning.
var knownFeatures = func() map[string]bool {
	m := map[string]bool{}
	for _, f := range []string{"SR_CREATE", "SR_DELETE", "SR_ATTACH", "SR_DETACH", "SR_SCAN", "SR_PROBE", "SR_UPDATE",
		"SR_SUPPORTS_LOCAL_CACHING", "SR_METADATA", "SR_TRIM", "SR_MULTIPATH", "SR_CACHING", "SR_STATS", "VDI_CREATE",
		"VDI_DELETE", "VDI_ATTACH", "VDI_DETACH", "VDI_MIRROR", "VDI_MIRROR_IN", "VDI_RESIZE", "VDI_RESIZE_ONLINE",
		"VDI_CLONE", "VDI_SNAPSHOT", "VDI_ACTIVATE", "VDI_ACTIVATE_READONLY", "VDI_DEACTIVATE", "VDI_UPDATE",
		"VDI_INTRODUCE", "VDI_GENERATE_CONFIG", "VDI_ATTACH_OFFLINE", "VDI_RESET_ON_BOOT", "VDI_CONFIG_CBT",
		"VDI_COMPOSE", "LARGE_VDI", "THIN_PROVISIONING", "VDI_READ_CACHING", "VDI_REVERT",
		// datapath features consulted by the daemon
		"NONPERSISTENT"} {
		m[f] = true
	}
	return m
}()
