package background_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/http/httputil"
	"net/textproto"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"example.com/background"
)

// This file checks the promises of package background, one section for each,
// in the order below; each section's heading says what it checks. A
// section's tests share its name prefix, so that go test -run TestShutdown .
// runs that section alone. The tests of tasks (sections 3 to 9) call
// ServeHTTP in process, with no server, in a synctest bubble. The tests of
// the wire run over HTTP/1.1 and over HTTP/2, in subtests named h1 and h2
// (go test -run /h2 . runs the HTTP/2 ones), unless their promise is
// HTTP/1's alone. Either way, a test fails if it leaves a goroutine running.
// Helpers and Examples come first (Example_testing shows how to unit-test a
// handler that adds tasks); what only one section uses sits with that
// section.
//
//  1. TestResponse…    the whole response is sent before any task starts
//  2. TestConnection…  the connection is free while tasks run
//  3. TestOrder…       in order within a request, concurrently across requests
//  4. TestContext…     a task's ctx: the request's values, Shutdown's cancellation
//  5. TestFailure…     failures are logged, and the other tasks still run
//  6. TestPanic…       a handler that panics runs no tasks (each dropped with a
//                      log line) and sends nothing
//  7. TestAdd…         misuse panics clearly; an Add after the other tasks
//                      finished still runs
//  8. TestShutdown…    waits, gives up, and loses nothing without a log line
//  9. TestLimit…       at MaxPending, 503 before the handler runs, one log line
//                      a burst; nothing dropped
// 10. TestWriter…      the handler's w: cut off once it returns, Hijack, Copy
// 11. TestMux…         around a real mux: proxies, limits, uploads
//
// A first reading can stop there. After a comment that says so come:
//
// 12. TestTransparent… the same response as net/http alone, files and
//                      trailers too, but for the differences the package
//                      doc lists; FuzzTransparent writes the handlers
// 13. Benchmark…       what the wrapper costs; CI runs each once, to keep
//                      them working

// --- Helpers ---

// failSafe bounds every wait in these tests. Nothing should take more than a
// fraction of it; it only stops a broken build from hanging.
const failSafe = 30 * time.Second

// bufferLimit is how much of an unsized body the wrapper holds back.
const bufferLimit = 64 << 10

// proto is a protocol that a test's client speaks.
type proto string

const (
	http1 proto = "h1" // HTTP/1.1
	http2 proto = "h2" // HTTP/2 without TLS, which needs no certificate
)

// run runs f in a subtest for each of protos, or for both protocols if none
// is given, as net/http's own tests do. Each subtest fails if it leaves a
// goroutine running.
//
// Over HTTP/1, net/http writes to the connection in the handler's goroutine,
// so a test can look at the wire at a given step of the handler. Over HTTP/2,
// the connection's own goroutine writes the frames a moment later: there,
// tests check from the client's side what has been sent.
func run(t *testing.T, f func(t *testing.T, p proto), protos ...proto) {
	if len(protos) == 0 {
		protos = []proto{http1, http2}
	}
	for _, p := range protos {
		t.Run(string(p), func(t *testing.T) {
			checkGoroutines(t)
			f(t, p)
		})
	}
}

// checkGoroutines fails t if more goroutines run once its cleanups have run
// than when it started: servers, connections, handlers and tasks must all
// have ended. Nothing signals a goroutine's end, so it looks again, less and
// less often, until failSafe.
func checkGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() { // registered first, so it runs after the others
		deadline := time.Now().Add(failSafe)
		for wait := time.Millisecond; runtime.NumGoroutine() > before; wait = min(2*wait, 100*time.Millisecond) {
			if time.Now().After(deadline) {
				stacks := make([]byte, 1<<20)
				t.Fatalf("goroutines left running:\n%s", stacks[:runtime.Stack(stacks, true)])
			}
			time.Sleep(wait)
		}
	})
}

// testServer is a test's server, and what it wrote.
type testServer struct {
	*httptest.Server
	wire     *wireLog   // what it wrote to its connections
	errorLog *logBuffer // net/http's
}

// serve starts a server for h on 127.0.0.1 that speaks HTTP/1.1 and HTTP/2,
// with a client, srv.Client(), that speaks only p. Both close when the test
// ends; net/http's error log then goes to the test's log if it failed.
func serve(t testing.TB, p proto, h http.Handler) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &testServer{wire: &wireLog{Listener: ln}, errorLog: new(logBuffer)}
	srv.Server = &httptest.Server{Listener: srv.wire, Config: &http.Server{
		Handler:   h,
		ErrorLog:  log.New(srv.errorLog, "server: ", 0),
		Protocols: protocols(http1, http2),
	}}
	srv.Start()
	t.Cleanup(func() {
		srv.Close()
		if s := srv.errorLog.String(); t.Failed() && s != "" {
			t.Logf("net/http's error log:\n%s", s)
		}
	})
	srv.Client().Transport.(*http.Transport).Protocols = protocols(p)
	srv.Client().Timeout = failSafe
	return srv
}

// protocols returns ps as an http.Protocols, for a server or a Transport.
func protocols(ps ...proto) *http.Protocols {
	set := new(http.Protocols)
	set.SetHTTP1(slices.Contains(ps, http1))
	set.SetUnencryptedHTTP2(slices.Contains(ps, http2))
	return set
}

// wireLog records the first MiB that a server writes to its connections:
// more than any test looks at, and a bound for the fuzzer's long runs. What
// goes out through a connection's ReadFrom, which is where net/http hands a
// file to the kernel's sendfile, it counts instead. It counts connections.
type wireLog struct {
	net.Listener
	mu              sync.Mutex
	out             bytes.Buffer
	readFrom, conns atomic.Int64
}

func (l *wireLog) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.conns.Add(1)
	return &wireConn{TCPConn: c.(*net.TCPConn), log: l}, nil
}

// sent returns a copy of what has been written so far.
func (l *wireLog) sent() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.out.Bytes())
}

// wireConn is a TCP connection that records what is written to it. It keeps
// the methods of *net.TCPConn, such as CloseWrite, that net/http looks for.
type wireConn struct {
	*net.TCPConn
	log *wireLog
}

func (c *wireConn) Write(p []byte) (int, error) {
	n, err := c.TCPConn.Write(p)
	c.log.mu.Lock()
	c.log.out.Write(p[:min(n, max(0, 1<<20-c.log.out.Len()))])
	c.log.mu.Unlock()
	return n, err
}

func (c *wireConn) ReadFrom(r io.Reader) (int64, error) {
	n, err := c.TCPConn.ReadFrom(r)
	c.log.readFrom.Add(n)
	return n, err
}

// logBuffer collects log lines: a Handler's records, or net/http's errors.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// records returns the records logged so far, decoded.
func (l *logBuffer) records(t *testing.T) []map[string]any {
	t.Helper()
	var recs []map[string]any
	dec := json.NewDecoder(strings.NewReader(l.String()))
	for dec.More() {
		var rec map[string]any
		if err := dec.Decode(&rec); err != nil {
			t.Fatalf("log is not JSON lines: %v\n%s", err, l)
		}
		recs = append(recs, rec)
	}
	return recs
}

// lines returns each record logged so far as its message and the values of
// attrs, sorted, for a test to compare with the lines it expects.
func (l *logBuffer) lines(t *testing.T, attrs ...string) []string {
	t.Helper()
	var lines []string
	for _, rec := range l.records(t) {
		line := rec["msg"].(string)
		for _, a := range attrs {
			line += fmt.Sprint(" ", rec[a])
		}
		lines = append(lines, line)
	}
	slices.Sort(lines)
	return lines
}

// find returns the first record whose message contains msg, or nil.
func (l *logBuffer) find(t *testing.T, msg string) map[string]any {
	t.Helper()
	for _, rec := range l.records(t) {
		if strings.Contains(rec["msg"].(string), msg) {
			return rec
		}
	}
	return nil
}

// wrap returns next wrapped in a Handler that logs to the returned buffer.
// When the test ends, it waits for the Handler's tasks.
func wrap(t *testing.T, next http.HandlerFunc) (*background.Handler, *logBuffer) {
	t.Helper()
	logs := new(logBuffer)
	h := background.NewHandler(next)
	h.Logger = slog.New(slog.NewJSONHandler(logs, nil))
	t.Cleanup(func() { shutdown(t, h) })
	return h, logs
}

// serveWrapped is wrap and serve in one: it serves next, wrapped in a
// Handler, over p.
func serveWrapped(t *testing.T, p proto, next http.HandlerFunc) (*testServer, *background.Handler, *logBuffer) {
	t.Helper()
	h, logs := wrap(t, next)
	return serve(t, p, h), h, logs
}

// shutdown waits for h's tasks, failing the test if they take longer than
// failSafe. Once a Shutdown has given up, the later ones return its error, so
// only a Shutdown that gave up itself fails the test.
func shutdown(t *testing.T, h *background.Handler) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), failSafe)
	defer cancel()
	if err := h.Shutdown(ctx); err != nil && ctx.Err() != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

// open sends a method request for url with c, and returns the response with
// its body unread, to be closed when the test ends. It stops the test if
// there is no response, so call it only from the test's goroutine.
func open(t *testing.T, c *http.Client, method, url string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// get is open for a GET, and then reads the whole body.
func get(t *testing.T, c *http.Client, url string) (*http.Response, string) {
	t.Helper()
	resp := open(t, c, "GET", url)
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %s, then reading the body: %v", url, resp.Status, err)
	}
	return resp, string(body)
}

// serveOnce serves one request with h, in the calling goroutine.
func serveOnce(h http.Handler, method, target string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, target, nil))
	return rec
}

// panicOf serves one request with h, in the test's goroutine, and returns
// what it panicked with, or nil.
func panicOf(h http.Handler) (v any) {
	defer func() { v = recover() }()
	serveOnce(h, "GET", "/")
	return nil
}

// gate makes tasks that block: each sends its ctx on started as it starts,
// then waits until the test calls open, whatever its ctx says.
type gate struct {
	started chan context.Context
	opened  chan struct{}
	open    func() // may be called more than once; defer it
}

func newGate() *gate {
	g := &gate{started: make(chan context.Context, 1000), opened: make(chan struct{})}
	g.open = sync.OnceFunc(func() { close(g.opened) })
	return g
}

func (g *gate) task(ctx context.Context) error {
	g.started <- ctx
	<-g.opened
	return nil
}

// await waits for ch to be closed or to deliver, and stops the test after
// failSafe. Call it only from the test's goroutine.
func await[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	v, ok := receive(ch)
	if !ok {
		t.Fatalf("timed out waiting for %s", what)
	}
	return v
}

