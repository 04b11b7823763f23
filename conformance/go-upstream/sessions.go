package main

// --mode sessions: a tiny chat on the session extension of the contract.
//
// It announces "lifecycle" in ReadyResult.features, prints every CONNECTED
// (with its metadata) and DISCONNECTED (with its reason), and:
//   - the first line a client sends names its room: the client JOINs it and
//     the room hears "<id> joined <room>";
//   - every later line is SENT to the room (a group target): "<id>: <line>";
//   - "/quit" CLOSEs the client with the payload "goodbye";
//   - when a client goes, the room hears "<id> left <room>".
// It also answers the conformance suite's session commands (see
// conformance/README.md): "pplex-conformance:session[:UUID]" and friends.
//
// Run pplex with --plugins framing_line to chat with nc: each line is a
// message, and each reply comes back as a line.

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/metadata"

	pb "pplex/conformance/upstreampb"
)

const (
	lifecycleFeature = "lifecycle"
	nodeHeader       = "pplex-node"
	conventionPrefix = "pplex-conformance:"
	maxRoomBytes     = 64
	journalSize      = 10000 // clients remembered for "pplex-conformance:session:UUID"
)

// journal remembers the lifecycle events seen for the last journalSize
// clients, on every stream: the conformance suite asks about a client after
// it left, possibly through another pplex.
type journal struct {
	mu      sync.Mutex
	clients map[string]*clientRecord
	order   []string // oldest first, for eviction
}

type clientRecord struct {
	UUID         string              `json:"uuid"`
	Connected    []map[string]string `json:"connected"`
	Disconnected []map[string]string `json:"disconnected"`
}

func newJournal() *journal {
	return &journal{clients: make(map[string]*clientRecord)}
}

func (j *journal) record(uuid string) *clientRecord {
	r, ok := j.clients[uuid]
	if !ok {
		if len(j.order) >= journalSize {
			delete(j.clients, j.order[0])
			j.order = j.order[1:]
		}
		r = &clientRecord{UUID: uuid, Connected: []map[string]string{}, Disconnected: []map[string]string{}}
		j.clients[uuid] = r
		j.order = append(j.order, uuid)
	}
	return r
}

func (j *journal) add(in *pb.InputStreamRequest) {
	j.mu.Lock()
	defer j.mu.Unlock()
	r := j.record(in.ClientUuid)
	meta := make(map[string]string, len(in.Metadata))
	for k, v := range in.Metadata {
		meta[k] = v
	}
	if in.Kind == pb.InputStreamRequest_CONNECTED {
		r.Connected = append(r.Connected, meta)
	} else {
		r.Disconnected = append(r.Disconnected, meta)
	}
}

func (j *journal) report(uuid string) []byte {
	j.mu.Lock()
	defer j.mu.Unlock()
	r, ok := j.clients[uuid]
	if !ok {
		r = &clientRecord{UUID: uuid, Connected: []map[string]string{}, Disconnected: []map[string]string{}}
	}
	data, err := json.Marshal(r)
	if err != nil { // maps of strings always marshal; keep the reply well-formed anyway
		return []byte(`{"error":"` + err.Error() + `"}`)
	}
	return data
}

func formatMetadata(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + m[k]
	}
	return strings.Join(parts, " ")
}

func shortID(uuid string) string {
	if len(uuid) > 8 {
		return uuid[:8]
	}
	return uuid
}

// chatStream serves one data stream: one pplex node's clients.
type chatStream struct {
	srv    *server
	stream pb.UpstreamPeerService_BidirectionalStreamingServer
	id     uint64
	clk    clock
	rooms  map[string]string // client uuid -> its room, for this node's clients
}

func (c *chatStream) send(out *pb.OutputStreamRequest) error {
	out.Time = c.clk.now()
	return c.stream.Send(out)
}

func (c *chatStream) toClient(uuid string, payload []byte, action pb.OutputStreamRequest_Action, groups ...string) error {
	return c.send(&pb.OutputStreamRequest{Target: &pb.OutputStreamRequest_ClientUuid{ClientUuid: uuid},
		Payload: payload, Action: action, Groups: groups})
}

func (c *chatStream) toGroup(group string, payload []byte, action pb.OutputStreamRequest_Action) error {
	return c.send(&pb.OutputStreamRequest{Target: &pb.OutputStreamRequest_Group{Group: group},
		Payload: payload, Action: action})
}

