// Command loadgen is the closed-loop TCP load generator of the pplex benchmark.
//
// Each of -clients goroutines opens one TCP connection and then keeps
// -pipeline messages of -size bytes in flight: it writes a message, reads
// exactly len(message) bytes back (TCP is a byte stream, so replies may arrive
// coalesced or split: bytes are counted, not reads), and only then writes the
// next one. With -pipeline 1 this is a classic closed loop: one round trip at
// a time per client.
//
// The run has three phases: connect (gradual, at most -connect-concurrency
// dials at a time, each retried), warm-up (-warmup seconds, not recorded) and
// measurement (-seconds). Round trips that complete inside the measurement
// window are counted and their latency goes into a per-client log-linear
// histogram (about 1.5% resolution), merged at the end.
//
// Output: one JSON line on stdout, e.g.
//
//	{"rt_per_s":51234.5,"p50_us":18.2,"p99_us":45.1,"errors":0,"clients":100,"seconds":5.0,...}
//
// With -events it also prints {"event":"measure_start"} and
// {"event":"measure_end"} lines when the measurement window opens and closes,
// so that a harness can sample other processes' CPU over the same window.
//
// Every dial, read and write has a deadline and the whole run is bounded by a
// watchdog. Connection errors are counted, not fatal (a failed client tries to
// reconnect until the window closes); if no client could connect, or no round
// trip completed at all, it exits non-zero with a message on stderr.
//
// Standard library only; builds with Go 1.19 in GOPATH mode.
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// ---------------------------------------------------------------------------
// Latency histogram: log-linear buckets over nanoseconds. Values below 128 ns
// are exact; above, each power of two is split into 64 sub-buckets.

const (
	subBits    = 6
	subCount   = 1 << subBits // 64
	maxShift   = 30           // covers up to ~2^37 ns (> 2 minutes)
	numBuckets = (maxShift + 2) * subCount
)

type histogram struct {
	counts [numBuckets]uint32
	n      uint64
	sum    uint64
	max    uint64
}

func bucketOf(v uint64) int {
	if v < 2*subCount {
		return int(v)
	}
	shift := 0
	for x := v >> (subBits + 1); x != 0; x >>= 1 {
		shift++
	}
	if shift > maxShift {
		shift = maxShift
		v = (2*subCount - 1) << shift
	}
	return shift*subCount + int(v>>uint(shift))
}

// bucketMid returns a representative value (the middle) of bucket i in ns.
func bucketMid(i int) float64 {
	if i < 2*subCount {
		return float64(i)
	}
	shift := i/subCount - 1
	lo := uint64(i-shift*subCount) << uint(shift)
	width := uint64(1) << uint(shift)
	return float64(lo) + float64(width)/2
}

func (h *histogram) record(ns int64) {
	if ns < 0 {
		ns = 0
	}
	v := uint64(ns)
	h.counts[bucketOf(v)]++
	h.n++
	h.sum += v
	if v > h.max {
		h.max = v
	}
}

func (h *histogram) merge(o *histogram) {
	for i := range h.counts {
		h.counts[i] += o.counts[i]
	}
	h.n += o.n
	h.sum += o.sum
	if o.max > h.max {
		h.max = o.max
	}
}

// quantile returns the q-quantile (0..1) in nanoseconds.
func (h *histogram) quantile(q float64) float64 {
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	var cum uint64
	for i, c := range h.counts {
		cum += uint64(c)
		if cum >= rank {
			m := bucketMid(i)
			if m > float64(h.max) {
				m = float64(h.max)
			}
			return m
		}
	}
	return float64(h.max)
}

// ---------------------------------------------------------------------------

type config struct {
	addr           string
	clients        int
	seconds        float64
	count          int
	size           int
	lenPrefix      bool
	pipeline       int
	warmup         float64
	connectTimeout time.Duration
	connectPhase   time.Duration
	connectConc    int
	connectRetries int
	ioTimeout      time.Duration
	events         bool
}

type result struct {
	RtPerS        float64 `json:"rt_per_s"`
	P50Us         float64 `json:"p50_us"`
	P99Us         float64 `json:"p99_us"`
	Errors        int64   `json:"errors"`
	Clients       int     `json:"clients"`
	Seconds       float64 `json:"seconds"`
	P90Us         float64 `json:"p90_us"`
	P999Us        float64 `json:"p999_us"`
	MeanUs        float64 `json:"mean_us"`
	MaxUs         float64 `json:"max_us"`
	Messages      uint64  `json:"messages"`
	Connected     int64   `json:"connected"`
	ConnectErrors int64   `json:"connect_errors"`
	IOErrors      int64   `json:"io_errors"`
	Mismatches    int64   `json:"mismatches"`
	Pipeline      int     `json:"pipeline"`
	Size          int     `json:"size"`
	Warmup        float64 `json:"warmup"`
	ConnectS      float64 `json:"connect_s"`
	Addr          string  `json:"addr"`
}