// receive is await for any goroutine, such as a handler's: it reports
// whether ch delivered within failSafe.
func receive[T any](ch <-chan T) (T, bool) {
	select {
	case v := <-ch:
		return v, true
	case <-time.After(failSafe):
		var zero T
		return zero, false
	}
}

// expired returns a context that has already ended: given to Shutdown, it
// means "do not wait at all".
func expired() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}

// addTask adds task to r's request; it panics if r is not served through a
// Handler.
func addTask(r *http.Request, task func(ctx context.Context) error) {
	background.FromContext(r.Context()).Add(task)
}

// noop is a task that does nothing.
func noop(context.Context) error { return nil }

// counter returns a task that counts its runs in n.
func counter(n *atomic.Int32) func(context.Context) error {
	return func(context.Context) error { n.Add(1); return nil }
}

// readerOnly hides any method of its Reader but Read, such as WriteTo, so
// that io.Copy calls the writer's ReadFrom.
type readerOnly struct{ io.Reader }

// dial opens a connection to srv, closed when the test ends, for a test that
// speaks HTTP/1.1 itself.
func dial(t *testing.T, srv *testServer) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(failSafe))
	return conn
}

// rawExchange sends request on a new connection to srv, and returns every
// byte the server sends back until it closes the connection.
func rawExchange(t *testing.T, srv *testServer, request string) string {
	t.Helper()
	conn := dial(t, srv)
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("read %d bytes, then: %v", len(got), err)
	}
	return string(got)
}

// --- Examples ---

// notify is the tutorial's endpoint: it answers at once and leaves the log
// line to a task.
func notify(w http.ResponseWriter, r *http.Request) {
	msg := "Notification sent to: " + r.PathValue("email")
	background.FromContext(r.Context()).Add(func(ctx context.Context) error { return writeLog(msg) })
	json.NewEncoder(w).Encode(map[string]string{"message": "Notification sent successfully!"})
}

// writeLog stands in for slow work, such as sending an email.
func writeLog(msg string) error {
	_, err := fmt.Println("Log written:", msg)
	return err
}

func Example() {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /send-notification/{email}", notify)
	h := background.NewHandler(mux)
	srv := httptest.NewServer(h)

	resp, err := http.Post(srv.URL+"/send-notification/test@example.com", "", nil)
	if err != nil {
		log.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Print(string(body)) // the task runs meanwhile, so the order of the lines varies

	srv.Close()
	h.Shutdown(context.Background())
	// Unordered output:
	// {"message":"Notification sent successfully!"}
	// Log written: Notification sent to: test@example.com
}

func ExampleHandler_Shutdown() {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /send-notification/{email}", notify)
	h := background.NewHandler(mux)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go srv.Serve(ln)

	resp, err := http.Post("http://"+ln.Addr().String()+"/send-notification/ada@example.com", "", nil)
	if err != nil {
		log.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()

	// Time to stop, on SIGTERM say. Both steps share one deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// First, stop taking requests and let the responses in flight finish...
	if err := srv.Shutdown(ctx); err != nil {
		log.Fatal(err)
	}
	// ...then wait for the tasks those responses queued.
	if err := h.Shutdown(ctx); err != nil {
		fmt.Println("some tasks did not finish:", err)
		return
	}
	fmt.Println("all tasks done")
	// Output:
	// Log written: Notification sent to: ada@example.com
	// all tasks done
}

// newNotifier is the tutorial's endpoint built to be tested: the work its
// task does comes in as send, so that a test can pass a fake.
func newNotifier(send func(email string) error) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /send-notification/{email}", func(w http.ResponseWriter, r *http.Request) {
		email := r.PathValue("email")
		background.FromContext(r.Context()).Add(func(ctx context.Context) error { return send(email) })
		io.WriteString(w, "Notification sent")
	})
	return mux
}

// Example_testing unit-tests a handler that adds tasks, as FastAPI's
// TestClient does: one request, no network, then a look at what the task did.
func Example_testing() {
	var sent []string // the fake's record of the mail it would have sent
	// Wrap the mux, as in production: the mux sets r.PathValue (called
	// directly, the handler would see "" unless the test set it with
	// req.SetPathValue), and without NewHandler, Add panics.
	h := background.NewHandler(newNotifier(func(email string) error {
		sent = append(sent, email)
		return nil
	}))

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/send-notification/ada@example.com", nil))
	fmt.Println(rec.Code, rec.Body.String())

	// Shutdown is how to wait for the tasks. The Handler keeps working
	// afterwards, so a test may go on serving; but once a Shutdown's deadline
	// has passed, every later task is dropped.
	if err := h.Shutdown(context.Background()); err != nil {
		log.Fatal(err)
	}
	fmt.Println("mail sent to:", sent)
	// Output:
	// 200 Notification sent
	// mail sent to: [ada@example.com]
}

// auditQuery is what FastAPI makes a dependency: a helper that the handler
// calls with the request's context. The task it adds joins the request's
// list, and runs in order with the handler's own.
func auditQuery(ctx context.Context, query string) {
	if query != "" {
		background.FromContext(ctx).Add(func(context.Context) error {
			return writeLog("found query: " + query)
		})
	}
}

func ExampleFromContext_dependency() {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /send-notification/{email}", func(w http.ResponseWriter, r *http.Request) {
		auditQuery(r.Context(), r.URL.Query().Get("q"))
		message := "message to " + r.PathValue("email")
		background.FromContext(r.Context()).Add(func(context.Context) error { return writeLog(message) })
		io.WriteString(w, `{"message":"Message sent"}`)
	})
	h := background.NewHandler(mux)

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/send-notification/ada@example.com?q=shoes", nil))
	h.Shutdown(context.Background()) // wait for the tasks
	fmt.Println(rec.Body.String())
	// Output:
	// Log written: found query: shoes
	// Log written: message to ada@example.com
	// {"message":"Message sent"}
}

// --- 1. TestResponse…: the client gets the whole response before any task starts ---

// responseCases are the responses whose end testResponseIsComplete… watches.
var responseCases = []struct {
	name, method string
	handler      http.HandlerFunc
	body         string
	streamed     bool   // sent as written: its end may follow the task's start
	held         bool   // over HTTP/1, nothing on the wire as the handler returns
	sent         string // over HTTP/1, on the wire as the handler returns
}{
	{"no Content-Length", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello, ")
		io.WriteString(w, "world")
	}, "hello, world", false, true, ""},
	{"empty body", "GET", func(w http.ResponseWriter, r *http.Request) {}, "", false, true, ""},
	{"error status, whose tasks run as any others", "GET", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no such thing", http.StatusNotFound)
	}, "no such thing\n", false, true, ""},
	{"HEAD", "HEAD", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "not sent")
	}, "", false, false, ""},
	{"no Content-Length, through ReadFrom", "GET", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(w, readerOnly{strings.NewReader("hello, world")})
	}, "hello, world", false, true, ""},
	{"body at the buffer limit, which net/http alone would stream", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Write(bytes.Repeat([]byte("x"), bufferLimit))
	}, strings.Repeat("x", bufferLimit), false, true, ""},
	{"body past the buffer limit", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Write(bytes.Repeat([]byte("y"), 4*bufferLimit))
	}, strings.Repeat("y", 4*bufferLimit), true, false, "yyyy"},
	{"Content-Length set, and more body than net/http buffers", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "16384")
		w.Write(bytes.Repeat([]byte("z"), 16<<10))
	}, strings.Repeat("z", 16<<10), false, false, "zzzz"},
	{"flushed with http.Flusher", "GET", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first ")
		w.(http.Flusher).Flush()
		io.WriteString(w, "second")
	}, "first second", true, false, "first "},
	{"flushed with http.ResponseController", "GET", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first ")
		http.NewResponseController(w).Flush()
		io.WriteString(w, "second")
	}, "first second", true, false, "first "},
	{"Transfer-Encoding: chunked set before writing", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Transfer-Encoding", "chunked")
		io.WriteString(w, "hello")
	}, "hello", false, true, ""},
	{"Trailer declared, which no Content-Length can carry", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Checksum")
		io.WriteString(w, "hello")
		w.Header().Set("X-Checksum", "5d41402a")
	}, "hello", true, false, ""},
}

// The client has the whole response, and over HTTP/1 the wire has it, when
// the task starts. While the handler runs, the wrapper holds back an
// unflushed, unsized body within the limit, and sends any other.
func TestResponseIsCompleteOnTheWireBeforeTaskStartsAndHeldBackOnlyUntilThen(t *testing.T) {
	run(t, testResponseIsComplete)
}

func testResponseIsComplete(t *testing.T, p proto) {
	for _, tc := range responseCases {
		// A broken build fails each HTTP/2 case at failSafe: stop at the first.
		if !t.Run(tc.name, func(t *testing.T) {
			block, clientRead := make(chan struct{}), make(chan struct{}) // clientRead: the whole body
			defer close(block)
			looked, onWire := make(chan error, 1), make(chan error, 1)
			var srv *testServer
			h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
				addTask(r, func(context.Context) error {
					if p == http1 {
						looked <- readWholeResponse(srv.wire.sent(), tc.method, tc.body, tc.streamed)
					} else if _, ok := receive(clientRead); !ok {
						looked <- errors.New("the client could not read the whole body")
					} else {
						looked <- nil
					}
					<-block // a task that never ends must not hold up the client
					return nil
				})
				tc.handler(w, r)
				if sent := srv.wire.sent(); p == http1 && (tc.held && len(sent) > 0 || !bytes.Contains(sent, []byte(tc.sent))) {
					t.Errorf("as the handler returned, the wire held %.60q; want it to hold nothing back: %v, and %q", sent, tc.held, tc.sent)
				}
			})
			// net/http finishes the response after ServeHTTP returns. Hold it
			// there until the task has looked, so that only what the wrapper
			// itself sent can have reached the client.
			srv = serve(t, p, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				h.ServeHTTP(w, r)
				if err, ok := receive(looked); ok {
					onWire <- err
				}
			}))
			resp := open(t, srv.Client(), tc.method, srv.URL)
			body := make([]byte, len(tc.body))
			if n, err := io.ReadFull(resp.Body, body); err != nil || string(body) != tc.body {
				t.Fatalf("client read %d bytes, %v; want %d bytes", n, err, len(tc.body))
			}
			close(clientRead)
			if rest, err := io.ReadAll(resp.Body); len(rest) > 0 || err != nil {
				t.Fatalf("and then %d bytes more, %v", len(rest), err)
			}
			if p == http2 && !tc.streamed && tc.method == "GET" && resp.ContentLength != int64(len(body)) {
				t.Errorf("Content-Length %d, want %d", resp.ContentLength, len(body))
			}
			if err := await(t, onWire, "the task"); err != nil {
				t.Errorf("when the task started: %v", err)
			}
		}) {
			break
		}
	}
}

