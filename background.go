// Package background runs functions after an HTTP response has been sent,
// like FastAPI's BackgroundTasks, with nothing but net/http.
//
//	tasks := background.NewHandler(mux) // wrap the whole mux
//	srv := &http.Server{Addr: "127.0.0.1:8000", Handler: tasks}
//
//	// In a handler: queue a task, to run once the response has been sent.
//	background.FromContext(r.Context()).Add(func(ctx context.Context) error {
//		return sendMail(ctx, email)
//	})
//
//	// To stop: first the server, then the tasks its responses queued.
//	srv.Shutdown(ctx)
//	tasks.Shutdown(ctx)
//
// To test a handler, serve a request through a Handler into an
// httptest.ResponseRecorder, then call Shutdown(context.Background()): it
// returns once the tasks are done (see Example_testing).
//
// The tasks of one request run one at a time, in order, in a goroutine of
// their own. Tasks of different requests run concurrently. A task's ctx has
// the request's values, and only Shutdown cancels it. A task's error or panic
// is logged, and the request's other tasks still run. A handler that panics
// runs none of its tasks. Tasks live in memory: if the process dies, or
// Shutdown gives up, unfinished tasks are lost (the latter with a log line).
// Nothing is retried. Work that must survive that needs a durable job queue.
//
// # Differences from net/http
//
// A response through a Handler differs from one without it in these ways,
// shortest first. [Handler] lists the wire details that change no code.
//   - The writer does not implement http.Pusher or http.CloseNotifier.
//   - Middleware outside the Handler sees neither r.Pattern nor r.PathValue:
//     the mux sets them on the copy of the request that the Handler passes on.
//   - A body written without Flush reaches the client only when the handler
//     returns or passes 64 KiB. Handlers that stream should Flush.
//   - Over HTTP/1, trailers named with http.TrailerPrefix are dropped from a
//     held-back body. Declare trailers in the Trailer header before writing.
//   - A response that streams (flushed, past 64 KiB, with a declared Trailer,
//     or with a Transfer-Encoding other than chunked) ends as ServeHTTP
//     returns. Its tasks may start a moment before the client sees that end.
//     Over HTTP/2, every response ends so.
//   - A 413 over HTTP/1 closes the connection, as net/http does when
//     http.MaxBytesReader trips. A handler that answers a too-large body with
//     another status should set "Connection: close" itself.
//   - A handler that panics sends none of what it held back. The client sees
//     the connection close, and Go's http.Transport may then retry an
//     idempotent request, which runs the handler twice.
package background

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// Handler is an http.Handler that serves requests with the handler it wraps,
// and runs the tasks they add once their responses have been sent. Make one
// with NewHandler, put it outermost, around the mux and all middleware, and
// set its fields before it serves. A Handler must not be copied.
//
// The writer the wrapped handler gets holds back a body written without a
// Content-Length, up to 64 KiB. It sends it with one as the handler returns,
// so that the whole response has been sent before the first task starts. It
// implements http.Flusher, io.ReaderFrom (for sendfile), and http.Hijacker
// where the server's writer does (over HTTP/1). It unwraps to the server's
// writer for http.ResponseController. Once the handler has returned, the
// writer is cut off: a task that kept it by mistake reaches no client.
//
// A held-back response differs from net/http's on the wire in ways that
// change no code. Header changes made after WriteHeader are sent, but for
// framing. A HEAD response gets a Content-Length only if the handler sets one.
// A second WriteHeader is not logged. A request that says "Expect:
// 100-continue" gets its 100 Continue even if the handler reads the body
// after writing a reply.
type Handler struct {
	// Logger receives the Handler's lines about tasks that failed or were
	// dropped, refusals, and a Shutdown that gave up. If nil, slog.Default()
	// at the moment of logging is used.
	Logger *slog.Logger

	// MaxPending limits the tasks pending, as Pending counts them; zero means
	// no limit. At the limit, a new request gets 503 Service Unavailable and
	// "Retry-After: 1" before its handler runs, so it is not acknowledged.
	// Requests being served, and tasks, may add past it.
	MaxPending int

	next    http.Handler
	buffers sync.Pool               // of *bytes.Buffer, for held-back bodies
	ctx     context.Context         // the cancellation every task sees
	cancel  context.CancelCauseFunc // ends ctx when a Shutdown gives up
	idled   atomic.Int64            // times idle was closed; a request notes it as it arrives

	// The rule: no task is lost without a log line. A task that fails is
	// logged by next or unwound; one that is dropped, by Add or handlerEnded.
	// A Shutdown that gives up logs one line instead, which counts the tasks
	// pending then: later drops of those are not logged again.
	mu       sync.Mutex    // guards the fields below, and each queue's tasks and flags
	pending  int           // tasks added and not yet finished or dropped
	idle     chan struct{} // closed when pending drops to 0; nil unless a Shutdown waits
	refusing bool          // a 503 has been logged, and its burst goes on
}

