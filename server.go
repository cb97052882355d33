package background

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
)

// Handler is an http.Handler that runs the tasks its requests add (see
// [Tasks.Add]) after their responses have been sent. Make one with NewHandler;
// it must not be copied. Put it outermost, around the mux and all middleware:
// only handlers inside it can add tasks, and middleware outside it sees
// neither r.Pattern nor r.PathValue, which the mux sets on the request the
// wrapper passes on (a copy, as net/http asks of wrappers).
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
// While the response is held back, net/http has not seen its header yet, so
// two things differ from net/http alone. Header changes made after
// WriteHeader (or the first Write) are sent, where net/http would ignore
// them; framing (Content-Length, Transfer-Encoding and the Trailer
// declaration) is the exception: the wrapper frames the body, and ignores
// what was set after WriteHeader, as net/http does. And over HTTP/1, trailers
// named with http.TrailerPrefix are dropped, as net/http itself drops those
// named after a body of under 2 KiB: declare trailers in the Trailer header
// before writing.
//
// Holding back has two costs. A handler that writes a body slowly, without
// flushing, gets it to the client only when it returns or passes 64 KiB, and
// learns late that the client has gone: handlers that stream should Flush.
// And a handler that panics sends none of what it held back: the client sees
// the connection close with no response, and Go's http.Transport may then
// retry an idempotent request, which runs the handler twice. (Without the
// wrapper, net/http would have sent the part it had flushed, from about 2 KiB
// on.)
//
// A 413 response over HTTP/1 closes the connection, as net/http's own writer
// does when http.MaxBytesReader trips; otherwise net/http would first wait
// for the rest of a body that a stalled client never sends. Through the
// wrapper, net/http cannot see the trip itself, so a handler that answers a
// too-large body with another status should set "Connection: close".
//
// The response writer passed to the handler implements http.Flusher,
// http.Hijacker and io.ReaderFrom (through which http.FileServer still gets
// sendfile), and unwraps (for http.ResponseController) to the server's own, so
// deadlines and full duplex work as without the wrapper. It does not implement
// http.Pusher or the deprecated http.CloseNotifier. Each response gets a
// writer of its own, and once the handler has returned, that writer is cut off
// from the response: if a task kept it by mistake, Header returns a map that
// nothing sends, Write returns an error, and WriteHeader and Flush do nothing.
// The temporary files of a multipart form that the handler parsed are
// removed then too, as net/http does once the response is sent.
type Handler struct {
	// Logger receives failed and panicking tasks and dropped ones.
	// If nil, slog.Default() at the moment of logging is used.
	Logger *slog.Logger

	next   http.Handler
	ctx    context.Context         // the cancellation every task sees; ended by Shutdown
	cancel context.CancelCauseFunc // ends ctx, with the error of the Shutdown that gave up

	buffers sync.Pool // of *bytes.Buffer, for held-back bodies: only the wrapper holds them

	mu   sync.Mutex          // guards busy, idle and every queue's fields
	busy map[*queue]struct{} // the queues that have tasks queued or running
	idle chan struct{}       // closed when busy empties; nil unless Shutdown waits

	// drains counts the times Shutdown found no task left, and so returned.
	// It changes only with mu held, but ServeHTTP reads it without, to note
	// in each queue when its request arrived.
	drains atomic.Int64
}

// NewHandler returns a Handler that serves requests with next and runs the
// tasks they add.
func NewHandler(next http.Handler) *Handler {
	if next == nil {
		panic("background: NewHandler called with a nil handler")
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Handler{next: next, ctx: ctx, cancel: cancel, busy: make(map[*queue]struct{}),
		buffers: sync.Pool{New: func() any { return new(bytes.Buffer) }}}
}

// ServeHTTP serves r with the wrapped handler, sends its whole response, and
// then starts the request's tasks in a goroutine of their own. If the handler
// panics, its tasks are discarded and the panic goes on up to net/http.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := &queue{h: h, method: r.Method, path: r.URL.Path, drains: h.drains.Load()}
	rw := &responseWriter{rw: w, buffers: &h.buffers,
		head: r.Method == http.MethodHead, http1: r.ProtoMajor == 1}
	r2 := r.WithContext(context.WithValue(r.Context(), tasksKey{}, q))

	responded := false
	defer func() {
		if !responded { // a panic is on its way up to net/http
			rw.detach()
			h.discard(q)
		}
	}()
	h.next.ServeHTTP(rw, r2)
	rw.finish() // the whole response, on its way to the client...
	rw.detach() // ...out of reach of a task that kept the handler's w...
	if r2.MultipartForm != nil {
		// ...and uploads' temporary files removed: net/http removes only
		// those of a form parsed on its own request, not on this copy. A
		// task that needs an upload gets it from the handler, not from r...
		r2.MultipartForm.RemoveAll()
	}
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
		h.logger().Warn("background: tasks dropped", "count", n, "reason", "the handler panicked", "method", q.method, "path", q.path)
	}
}