type shared struct {
	cfg           config
	base          time.Time // monotonic origin for all timestamps
	start         chan struct{}
	measureStart  int64 // ns since base; set before start is closed
	measureEnd    int64
	connectErrors int64
	ioErrors      int64
	mismatches    int64
	connected     int64
	sem           chan struct{}
	connectUntil  time.Time
}

func (s *shared) now() int64 { return int64(time.Since(s.base)) }

// dial connects with retries, honouring the per-dial timeout and the overall
// connect-phase deadline. The semaphore limits concurrent handshakes so that a
// server with a small listen backlog is not overrun.
func (s *shared) dial(limit time.Time) (net.Conn, error) {
	var lastErr error
	backoff := 20 * time.Millisecond
	for attempt := 0; attempt <= s.cfg.connectRetries; attempt++ {
		if attempt > 0 {
			if time.Now().Add(backoff).After(limit) {
				break
			}
			time.Sleep(backoff)
			backoff *= 2
		}
		deadline := time.Now().Add(s.cfg.connectTimeout)
		if deadline.After(limit) {
			deadline = limit
		}
		if !time.Now().Before(deadline) {
			break
		}
		s.sem <- struct{}{}
		d := net.Dialer{Deadline: deadline}
		c, err := d.Dial("tcp", s.cfg.addr)
		<-s.sem
		if err == nil {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetNoDelay(true)
			}
			return c, nil
		}
		lastErr = err
		atomic.AddInt64(&s.connectErrors, 1)
	}
	if lastErr == nil {
		lastErr = errors.New("connect deadline passed")
	}
	return nil, lastErr
}

type client struct {
	s     *shared
	id    int
	conn  net.Conn
	hist  histogram
	done  uint64 // completed round trips inside the window
	ready chan struct{}
}

// run is one client's life: initial connect, wait for the start signal, then
// keep -pipeline messages in flight until the window closes.
func (c *client) run(wg *sync.WaitGroup) {
	defer wg.Done()
	s := c.s
	conn, err := s.dial(s.connectUntil)
	if err == nil {
		atomic.AddInt64(&s.connected, 1)
		c.conn = conn
	}
	close(c.ready)
	<-s.start
	defer func() {
		if c.conn != nil {
			c.conn.Close()
		}
	}()

	size := s.cfg.size
	depth := s.cfg.pipeline
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte('a' + (c.id+i)%26)
	}
	if s.cfg.lenPrefix {
		// A valid framing_len frame: 4-byte big-endian length, then the body.
		binary.BigEndian.PutUint32(msg, uint32(size-4))
	}
	sent := make([]int64, depth) // ring of send timestamps, FIFO
	seqs := make([]uint64, depth)
	var seq uint64
	target := uint64(s.cfg.count)

	for {
		if s.now() >= s.measureEnd || (target > 0 && c.done >= target) {
			return
		}
		if c.conn == nil {
			// Reconnect after an error (or a failed initial connect).
			limit := s.base.Add(time.Duration(s.measureEnd))
			conn, err := s.dial(limit)
			if err != nil {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			c.conn = conn
		}
		if err := c.session(msg, sent, seqs, &seq, target); err != nil {
			if s.now() < s.measureEnd {
				if errors.Is(err, errMismatch) {
					atomic.AddInt64(&s.mismatches, 1)
				} else {
					atomic.AddInt64(&s.ioErrors, 1)
				}
			}
			c.conn.Close()
			c.conn = nil
		}
	}
}

var errMismatch = errors.New("reply does not match the message sent")