// NewHandler returns a Handler that serves requests with next, or with
// http.DefaultServeMux if next is nil, as http.Server does.
func NewHandler(next http.Handler) *Handler {
	if next == nil {
		next = http.DefaultServeMux
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Handler{next: next, ctx: ctx, cancel: cancel, buffers: sync.Pool{New: func() any { return new(bytes.Buffer) }}}
}

// queue is one request's task list. It is also the context of the request
// that the wrapped handler gets, which carries the queue to FromContext: one
// allocation where context.WithValue would add a second.
type queue struct {
	context.Context // the request's, as the Handler got it
	h               *Handler
	own             Tasks  // what FromContext returns for the request's context
	method, path    string // for log lines
	idled           int64  // h.idled as the request arrived

	// h.mu guards the rest.
	current *Tasks  // the running task's, for its ctx; nil between tasks
	tasks   []entry // waiting to run, in order
	// The handler returned, so tasks may start, or panicked, so they are
	// dropped. running: a goroutine runs them, and any added meanwhile.
	returned, panicked, running bool
}

// entry is a queued task, and the Tasks it was added through.
type entry struct {
	fn    func(ctx context.Context) error
	tasks *Tasks
}

// tasksKey is the context key under which a request's queue is found.
type tasksKey struct{}

// String names q as context.WithValue would. It reads only the request's
// context, which never changes, so printing races with no Add.
func (q *queue) String() string {
	return fmt.Sprint(q.Context) + ".WithValue(background.tasksKey, *background.queue)"
}

// Value makes q the request's context with the queue added.
func (q *queue) Value(key any) any {
	if key == (tasksKey{}) {
		return q
	}
	return q.Context.Value(key)
}

// ServeHTTP serves r with the wrapped handler, sends its whole response, and
// then starts the request's tasks in a goroutine of their own. If the handler
// panics, its tasks are dropped and the panic goes on up to net/http.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h.MaxPending > 0 && h.refuse(w) {
		return
	}
	if r.Trailer == nil && r.TransferEncoding != nil { // chunked, so it may end with trailers
		r.Trailer = make(http.Header) // net/http fills this in on its own request: the copy shares it
	}
	q := &queue{Context: r.Context(), h: h, method: r.Method, path: r.URL.Path, idled: h.idled.Load()}
	q.own = Tasks{q, q}
	r2, hw := r.WithContext(q), &holdingWriter{server: w, req: r, buffers: &h.buffers}

	// A request's life has four steps. Steps 3 and 4 are deferred, so that
	// they happen even if the handler panics, which skips step 2.
	returned := false
	defer func() {
		// 3. Cut hw off: net/http reuses its writer once ServeHTTP returns,
		// and a task may have kept hw. Remove uploads, as net/http does.
		hw.detach()
		if r2.MultipartForm != nil {
			r2.MultipartForm.RemoveAll()
		}
		q.handlerEnded(returned) // 4. Start the tasks, or drop them.
	}()
	h.next.ServeHTTP(hw.forHandler(), r2) // 1. Serve into hw, which holds the response back.
	returned = true
	hw.finish() // 2. Send the whole response, with a Content-Length, and flush it.
}

// refuse answers 503 if MaxPending tasks are pending, before the handler
// can acknowledge anything, and reports whether it did. A burst of refusals
// gets one log line. It lasts until a request finds at most half of
// MaxPending pending.
func (h *Handler) refuse(w http.ResponseWriter) bool {
	h.mu.Lock()
	full, wasRefusing := h.pending >= h.MaxPending, h.refusing
	h.refusing = full || (wasRefusing && 2*h.pending > h.MaxPending)
	h.mu.Unlock()
	if full && !wasRefusing {
		h.logger().Warn("background: MaxPending tasks pending; refusing requests with 503", "max", h.MaxPending)
	}
	if full {
		w.Header().Set("Retry-After", "1")
		http.Error(w, "Service Unavailable: too many background tasks pending", http.StatusServiceUnavailable)
	}
	return full
}

