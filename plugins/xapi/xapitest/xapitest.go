// Package xapitest is an in-memory XenAPI server speaking JSON-RPC 2.0 on a
// unix socket, with just the calls the plugin makes (session login/logout,
// secret get_by_uuid/get_value/destroy, message.create), so secret
// resolution and notifications are tested over the real wire protocol.
// Unlike xapi it does not check that a message's object exists.
package xapitest

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
)

// Server holds secrets by uuid. Values live only in memory.
type Server struct {
	mu      sync.Mutex
	secrets map[string]string
	calls   []string
	msgs    []Message
	srv     *http.Server
	ln      net.Listener
	callLog io.Writer
	msgLog  io.Writer
}

// SetMessageLog makes the server write each message it creates to w as
// one JSON object per line (a VM test reads them from outside).
func (s *Server) SetMessageLog(w io.Writer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgLog = w
}

// SetCallLog makes the server write each method name, one per line, to w
// (a VM test reads it from outside the process). Never values.
func (s *Server) SetCallLog(w io.Writer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.callLog = w
}

// New starts a server on socket with the given uuid → value secrets.
func New(socket string, secrets map[string]string) (*Server, error) {
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return nil, err
	}
	s := &Server{secrets: map[string]string{}, ln: ln}
	for k, v := range secrets {
		s.secrets[k] = v
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/jsonrpc", s.handle)
	s.srv = &http.Server{Handler: mux}
	go func() { _ = s.srv.Serve(ln) }()
	return s, nil
}

// Close stops the server.
func (s *Server) Close() error { return s.srv.Close() }

// Has reports whether the secret uuid still exists.
func (s *Server) Has(uuid string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.secrets[uuid]
	return ok
}

// Calls lists the method names received.
func (s *Server) Calls() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.calls...)
}

// Message is one message.create call, its parameters as decoded from
// the wire (priority arrives as a JSON number).
type Message struct {
	Name     string  `json:"name"`
	Priority float64 `json:"priority"`
	Class    string  `json:"cls"`
	ObjUUID  string  `json:"obj_uuid"`
	Body     string  `json:"body"`
}

// Messages lists the messages created, oldest first.
func (s *Server) Messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Message(nil), s.msgs...)
}

type request struct {
	Method string            `json:"method"`
	Params []json.RawMessage `json:"params"`
	ID     any               `json:"id"`
}

func (s *Server) handle(w http.ResponseWriter, r *http.Request) {
	var req request
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, "bad request", http.StatusInternalServerError)
		return
	}
	str := func(i int) string {
		var v string
		if i < len(req.Params) {
			_ = json.Unmarshal(req.Params[i], &v)
		}
		return v
	}
	s.mu.Lock()
	s.calls = append(s.calls, req.Method)
	if s.callLog != nil {
		_, _ = io.WriteString(s.callLog, req.Method+"\n")
	}
	var result any
	var fail []string
	switch req.Method {
	case "session.login_with_password":
		result = "OpaqueRef:session-1"
	case "session.logout":
		result = ""
	case "secret.get_by_uuid":
		if _, ok := s.secrets[str(1)]; ok {
			result = "OpaqueRef:secret-" + str(1)
		} else {
			fail = []string{"UUID_INVALID", "secret", str(1)}
		}
	case "secret.get_value", "secret.destroy":
		uuid := str(1)[len("OpaqueRef:secret-"):]
		v, ok := s.secrets[uuid]
		switch {
		case !ok:
			fail = []string{"HANDLE_INVALID", "secret", str(1)}
		case req.Method == "secret.get_value":
			result = v
		default:
			delete(s.secrets, uuid)
			result = ""
		}
	case "message.create":
		var m Message
		var prio any
		if len(req.Params) == 6 && json.Unmarshal(req.Params[2], &prio) == nil {
			m = Message{Name: str(1), Class: str(3), ObjUUID: str(4), Body: str(5)}
			p, isNumber := prio.(float64)
			m.Priority = p
			switch {
			case !isNumber:
				fail = []string{"FIELD_TYPE_ERROR", "priority"}
			case m.Class != "VM" && m.Class != "Host" && m.Class != "SR" && m.Class != "Pool" && m.Class != "VMPP" && m.Class != "VMSS" && m.Class != "PVS_proxy" && m.Class != "VDI" && m.Class != "Certificate":
				fail = []string{"INVALID_VALUE", "cls", m.Class}
			default:
				s.msgs = append(s.msgs, m)
				if s.msgLog != nil {
					b, _ := json.Marshal(m)
					_, _ = s.msgLog.Write(append(b, '\n'))
				}
				result = "OpaqueRef:message-" + strconv.Itoa(len(s.msgs))
			}
		} else {
			fail = []string{"MESSAGE_PARAMETER_COUNT_MISMATCH", req.Method, "6", strconv.Itoa(len(req.Params))}
		}
	default:
		fail = []string{"MESSAGE_METHOD_UNKNOWN", req.Method}
	}
	s.mu.Unlock()
	resp := map[string]any{"jsonrpc": "2.0", "id": req.ID}
	if fail != nil {
		resp["error"] = map[string]any{"code": 1, "message": fail[0], "data": fail[1:]}
	} else {
		resp["result"] = result
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}