// readWholeResponse reports whether raw holds one whole, properly framed
// response to a method request, with the given body; if streamed, with the
// whole body but maybe not its end.
func readWholeResponse(raw []byte, method, want string, streamed bool) error {
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(raw)), &http.Request{Method: method})
	if err != nil {
		return fmt.Errorf("%d bytes on the wire, and no response header: %v", len(raw), err)
	}
	body, err := io.ReadAll(resp.Body)
	if string(body) != want || (err != nil && !streamed) {
		return fmt.Errorf("%d bytes on the wire, with %d of the body's %d, then %v", len(raw), len(body), len(want), err)
	}
	return nil
}

// --- 2. TestConnection…: the connection is free while tasks run ---

func TestConnectionKeepAliveServesNextRequestWhileTasksRun(t *testing.T) {
	synctest.Test(t, testConnectionFree)
}

// testConnectionFree checks that ServeHTTP returns while its task runs:
// net/http reads a connection's next request once ServeHTTP has returned.
// The bubble's clock moves only while every goroutine in it waits, so a
// ServeHTTP that waited for its one-second task would take a second.
func testConnectionFree(t *testing.T) {
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		addTask(r, func(context.Context) error { time.Sleep(time.Second); return nil })
	})
	start := time.Now()
	if serveOnce(h, "GET", "/"); time.Since(start) != 0 {
		t.Errorf("ServeHTTP took %v, as long as its task: the connection's next request would wait for it", time.Since(start))
	}
}

// A client that reads its response slowly, or leaves, holds up no other
// request and no other task; its task runs once it has gone.
func TestConnectionSlowReaderHoldsUpNoOtherRequestOrTask(t *testing.T) {
	run(t, testConnectionSlowReader, http1)
}

func testConnectionSlowReader(t *testing.T, p proto) {
	const others = 20
	ran := make(chan string, others+2)
	srv, h, _ := serveWrapped(t, p, func(w http.ResponseWriter, r *http.Request) {
		addTask(r, func(context.Context) error { ran <- r.URL.Path; return nil })
		if r.URL.Path != "/big" {
			io.WriteString(w, "small")
			return
		}
		chunk := make([]byte, 32<<10)
		for n := 0; n < 256<<20; n += len(chunk) { // far more than the socket buffers hold
			if _, err := w.Write(chunk); err != nil {
				return // the slow reader has gone
			}
		}
	})
	slow := dial(t, srv)
	io.WriteString(slow, "GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
	if _, err := slow.Read(make([]byte, 1)); err != nil { // the response has begun; read no more
		t.Fatal(err)
	}
	for i := range others {
		get(t, srv.Client(), fmt.Sprintf("%s/small/%d", srv.URL, i))
	}
	for range others {
		if path := await(t, ran, "the other requests' tasks"); path == "/big" {
			t.Fatal("the slow reader's task ran while its response was still being written")
		}
	}
	slow.Close()
	shutdown(t, h)
	if n := len(ran); n != 1 || <-ran != "/big" {
		t.Errorf("once the slow reader had gone, %d tasks ran; want its task, once", n)
	}
}

// --- 3. TestOrder…: in order within a request, concurrently across requests ---

// Sections 3 to 9 are about tasks, which no connection changes. Their tests
// call ServeHTTP with a ResponseRecorder inside a synctest bubble. Its clock
// is fake, and it fails a test that leaves a goroutine blocked.

func TestOrderTasksRunInOrderOneAtATimeAndRequestsConcurrently(t *testing.T) {
	synctest.Test(t, testOrder)
}

// testOrder serves two requests, each of which adds three tasks; the first
// adds a fourth. Each takes a second on the bubble's clock, which is exact:
// tasks of one request that overlapped would take less than four seconds
// (and race on its slice, under -race), and requests whose tasks ran one
// after the other would take eight.
func testOrder(t *testing.T) {
	var orders [2][]int
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		id, _ := strconv.Atoi(r.URL.Query().Get("id"))
		for n := 1; n <= 3; n++ {
			addTask(r, appendTask(&orders[id], n))
		}
	})
	start := time.Now()
	serveOnce(h, "GET", "/?id=0")
	serveOnce(h, "GET", "/?id=1")
	h.Shutdown(context.Background())
	if want := []int{1, 2, 3, 4}; !slices.Equal(orders[0], want) || !slices.Equal(orders[1], want) {
		t.Errorf("tasks ran in order %v; want %v for each request", orders, want)
	}
	if took := time.Since(start); took != 4*time.Second {
		t.Errorf("two requests with four one-second tasks each took %v; want 4s", took)
	}
}

// appendTask returns a task that appends n to order and takes a second.
// Task 1 adds task 4, which runs after those already queued.
func appendTask(order *[]int, n int) func(context.Context) error {
	return func(ctx context.Context) error {
		*order = append(*order, n)
		if n == 1 {
			background.FromContext(ctx).Add(appendTask(order, 4))
		}
		time.Sleep(time.Second)
		return nil
	}
}

func TestOrderEveryTaskRunsExactlyOnceUnderConcurrentRequests(t *testing.T) {
	synctest.Test(t, testOrderExactlyOnce)
}

// testOrderExactlyOnce serves many requests at once, each of which adds
// its tasks from goroutines of its own.
func testOrderExactlyOnce(t *testing.T) {
	const requests, tasksEach = 300, 8
	var runs [requests][tasksEach]atomic.Int32
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		id, _ := strconv.Atoi(r.URL.Query().Get("id"))
		var wg sync.WaitGroup
		for k := range runs[id] {
			wg.Go(func() { addTask(r, counter(&runs[id][k])) })
		}
		wg.Wait()
	})
	var served sync.WaitGroup
	for id := range requests {
		served.Go(func() { serveOnce(h, "GET", fmt.Sprintf("/?id=%d", id)) })
	}
	served.Wait()
	h.Shutdown(context.Background())
	for id := range runs {
		for k := range runs[id] {
			if n := runs[id][k].Load(); n != 1 {
				t.Errorf("request %d task %d ran %d times, want once", id, k, n)
			}
		}
	}
}

// --- 4. TestContext…: values, and only Shutdown's cancellation ---

type ctxKey string

func TestContextOfTaskHasValuesButOnlyShutdownCancelsIt(t *testing.T) {
	synctest.Test(t, testContextValuesAndCancel)
}

func testContextValuesAndCancel(t *testing.T) {
	var taskCtx context.Context
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		// Middleware inside the wrapper adds a value, and ends its context
		// with a cause of its own as the handler returns, as net/http does.
		ctx, cancel := context.WithCancelCause(context.WithValue(r.Context(), ctxKey("middleware"), "from middleware"))
		defer cancel(errors.New("request over"))
		ctx = context.WithValue(ctx, ctxKey("handler"), "from the handler")
		background.FromContext(ctx).Add(func(ctx context.Context) error {
			taskCtx = ctx
			<-ctx.Done()
			return nil
		})
	})
	serveOnce(h, "GET", "/")
	synctest.Wait() // the task waits, the request over
	if a, b := taskCtx.Value(ctxKey("middleware")), taskCtx.Value(ctxKey("handler")); a != "from middleware" || b != "from the handler" {
		t.Errorf("task saw values %q and %q, want the middleware's and the handler's", a, b)
	}
	if _, ok := taskCtx.Deadline(); ok || taskCtx.Err() != nil {
		t.Errorf("after the request ended, the task's ctx has Err %v, deadline %v; want neither", taskCtx.Err(), ok)
	}
	h.Shutdown(expired())
	synctest.Wait()
	if cause := context.Cause(taskCtx); cause != context.Canceled {
		t.Errorf("canceled by Shutdown, the task's ctx has cause %v, want context.Canceled", cause)
	}
}

// Middleware may print r.Context() while the handler adds a task: it reads
// as context.WithValue's would, and races with nothing.
func TestContextOfRequestPrintsAsWithValueDoesWhileTasksAreAdded(t *testing.T) {
	req := httptest.NewRequest("GET", "/", nil)
	var printed string
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		added := make(chan struct{})
		go func() { addTask(r, noop); close(added) }()
		printed = fmt.Sprint(r.Context())
		<-added
	})
	h.ServeHTTP(httptest.NewRecorder(), req)
	if want := fmt.Sprint(req.Context()) + ".WithValue(background.tasksKey, *background.queue)"; printed != want {
		t.Errorf("r.Context() prints as %q, want %q", printed, want)
	}
}

// Real tasks add a logger or a span to their ctx before they derive a
// timeout from it: such contexts start no goroutine, and see Shutdown.
func TestContextDerivedFromTaskContextStartsNoGoroutineAndSeesShutdown(t *testing.T) {
	synctest.Test(t, testContextDerived)
}

func testContextDerived(t *testing.T) {
	var derived []context.Context
	goroutines := -1 // how many deriving started
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		addTask(r, func(ctx context.Context) error {
			before := runtime.NumGoroutine()
			for i := range 100 {
				layered, cancel := context.WithTimeout(context.WithValue(ctx, ctxKey("span"), i), time.Hour)
				defer cancel()
				direct, cancel := context.WithCancel(ctx)
				defer cancel()
				derived = append(derived, layered, direct)
			}
			goroutines = runtime.NumGoroutine() - before
			<-ctx.Done() // Shutdown has given up
			return nil
		})
	})
	serveOnce(h, "GET", "/")
	synctest.Wait()
	if goroutines > 10 {
		t.Errorf("200 contexts derived from the task's ctx started %d goroutines; want next to none", goroutines)
	}
	h.Shutdown(expired())
	synctest.Wait()
	for i, c := range derived {
		if c.Err() == nil {
			t.Fatalf("derived context %d was not canceled with the task's", i)
		}
	}
}

// --- 5. TestFailure…: failures are logged, and the rest still run ---

// requestIDs is a slog.Handler that adds the request ID that a record's
// context carries, as a tracing handler adds a trace ID.
type requestIDs struct{ slog.Handler }

func (h requestIDs) Handle(ctx context.Context, rec slog.Record) error {
	if id, ok := ctx.Value(ctxKey("request-id")).(string); ok {
		rec.AddAttrs(slog.String("request_id", id))
	}
	return h.Handler.Handle(ctx, rec)
}

// A task's error, panic or runtime.Goexit is logged with the task's ctx and
// its request's method and path, and the request's other tasks still run. A
// panicking handler's tasks are dropped, each with a line.
func TestFailureOfTasksIsLoggedWithTheirContextAndTheRestStillRun(t *testing.T) {
	synctest.Test(t, testFailureLogged)
}

