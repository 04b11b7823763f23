// Command go-upstream is the reference upstream worker for pplex's
// conformance suite: a gRPC server implementing UpstreamPeerService
// (proto/upstream.proto) that reproduces the behaviour of the workers pplex
// talks to in the field, plus a few deliberately misbehaving modes.
//
// See README.md in this directory for flags and modes.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	pb "pplex/conformance/upstreampb"
)

// referencePayload is what the field workers answer to every input.
var referencePayload = []byte("Salut à toi cher downstream")

const (
	modeReference  = "reference"
	modeEcho       = "echo"
	modeCloseStrm  = "close-stream"
	modeNeverReady = "never-ready"
	modeNotReady   = "not-ready"
	modeLiveFalse  = "live-false"
	modeGarbage    = "garbage"
	modeSessions   = "sessions"
)

var modeHelp = map[string]string{
	modeReference:  "field behaviour: fixed payload, alternating client_uuid / BROADCAST_ALL, logs every message",
	modeEcho:       "each input's payload is sent back unchanged to its sender",
	modeCloseStrm:  "echo the first input of each data stream, then end the stream with UNAVAILABLE",
	modeNeverReady: "ready never answers (until the caller's deadline or cancel); echo on the data stream",
	modeNotReady:   "ready answers ready=false; echo on the data stream",
	modeLiveFalse:  "live answers live=false; echo on the data stream",
	modeGarbage:    "each input is answered (to its sender) with 0..200000 random bytes",
	modeSessions:   "a chat on lifecycle events and groups: first line joins a room, later lines go to it, /quit closes",
}

const garbageMax = 200000

// gracefulBound is how long shutdown waits for calls to finish before it
// cuts them. pplex's data stream is long-lived, so this is usually hit.
const gracefulBound = 2 * time.Second

type server struct {
	pb.UnimplementedUpstreamPeerServiceServer

	mode       string
	readySleep time.Duration
	liveSleep  time.Duration
	verbose    bool // print every received message (reference mode)

	streamSeq uint64   // atomic; numbers data streams in the log
	journal   *journal // sessions mode: lifecycle events seen, per client
}

// clock formats "now" like the field workers (time.UnixDate, local time),
// reformatting at most once per second. Not safe for concurrent use: give
// each stream its own.
type clock struct {
	sec int64
	s   string
}

func (c *clock) now() string {
	t := time.Now()
	if u := t.Unix(); u != c.sec || c.s == "" {
		c.sec = u
		c.s = t.Format(time.UnixDate)
	}
	return c.s
}

// sleepCtx waits d or until ctx ends; it reports whether d elapsed.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func ctxErr(ctx context.Context) error {
	return status.FromContextError(ctx.Err()).Err()
}

func (s *server) Ready(ctx context.Context, _ *emptypb.Empty) (*pb.ReadyResult, error) {
	if s.verbose {
		fmt.Printf("ready: request at %s\n", time.Now().Format(time.UnixDate))
	}
	if s.mode == modeNeverReady {
		<-ctx.Done()
		return nil, ctxErr(ctx)
	}
	if !sleepCtx(ctx, s.readySleep) {
		return nil, ctxErr(ctx)
	}
	answer := &pb.ReadyResult{
		Time:  time.Now().Format(time.UnixDate),
		Ready: s.mode != modeNotReady,
	}
	if s.mode == modeSessions {
		answer.Features = []string{lifecycleFeature}
	}
	return answer, nil
}