// handlerEnded starts q's tasks if the handler returned. If it panicked, it
// did not finish what it set out to do: its tasks are dropped, and any added
// later too.
func (q *queue) handlerEnded(returned bool) {
	h := q.h
	h.mu.Lock()
	q.returned, q.panicked = returned, !returned
	q.startLocked()
	var dropped []entry
	if q.panicked {
		dropped, q.tasks = q.tasks, nil
		h.doneLocked(len(dropped))
		if h.ctx.Err() != nil {
			dropped = nil // a Shutdown that gave up has counted them
		}
	}
	h.mu.Unlock()
	for _, e := range dropped {
		h.log(e.tasks, slog.LevelWarn, "background: task dropped", "reason", "the handler panicked")
	}
}

// Tasks is the task list of one request. Get it with [FromContext], whose
// ctx gives the values that tasks added through it see. A nil or zero Tasks
// panics on Add. It is safe for concurrent use.
type Tasks struct {
	q      *queue
	values context.Context // the ctx given to FromContext
}

// FromContext returns the task list of the request that ctx belongs to, or
// nil if that request is not served through a [Handler]. Tasks added through
// the result see the values of ctx.
func FromContext(ctx context.Context) *Tasks {
	q, ok := ctx.Value(tasksKey{}).(*queue)
	switch {
	case !ok:
		return nil
	case ctx == q: // the request's own context, as most handlers pass
		return &q.own
	}
	return &Tasks{q, ctx}
}

// ctx returns the context that tasks added through t run with, at no cost:
// see taskContext.
func (t *Tasks) ctx() context.Context { return (*taskContext)(t) }

// Add queues task to run after the response has been sent, and after the
// request's tasks added before it. It may be called from any goroutine, and
// from a running task, through FromContext on the task's ctx.
//
// The task's ctx has the values of the context given to FromContext, but it
// is canceled only when [Handler.Shutdown] gives up. The task should capture
// what it needs from the request, not r, w or w.Header(). Once the handler
// has returned, w is cut off, uploaded files are removed, and net/http may
// still be reading the header map.
//
// A task's error or panic is logged with the task's ctx and the request's
// method and path, and so is a runtime.Goexit (which t.FailNow calls). The
// request's other tasks still run. They run after an error status too: only
// a panicking handler drops its tasks. So add tasks once the checks that can
// fail have passed.
//
// A task added after the request's other tasks have finished still runs,
// and Shutdown waits for it. Add panics if t is nil (the request was not
// served through a Handler) or task is nil.
func (t *Tasks) Add(task func(ctx context.Context) error) {
	if t == nil || t.q == nil || task == nil {
		panic("background: Add on a nil Tasks (FromContext returns nil unless the request is served through background.NewHandler), or with a nil task")
	}
	q, h := t.q, t.q.h
	dropped, unwaited := "", false
	h.mu.Lock()
	switch {
	case h.ctx.Err() != nil:
		dropped = "Shutdown's deadline has passed"
	case q.panicked:
		dropped = "the handler panicked"
	default:
		q.tasks = append(q.tasks, entry{task, t})
		h.pending++
		q.startLocked()
		unwaited = q.idled != h.idled.Load() // a Shutdown returned since the request arrived
	}
	h.mu.Unlock()
	if dropped != "" {
		h.log(t, slog.LevelWarn, "background: task dropped", "reason", dropped)
	} else if unwaited {
		h.log(t, slog.LevelWarn, "background: task added after Shutdown returned; it runs unwaited")
	}
}

// startLocked starts a goroutine to run q's tasks, if there are some and none
// runs yet; h.mu must be held. It keeps the connection free: net/http reads a
// keep-alive connection's next request only once ServeHTTP has returned.
func (q *queue) startLocked() {
	if q.returned && !q.running && len(q.tasks) > 0 {
		q.running = true
		go q.run()
	}
}

// run runs q's tasks one at a time, until none is left. It is the
// goroutine's first frame, and holds little: the garbage collector scans the
// stack of every pending task.
func (q *queue) run() {
	returned := false
	defer q.unwound(&returned)
	fn := q.next(nil)
	for fn != nil {
		fn = q.next(fn(q.current.ctx()))
	}
	returned = true
}

// unwound is deferred by run. If run did not return, the current task
// panicked, or called runtime.Goexit, as t.FailNow does. unwound must
// recover a panic: in a goroutine we started, nothing else would, and it
// would end the process. Either way this goroutine ends: unwound logs why,
// and hands q to another.
func (q *queue) unwound(returned *bool) {
	if *returned {
		return
	}
	if v := recover(); v != nil {
		q.h.log(q.current, slog.LevelError, "background: task panicked", "panic", v, "stack", string(debug.Stack()))
	} else {
		q.h.log(q.current, slog.LevelError, "background: task called runtime.Goexit")
	}
	go q.run()
}