func testFailureLogged(t *testing.T) {
	var ran atomic.Int32
	h, logs := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		ctx := context.WithValue(r.Context(), ctxKey("request-id"), "id"+r.URL.Path) // middleware, say
		tasks := background.FromContext(ctx)
		tasks.Add(func(context.Context) error { return errors.New("mail server said no") })
		tasks.Add(func(context.Context) error { panic("task blew up") })
		tasks.Add(func(context.Context) error { runtime.Goexit(); return nil }) // as t.FailNow in a fake does
		tasks.Add(counter(&ran))
		if r.URL.Path == "/" { // panicOf's request
			panic("handler blew up")
		}
	})
	h.Logger = slog.New(requestIDs{h.Logger.Handler()})
	serveOnce(h, "POST", "/jobs")
	panicOf(h)
	if err := h.Shutdown(context.Background()); err != nil || ran.Load() != 1 {
		t.Errorf("Shutdown = %v, and %d tasks after the failing ones ran; want nil and 1", err, ran.Load())
	}
	want := []string{
		"background: task called runtime.Goexit ERROR POST /jobs id/jobs",
		"background: task dropped WARN GET / id/", "background: task dropped WARN GET / id/",
		"background: task dropped WARN GET / id/", "background: task dropped WARN GET / id/",
		"background: task failed ERROR POST /jobs id/jobs",
		"background: task panicked ERROR POST /jobs id/jobs",
	}
	if lines := logs.lines(t, "level", "method", "path", "request_id"); !slices.Equal(lines, want) {
		t.Errorf("log lines:\n%s\nwant:\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
	failed, panicked := logs.find(t, "task failed"), logs.find(t, "task panicked")
	if failed["err"] != "mail server said no" || panicked["panic"] != "task blew up" ||
		!strings.Contains(fmt.Sprint(panicked["stack"]), "background_test.testFailureLogged") {
		t.Errorf("logged the error as %q, and the panic as %q with stack:\n%s", failed["err"], panicked["panic"], panicked["stack"])
	}
}

// stuckWriter blocks every Write until unblock is closed, like a log pipe
// that nobody reads, and closes writing at the first one.
type stuckWriter struct {
	once             sync.Once
	writing, unblock chan struct{}
}

func (w *stuckWriter) Write(p []byte) (int, error) {
	w.once.Do(func() { close(w.writing) })
	<-w.unblock
	return len(p), nil
}

// No log line is written with the Handler's lock held, so a stuck log
// stalls only the goroutine that writes it. (Outside a synctest bubble,
// where a goroutine blocked on a mutex would hang the test, not fail it.)
func TestFailureLogLineThatBlocksHoldsUpNoOtherTask(t *testing.T) {
	stuck := &stuckWriter{writing: make(chan struct{}), unblock: make(chan struct{})}
	defer close(stuck.unblock)
	ran := make(chan struct{})
	h := background.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/" { // panicOf's request: its dropped task is logged
			addTask(r, noop)
			panic("handler blew up")
		}
		addTask(r, func(context.Context) error { close(ran); return nil })
	}))
	h.Logger = slog.New(slog.NewTextHandler(stuck, nil))
	go panicOf(h)
	await(t, stuck.writing, "the log line")
	go serveOnce(h, "GET", "/other")
	await(t, ran, "another request's task, while a log line was stuck")
}

// With no Logger, a Handler logs to slog.Default() as it is when it logs.
func TestFailureIsLoggedToSlogDefaultIfLoggerIsNil(t *testing.T) {
	logs := new(logBuffer)
	defer log.SetOutput(log.Writer()) // which slog.SetDefault changes, and does not change back
	defer log.SetFlags(log.Flags())
	defer slog.SetDefault(slog.Default())
	h := background.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		addTask(r, func(context.Context) error { return errors.New("mail server said no") })
	}))
	slog.SetDefault(slog.New(slog.NewJSONHandler(logs, nil)))
	serveOnce(h, "GET", "/")
	h.Shutdown(context.Background())
	if !strings.Contains(logs.String(), "mail server said no") {
		t.Errorf("slog.Default() got %q; want the task's error", logs)
	}
}

// --- 6. TestPanic…: a panicking handler runs no tasks ---

func TestPanicInHandlerRunsNoTasksAndPropagatesUnchanged(t *testing.T) {
	synctest.Test(t, testPanicRunsNoTasks)
}

func testPanicRunsNoTasks(t *testing.T) {
	// late: added after the panic, by a goroutine the handler left behind.
	// The panic values are net/http's sentinel, and any other value.
	for _, late := range []bool{false, true} {
		var ran atomic.Int32
		value := any(http.ErrAbortHandler)
		if late {
			value = "handler blew up"
		}
		panicked := make(chan struct{})
		h, logs := wrap(t, func(w http.ResponseWriter, r *http.Request) {
			if late {
				go func() { <-panicked; addTask(r, counter(&ran)) }()
			} else {
				addTask(r, counter(&ran))
			}
			io.WriteString(w, "partial")
			panic(value)
		})
		if v := panicOf(h); v != value {
			t.Errorf("panic(%#v) reached the caller as %#v", value, v)
		}
		close(panicked)
		synctest.Wait()
		h.Shutdown(context.Background())
		if rec := logs.find(t, "task dropped"); ran.Load() != 0 || len(logs.lines(t)) != 1 || rec["reason"] != "the handler panicked" {
			t.Errorf("added late: %v; tasks ran: %d; logged: %s; want one line, for a task dropped because the handler panicked", late, ran.Load(), logs)
		}
	}
}

func TestPanicAfterWritingSendsNoneOfTheHeldBackBody(t *testing.T) {
	run(t, testPanicSendsNothing, http1)
}

func testPanicSendsNothing(t *testing.T, p proto) {
	srv, _, _ := serveWrapped(t, p, func(w http.ResponseWriter, r *http.Request) {
		w.Write(make([]byte, 8<<10)) // without the wrapper, some of it would be on its way
		panic(http.ErrAbortHandler)
	})
	if got := rawExchange(t, srv, "GET / HTTP/1.1\r\nHost: test\r\n\r\n"); got != "" {
		t.Errorf("the client got %d bytes (%.40q...); the doc says it gets none", len(got), got)
	}
}

// --- 7. TestAdd…: misuse panics clearly; an Add after the other tasks finished still runs ---

func TestAddToNilOrZeroTasksOrOfANilTaskPanicsNamingTheFix(t *testing.T) {
	if tasks := background.FromContext(context.Background()); tasks != nil {
		t.Fatalf("FromContext outside a wrapped handler = %v, want nil", tasks)
	}
	nilTask, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) { addTask(r, nil) })
	for _, misuse := range []struct {
		name  string
		serve http.HandlerFunc // serves one request, in the test's goroutine
		want  string           // in the panic's message
	}{
		{"nil Tasks", func(http.ResponseWriter, *http.Request) { (*background.Tasks)(nil).Add(noop) }, "NewHandler"},
		{"zero Tasks", func(http.ResponseWriter, *http.Request) { new(background.Tasks).Add(noop) }, "NewHandler"},
		{"FromContext outside the wrapper", func(w http.ResponseWriter, r *http.Request) { addTask(r, noop) }, "NewHandler"},
		{"nil task", nilTask.ServeHTTP, "nil task"},
	} {
		if v := panicOf(misuse.serve); !strings.Contains(fmt.Sprint(v), misuse.want) {
			t.Errorf("%s: panicked with %v; want a panic whose message contains %q", misuse.name, v, misuse.want)
		}
	}
}

func TestAddAfterTasksFinishedRunsAndShutdownWaitsForIt(t *testing.T) {
	synctest.Test(t, testAddLate)
}

func testAddLate(t *testing.T) {
	late := newGate()
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		tasks := background.FromContext(r.Context())
		firstDone := make(chan struct{})
		tasks.Add(func(context.Context) error { close(firstDone); return nil })
		go func() { // a goroutine that outlives the handler
			<-firstDone
			tasks.Add(late.task)
		}()
	})
	serveOnce(h, "GET", "/")
	taskCtx := <-late.started
	// With no time to wait, Shutdown must report the late task still running,
	// and cancel it.
	if err := h.Shutdown(expired()); err != context.Canceled || taskCtx.Err() == nil {
		t.Errorf("Shutdown with a task running = %v, and the task's ctx ended: %v; want context.Canceled, and true", err, taskCtx.Err() != nil)
	}
	late.open()
}

// --- 8. TestShutdown…: waits, gives up, and loses nothing silently ---

func TestShutdownWaitsForQueuedAndRunningTasks(t *testing.T) {
	synctest.Test(t, testShutdownWaits)
}

func testShutdownWaits(t *testing.T) {
	g := newGate()
	var done atomic.Int32
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		addTask(r, func(ctx context.Context) error {
			g.task(ctx)
			background.FromContext(ctx).Add(func(context.Context) error { // while Shutdown waits
				time.Sleep(time.Second)
				done.Add(1)
				return nil
			})
			return nil
		})
		addTask(r, counter(&done))
	})
	serveOnce(h, "GET", "/")
	var err error
	returned := make(chan struct{})
	go func() { err = h.Shutdown(context.Background()); close(returned) }()
	synctest.Wait()
	select {
	case <-returned:
		t.Fatalf("Shutdown returned %v with a task running and one queued", err)
	default:
	}
	g.open()
	<-returned
	if err != nil || done.Load() != 2 {
		t.Errorf("Shutdown returned %v with %d of 2 counting tasks done, one added while it waited; want nil with both", err, done.Load())
	}
}

// A task that calls Shutdown waits for itself, so only ctx ends the wait.
func TestShutdownCalledByATaskWaitsForItselfUntilItsDeadline(t *testing.T) {
	synctest.Test(t, testShutdownByATask)
}

func testShutdownByATask(t *testing.T) {
	var h *background.Handler
	var err error
	h, _ = wrap(t, func(w http.ResponseWriter, r *http.Request) {
		addTask(r, func(context.Context) error {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			err = h.Shutdown(ctx)
			return nil
		})
	})
	start := time.Now()
	serveOnce(h, "GET", "/")
	h.Shutdown(context.Background()) // returns once the task has
	if err != context.DeadlineExceeded || time.Since(start) != time.Second {
		t.Errorf("a task's Shutdown returned %v after %v; want context.DeadlineExceeded, after its one-second deadline", err, time.Since(start))
	}
}

// A Shutdown that gives up cancels the running task, drops the queued one,
// and says so in one line. Every Shutdown, earlier or later, returns its
// error, and a task added later is dropped with a line. A task that returns
// ctx.Err(), wrapped or not, is counted there, not logged again; any other
// error is logged.
func TestShutdownDeadlineCancelsRunningDropsQueuedAndLaterAndEveryShutdownReturnsItsError(t *testing.T) {
	synctest.Test(t, testShutdownGivesUp)
}

