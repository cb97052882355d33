package background

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
)

// Handler is an http.Handler that runs the tasks its requests add (see
// [Tasks.Add]) after their responses have been sent. Make one with NewHandler;
// it must not be copied. The outermost position is the usual place for it, so
// that every handler inside can add tasks.
//
// How the response is sent: a body written without a Content-Length header is
// held back, up to 64 KiB, and sent with a Content-Length once the handler
// returns, so that the whole response has reached the client before the first
// task starts. A body that outgrows that, or that the handler flushes, streams
// as it would without the wrapper; its last bytes (the chunked terminator)
// leave only as ServeHTTP returns, so its tasks may start a moment before
// then. The client never waits for a task either way. Over HTTP/2, the end of
// the stream is likewise sent as ServeHTTP returns.
//
// The response writer passed to the handler implements http.Flusher and
// http.Hijacker, and unwraps (for http.ResponseController) to the server's
// own, so deadlines and full duplex work as without the wrapper. It does not
// implement http.Pusher or the deprecated http.CloseNotifier. As net/http
// requires of its own, it must not be used once the handler has returned:
// the Handler reuses it for a later response.
type Handler struct {
	// Logger receives failed and panicking tasks and dropped ones.
	// If nil, slog.Default() at the moment of logging is used.
	Logger *slog.Logger

	next    http.Handler
	ctx     context.Context    // the cancellation every task sees; ended by Shutdown
	cancel  context.CancelFunc // ends ctx
	writers sync.Pool          // of *responseWriter, reused from response to response

	mu   sync.Mutex          // guards busy, idle and every queue's fields
	busy map[*queue]struct{} // the queues that have tasks queued or running
	idle chan struct{}       // closed when busy empties; nil unless Shutdown waits
}

// NewHandler returns a Handler that serves requests with next and runs the
// tasks they add.
func NewHandler(next http.Handler) *Handler {
	if next == nil {
		panic("background: NewHandler called with a nil handler")
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Handler{next: next, ctx: ctx, cancel: cancel, busy: make(map[*queue]struct{})}
}

// ServeHTTP serves r with the wrapped handler, sends its whole response, and
// then starts the request's tasks in a goroutine of their own. If the handler
// panics, its tasks are discarded and the panic goes on up to net/http.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := &queue{h: h, method: r.Method, path: r.URL.Path}
	rw := h.newWriter(w, r.Method == http.MethodHead)
	defer h.recycle(rw)
	r2 := r.WithContext(context.WithValue(r.Context(), tasksKey{}, q))

	responded := false
	defer func() {
		if !responded { // a panic is on its way up to net/http
			h.discard(q)
		}
	}()
	h.next.ServeHTTP(rw, r2)
	rw.finish() // the whole response, on its way to the client...
	responded = true
	h.respond(q) // ...before any task starts
}

// discard drops q's tasks after a panic, as FastAPI does when an endpoint
// raises.
func (h *Handler) discard(q *queue) {
	h.mu.Lock()
	n := len(q.tasks)
	q.tasks = nil
	q.discarded = true
	h.track(q)
	h.mu.Unlock()
	if n > 0 {
		h.logDropped(q, n, "the handler panicked")
	}
}

// logDropped logs that n of q's tasks will never run, and why.
func (h *Handler) logDropped(q *queue, n int, reason string) {
	h.logger().Warn("background: tasks dropped", "count", n, "reason", reason, "method", q.method, "path", q.path)
}