func (s *server) streamSessions(stream pb.UpstreamPeerService_BidirectionalStreamingServer) error {
	c := &chatStream{srv: s, stream: stream, id: atomic.AddUint64(&s.streamSeq, 1), rooms: map[string]string{}}
	node := "(none)"
	if md, ok := metadata.FromIncomingContext(stream.Context()); ok {
		if v := md.Get(nodeHeader); len(v) > 0 {
			node = v[0]
		}
	}
	fmt.Printf("stream %d: opened by pplex node %s\n", c.id, node)
	for {
		in := new(pb.InputStreamRequest)
		if err := stream.RecvMsg(in); err != nil {
			// At most once: no DISCONNECTED will come for this node's clients on this stream.
			fmt.Printf("stream %d: closed (%v): forgetting the %d client(s) of node %s\n", c.id, err, len(c.rooms), node)
			return endOfStream(err)
		}
		if err := c.handle(in); err != nil {
			return err
		}
	}
}

func (c *chatStream) handle(in *pb.InputStreamRequest) error {
	uuid := in.ClientUuid
	switch in.Kind {
	case pb.InputStreamRequest_CONNECTED:
		c.srv.journal.add(in)
		fmt.Printf("stream %d: CONNECTED %s %s\n", c.id, uuid, formatMetadata(in.Metadata))
		return nil
	case pb.InputStreamRequest_DISCONNECTED:
		c.srv.journal.add(in)
		fmt.Printf("stream %d: DISCONNECTED %s reason=%s\n", c.id, uuid, in.Metadata["reason"])
		if room, ok := c.rooms[uuid]; ok {
			delete(c.rooms, uuid)
			return c.toGroup(room, []byte(shortID(uuid)+" left "+room), pb.OutputStreamRequest_SEND)
		}
		return nil
	case pb.InputStreamRequest_MESSAGE:
	default:
		return nil // a kind newer than this worker
	}
	text := strings.TrimRight(string(in.Payload), "\r\n")
	if strings.HasPrefix(text, conventionPrefix) {
		return c.convention(uuid, text[len(conventionPrefix):])
	}
	room, joined := c.rooms[uuid]
	switch {
	case !joined:
		room = strings.TrimSpace(text)
		if room == "" || len(room) > maxRoomBytes {
			return c.toClient(uuid, []byte(fmt.Sprintf("name a room (1 to %d bytes) first", maxRoomBytes)),
				pb.OutputStreamRequest_SEND)
		}
		c.rooms[uuid] = room
		if err := c.toClient(uuid, nil, pb.OutputStreamRequest_JOIN, room); err != nil {
			return err
		}
		return c.toGroup(room, []byte(shortID(uuid)+" joined "+room), pb.OutputStreamRequest_SEND)
	case text == "/quit":
		return c.toClient(uuid, []byte("goodbye"), pb.OutputStreamRequest_CLOSE)
	default:
		return c.toGroup(room, []byte(shortID(uuid)+": "+text), pb.OutputStreamRequest_SEND)
	}
}

// convention answers the conformance suite's commands (conformance/README.md, "Sessions").
func (c *chatStream) convention(uuid, command string) error {
	name, arg, _ := strings.Cut(command, ":")
	switch name {
	case "session":
		about := uuid
		if arg != "" {
			about = arg
		}
		return c.toClient(uuid, c.srv.journal.report(about), pb.OutputStreamRequest_SEND)
	case "close":
		return c.toClient(uuid, []byte(arg), pb.OutputStreamRequest_CLOSE)
	case "join", "leave":
		action := pb.OutputStreamRequest_JOIN
		if name == "leave" {
			action = pb.OutputStreamRequest_LEAVE
		}
		if err := c.toClient(uuid, nil, action, arg); err != nil {
			return err
		}
		return c.toClient(uuid, []byte("ok"), pb.OutputStreamRequest_SEND)
	case "group", "close-group":
		group, payload, _ := strings.Cut(arg, ":")
		action := pb.OutputStreamRequest_SEND
		if name == "close-group" {
			action = pb.OutputStreamRequest_CLOSE
		}
		return c.toGroup(group, []byte(payload), action)
	case "broadcast":
		kinds := map[string]pb.OutputStreamRequest_Broadcast{"all": pb.OutputStreamRequest_BROADCAST_ALL,
			"active": pb.OutputStreamRequest_BROADCAST_ACTIVE, "not_active": pb.OutputStreamRequest_BROADCAST_NOT_ACTIVE}
		if kind, ok := kinds[arg]; ok {
			return c.send(&pb.OutputStreamRequest{Target: &pb.OutputStreamRequest_Broadcast_{Broadcast: kind},
				Payload: []byte(conventionPrefix + command)})
		}
	}
	return c.toClient(uuid, []byte("unknown command "+name), pb.OutputStreamRequest_SEND)
}