// session drives one connection until the window closes (nil) or an error.
//
// Replies are read in whatever chunks the kernel has (one read may hold many
// replies when the proxy coalesces, or part of one); every complete reply
// frees its slot and the replacement messages are written together in one
// write. With -pipeline 1 this is exactly write one, read one.
func (c *client) session(msg []byte, sent []int64, seqs []uint64, seq *uint64, target uint64) error {
	s := c.s
	conn := c.conn
	depth := len(sent)
	size := len(msg)
	ioTimeout := int64(s.cfg.ioTimeout)
	endGrace := s.measureEnd + int64(200*time.Millisecond)
	var deadline int64 // ns since base of the deadline currently set

	// Deadlines are refreshed lazily (only when less than half of ioTimeout
	// is left) so that a round trip does not cost a timer update.
	refresh := func(now int64) {
		if deadline-now < ioTimeout/2 {
			deadline = now + ioTimeout
			if deadline > endGrace {
				deadline = endGrace
			}
			conn.SetDeadline(s.base.Add(time.Duration(deadline)))
		}
	}

	// At most depth messages are outstanding, so replies never exceed this.
	in := make([]byte, depth*size)
	out := make([]byte, 0, depth*size)
	have := 0
	off := 0
	if s.cfg.lenPrefix {
		off = 4
	}
	queue := func(slot int) {
		*seq++
		if size >= off+8 {
			binary.LittleEndian.PutUint64(msg[off:], *seq)
		}
		seqs[slot] = *seq
		out = append(out, msg...)
	}

	now := s.now()
	refresh(now)
	for i := 0; i < depth; i++ {
		queue(i)
		sent[i] = now
	}
	if _, err := conn.Write(out); err != nil {
		return err
	}
	head := 0
	for {
		n, err := conn.Read(in[have:])
		if n == 0 && err == nil {
			continue
		}
		if err != nil && n == 0 {
			if s.now() >= s.measureEnd {
				return nil // window closed while waiting: not an error
			}
			if err == io.EOF {
				return io.ErrUnexpectedEOF
			}
			return err
		}
		have += n
		now = s.now()
		out = out[:0]
		freed := head
		off := 0
		stop := false
		for have-off >= size {
			r := in[off : off+size]
			off += size
			if size >= off+8 && binary.LittleEndian.Uint64(r[off:]) != seqs[head] {
				return errMismatch
			}
			if now >= s.measureStart && now < s.measureEnd {
				c.hist.record(now - sent[head])
				c.done++
			}
			if now >= s.measureEnd || (target > 0 && c.done >= target) {
				stop = true
			} else {
				queue(head)
			}
			head++
			if head == depth {
				head = 0
			}
		}
		if off > 0 {
			have = copy(in, in[off:have])
		}
		if stop {
			return nil
		}
		if len(out) > 0 {
			for i := 0; i < len(out)/size; i++ {
				sent[freed] = now
				freed++
				if freed == depth {
					freed = 0
				}
			}
			refresh(now)
			if _, err := conn.Write(out); err != nil {
				return err
			}
		}
		if err != nil {
			return err
		}
	}
}

func emit(v interface{}) {
	b, _ := json.Marshal(v)
	os.Stdout.Write(append(b, '\n'))
}