func (s *server) Live(stream pb.UpstreamPeerService_LiveServer) error {
	ctx := stream.Context()
	var clk clock
	in := new(emptypb.Empty)
	out := &pb.LiveResult{Live: s.mode != modeLiveFalse}
	for {
		if err := stream.RecvMsg(in); err != nil {
			// On half-close this is io.EOF. The field workers return it as
			// is, so the call ends with status UNKNOWN, details "EOF".
			// Reproduced on purpose.
			return err
		}
		if s.verbose {
			fmt.Printf("live: ping at %s\n", time.Now().Format(time.UnixDate))
		}
		if !sleepCtx(ctx, s.liveSleep) {
			return ctxErr(ctx)
		}
		out.Time = clk.now()
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

// BidirectionalStreaming runs one data stream. Each stream is served by this
// single goroutine: receive one input, send its reply, repeat. grpc-go only
// allows one sender per stream, and this keeps it trivially so; the transport
// buffers on both sides, so receive and send still overlap on the wire.
func (s *server) BidirectionalStreaming(stream pb.UpstreamPeerService_BidirectionalStreamingServer) error {
	switch s.mode {
	case modeReference:
		return s.streamReference(stream)
	case modeGarbage:
		return s.streamGarbage(stream)
	case modeSessions:
		return s.streamSessions(stream)
	default:
		return s.streamEcho(stream, s.mode == modeCloseStrm)
	}
}

func (s *server) streamReference(stream pb.UpstreamPeerService_BidirectionalStreamingServer) error {
	id := atomic.AddUint64(&s.streamSeq, 1)
	fmt.Printf("stream %d: opened\n", id)
	var clk clock
	var n uint64
	for {
		in := new(pb.InputStreamRequest)
		if err := stream.RecvMsg(in); err != nil {
			fmt.Printf("stream %d: closed: %v\n", id, err)
			return endOfStream(err)
		}
		n++
		fmt.Printf("stream %d: recv #%d time=%q client_uuid=%q payload(%d)=%s\n",
			id, n, in.Time, in.ClientUuid, len(in.Payload), quoteTrunc(in.Payload, 256))
		out := &pb.OutputStreamRequest{Time: clk.now(), Payload: referencePayload}
		if n%2 == 1 {
			out.Target = &pb.OutputStreamRequest_ClientUuid{ClientUuid: in.ClientUuid}
		} else {
			// The zero enum value, set explicitly: a set oneof member is
			// always sent on the wire, even when it is the zero value.
			// (The wrapper is Broadcast_ with a trailing underscore:
			// OutputStreamRequest_Broadcast is already the enum's name.)
			out.Target = &pb.OutputStreamRequest_Broadcast_{Broadcast: pb.OutputStreamRequest_BROADCAST_ALL}
		}
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

// streamEcho is the hot path of the benchmarks: the input and output messages
// and the oneof wrapper are reused for the whole stream, the time string is
// reformatted at most once a second, and nothing is printed. (Send marshals
// before it returns, so reuse is safe.)
func (s *server) streamEcho(stream pb.UpstreamPeerService_BidirectionalStreamingServer, closeAfterFirst bool) error {
	var clk clock
	in := new(pb.InputStreamRequest)
	target := new(pb.OutputStreamRequest_ClientUuid)
	out := &pb.OutputStreamRequest{Target: target}
	for {
		if err := stream.RecvMsg(in); err != nil {
			return endOfStream(err)
		}
		target.ClientUuid = in.ClientUuid
		out.Time = clk.now()
		out.Payload = in.Payload
		if err := stream.Send(out); err != nil {
			return err
		}
		if closeAfterFirst {
			return status.Error(codes.Unavailable, "closing on purpose")
		}
	}
}

func (s *server) streamGarbage(stream pb.UpstreamPeerService_BidirectionalStreamingServer) error {
	var clk clock
	rng := rand.New(rand.NewSource(time.Now().UnixNano() ^ int64(atomic.AddUint64(&s.streamSeq, 1))))
	buf := make([]byte, garbageMax)
	in := new(pb.InputStreamRequest)
	target := new(pb.OutputStreamRequest_ClientUuid)
	out := &pb.OutputStreamRequest{Target: target}
	for {
		if err := stream.RecvMsg(in); err != nil {
			return endOfStream(err)
		}
		n := rng.Intn(garbageMax + 1)
		rng.Read(buf[:n])
		target.ClientUuid = in.ClientUuid
		out.Time = clk.now()
		out.Payload = buf[:n]
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

// endOfStream maps the receive error that ends a data stream to the handler's
// result: a client half-close (io.EOF) ends the stream with OK. The UNKNOWN
// "EOF" quirk is only known from the field workers' live RPC, so it is not
// reproduced here.
func endOfStream(err error) error {
	if err == io.EOF {
		return nil
	}
	return err
}

func quoteTrunc(b []byte, max int) string {
	if len(b) <= max {
		return strconv.Quote(string(b))
	}
	return strconv.Quote(string(b[:max])) + fmt.Sprintf("...(+%d bytes)", len(b)-max)
}

func usageExit(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-upstream: "+format+"\n", args...)
	fmt.Fprintf(os.Stderr, "run with --help for usage\n")
	os.Exit(2)
}

func modeNames() []string {
	names := make([]string, 0, len(modeHelp))
	for m := range modeHelp {
		names = append(names, m)
	}
	sort.Strings(names)
	return names
}

func main() {
	fs := flag.NewFlagSet("go-upstream", flag.ExitOnError)
	port := fs.Int("port", 0, "TCP port to listen on, on 127.0.0.1 (required, 1025..65535)")
	readySleep := fs.Int("ready_sleep", 0, "milliseconds to wait before answering ready")
	liveSleep := fs.Int("live_sleep", 0, "milliseconds to wait before each live answer")
	mode := fs.String("mode", modeReference, "behaviour: "+strings.Join(modeNames(), ", "))
	fs.Usage = func() {
		fmt.Fprintf(os.Stderr, "usage: go-upstream --port N [--mode M] [--ready_sleep MS] [--live_sleep MS]\n\n")
		fs.PrintDefaults()
		fmt.Fprintf(os.Stderr, "\nmodes:\n")
		for _, m := range modeNames() {
			fmt.Fprintf(os.Stderr, "  %-13s %s\n", m, modeHelp[m])
		}
	}
	fs.Parse(os.Args[1:])

	if fs.NArg() > 0 {
		usageExit("unexpected argument %q", fs.Arg(0))
	}
	portSet := false
	fs.Visit(func(f *flag.Flag) { portSet = portSet || f.Name == "port" })
	if !portSet {
		usageExit("--port is required")
	}
	if *port < 1025 || *port > 65535 {
		usageExit("--port must be in 1025..65535, got %d", *port)
	}
	if _, ok := modeHelp[*mode]; !ok {
		usageExit("unknown --mode %q (want one of: %s)", *mode, strings.Join(modeNames(), ", "))
	}
	if *readySleep < 0 {
		usageExit("--ready_sleep must be >= 0, got %d", *readySleep)
	}
	if *liveSleep < 0 {
		usageExit("--live_sleep must be >= 0, got %d", *liveSleep)
	}

	addr := fmt.Sprintf("127.0.0.1:%d", *port)
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-upstream: listen %s: %v\n", addr, err)
		os.Exit(1)
	}

	srv := &server{
		mode:       *mode,
		readySleep: time.Duration(*readySleep) * time.Millisecond,
		liveSleep:  time.Duration(*liveSleep) * time.Millisecond,
		verbose:    *mode == modeReference,
		journal:    newJournal(),
	}
	gs := grpc.NewServer()
	pb.RegisterUpstreamPeerServiceServer(gs, srv)

	stopped := make(chan struct{})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		sig := <-sigs
		fmt.Fprintf(os.Stderr, "go-upstream: %v: stopping\n", sig)
		done := make(chan struct{})
		go func() { gs.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-time.After(gracefulBound):
			gs.Stop()
			<-done
		}
		close(stopped)
	}()

	// os.Stdout is unbuffered in Go: this line is out as soon as Printf returns.
	fmt.Printf("listening on %s mode=%s\n", addr, *mode)

	if err := gs.Serve(lis); err != nil {
		fmt.Fprintf(os.Stderr, "go-upstream: serve: %v\n", err)
		os.Exit(1)
	}
	// Serve returns as soon as a stop begins; wait for the stop to finish.
	<-stopped
	os.Exit(0)
}
