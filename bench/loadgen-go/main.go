// Command loadgen is the compiled load generator for bench/run.py.
//
// It speaks the same command line and prints the same JSON lines as bench/loadgen.py, so
// the orchestrator can use either. It exists because one Python process cannot generate
// or absorb enough load to find the server's limits: with a Python generator, the
// generator's own core saturates first and hides where the server stops.
//
// Messages are encoded and decoded with protowire (no generated Go code), so the only
// source of truth for the wire format stays protos/tsnetchat/v1/chat.proto; the field
// numbers used here are listed next to each helper.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// rawCodec passes pre-encoded protobuf bytes through unchanged. Its name is "proto" so the
// request's content-type is the ordinary application/grpc+proto.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

var _ encoding.Codec = rawCodec{}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func emit(v any) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

type args struct {
	mode, target, token, room              string
	n, conns, stall, sample, count, window int
	size                                   int
	rate, readyTimeout, startAfter         float64
	spread                                 bool
}

func dial(a *args, n int) []*grpc.ClientConn {
	conns := make([]*grpc.ClientConn, n)
	for i := range conns {
		cc, err := grpc.NewClient("passthrough:///"+a.target,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}),
				grpc.MaxCallRecvMsgSize(64<<20)))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		conns[i] = cc
	}
	return conns
}

// ---- wire helpers (field numbers from chat.proto) ----

// SubscribeRequest{room=1}
func subscribeRequest(room string) []byte {
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	return protowire.AppendString(b, room)
}

// ClientEvent{hello=1: Hello{room=1, after_id=2, batch_acks=3}}
func helloEvent(room string, afterID uint64) []byte {
	h := protowire.AppendTag(nil, 1, protowire.BytesType)
	h = protowire.AppendString(h, room)
	h = protowire.AppendTag(h, 2, protowire.VarintType)
	h = protowire.AppendVarint(h, afterID)
	h = protowire.AppendTag(h, 3, protowire.VarintType) // batch_acks: acks may come in batches
	h = protowire.AppendVarint(h, 1)
	b := protowire.AppendTag(nil, 1, protowire.BytesType)
	return protowire.AppendBytes(b, h)
}

// ClientEvent{send=2: SendMessage{text=1, client_msg_id=3}}
func sendEvent(text, id string) []byte {
	m := protowire.AppendTag(nil, 1, protowire.BytesType)
	m = protowire.AppendString(m, text)
	m = protowire.AppendTag(m, 3, protowire.BytesType)
	m = protowire.AppendString(m, id)
	b := protowire.AppendTag(nil, 2, protowire.BytesType)
	return protowire.AppendBytes(b, m)
}

// eachField calls fn for every field of a message; bytes fields get their payload.
func eachField(b []byte, fn func(num protowire.Number, payload []byte)) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return
		}
		b = b[n:]
		if typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return
			}
			fn(num, v)
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return
		}
		fn(num, nil)
		b = b[m:]
	}
}

// ServerEvent oneof: message=2, sent=4, batch=6 (Batch{messages=1}), replay_done=7.
// ChatMessage text=5, whose text starts with the send time in ns and a "|".
func sentNs(msg []byte) int64 {
	var ns int64
	eachField(msg, func(num protowire.Number, p []byte) {
		if num == 5 {
			if i := strings.IndexByte(string(p), '|'); i > 0 {
				ns, _ = strconv.ParseInt(string(p[:i]), 10, 64)
			}
		}
	})
	return ns
}

// ---- subscribe ----