func testShutdownGivesUp(t *testing.T) {
	g := newGate() // its task ignores ctx: Shutdown must not wait for it
	var ran atomic.Int32
	h, logs := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/gate":
			addTask(r, g.task)
			addTask(r, counter(&ran)) // queued
		case "/own-cancellation": // not Shutdown's: logged
			addTask(r, func(ctx context.Context) error {
				ctx, cancel := context.WithCancel(ctx)
				cancel()
				return ctx.Err()
			})
		case "/other-error": // after Shutdown's cancellation, but not it: logged
			addTask(r, func(ctx context.Context) error { <-ctx.Done(); return errors.New("mail server said no") })
		case "/wrapped":
			addTask(r, func(ctx context.Context) error { <-ctx.Done(); return fmt.Errorf("sending mail: %w", ctx.Err()) })
		case "/plain":
			addTask(r, func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() })
		case "/late":
			addTask(r, counter(&ran))
		}
	})
	for _, path := range []string{"/gate", "/own-cancellation", "/other-error", "/wrapped", "/plain"} {
		serveOnce(h, "GET", path)
	}
	synctest.Wait()
	patient := make(chan error, 1)
	go func() { patient <- h.Shutdown(context.Background()) }()
	synctest.Wait()
	if err := h.Shutdown(expired()); err != context.Canceled {
		t.Errorf("Shutdown past its deadline = %v, want context.Canceled", err)
	}
	if taskCtx := <-g.started; taskCtx.Err() == nil {
		t.Error("the running task's ctx was not canceled")
	}
	g.open()
	if err := <-patient; err != context.Canceled {
		t.Errorf("the patient Shutdown = %v, though the other one dropped a task; want context.Canceled", err)
	}
	serveOnce(h, "GET", "/late")
	if err := h.Shutdown(context.Background()); err != context.Canceled || ran.Load() != 0 {
		t.Errorf("a later Shutdown = %v, and %d dropped tasks ran; want context.Canceled, and none", err, ran.Load())
	}
	want := []string{
		"background: shutdown deadline passed; unfinished tasks canceled or dropped 5 <nil> <nil>",
		"background: task dropped <nil> /late <nil>",
		"background: task failed <nil> /other-error mail server said no",
		"background: task failed <nil> /own-cancellation context canceled",
	}
	if lines := logs.lines(t, "count", "path", "err"); !slices.Equal(lines, want) {
		t.Errorf("log lines:\n%s\nwant:\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}
}

func TestShutdownReturnedThenTaskAddedRunsAndIsLogged(t *testing.T) {
	synctest.Test(t, testShutdownThenAdd)
}

func testShutdownThenAdd(t *testing.T) {
	release, ran := make(chan struct{}), make(chan struct{})
	slow := func(w http.ResponseWriter, r *http.Request) {
		<-release // still running when http.TimeoutHandler answers
		addTask(r, func(context.Context) error { close(ran); return nil })
	}
	h, logs := wrap(t, http.TimeoutHandler(http.HandlerFunc(slow), time.Millisecond, "too slow").ServeHTTP)
	if rec := serveOnce(h, "GET", "/slow"); rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("got %d, want http.TimeoutHandler's 503", rec.Code)
	}
	if err := h.Shutdown(context.Background()); err != nil {
		t.Fatalf("Shutdown with nothing to wait for = %v, want nil", err)
	}
	close(release)
	<-ran
	synctest.Wait()
	if rec := logs.find(t, "after Shutdown returned"); rec == nil || rec["path"] != "/slow" {
		t.Errorf("the task added after Shutdown returned was logged as %v; want a record naming /slow", rec)
	}
}

// Shutdowns, patient and impatient, race with requests. While none has given
// up, every task runs; once one has, every task runs or is counted in a line.
func TestShutdownRacingRequestsAndShutdownsLosesNoTaskWithoutALogLine(t *testing.T) {
	synctest.Test(t, testShutdownRacing)
}

func testShutdownRacing(t *testing.T) {
	var added, ran atomic.Int32
	h, logs := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		for range 2 {
			added.Add(1)
			addTask(r, func(context.Context) error { time.Sleep(time.Millisecond); ran.Add(1); return nil })
		}
	})
	for _, ctx := range []context.Context{context.Background(), expired()} {
		var wg sync.WaitGroup
		for i := range 100 {
			wg.Go(func() { serveOnce(h, "GET", "/") })
			if i%10 == 0 {
				wg.Go(func() { h.Shutdown(ctx) })
			}
		}
		wg.Wait()
		h.Shutdown(context.Background())
		if ctx.Err() == nil && ran.Load() != added.Load() {
			t.Errorf("with no Shutdown giving up, %d of %d tasks ran", ran.Load(), added.Load())
		}
	}
	counted := 0 // tasks counted in log lines
	for _, rec := range logs.records(t) {
		switch rec["msg"] {
		case "background: task dropped":
			counted++
		case "background: shutdown deadline passed; unfinished tasks canceled or dropped":
			counted += int(rec["count"].(float64))
		}
	}
	if a, r := int(added.Load()), int(ran.Load()); a > r+counted || counted == 0 {
		t.Errorf("%d tasks added, %d ran and %d were counted in log lines; want none lost without a word, and some counted", a, r, counted)
	}
}

// --- 9. TestLimit…: MaxPending ---

// A request that finds MaxPending tasks pending gets a 503 before its handler
// runs; a burst of them logs one line. Tasks may add past the limit: nothing
// is dropped. Pending counts the tasks added and not yet finished or
// dropped. Once the backlog drains (Shutdown waits for it, and the Handler
// goes on serving), requests are accepted again.
func TestLimitRefusesWith503AndRetryAfterDropsNothingAndAcceptsAgain(t *testing.T) {
	synctest.Test(t, testLimit)
}

func testLimit(t *testing.T) {
	g := newGate()
	var served, finished atomic.Int32
	h, logs := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		addTask(r, func(ctx context.Context) error {
			g.task(ctx)
			background.FromContext(ctx).Add(counter(&finished)) // past the limit
			return counter(&finished)(ctx)
		})
		addTask(r, func(ctx context.Context) error { g.task(ctx); return counter(&finished)(ctx) })
		if r.URL.Path == "/" { // panicOf's request: its tasks are dropped
			panic("handler blew up")
		}
		served.Add(1)
		io.WriteString(w, "queued")
	})
	h.MaxPending = 4
	panicOf(h)
	pending := []int{h.Pending()}
	serveOnce(h, "GET", "/a")
	serveOnce(h, "GET", "/b") // let in with 2 pending; then 4 are
	synctest.Wait()           // the first task of each request runs, and blocks
	pending = append(pending, h.Pending())
	for range 3 {
		if rec := serveOnce(h, "GET", "/c"); rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") != "1" {
			t.Errorf("at the limit: %d with Retry-After %q, %q; want 503 with Retry-After 1", rec.Code, rec.Header().Get("Retry-After"), rec.Body)
		}
	}
	if n, lines := served.Load(), strings.Count(logs.String(), "MaxPending"); n != 2 || lines != 1 {
		t.Errorf("the handler served %d requests, and %d lines logged the refusals; want 2, none of them refused, and 1", n, lines)
	}
	g.open()
	h.Shutdown(context.Background()) // the backlog drains
	pending = append(pending, h.Pending())
	if rec := serveOnce(h, "GET", "/d"); rec.Body.String() != "queued" {
		t.Errorf("once the backlog drained, got %q; want the handler's reply", rec.Body)
	}
	h.Shutdown(context.Background())
	// After a panicking handler's tasks were dropped; with two tasks running
	// and two queued; once Shutdown has returned.
	if want := []int{0, 4, 0}; !slices.Equal(pending, want) || finished.Load() != 9 {
		t.Errorf("Pending at each step = %v, and %d tasks finished; want %v, and 9: three for each request served", pending, finished.Load(), want)
	}
}

// --- 10. TestWriter…: the handler's w ---

func TestWriterKeptByTaskReachesNoOtherResponse(t *testing.T) {
	run(t, testWriterKeptByTask)
}

// testWriterKeptByTask serves /a, whose task kept its w by mistake and uses
// it while /b is served on the same connection, again and again.
func testWriterKeptByTask(t *testing.T, p proto) {
	serving, used := make(chan struct{}, 1), make(chan error, 1)
	srv, h, logs := serveWrapped(t, p, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/b" {
			serving <- struct{}{}
			if err, _ := receive(used); err != nil {
				t.Error(err)
			}
			io.WriteString(w, "b")
			return
		}
		addTask(r, func(context.Context) error {
			receive(serving)
			w.Header().Set("Set-Cookie", "session=user-A-secret") // the mistake: a closure kept w
			_, err := io.WriteString(w, "leak")
			w.WriteHeader(http.StatusTeapot)
			w.(http.Flusher).Flush()
			if cookie := w.Header().Get("Set-Cookie"); err == nil || cookie == "" {
				err = fmt.Errorf("the kept w's Write returned %v, and its Header held %q; want an error, and the cookie", err, cookie)
			} else {
				err = nil
			}
			used <- err
			return nil
		})
	})
	for i := range 50 {
		get(t, srv.Client(), srv.URL+"/a")
		if resp, body := get(t, srv.Client(), srv.URL+"/b"); resp.StatusCode != http.StatusOK || body != "b" || resp.Header["Set-Cookie"] != nil {
			t.Fatalf("round %d: /b got %s %q with Set-Cookie %q; want 200 \"b\" and no cookie", i, resp.Status, body, resp.Header["Set-Cookie"])
		}
	}
	shutdown(t, h)
	if rec := logs.find(t, "task panicked"); rec != nil {
		t.Fatalf("using the kept w panicked: %v", rec["panic"])
	}
}

// Handlers ask w which interfaces it has: a WebSocket library, for one, may
// type-assert w.(http.Hijacker) to choose between taking the connection over
// and answering on it. So w is a Hijacker where net/http's writer is, over
// HTTP/1 and not over HTTP/2, and has the other interfaces in both; through
// http.ResponseController, it reaches the server's writer.
func TestWriterHasTheInterfacesOfTheServersWriter(t *testing.T) {
	run(t, testWriterInterfaces)
}