// Shutdown waits for every queued and running task, including those that
// requests still being served add meanwhile, and returns nil once they have
// all finished. If ctx ends first, Shutdown cancels the context of the running
// tasks, drops the queued ones with a log line saying how many, and returns
// ctx.Err() without waiting further. From then on, tasks added are dropped,
// each with a log line.
//
// http.Server.Shutdown knows nothing of the goroutines that run tasks, so
// shutting down takes two steps: first http.Server.Shutdown, which stops new
// requests and lets responses finish, then this, which drains the tasks those
// responses queued. Shutdown may be called more than once, and concurrently
// with requests.
func (h *Handler) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	if len(h.busy) == 0 {
		h.mu.Unlock()
		return nil
	}
	if h.idle == nil {
		h.idle = make(chan struct{})
	}
	idle := h.idle
	h.mu.Unlock()

	select {
	case <-idle:
		return nil
	case <-ctx.Done():
	}

	h.mu.Lock()
	if len(h.busy) == 0 { // finished just as ctx ended
		h.mu.Unlock()
		return nil
	}
	h.cancel()
	dropped, running := 0, 0
	for q := range h.busy {
		dropped += len(q.tasks)
		q.tasks = nil
		if q.running {
			running++
		}
		h.track(q)
	}
	h.mu.Unlock()
	h.logger().Error("background: shutdown deadline passed; running tasks canceled, queued ones dropped",
		"dropped", dropped, "running", running)
	return ctx.Err()
}

// track records whether q has tasks queued or running, which is what Shutdown
// waits for. h.mu must be held.
func (h *Handler) track(q *queue) {
	if len(q.tasks) > 0 || q.running {
		h.busy[q] = struct{}{}
		return
	}
	delete(h.busy, q)
	if len(h.busy) == 0 && h.idle != nil {
		close(h.idle)
		h.idle = nil
	}
}

// newWriter returns a responseWriter for one response. It reuses one that
// an earlier response has finished with, if there is one, so that a busy
// server allocates no writer, header snapshot or body buffer per response.
func (h *Handler) newWriter(rw http.ResponseWriter, head bool) *responseWriter {
	w, _ := h.writers.Get().(*responseWriter)
	if w == nil {
		w = &responseWriter{header: make(http.Header)}
	}
	w.rw, w.head = rw, head
	return w
}

// recycle makes w ready for another response; the handler that had it has
// returned, and must no longer use it.
func (h *Handler) recycle(w *responseWriter) {
	clear(w.header)
	clear(w.values) // let go of the strings
	*w = responseWriter{header: w.header, values: w.values[:0], body: w.body[:0]}
	h.writers.Put(w)
}

func (h *Handler) logger() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.Default()
}

// maxBuffered is how much of a body without Content-Length is held back.
const maxBuffered = 64 << 10

// responseWriter is the writer the wrapped handler gets. It holds back the
// status, headers and up to maxBuffered bytes of body, so that finish can send
// the response with a Content-Length.
//
// That is the heart of the package. net/http writes the end of a response
// (the chunked terminator, or the Content-Length it computes for small
// bodies) only after ServeHTTP returns. A wrapper that writes, flushes and
// then runs the tasks would leave the client waiting for them, since it has
// no way to tell the body is complete. With a Content-Length it can.
//
// Responses that take no Content-Length from us pass straight through: 1xx,
// 204 and 304, and those whose handler sets Content-Length, Transfer-Encoding
// or trailers. So does any response once flushed or past maxBuffered bytes.
type responseWriter struct {
	rw   http.ResponseWriter
	head bool // a HEAD request: net/http sends no body

	status   int         // the handler's status, or 0 before WriteHeader
	header   http.Header // the headers as they were at WriteHeader, while held back
	values   []string    // the memory of header's values
	body     []byte      // the held-back body
	sent     bool        // status and headers have gone to rw, so writes pass through
	hijacked bool        // the handler took the connection: write nothing more
}

var (
	_ http.Flusher  = (*responseWriter)(nil)
	_ http.Hijacker = (*responseWriter)(nil)
)

// Header returns the server's header map: the handler and net/http share it,
// as they do without the wrapper.
func (w *responseWriter) Header() http.Header { return w.rw.Header() }

// WriteHeader holds back a final status that may still get a Content-Length,
// and passes any other status on at once.
func (w *responseWriter) WriteHeader(code int) {
	if w.status != 0 {
		return // net/http ignores a second status too
	}
	if code < 100 || code > 999 {
		// net/http panics here; a held-back status would only reach it later.
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		w.rw.WriteHeader(code) // informational: sent at once, the final status is still to come
		return
	}
	w.status = code
	h := w.rw.Header()
	if mayAddLength(code, h) && !w.snapshot(h) {
		return // held back until finish, or until it must stream
	}
	w.sent = true
	w.rw.WriteHeader(code)
}