// next ends the current task, if any: it logs err, unless that is
// context.Canceled once a Shutdown has given up, and counts the task done.
// Then it takes q's next task. It returns nil if none is left, or if a
// Shutdown gave up: then it drops the rest, which that Shutdown counted.
func (q *queue) next(err error) func(ctx context.Context) error {
	h := q.h
	if err != nil && (!errors.Is(err, context.Canceled) || h.ctx.Err() == nil) {
		h.log(q.current, slog.LevelError, "background: task failed", "err", err)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if q.current != nil {
		h.doneLocked(1)
	}
	if len(q.tasks) == 0 || h.ctx.Err() != nil {
		h.doneLocked(len(q.tasks))
		q.tasks, q.current, q.running = nil, nil, false
		return nil
	}
	e := q.tasks[0]
	q.tasks[0] = entry{} // so that the array keeps no finished task alive
	if q.tasks = q.tasks[1:]; len(q.tasks) == 0 {
		q.tasks = nil // nor is kept alive itself while e runs
	}
	q.current = e.tasks
	return e.fn
}

// log logs msg about a task added through t, with its request's method and
// path. It logs with the task's ctx, so that a slog.Handler can add what the
// ctx carries, such as a trace ID.
func (h *Handler) log(t *Tasks, level slog.Level, msg string, args ...any) {
	h.logger().Log(t.ctx(), level, msg, append([]any{"method", t.q.method, "path", t.q.path}, args...)...)
}

func (h *Handler) logger() *slog.Logger {
	if h.Logger != nil {
		return h.Logger
	}
	return slog.Default()
}

// doneLocked records that n tasks have finished or been dropped, and wakes
// the waiting Shutdowns once none is pending. h.mu must be held.
func (h *Handler) doneLocked(n int) {
	h.pending -= n
	if h.pending == 0 && h.idle != nil {
		close(h.idle)
		h.idle = nil
		h.idled.Add(1)
	}
}

// Pending returns how many tasks have been added and not yet finished or
// dropped, for a metrics endpoint or a shutdown message. It is the count
// that MaxPending limits.
func (h *Handler) Pending() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.pending
}

// Shutdown waits until no task is queued or running, counting those added
// while it waits, and then returns nil. A task that calls Shutdown waits for
// itself. Once Shutdown has returned nil, what the tasks wrote can be read
// without a data race.
//
// If ctx ends first, Shutdown gives up: it cancels the running tasks' ctx,
// drops the queued ones, logs one line that counts them, and returns
// ctx.Err(). A task that then returns context.Canceled, wrapped or not, is
// not logged again. From then on, every task added is dropped with a log
// line, and every Shutdown returns that first error.
//
// http.Server.Shutdown does not wait for the goroutines that run tasks, so
// stopping takes two steps: first http.Server.Shutdown, which stops new
// requests and lets the responses in flight finish, then this. A task added
// after a Shutdown returned (by a goroutine that http.TimeoutHandler left
// behind, say) still runs, with a log line, since Shutdown did not wait for
// it. Shutdown may be called more than once, and concurrently with requests.
// Until one gives up, the Handler goes on working afterwards.
func (h *Handler) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	if h.idle == nil {
		h.idle = make(chan struct{}) // shared by every Shutdown that waits
	}
	idle := h.idle
	h.doneLocked(0) // closes idle at once if no task is pending
	h.mu.Unlock()

	select {
	case <-idle:
		return context.Cause(h.ctx) // nil unless a Shutdown gave up
	case <-ctx.Done():
	}
	h.mu.Lock()
	// Give up, unless idle closed just as ctx ended, or another Shutdown has.
	giveUp := h.idle == idle && h.ctx.Err() == nil
	if giveUp {
		h.cancel(ctx.Err())
	}
	unfinished := h.pending
	h.mu.Unlock()
	if giveUp {
		h.logger().ErrorContext(ctx, "background: shutdown deadline passed; unfinished tasks canceled or dropped", "count", unfinished)
	}
	return context.Cause(h.ctx)
}

// taskContext is a Tasks seen as the context its tasks run with: the values
// of the ctx given to FromContext, with the Handler's cancellation. It cannot
// be the request's context, which net/http cancels as ServeHTTP returns, just
// as the tasks start.
type taskContext Tasks

func (c *taskContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c *taskContext) Done() <-chan struct{}       { return c.q.h.ctx.Done() }
func (c *taskContext) Err() error                  { return c.q.h.ctx.Err() }

// Value asks the Handler's context first. It answers only the key through
// which context.Cause, and the contexts derived from this one, find its
// cancellation: so deriving starts no goroutine, however many layers deep.
func (c *taskContext) Value(key any) any {
	if v := c.q.h.ctx.Value(key); v != nil {
		return v
	}
	return c.values.Value(key)
}