func main() {
	var cfg config
	flag.StringVar(&cfg.addr, "addr", "127.0.0.1:7000", "host:port to connect to")
	flag.IntVar(&cfg.clients, "clients", 1, "number of concurrent client connections")
	flag.Float64Var(&cfg.seconds, "seconds", 5, "length of the measurement window (a cap when -count is set)")
	flag.IntVar(&cfg.count, "count", 0, "if > 0, each client stops after this many measured round trips")
	flag.IntVar(&cfg.size, "size", 32, "message size in bytes")
	flag.BoolVar(&cfg.lenPrefix, "lenprefix", false, "make each message a framing_len frame (4-byte big-endian length first)")
	flag.IntVar(&cfg.pipeline, "pipeline", 1, "messages each client keeps in flight")
	flag.Float64Var(&cfg.warmup, "warmup", 1, "seconds of load before measuring")
	flag.DurationVar(&cfg.connectTimeout, "connect-timeout", 5*time.Second, "timeout of one dial")
	flag.DurationVar(&cfg.connectPhase, "connect-phase", 60*time.Second, "deadline for connecting all clients")
	flag.IntVar(&cfg.connectConc, "connect-concurrency", 32, "dials in progress at once")
	flag.IntVar(&cfg.connectRetries, "connect-retries", 8, "retries of a failed dial")
	flag.DurationVar(&cfg.ioTimeout, "io-timeout", 5*time.Second, "a read or write stalled this long is an error")
	flag.BoolVar(&cfg.events, "events", false, "print measure_start/measure_end event lines on stdout")
	flag.Parse()

	if cfg.clients < 1 || cfg.size < 1 || cfg.pipeline < 1 || cfg.seconds <= 0 || cfg.warmup < 0 || cfg.connectConc < 1 {
		fmt.Fprintln(os.Stderr, "loadgen: -clients, -size, -pipeline, -connect-concurrency must be >= 1, -seconds > 0, -warmup >= 0")
		os.Exit(2)
	}

	s := &shared{
		cfg:   cfg,
		base:  time.Now(),
		start: make(chan struct{}),
		sem:   make(chan struct{}, cfg.connectConc),
	}
	s.connectUntil = s.base.Add(cfg.connectPhase)

	// Connect phase.
	var wg sync.WaitGroup
	clients := make([]*client, cfg.clients)
	for i := range clients {
		clients[i] = &client{s: s, id: i, ready: make(chan struct{})}
		wg.Add(1)
		go clients[i].run(&wg)
	}
	for _, c := range clients {
		<-c.ready
	}
	connectS := time.Since(s.base).Seconds()
	connected := atomic.LoadInt64(&s.connected)
	if connected == 0 {
		close(s.start)
		connectS = math.Round(connectS*1000) / 1000
		fmt.Fprintf(os.Stderr, "loadgen: none of %d clients could connect to %s (%d failed dials)\n",
			cfg.clients, cfg.addr, atomic.LoadInt64(&s.connectErrors))
		emit(result{Errors: atomic.LoadInt64(&s.connectErrors), Clients: cfg.clients,
			ConnectErrors: atomic.LoadInt64(&s.connectErrors), Pipeline: cfg.pipeline,
			Size: cfg.size, Warmup: cfg.warmup, ConnectS: connectS, Addr: cfg.addr})
		os.Exit(1)
	}

	// Warm-up and measurement windows, relative to the moment all are connected.
	t0 := s.now()
	s.measureStart = t0 + int64(cfg.warmup*float64(time.Second))
	s.measureEnd = s.measureStart + int64(cfg.seconds*float64(time.Second))
	close(s.start)

	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	watchdog := time.Duration(s.measureEnd-s.now()) + cfg.ioTimeout + 5*time.Second
	timeout := time.After(watchdog)

	if d := time.Duration(s.measureStart - s.now()); d > 0 {
		select {
		case <-time.After(d):
		case <-finished:
		}
	}
	if cfg.events {
		emit(map[string]string{"event": "measure_start"})
	}
	select {
	case <-time.After(time.Duration(s.measureEnd - s.now())):
	case <-finished:
	}
	measuredEnd := s.now()
	if measuredEnd > s.measureEnd {
		measuredEnd = s.measureEnd
	}
	if cfg.events {
		emit(map[string]string{"event": "measure_end"})
	}
	select {
	case <-finished:
	case <-timeout:
		fmt.Fprintln(os.Stderr, "loadgen: some clients did not stop in time; reporting what was recorded")
	}

	// In -count mode clients may all finish early: the window is then the
	// time until the last of them finished.
	elapsed := float64(measuredEnd-s.measureStart) / 1e9
	if elapsed <= 0 {
		elapsed = 1e-9
	}
	var total histogram
	var done uint64
	for _, c := range clients {
		total.merge(&c.hist)
		done += c.done
	}
	r := result{
		RtPerS:        float64(done) / elapsed,
		P50Us:         total.quantile(0.50) / 1e3,
		P99Us:         total.quantile(0.99) / 1e3,
		P90Us:         total.quantile(0.90) / 1e3,
		P999Us:        total.quantile(0.999) / 1e3,
		MaxUs:         float64(total.max) / 1e3,
		Messages:      done,
		Clients:       cfg.clients,
		Seconds:       elapsed,
		Connected:     connected,
		ConnectErrors: atomic.LoadInt64(&s.connectErrors),
		IOErrors:      atomic.LoadInt64(&s.ioErrors),
		Mismatches:    atomic.LoadInt64(&s.mismatches),
		Pipeline:      cfg.pipeline,
		Size:          cfg.size,
		Warmup:        cfg.warmup,
		ConnectS:      connectS,
		Addr:          cfg.addr,
	}
	if total.n > 0 {
		r.MeanUs = float64(total.sum) / float64(total.n) / 1e3
	}
	r.Errors = r.ConnectErrors + r.IOErrors + r.Mismatches
	for _, p := range []*float64{&r.RtPerS, &r.P50Us, &r.P99Us, &r.P90Us, &r.P999Us, &r.MeanUs, &r.MaxUs} {
		*p = math.Round(*p*10) / 10
	}
	r.Seconds = math.Round(elapsed*1000) / 1000
	r.ConnectS = math.Round(connectS*1000) / 1000
	emit(r)
	if done == 0 {
		fmt.Fprintf(os.Stderr, "loadgen: %d clients connected to %s but no round trip completed (%d errors)\n",
			connected, cfg.addr, r.Errors)
		os.Exit(1)
	}
}