// awaitCounts returns once every count is at least want, or when none has moved for 2 s.
func awaitCounts(counts []int64, want int64) {
	var last int64 = -1
	since := time.Now()
	for {
		var total int64
		done := true
		for i := range counts {
			c := atomic.LoadInt64(&counts[i])
			total += c
			done = done && c >= want
		}
		if done {
			return
		}
		if total != last {
			last, since = total, time.Now()
		} else if time.Since(since) > 2*time.Second {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func subscribe(a *args) {
	conns := dial(a, a.conns)
	md := metadata.Pairs("authorization", "Bearer "+a.token)
	ctx := metadata.NewOutgoingContext(context.Background(), md)
	req := subscribeRequest(a.room)
	desc := &grpc.StreamDesc{ServerStreams: true}

	var ready atomic.Int64
	var stopping atomic.Bool // after "stop", cancelled streams are ours, not errors
	allReady := make(chan struct{})
	var once sync.Once
	counts := make([]int64, a.n)
	var firstNs, lastNs atomic.Int64
	var mu sync.Mutex
	var lat []float64
	errs := map[string]int{}
	// --spread: per message (keyed by its send time), the latest arrival over every stream:
	// "how long until the last subscriber had it".
	lastOf := map[int64]int64{}

	for i := 0; i < a.n; i++ {
		go func(i int) {
			fail := func(err error) {
				mu.Lock()
				errs[status.Code(err).String()]++
				mu.Unlock()
			}
			s, err := conns[i%a.conns].NewStream(ctx, desc, "/tsnetchat.v1.Chat/Subscribe")
			if err == nil {
				err = s.SendMsg(&req)
			}
			if err == nil {
				err = s.CloseSend()
			}
			if err != nil {
				fail(err)
				return
			}
			sample := i < a.sample
			var buf []byte
			for {
				if err := s.RecvMsg(&buf); err != nil {
					if !stopping.Load() || status.Code(err) != codes.Canceled {
						fail(err)
					}
					return
				}
				var msgs [][]byte
				replay := false
				eachField(buf, func(num protowire.Number, p []byte) {
					switch num {
					case 7:
						replay = true
					case 2:
						msgs = append(msgs, p)
					case 6:
						eachField(p, func(n protowire.Number, m []byte) {
							if n == 1 {
								msgs = append(msgs, m)
							}
						})
					}
				})
				if replay {
					if ready.Add(1) == int64(a.n-a.stall) {
						once.Do(func() { close(allReady) })
					}
					if i < a.stall {
						select {} // a client that stopped reading
					}
					continue
				}
				if len(msgs) == 0 {
					continue
				}
				now := time.Now().UnixNano()
				firstNs.CompareAndSwap(0, now)
				for { // the latest receive over all streams ("broadcast reached everyone")
					if old := lastNs.Load(); now <= old || lastNs.CompareAndSwap(old, now) {
						break
					}
				}
				atomic.AddInt64(&counts[i], int64(len(msgs)))
				if sample || a.spread {
					mu.Lock()
					for _, m := range msgs {
						t := sentNs(m)
						if t <= 0 {
							continue
						}
						if sample {
							lat = append(lat, float64(now-t)/1e6)
						}
						if a.spread && now > lastOf[t] {
							lastOf[t] = now
						}
					}
					mu.Unlock()
				}
			}
		}(i)
	}
	cpu0 := cpuSeconds()
	select {
	case <-allReady:
	case <-time.After(time.Duration(a.readyTimeout * float64(time.Second))):
	}
	emit(map[string]any{"ready": ready.Load()})
	line, _ := bufio.NewReader(os.Stdin).ReadString('\n')
	// "stop N": first let every reading stream get N messages, while they keep coming. The
	// server counts a delivery when a stream takes it, before it is written: at 10,000
	// streams this generator read up to 3% of them after the server had counted all
	// (2 of 20 runs, 2026-11-22), and a plain stop cut them off.
	if f := strings.Fields(line); len(f) == 2 {
		if want, err := strconv.ParseInt(f[1], 10, 64); err == nil {
			awaitCounts(counts[a.stall:], want)
		}
	}
	stopping.Store(true)
	var total, minCount int64 = 0, -1
	for i := range counts {
		c := atomic.LoadInt64(&counts[i])
		total += c
		if i >= a.stall && (minCount < 0 || c < minCount) {
			minCount = c
		}
	}
	if minCount < 0 {
		minCount = 0
	}
	mu.Lock()
	out := map[string]any{"deliveries": total, "per_stream_min": minCount,
		"latencies_ms": lat, "first_ns": firstNs.Load(), "last_ns": lastNs.Load(),
		"cpu_s": cpuSeconds() - cpu0, "errors": errs, "ready": ready.Load()}
	if lat == nil {
		out["latencies_ms"] = []float64{}
	}
	if a.spread { // in the order the messages were sent
		sent := make([]int64, 0, len(lastOf))
		for t := range lastOf {
			sent = append(sent, t)
		}
		sort.Slice(sent, func(i, j int) bool { return sent[i] < sent[j] })
		last := make([]float64, 0, len(sent))
		for _, t := range sent {
			last = append(last, float64(lastOf[t]-t)/1e6)
		}
		out["last_arrival_ms"] = last
	}
	emit(out)
	mu.Unlock()
	os.Exit(0)
}

// ---- send ----

func send(a *args) {
	cc := dial(a, 1)[0]
	md := metadata.Pairs("authorization", "Bearer "+a.token)
	ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(context.Background(), md))
	defer cancel()
	desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
	startNs := time.Now().UnixNano()
	cpu0 := cpuSeconds()
	s, err := cc.NewStream(ctx, desc, "/tsnetchat.v1.Chat/Join")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	hello := helloEvent(a.room, 1<<62)
	if err := s.SendMsg(&hello); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	window := make(chan struct{}, a.window)
	pad := strings.Repeat("x", max(0, a.size-20))
	go func() {
		// The sender's own join announces it to the room (a presence event to everyone);
		// --start-after lets that go out before the first message.
		time.Sleep(time.Duration(a.startAfter * float64(time.Second)))
		t0 := time.Now()
		for i := 0; i < a.count; i++ {
			if a.rate > 0 {
				if d := time.Until(t0.Add(time.Duration(float64(i) / a.rate * float64(time.Second)))); d > 0 {
					time.Sleep(d)
				}
			}
			window <- struct{}{}
			ev := sendEvent(strconv.FormatInt(time.Now().UnixNano(), 10)+"|"+pad, strconv.Itoa(i))
			if err := s.SendMsg(&ev); err != nil {
				return
			}
		}
	}()
	acked := 0
	var buf []byte
	for acked < a.count {
		if err := s.RecvMsg(&buf); err != nil {
			break
		}
		// ServerEvent.sent (4), or Batch.sent (2) inside ServerEvent.batch (6)
		n := 0
		eachField(buf, func(num protowire.Number, p []byte) {
			if num == 4 {
				n++
			} else if num == 6 {
				eachField(p, func(m protowire.Number, _ []byte) {
					if m == 2 {
						n++
					}
				})
			}
		})
		for ; n > 0; n-- {
			acked++
			<-window
		}
	}
	endNs := time.Now().UnixNano()
	emit(map[string]any{"sent": acked, "start_ns": startNs, "end_ns": endNs,
		"cpu_s": cpuSeconds() - cpu0})
	os.Exit(0)
}

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "subscribe" && os.Args[1] != "send") {
		fmt.Fprintln(os.Stderr, "usage: loadgen subscribe|send [flags]")
		os.Exit(2)
	}
	a := &args{mode: os.Args[1]}
	fs := flag.NewFlagSet(a.mode, flag.ExitOnError)
	fs.StringVar(&a.target, "target", "", "host:port")
	fs.StringVar(&a.token, "token", "", "bearer token")
	fs.StringVar(&a.room, "room", "bench", "room")
	fs.IntVar(&a.n, "n", 1, "streams")
	fs.IntVar(&a.conns, "conns", 1, "connections")
	fs.IntVar(&a.stall, "stall", 0, "streams that stop reading after replay_done")
	fs.IntVar(&a.sample, "sample", 10, "streams that record latencies")
	fs.BoolVar(&a.spread, "spread", false, "per message, record when the last stream had it")
	fs.Float64Var(&a.readyTimeout, "ready-timeout", 120, "seconds")
	fs.IntVar(&a.count, "count", 1000, "messages to send")
	fs.Float64Var(&a.rate, "rate", 0, "messages per second (0 = as fast as acks allow)")
	fs.IntVar(&a.window, "window", 512, "unacknowledged messages in flight")
	fs.Float64Var(&a.startAfter, "start-after", 0, "seconds between the hello and the first message")
	fs.IntVar(&a.size, "size", 64, "message size in bytes")
	_ = fs.Parse(os.Args[2:])
	if a.mode == "subscribe" {
		subscribe(a)
	} else {
		send(a)
	}
}