func testWriterInterfaces(t *testing.T, p proto) {
	type interfaces struct{ flusher, hijacker, readerFrom, unwrapper, pusher, closeNotifier bool }
	of := func(w http.ResponseWriter) (i interfaces) {
		_, i.pusher = w.(http.Pusher)
		_, i.closeNotifier = w.(http.CloseNotifier) // deprecated, and so not implemented
		_, i.flusher = w.(http.Flusher)
		_, i.hijacker = w.(http.Hijacker)
		_, i.readerFrom = w.(io.ReaderFrom)
		_, i.unwrapper = w.(interface{ Unwrap() http.ResponseWriter })
		return i
	}
	var bare, got interfaces
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		got = of(w)
		rc, deadline := http.NewResponseController(w), time.Now().Add(failSafe)
		if err := errors.Join(rc.SetReadDeadline(deadline), rc.SetWriteDeadline(deadline), rc.EnableFullDuplex()); err != nil {
			t.Errorf("SetReadDeadline, SetWriteDeadline or EnableFullDuplex through the wrapper: %v", err)
		}
	})
	srv := serve(t, p, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bare = of(w)
		h.ServeHTTP(w, r)
	}))
	get(t, srv.Client(), srv.URL) // the handler has returned: bare and got are set
	if want := (interfaces{flusher: true, hijacker: bare.hijacker, readerFrom: true, unwrapper: true}); got != want {
		t.Errorf("w is %+v; want %+v, since net/http's writer is %+v", got, want, bare)
	}
}

// A CONNECT proxy answers 200 and then takes the connection over with
// Hijack, which sends the held-back status first. After Hijack, the
// connection is the handler's alone: the wrapper's writes fail with
// http.ErrHijacked, as net/http's own writer's do, and write nothing to it.
// A deadline set through an http.ResponseController still reaches the
// connection, and the request's tasks still run.
func TestWriterHijackHandsOverTheConnectionAndTasksStillRun(t *testing.T) {
	run(t, testWriterHijack, http1)
}

func testWriterHijack(t *testing.T, p proto) {
	var ran atomic.Int32
	errs := make(chan error, 4)
	srv, h, logs := serveWrapped(t, p, func(w http.ResponseWriter, r *http.Request) {
		addTask(r, counter(&ran))
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w) // kept for the handler's whole life, as a tunnel may
		conn, brw, err := rc.Hijack()
		if err != nil {
			t.Errorf("Hijack through the wrapper: %v", err)
			return
		}
		defer conn.Close()
		_, _, err = rc.Hijack()
		errs <- err
		_, err = io.WriteString(w, "too late")
		errs <- err
		_, err = io.Copy(w, readerOnly{strings.NewReader("too late")}) // through ReadFrom
		errs <- err
		if err = rc.SetReadDeadline(time.Now()); err == nil { // passed: the next Read fails at once
			_, err = conn.Read(make([]byte, 1))
		}
		errs <- err
		brw.WriteString("through the tunnel")
		brw.Flush()
	})
	conn := dial(t, srv)
	io.WriteString(conn, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
	tunnel := bufio.NewReader(conn)
	resp, err := http.ReadResponse(tunnel, &http.Request{Method: "CONNECT"})
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT got %v, %v; want 200", resp, err)
	}
	if rest, err := io.ReadAll(tunnel); string(rest) != "through the tunnel" {
		t.Errorf("then the tunnel carried %q, %v; want the handler's bytes alone", rest, err)
	}
	for _, call := range []string{"a second Hijack", "Write", "io.Copy"} {
		if err := await(t, errs, "the handler"); !errors.Is(err, http.ErrHijacked) {
			t.Errorf("%s after Hijack returned %v; want http.ErrHijacked", call, err)
		}
	}
	shutdown(t, h)
	srv.Close()
	if ran.Load() != 1 || logs.String() != "" || srv.errorLog.String() != "" {
		t.Errorf("%d tasks ran, and logged %q; net/http logged %q; want 1 task, nothing written to the connection", ran.Load(), logs, srv.errorLog)
	}
	switch err := await(t, errs, "the handler"); {
	case errors.Is(err, http.ErrNotSupported):
		t.Errorf("SetReadDeadline after Hijack, through the wrapper: %v", err)
	case !errors.Is(err, os.ErrDeadlineExceeded):
		t.Skipf("premise: net/http's writer, once hijacked, sets a read deadline; a Read then returned %v", err)
	}
}

// io.Copy, through the writer's ReadFrom, reports what it copied, and no
// error, whether the body is held back or streams.
func TestWriterCopyReportsBytesCopiedAndNoError(t *testing.T) {
	for _, size := range []int{0, 100, bufferLimit, bufferLimit + 1, 3 * bufferLimit} {
		for _, sized := range []bool{false, true} {
			var n int64
			var err error
			h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
				if sized {
					w.Header().Set("Content-Length", fmt.Sprint(size))
				}
				n, err = io.Copy(w, readerOnly{bytes.NewReader(make([]byte, size))})
			})
			if rec := serveOnce(h, "GET", "/"); n != int64(size) || err != nil || rec.Body.Len() != size {
				t.Errorf("%d bytes, Content-Length set: %v: io.Copy = %d, %v, and %d bytes sent; want %d, nil, and all", size, sized, n, err, rec.Body.Len(), size)
			}
		}
	}
}

// --- 11. TestMux…: safe around a whole mux ---

func TestMuxOfNewHandlerNilIsDefaultServeMuxAsForHTTPServer(t *testing.T) {
	// DefaultServeMux redirects an unclean path, where another handler may answer 404.
	rec, bare := serveOnce(background.NewHandler(nil), "GET", "/a/../b"), serveOnce(http.DefaultServeMux, "GET", "/a/../b")
	if rec.Code != bare.Code || rec.Body.String() != bare.Body.String() {
		t.Errorf("NewHandler(nil) answered %d %q; want http.DefaultServeMux's %d %q", rec.Code, rec.Body, bare.Code, bare.Body)
	}
}

// httputil.ReverseProxy takes an upgraded connection (a WebSocket, say) over
// with Hijack, and only then writes the 101 from w.Header(), where
// middleware may have set headers of its own.
func TestMuxReverseProxyUpgradeSendsTheHeadersMiddlewareSet(t *testing.T) {
	run(t, testMuxReverseProxyUpgrade, http1)
}

func testMuxReverseProxyUpgrade(t *testing.T, p proto) {
	backend := serve(t, p, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\nX-Backend: 1\r\n\r\n")
		brw.Flush()
	}))
	target, _ := url.Parse(backend.URL)
	proxy := httputil.NewSingleHostReverseProxy(target)
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Request-Id", "42") // middleware, say
		proxy.ServeHTTP(w, r)
	})
	conn := dial(t, serve(t, p, h))
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	got := []string{resp.Status, resp.Header.Get("X-Request-Id"), resp.Header.Get("X-Backend")}
	if want := []string{"101 Switching Protocols", "42", "1"}; !slices.Equal(got, want) {
		t.Errorf("the 101 on the wire has status, X-Request-Id and X-Backend %q; want %q", got, want)
	}
}

// A 413 over HTTP/1 closes the connection, as net/http does when
// http.MaxBytesReader trips, so that a client that stalls mid-body is
// answered at once; the request's task still runs. Over HTTP/2, where one
// stream can be reset, a 413 leaves the connection for the next requests.
func TestMux413ClosesAnHTTP1ConnectionAndKeepsAnHTTP2One(t *testing.T) {
	run(t, testMux413)
}

func testMux413(t *testing.T, p proto) {
	if p == http2 { // a 413 with no body to reset the stream over
		srv, _, _ := serveWrapped(t, p, func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "too large", http.StatusRequestEntityTooLarge)
		})
		for range 3 {
			if resp, _ := get(t, srv.Client(), srv.URL); resp.StatusCode != http.StatusRequestEntityTooLarge {
				t.Fatalf("got %s, want 413", resp.Status)
			}
		}
		if n := srv.wire.conns.Load(); n != 1 {
			t.Errorf("three 413s over HTTP/2 took %d connections, want 1", n)
		}
		return
	}
	var ran atomic.Int32
	srv, h, _ := serveWrapped(t, p, http.MaxBytesHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		addTask(r, counter(&ran))
		if _, err := io.ReadAll(r.Body); err != nil {
			http.Error(w, err.Error(), http.StatusRequestEntityTooLarge)
		}
	}), 1<<10).ServeHTTP)
	// The client declares far more than the limit, sends a little over it,
	// and stalls.
	conn := dial(t, srv)
	io.WriteString(conn, "POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 200000\r\n\r\n")
	conn.Write(make([]byte, 2<<10))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no response while the client stalls: %v", err)
	}
	if resp.StatusCode != http.StatusRequestEntityTooLarge || !resp.Close {
		t.Errorf("got %s, Connection %q; want 413 and close", resp.Status, resp.Header.Get("Connection"))
	}
	if shutdown(t, h); ran.Load() != 1 {
		t.Errorf("%d tasks ran, want 1", ran.Load())
	}
}

// An upload too large for memory goes to a file, which the request's tasks
// must not find: the wrapper removes it as net/http would, since the form
// was parsed on its copy of the request.
func TestMuxUploadedFilesAreRemovedBeforeTasksStart(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("TMPDIR", dir) // where mime/multipart keeps uploads too large for memory
	var inHandler, inTask []os.DirEntry
	h, _ := wrap(t, func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseMultipartForm(1 << 10); err != nil { // larger files go to disk
			t.Error(err)
		}
		inHandler, _ = os.ReadDir(dir)
		addTask(r, func(context.Context) error { inTask, _ = os.ReadDir(dir); return nil })
	})
	var body bytes.Buffer
	form := multipart.NewWriter(&body)
	part, _ := form.CreateFormFile("upload", "big.bin")
	part.Write(make([]byte, 100<<10))
	form.Close()
	req := httptest.NewRequest("POST", "/", &body)
	req.Header.Set("Content-Type", form.FormDataContentType())
	h.ServeHTTP(httptest.NewRecorder(), req)
	h.Shutdown(context.Background())
	if len(inHandler) != 1 || len(inTask) != 0 {
		t.Errorf("the handler saw %d files in TMPDIR, and the task %d; want the upload, and then none", len(inHandler), len(inTask))
	}
}

// ===========================================================================
// A first reading can stop here. What follows compares the wrapper with
// net/http alone (12), and measures it (13).
// ===========================================================================

// --- 12. TestTransparent…: the same response as without the wrapper ---

// response is what a client saw of one response.
type response struct {
	Informational []string // 1xx responses, each with its header
	Status        int
	Header        http.Header // without Date, Content-Length and Transfer-Encoding
	ContentLength string      // the header, which compare leaves out: the wrapper adds one to what it holds back
	Body          string
	Trailer       http.Header
	Err           string // "" if the body was read to its end
}