// Shutdown waits for every queued and running task, including those that
// requests still being served add meanwhile, and returns once they have all
// finished: nil if no task was lost, and otherwise the error of the Shutdown
// that gave up, earlier or meanwhile. If ctx ends first, Shutdown gives up:
// it cancels the context of the running tasks, drops the queued ones, logs
// one line saying how many of each, and returns ctx.Err() without waiting
// further. A canceled task that returns that cancellation (context.Canceled,
// wrapped or not) is not logged again; any other error it returns is. From
// then on, tasks added are dropped, each with a log line.
//
// http.Server.Shutdown knows nothing of the goroutines that run tasks, so
// shutting down takes two steps: first http.Server.Shutdown, which stops new
// requests and lets responses finish, then this, which drains the tasks those
// responses queued. Shutdown may be called more than once, and concurrently
// with requests.
func (h *Handler) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	if len(h.busy) == 0 {
		h.drains.Add(1)
		h.mu.Unlock()
		return context.Cause(h.ctx) // nil unless a Shutdown gave up
	}
	if h.idle == nil {
		h.idle = make(chan struct{})
	}
	idle := h.idle
	h.mu.Unlock()

	select {
	case <-idle:
		return context.Cause(h.ctx)
	case <-ctx.Done():
	}

	h.mu.Lock()
	if len(h.busy) == 0 { // finished just as ctx ended
		h.mu.Unlock()
		return context.Cause(h.ctx)
	}
	h.cancel(ctx.Err())
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
		h.drains.Add(1)
		close(h.idle)
		h.idle = nil
	}
}

func (h *Handler) logger() *slog.Logger { return cmp.Or(h.Logger, slog.Default()) }

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
// 204 and 304, and those whose handler sets Content-Length or
// Transfer-Encoding, or declares trailers, before WriteHeader. So does any
// response once flushed or past maxBuffered bytes.
type responseWriter struct {
	rw      http.ResponseWriter // the server's, until detach
	head    bool                // a HEAD request: net/http sends no body
	http1   bool                // an HTTP/1.x request: see WriteHeader's 413
	buffers *sync.Pool          // the Handler's, where body comes from and goes back to

	status   int           // the handler's status, or 0 before WriteHeader
	body     *bytes.Buffer // the held-back body; nil until held takes one from buffers
	sent     bool          // status and headers have gone to rw, so writes pass through
	hijacked bool          // the handler took the connection: write nothing more
}

// Header returns the server's header map: the handler and net/http share it,
// as they do without the wrapper. After detach, it returns the stand-in's.
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
	if code == http.StatusRequestEntityTooLarge && w.http1 {
		// When http.MaxBytesReader trips, net/http closes the connection
		// after the response instead of first reading the rest of the body,
		// which a stalled client would never send. It learns of the trip
		// only through its own writer, not this one, so say it here: 413 is
		// what handlers answer then. (HTTP/2 reads no body before it
		// answers; there, the header would close every stream's connection.)
		h.Set("Connection", "close")
	}
	if mayAddLength(code, h) {
		return // held back until finish, or until it must stream
	}
	w.sent = true
	w.rw.WriteHeader(code)
}

// mayAddLength reports whether a response may be sent with a Content-Length
// of our making: it may have a body, and the handler has chosen no framing of
// its own, nor declared trailers, which need a chunked body.
func mayAddLength(code int, h http.Header) bool {
	_, sized := h["Content-Length"]
	_, encoded := h["Transfer-Encoding"]
	_, trailers := h["Trailer"]
	bodyless := code < 200 || code == http.StatusNoContent || code == http.StatusNotModified
	return !sized && !encoded && !trailers && !bodyless
}

// Write holds p back if it fits, and otherwise starts streaming.
func (w *responseWriter) Write(p []byte) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked // as net/http's own writer says
	}
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !w.sent && w.held().Len()+len(p) > maxBuffered {
		w.send(-1)
	}
	if w.sent {
		return w.rw.Write(p)
	}
	return w.body.Write(p)
}