// mayAddLength reports whether a response may be sent with a Content-Length
// of our making. These are the cases where net/http would not compute one,
// but for trailers set with http.TrailerPrefix, which snapshot looks for.
func mayAddLength(code int, h http.Header) bool {
	if code < 200 || code == http.StatusNoContent || code == http.StatusNotModified {
		return false // no body allowed
	}
	_, length := h["Content-Length"]
	_, encoding := h["Transfer-Encoding"]
	_, trailers := h["Trailer"] // trailers need a chunked body
	return !length && !encoding && !trailers
}

// snapshot copies h into w.header, in memory reused from earlier responses,
// and reports whether h has keys with http.TrailerPrefix. net/http sends the
// headers as they are at WriteHeader and ignores later changes, so send must
// send this copy, not h.
func (w *responseWriter) snapshot(h http.Header) (trailers bool) {
	for k, vv := range h {
		trailers = trailers || strings.HasPrefix(k, http.TrailerPrefix)
		n := len(w.values)
		w.values = append(w.values, vv...)
		w.header[k] = w.values[n:]
	}
	return trailers
}

// Write holds p back if it fits, and otherwise starts streaming.
func (w *responseWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.sent {
		return w.rw.Write(p)
	}
	if len(w.body)+len(p) > maxBuffered {
		if err := w.send(-1); err != nil {
			return 0, err
		}
		return w.rw.Write(p)
	}
	w.body = append(w.body, p...)
	return len(p), nil
}

// send passes the held-back status, headers and body on to rw, with a
// Content-Length of length unless it is negative. From then on, the response
// streams.
func (w *responseWriter) send(length int) error {
	w.sent = true
	// Undo header changes made since WriteHeader, which net/http would have
	// ignored, but keep trailers, which it reads at the end. They need a
	// chunked body: no length.
	h := w.rw.Header()
	for k := range h {
		if _, ok := w.header[k]; ok {
			continue
		}
		if strings.HasPrefix(k, http.TrailerPrefix) {
			length = -1
		} else {
			delete(h, k)
		}
	}
	for k, vv := range w.header {
		if !slices.Equal(h[k], vv) {
			h[k] = slices.Clone(vv) // not vv itself: its memory goes on to later responses
		}
	}
	if length >= 0 {
		h.Set("Content-Length", strconv.Itoa(length))
	}
	w.rw.WriteHeader(w.status)
	if len(w.body) == 0 {
		return nil
	}
	_, err := w.rw.Write(w.body)
	w.body = w.body[:0]
	return err
}

// FlushError sends anything held back and flushes it to the client: the
// response streams from here on. It is what http.ResponseController.Flush
// calls.
func (w *responseWriter) FlushError() error {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.sent {
		if err := w.send(-1); err != nil {
			return err
		}
	}
	return http.NewResponseController(w.rw).Flush()
}

// Flush implements http.Flusher; see FlushError.
func (w *responseWriter) Flush() { w.FlushError() }

// Hijack implements http.Hijacker. It passes anything held back on first, as
// net/http's own Hijack flushes what it holds. The wrapper needs its own
// Hijack, rather than leaving it to Unwrap, to know to write nothing after.
func (w *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.status != 0 && !w.sent {
		w.send(-1)
	}
	conn, brw, err := http.NewResponseController(w.rw).Hijack()
	w.hijacked = err == nil
	return conn, brw, err
}

// Unwrap returns the server's response writer, for http.ResponseController.
func (w *responseWriter) Unwrap() http.ResponseWriter { return w.rw }

// finish completes the response once the handler has returned: it sends
// anything held back, now with a Content-Length, and flushes it all to the
// client. Errors are ignored: a client that has gone away does not stop the
// tasks.
func (w *responseWriter) finish() {
	if w.hijacked {
		return
	}
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.sent {
		// Like net/http, give a HEAD response a length only if the handler
		// wrote a body: an empty one may just mean it skipped the body.
		length := len(w.body)
		if length == 0 && w.head {
			length = -1
		}
		w.send(length)
	}
	http.NewResponseController(w.rw).Flush()
}