// fetch sends method to url and records everything the client sees.
func fetch(t *testing.T, c *http.Client, method, target string) response {
	t.Helper()
	var got response
	trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
		got.Informational = append(got.Informational, fmt.Sprint(code, " ", h))
		return nil
	}}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), method, target, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if urlErr := (*url.Error)(nil); errors.As(err, &urlErr) {
		got.Err = "no response: " + urlErr.Err.Error() // without the URL, whose port differs
		return got
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		got.Err = err.Error()
	}
	got.Status, got.Header, got.Body, got.Trailer = resp.StatusCode, resp.Header, string(body), resp.Trailer
	got.ContentLength = resp.Header.Get("Content-Length")
	for _, k := range []string{"Date", "Content-Length", "Transfer-Encoding"} {
		got.Header.Del(k)
	}
	return got
}

// compare fetches method path from both servers and reports any difference
// but in Content-Length.
func compare(t *testing.T, bare, wrapped *testServer, method, path string) {
	t.Helper()
	want := fetch(t, bare.Client(), method, bare.URL+path)
	got := fetch(t, wrapped.Client(), method, wrapped.URL+path)
	want.ContentLength, got.ContentLength = "", ""
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s %s:\nwrapped: %s\nbare:    %s", method, path, summary(got), summary(want))
	}
}

func summary(r response) string {
	body := r.Body
	if len(body) > 40 {
		body = fmt.Sprintf("%.40q... (%d bytes)", body, len(body))
	}
	return fmt.Sprintf("1xx %v, status %d, header %v, Content-Length %q, body %s, trailer %v, err %q",
		r.Informational, r.Status, r.Header, r.ContentLength, body, r.Trailer, r.Err)
}

// differences are the ways in which the package doc and Handler's say a
// response through the wrapper differs from net/http's. differ turns the
// bare response into the wrapped one; if nil, the two are the same,
// Content-Length included.
var differences = []struct {
	name, method string
	handler      http.HandlerFunc
	differ       func(bare *response)
	http1        bool // a difference over HTTP/1 only
}{
	{"header changed after WriteHeader is sent while held back", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Before", "1")
		w.WriteHeader(http.StatusAccepted)
		w.Header().Set("X-After", "2") // net/http alone ignores this
		io.WriteString(w, "body")
	}, func(bare *response) { bare.Header.Set("X-After", "2") }, false},
	{"prefixed trailer named before a held-back body is dropped", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(http.TrailerPrefix+"X-Early", "abc")
		w.Write(make([]byte, 4<<10)) // net/http alone streams it, chunked, from 2 KiB on
	}, func(bare *response) { bare.Trailer, bare.ContentLength = nil, "4096" }, true},
	{"prefixed trailer named after a held-back body is dropped", "GET", func(w http.ResponseWriter, r *http.Request) {
		w.Write(make([]byte, 4<<10))
		w.Header().Set(http.TrailerPrefix+"X-Late", "xyz")
	}, func(bare *response) { bare.Trailer, bare.ContentLength = nil, "4096" }, true},
	{"HEAD gets no Content-Length unless the handler sets one", "HEAD", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "0123456789")
	}, func(bare *response) { bare.ContentLength = "" }, false},
	{"HEAD with Content-Length set", "HEAD", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "0123456789")
	}, nil, false},
}

// Each difference is expected exactly: the test fails if the wrapper differs
// in any other way, and skips if net/http alone comes to behave like the
// wrapper.
func TestTransparentDocumentedDifferencesAndNoOthers(t *testing.T) {
	run(t, testTransparentDifferences)
}

func testTransparentDifferences(t *testing.T, p proto) {
	for _, tc := range differences {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := wrap(t, tc.handler)
			bare, wrapped := serve(t, p, tc.handler), serve(t, p, h)
			if tc.http1 && p != http1 {
				compare(t, bare, wrapped, tc.method, "/")
				return
			}
			gotBare := fetch(t, bare.Client(), tc.method, bare.URL)
			want := gotBare // a copy, for differ to change
			if want.Header, want.Trailer = gotBare.Header.Clone(), gotBare.Trailer.Clone(); tc.differ != nil {
				if tc.differ(&want); reflect.DeepEqual(want, gotBare) {
					t.Skipf("premise: net/http's own response differs; it is now %s", summary(gotBare))
				}
			}
			if got := fetch(t, wrapped.Client(), tc.method, wrapped.URL); !reflect.DeepEqual(got, want) {
				t.Errorf("wrapped: %s\nwant:    %s\nbare:    %s", summary(got), summary(want), summary(gotBare))
			}
		})
	}
}

// The bytes on the wire over HTTP/1 are the same as without the wrapper, but
// for the date, a multipart boundary, and a documented difference: the
// wrapper sends a 100 Continue that net/http, once the reply is written,
// does not. http.FileServer still hands a file to its connection's ReadFrom,
// where the kernel's sendfile copies it to the socket; a handler gets the
// trailers of a request's body; a second WriteHeader is not logged.
func TestTransparentBytesOverHTTP1AreTheSameAsWithoutWrapper(t *testing.T) {
	run(t, testTransparentBytes, http1)
}

func testTransparentBytes(t *testing.T, p proto) {
	dir, content := t.TempDir(), make([]byte, 300<<10)
	for i := range content {
		content[i] = byte(i*7 + i>>8) // no two nearby ranges alike
	}
	os.WriteFile(filepath.Join(dir, "big.bin"), content, 0o644)
	os.WriteFile(filepath.Join(dir, "small.bin"), content[:1000], 0o644)
	mux := http.NewServeMux()
	mux.Handle("/", http.FileServer(http.Dir(dir)))
	mux.HandleFunc("/trailer", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body) // then net/http fills in r.Trailer, on the request it made
		io.WriteString(w, "checksum "+r.Trailer.Get("X-Checksum"))
	})
	mux.HandleFunc("/reply-first", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "written before the body is read")
		io.Copy(io.Discard, r.Body)
	})
	mux.HandleFunc("/second-status", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusAccepted)
		w.WriteHeader(http.StatusTeapot) // net/http logs it
	})
	h, _ := wrap(t, mux.ServeHTTP)
	bare, wrapped := serve(t, p, mux), serve(t, p, h)
	date, boundary := regexp.MustCompile("(?m)^Date: .*\r\n"), regexp.MustCompile("boundary=([0-9a-f]+)")
	exchange := func(srv *testServer, request string) string {
		raw := rawExchange(t, srv, request)
		if m := boundary.FindStringSubmatch(raw); m != nil {
			raw = strings.ReplaceAll(raw, m[1], "BOUNDARY")
		}
		return date.ReplaceAllString(raw, "")
	}
	const continued = "HTTP/1.1 100 Continue\r\n\r\n"
	var premises []string                                     // about net/http alone, which skip the test if they fail
	for _, tc := range []struct{ head, body, prefix string }{ // prefix: what the wrapper sends first
		{"GET /big.bin HTTP/1.1\r\n", "", ""},
		{"GET /small.bin HTTP/1.1\r\n", "", ""},
		{"GET /big.bin HTTP/1.1\r\nRange: bytes=1000-99999\r\n", "", ""},
		{"GET /big.bin HTTP/1.1\r\nRange: bytes=0-99,70000-80000,250000-\r\n", "", ""},
		{"HEAD /big.bin HTTP/1.1\r\n", "", ""},
		{"HEAD /big.bin HTTP/1.1\r\nRange: bytes=5-9\r\n", "", ""},
		{"GET /small.bin HTTP/1.1\r\nIf-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n", "", ""},
		{"POST /trailer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", "4\r\nbody\r\n0\r\nX-Checksum: 5d41402a\r\n\r\n", ""},
		{"POST /trailer HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n", "4\r\nbody\r\n0\r\nX-Checksum: 5d41402a\r\n\r\n", ""},
		{"POST /reply-first HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n", "body", continued},
		{"GET /second-status HTTP/1.1\r\n", "", ""},
	} {
		request := tc.head + "Host: test\r\nConnection: close\r\n\r\n" + tc.body
		want, got := exchange(bare, request), exchange(wrapped, request)
		if tc.prefix != "" && strings.HasPrefix(want, tc.prefix) {
			premises = append(premises, fmt.Sprintf("net/http alone does not send %.40q...", tc.prefix))
		} else if got != tc.prefix+want {
			t.Errorf("%.60q: wrapped sent %d bytes, bare %d:\nwrapped: %.300q\nbare:    %.300q", request, len(got), len(want), got, want)
		}
	}
	if s := wrapped.errorLog.String(); s != "" {
		t.Errorf("net/http logged %q through the wrapper; want nothing", s)
	}
	if want := bare.wire.readFrom.Load(); want < 300<<10 {
		premises = append(premises, fmt.Sprintf("net/http hands a file to the connection's ReadFrom (sendfile); it did %d bytes", want))
	} else if n := wrapped.wire.readFrom.Load(); n != want {
		t.Errorf("%d bytes went through the connection's ReadFrom, %d without the wrapper; want the same", n, want)
	}
	if premises != nil {
		t.Skip("premise:", strings.Join(premises, "; "))
	}
}

// runOps plays ops as a handler's calls on w. Each byte is one call: its low
// two bits choose which, the rest its argument.
func runOps(w http.ResponseWriter, ops []byte) {
	headers := [][2]string{
		{"X-A", "1"}, {"X-B", "2"}, {"Content-Type", "text/plain"},
		{"Content-Length", "5"}, {"Trailer", "X-T"}, {"X-T", "t"},
		{"Transfer-Encoding", "chunked"},
	}
	codes := []int{200, 201, 204, 304, 404, 500, 103, 1000}
	sizes := []int{0, 1, 5, 100, 3000, 70000}

	// Once the status is out, net/http ignores header changes, and the
	// wrapper sends those it sees while it holds the response back: a
	// documented difference. So after that, runOps changes only the
	// framing headers, which the wrapper ignores then, as net/http does.
	h := w.Header()
	committed := false
	for _, op := range ops {
		arg := int(op >> 2)
		switch op & 3 {
		case 0:
			if kv := headers[arg%len(headers)]; !committed || kv[0] == "Content-Length" || kv[0] == "Transfer-Encoding" || kv[0] == "Trailer" {
				h.Set(kv[0], kv[1])
			}
		case 1: // 1000, an invalid status, makes net/http panic in the handler
			code := codes[arg%len(codes)]
			w.WriteHeader(code)
			committed = committed || code >= 200
		case 2: // with arg's top bit set, through io.Copy and so ReadFrom
			p := bytes.Repeat([]byte{'a' + byte(arg%26)}, sizes[arg%len(sizes)])
			if arg&32 != 0 {
				io.Copy(w, readerOnly{bytes.NewReader(p)})
				committed = committed || len(p) > 0 // an empty io.Copy commits nothing
			} else {
				w.Write(p)
				committed = true
			}
		case 3:
			http.NewResponseController(w).Flush()
			committed = true
		}
	}
}