// held returns the held-back body's buffer, taking one from the pool the
// first time: a response that never holds anything back, such as a
// hijacked connection or a long poll, keeps none while its handler runs.
func (w *responseWriter) held() *bytes.Buffer {
	if w.body == nil {
		w.body = w.buffers.Get().(*bytes.Buffer)
	}
	return w.body
}

// ReadFrom implements io.ReaderFrom, which is how io.Copy, and with it
// http.FileServer and http.ServeContent, reach net/http's sendfile. Once the
// response streams, or at once if the handler set a Content-Length, src goes
// straight to the server's writer. Until then, src is read into the spare
// room of the held-back body and written from there, so that Write decides,
// as for any other bytes, whether to hold them back.
func (w *responseWriter) ReadFrom(src io.Reader) (int64, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	var n int64
	for !w.sent {
		w.held().Grow(512)
		p := w.body.AvailableBuffer()
		m, err := src.Read(p[:cap(p)])
		n += int64(m)
		if m > 0 {
			if _, err := w.Write(p[:m]); err != nil {
				return n, err
			}
		}
		if err == io.EOF {
			return n, nil
		} else if err != nil {
			return n, err
		}
	}
	m, err := io.Copy(w.rw, src)
	return n + m, err
}

// send passes the held-back status, headers and body on to rw, unless they
// have gone already, with a Content-Length of length unless it is negative.
// A response without a status yet gets 200. From then on, the response
// streams. A write error is left to the caller's next Write or Flush, which
// sees it again: net/http's writer keeps failing once it has failed.
func (w *responseWriter) send(length int) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.sent {
		return
	}
	w.sent = true
	// The handler framed the body itself only after WriteHeader, or the
	// response would not be held back: net/http would ignore that framing,
	// and it may not match the body.
	h := w.rw.Header()
	for _, k := range []string{"Content-Length", "Transfer-Encoding", "Trailer"} {
		delete(h, k)
	}
	if length >= 0 {
		h.Set("Content-Length", strconv.Itoa(length))
	}
	w.rw.WriteHeader(w.status)
	if w.body != nil && w.body.Len() > 0 {
		w.rw.Write(w.body.Bytes())
		w.body.Reset()
	}
}

// FlushError sends anything held back and flushes it to the client: the
// response streams from here on. It is what http.ResponseController.Flush
// calls.
func (w *responseWriter) FlushError() error {
	w.send(-1)
	return http.NewResponseController(w.rw).Flush()
}

// Flush implements http.Flusher; see FlushError.
func (w *responseWriter) Flush() { w.FlushError() }

// Hijack implements http.Hijacker. It passes anything held back on first, as
// net/http's own Hijack flushes what it holds. The wrapper needs its own
// Hijack, rather than leaving it to Unwrap, to know to write nothing after.
func (w *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.status != 0 {
		w.send(-1)
	}
	conn, brw, err := http.NewResponseController(w.rw).Hijack()
	w.hijacked = w.hijacked || err == nil // a second Hijack, which fails, must not undo the first
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
	// Like net/http, give a HEAD response a length only if the handler
	// wrote a body: an empty one may just mean it skipped the body.
	length := w.held().Len()
	if length == 0 && w.head {
		length = -1
	}
	w.send(length)
	http.NewResponseController(w.rw).Flush()
}

// detach cuts w off from the response for good, once the handler has
// returned. The handler may have left w behind, captured by a task's
// closure say, and net/http finishes its own writer as ServeHTTP returns and
// then reuses its buffers for other connections: nothing may reach it from
// a task, which runs meanwhile.
//
// The held-back body's buffer goes back to the pool here, and w lets go of
// it, since the pool hands it to other requests. It was never w itself,
// which a handler can keep, but memory that only w held, and by now its
// bytes have been sent, or discarded after a panic.
func (w *responseWriter) detach() {
	if w.body != nil {
		w.body.Reset()
		w.buffers.Put(w.body)
		w.body = nil
	}
	w.sent = true // so that nothing looks for a held-back body again
	w.rw = detachedWriter{header: make(http.Header)}
}

// detachedWriter stands in for the server's writer after detach: its header
// map is its own, nothing sends it, and nothing can be written.
type detachedWriter struct{ header http.Header }

func (d detachedWriter) Header() http.Header { return d.header }
func (detachedWriter) WriteHeader(int)       {}
func (detachedWriter) Write([]byte) (int, error) {
	return 0, errors.New("background: Write after the handler returned")
}