// FuzzTransparent compares the wrapper with net/http alone, but for
// Content-Length, for handlers made of the calls runOps plays. Its seeds are
// the comparison that go test runs.
func FuzzTransparent(f *testing.F) {
	const set, status, write, flush = 0, 1, 2, 3
	op := func(kind, arg int) byte { return byte(arg<<2 | kind) }
	for _, seed := range [][]byte{
		{},                                       // an empty body
		{op(write, 3)},                           // a small one
		{op(set, 2), op(write, 3), op(write, 3)}, // two writes, typed
		{op(status, 1), op(set, 0), op(write, 4)},                            // a header set after the status
		{op(status, 2), op(write, 1)},                                        // 204, whose body is dropped
		{op(set, 2), op(status, 3), op(write, 1)},                            // 304
		{op(set, 0), op(status, 6), op(set, 1), op(status, 1), op(write, 2)}, // 103 Early Hints, then 201
		{op(set, 3), op(write, 2)},                                           // Content-Length set, and met
		{op(set, 3), op(write, 1)},                                           // Content-Length set, and not met
		{op(write, 3), op(set, 3)},                                           // Content-Length set after writing
		{op(write, 4), op(flush, 0), op(write, 4)},                           // flushed between two writes
		{op(write, 5), op(write, 5)},                                         // past the buffer limit
		{op(set, 4), op(write, 3), op(set, 5)},                               // a declared trailer
		{op(status, 0), op(set, 4), op(write, 3)},                            // a trailer declared after WriteHeader
		{op(set, 6), op(write, 3)},                                           // chunked set, so not sniffed
		{op(status, 0), op(set, 6), op(write, 3)},                            // chunked set after WriteHeader
		{op(write, 3), op(set, 3), op(flush, 0)},                             // Content-Length set after writing, then flushed
		{op(set, 2), op(write, 32+3), op(write, 32+5)},                       // io.Copy, past the buffer limit
		{op(set, 3), op(write, 32+5)},                                        // Content-Length shorter than an io.Copy
		{op(write, 48), op(set, 0)},                                          // an empty io.Copy, unlike an empty Write, commits no header
		{op(status, 7), op(write, 3)},                                        // an invalid status, on which net/http panics
	} {
		for _, head := range []bool{false, true} {
			f.Add(head, false, seed)
			f.Add(head, true, seed)
		}
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ops, _ := hex.DecodeString(r.URL.Query().Get("ops"))
		runOps(w, ops)
	})
	h := background.NewHandler(handler)
	h.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	servers := map[bool][2]*testServer{} // bare and wrapped, by whether they speak HTTP/2
	for _, p := range []proto{http1, http2} {
		servers[p == http2] = [2]*testServer{serve(f, p, handler), serve(f, p, h)}
	}
	f.Fuzz(func(t *testing.T, head, h2 bool, ops []byte) {
		if len(ops) > 32 {
			t.Skip("long sequences add nothing but time")
		}
		method := map[bool]string{false: "GET", true: "HEAD"}[head]
		bare, wrapped := servers[h2][0], servers[h2][1]
		compare(t, bare, wrapped, method, "/?ops="+hex.EncodeToString(ops))
		// A response that broke its own framing (more bytes than its
		// Content-Length, which net/http's sendfile path lets through) must
		// not garble the next input's: give each input new connections.
		bare.Client().CloseIdleConnections()
		wrapped.Client().CloseIdleConnections()
	})
}

// --- 13. Benchmarks ---

// discardWriter is a minimal http.ResponseWriter, so that benchmarks measure
// the handlers rather than a recorder.
type discardWriter struct{ header http.Header }

func (w *discardWriter) Header() http.Header         { return w.header }
func (w *discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *discardWriter) WriteHeader(int)             {}
func (w *discardWriter) Flush()                      {}

func benchmarkServe(b *testing.B, h http.Handler) {
	req := httptest.NewRequest("POST", "/send-notification/test@example.com", nil)
	w := &discardWriter{header: make(http.Header)}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		clear(w.header)
		h.ServeHTTP(w, req)
	}
	b.StopTimer()
	if h, ok := h.(*background.Handler); ok {
		h.Shutdown(context.Background())
	}
}

// BenchmarkHandler calls ServeHTTP directly, with a writer that discards
// everything, to count what the wrapper allocates. The handler's own
// Header().Set is one allocation, as bare. A wrapped request adds: the copy
// of the request (r.WithContext, as net/http asks of wrappers), the queue,
// which is also its context, the response writer (new for each response,
// since a handler can keep it), and the Content-Length's value. A task adds
// the queue's slice and the goroutine. The held-back body's buffer comes
// from a pool.
func BenchmarkHandler(b *testing.B) {
	reply := []byte(`{"message":"Notification sent successfully!"}` + "\n")
	respond := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(reply)
	}
	withTask := func(w http.ResponseWriter, r *http.Request) {
		addTask(r, noop)
		respond(w, r)
	}
	b.Run("bare", func(b *testing.B) { benchmarkServe(b, http.HandlerFunc(respond)) })
	b.Run("wrapped", func(b *testing.B) { benchmarkServe(b, background.NewHandler(http.HandlerFunc(respond))) })
	b.Run("wrapped+task", func(b *testing.B) { benchmarkServe(b, background.NewHandler(http.HandlerFunc(withTask))) })
}

// BenchmarkLoopback measures what a client feels: requests per second, and
// the median and p99 latency, for a short JSON reply over 32 keep-alive
// connections on 127.0.0.1, in each of loopbackModes, with a no-op task and
// with a task that sleeps 200 ms. Its client writes a prebuilt request and
// reads each response by its Content-Length, so that the server's cost shows.
// A shared virtual machine's speed varies from second to second: compare
// modes within one run, over several rounds, and read a ratio between two as
// a range.
func BenchmarkLoopback(b *testing.B) {
	h, wait := loopbackServer()
	addr := listenLoopback(b, h)
	for _, task := range loopbackTasks {
		for _, mode := range loopbackModes {
			b.Run(task.name+"/"+mode, func(b *testing.B) {
				benchmarkLoopback(b, addr, "/"+task.name+"/"+mode)
				b.StopTimer()
				wait()
			})
		}
	}
}

// loopbackModes are the ways loopbackServer serves a request:
//   - bare: no task at all;
//   - go-statement: go task(), which may run before the response is sent;
//   - flush-then-go: the hand-rolled code with this package's promise: set
//     Content-Length, write, Flush, then go task(). It is the fair
//     comparison for background, since a bare go statement promises nothing;
//   - background: through this package;
//   - inline-after-flush: as flush-then-go, but the task runs in the
//     handler, so the connection's next request waits for it.
//
// The go statements go through a sync.WaitGroup, as they must in a server
// that waits for its tasks when it shuts down.
var loopbackModes = []string{"bare", "go-statement", "flush-then-go", "background", "inline-after-flush"}

var loopbackTasks = []struct {
	name string
	run  func()
}{
	{"noop", func() {}},
	{"sleep200ms", func() { time.Sleep(200 * time.Millisecond) }},
}

// loopbackServer returns a handler that serves each of loopbackTasks in each
// of loopbackModes, at /noop/bare, /sleep200ms/background and so on, and a
// function that waits until every task started so far has finished.
func loopbackServer() (http.Handler, func()) {
	reply := []byte(`{"message":"Notification sent successfully!"}`)
	length := strconv.Itoa(len(reply))
	respond := func(w http.ResponseWriter) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(reply)
	}
	flush := func(w http.ResponseWriter) {
		w.Header().Set("Content-Length", length)
		respond(w)
		w.(http.Flusher).Flush()
	}
	var tasks sync.WaitGroup // the go statements' tasks
	var handlers []*background.Handler
	mux := http.NewServeMux()
	for _, task := range loopbackTasks {
		bg := background.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			background.FromContext(r.Context()).Add(func(context.Context) error {
				task.run()
				return nil
			})
			respond(w)
		}))
		handlers = append(handlers, bg)
		modes := map[string]http.HandlerFunc{
			"bare": func(w http.ResponseWriter, r *http.Request) { respond(w) },
			"go-statement": func(w http.ResponseWriter, r *http.Request) {
				tasks.Go(task.run)
				respond(w)
			},
			"flush-then-go": func(w http.ResponseWriter, r *http.Request) {
				flush(w)
				tasks.Go(task.run)
			},
			"background": bg.ServeHTTP,
			"inline-after-flush": func(w http.ResponseWriter, r *http.Request) {
				flush(w)
				task.run()
			},
		}
		for _, mode := range loopbackModes {
			mux.Handle("/"+task.name+"/"+mode, modes[mode])
		}
	}
	return mux, func() {
		tasks.Wait()
		for _, h := range handlers {
			h.Shutdown(context.Background())
		}
	}
}

// listenLoopback serves h on a free port of 127.0.0.1 until the benchmark
// ends, and returns its address.
func listenLoopback(b *testing.B, h http.Handler) string {
	srv := httptest.NewServer(h)
	b.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// benchmarkLoopback GETs path b.N times in all over 32 keep-alive
// connections to addr, each waiting for one response before it sends the
// next request.
func benchmarkLoopback(b *testing.B, addr, path string) {
	request := []byte("GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\n\r\n")
	conns := make([]net.Conn, 32)
	for i := range conns {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		conns[i] = conn
	}
	var claimed atomic.Int64 // requests sent or about to be, by all connections
	latencies := make([][]time.Duration, len(conns))
	errs := make(chan error, len(conns))
	var clients sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for i, conn := range conns {
		clients.Go(func() {
			br := bufio.NewReader(conn)
			for claimed.Add(1) <= int64(b.N) {
				sent := time.Now()
				conn.SetDeadline(sent.Add(failSafe))
				_, err := conn.Write(request)
				if err == nil {
					err = readResponse(br)
				}
				if err != nil {
					errs <- err
					return
				}
				latencies[i] = append(latencies[i], time.Since(sent))
			}
		})
	}
	clients.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	all := slices.Sorted(slices.Values(slices.Concat(latencies...)))
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(ms(all[len(all)/2]), "p50-ms")
	b.ReportMetric(ms(all[len(all)*99/100]), "p99-ms")
}

// readResponse reads one response from br by its status line and
// Content-Length, which must be there, and checks that it is a 200.
func readResponse(br *bufio.Reader) error {
	line, err := br.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(line, []byte("HTTP/1.1 200 ")) {
		return fmt.Errorf("status line %q", line)
	}
	length := -1
	for line, err = br.ReadSlice('\n'); string(line) != "\r\n"; line, err = br.ReadSlice('\n') { // to the header's end
		if err != nil {
			return err
		}
		if v, ok := bytes.CutPrefix(line, []byte("Content-Length: ")); ok {
			length, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	if length < 0 {
		return errors.New("response without a Content-Length")
	}
	_, err = br.Discard(length)
	return err
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
