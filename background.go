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
// The tasks of one request run one at a time, in order, in a goroutine of
// their own; tasks of different requests run concurrently. [Tasks.Add] says
// what a task's context is, and what happens when a task or its handler
// fails. Tasks live in the process's memory: if it dies, or Shutdown gives
// up, unfinished tasks are lost (the latter with a log line), and nothing is
// retried. Work that must survive that needs a durable job queue.
//
// # Differences from net/http
//
// A response through a Handler differs from one without it in these ways,
// most of them because the Handler holds back small bodies (see [Handler]):
//   - A body written slowly, without Flush, reaches the client only when the
//     handler returns or passes 64 KiB, and the handler learns late that the
//     client has gone. Handlers that stream should Flush.
//   - A body past 64 KiB, or flushed, streams as usual, but its end (the
//     chunked terminator) leaves as ServeHTTP returns: its tasks may start a
//     moment before. Over HTTP/2, the end of every stream does.
//   - Header changes made after WriteHeader are sent while the response is
//     held back, where net/http would ignore them. Framing set then
//     (Content-Length, Transfer-Encoding, Trailer) is ignored, as net/http does.
//   - Over HTTP/1, trailers named with http.TrailerPrefix are dropped from a
//     held-back body: declare trailers in the Trailer header before writing.
//   - A HEAD response gets a Content-Length only if the handler sets one.
//   - A second WriteHeader is ignored without net/http's "superfluous" log
//     line. A request that says "Expect: 100-continue" gets its 100 Continue
//     even when the handler reads the body after writing a held-back reply.
//   - A handler that panics sends none of what it held back: the client sees
//     the connection close, and Go's http.Transport may then retry an
//     idempotent request, which runs the handler twice.
//   - A 413 over HTTP/1 closes the connection, as net/http does when
//     http.MaxBytesReader trips (which it cannot see through the wrapper). A
//     handler that answers a too-large body with another status should set
//     "Connection: close".
//   - Middleware outside the Handler sees neither r.Pattern nor r.PathValue:
//     the mux sets them on the copy of the request that the Handler passes on.
//   - The writer does not implement http.Pusher or http.CloseNotifier.
package background

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"log/slog"
	"net/http"
	"runtime/debug"
	"sync"
)

// Handler is an http.Handler that serves requests with the handler it wraps,
// and runs the tasks they add once their responses have been sent. Make one
// with NewHandler, and put it outermost, around the mux and all middleware:
// only handlers inside it can add tasks. A Handler must not be copied.
//
// The writer the wrapped handler gets holds back a body written without a
// Content-Length, up to 64 KiB, and sends it with one as the handler returns,
// then flushes, so that the whole response has been sent before the first
// task starts. It implements http.Flusher and io.ReaderFrom (through which
// http.FileServer still uses sendfile), http.Hijacker only if the server's
// writer does (over HTTP/1, not HTTP/2), and unwraps to the server's writer
// for http.ResponseController. Each response gets a writer of its own, cut
// off once the handler has returned: if a task kept it by mistake, Header
// returns a map that nothing sends, Write returns an error, and WriteHeader
// and Flush do nothing. The temporary files of a multipart form that the
// handler parsed are removed then too.
type Handler struct {
	// Logger receives the Handler's lines: tasks failed, panicked or dropped,
	// and refusals. If nil, slog.Default() at the moment of logging is used.
	Logger *slog.Logger

	// MaxPending limits the tasks pending (added, not yet finished or
	// dropped); zero means no limit. At the limit, a new request gets 503
	// Service Unavailable and "Retry-After: 1" before its handler runs, so it
	// is not acknowledged. Requests being served, and tasks, may add past it.
	MaxPending int

	next    http.Handler
	buffers sync.Pool               // of *bytes.Buffer, for the held-back bodies
	ctx     context.Context         // the cancellation every task sees
	cancel  context.CancelCauseFunc // ends ctx, when a Shutdown gives up

	// mu guards these fields and every queue's tasks and state: a task's
	// start and end change both together.
	mu       sync.Mutex
	drained  chan struct{} // closed when pending drops to 0; nil unless a Shutdown waits
	refusing bool          // since a 503 was logged: one line per burst of them
	// pending counts the tasks added and not yet finished or dropped, and
	// drains the times drained was closed, so Add can tell a Shutdown returned.
	pending, drains int
}

// NewHandler returns a Handler that serves requests with next, or with
// http.DefaultServeMux if next is nil, as http.Server does, and runs the
// tasks they add.
func NewHandler(next http.Handler) *Handler {
	ctx, cancel := context.WithCancelCause(context.Background())
	next = cmp.Or(next, http.Handler(http.DefaultServeMux))
	return &Handler{next: next, ctx: ctx, cancel: cancel, buffers: sync.Pool{New: func() any { return new(bytes.Buffer) }}}
}

// queue is one request's tasks. h.mu guards all but h, method and path.
type queue struct {
	h            *Handler
	method, path string // for log lines

	drains int            // h.drains as the request arrived
	tasks  []func() error // waiting to run, in order, each a closure over its ctx
	// Either the handler returned, and the tasks may start, or it panicked,
	// and they are dropped. running: a goroutine runs them, and any added.
	returned, panicked, running bool
}

// tasksKey is the context key under which a Handler stores a request's queue.
type tasksKey struct{}

// ServeHTTP serves r with the wrapped handler, sends its whole response, and
// then starts the request's tasks in a goroutine of their own. If the handler
// panics, its tasks are dropped and the panic goes on up to net/http.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := &queue{h: h, method: r.Method, path: r.URL.Path}
	if h.arrive(q) { // MaxPending tasks are pending: refuse, before the handler runs
		w.Header().Set("Retry-After", "1")
		http.Error(w, "Service Unavailable: too many background tasks pending", http.StatusServiceUnavailable)
		return
	}
	hw := &holdingWriter{out: w, req: r, buffers: &h.buffers}
	var out http.ResponseWriter = hw
	if _, ok := w.(http.Hijacker); ok {
		out = hijackingWriter{hw} // hw, but a Hijacker too, as w is (over HTTP/1, not HTTP/2)
	}
	r2 := r.WithContext(context.WithValue(r.Context(), tasksKey{}, q))
	// A request's life has four steps. Steps 3 and 4 are deferred, so that
	// they happen even if the handler panics, which skips step 2.
	defer h.release(q, hw, r2)
	h.next.ServeHTTP(out, r2) // 1. Serve into hw, which holds the response back.
	hw.finish()               // 2. Send the whole response, with a Content-Length, and flush it.
}

// arrive notes h.drains in q, for Add, and reports whether MaxPending tasks
// are pending. A burst of refusals gets one log line: it lasts until a
// request finds at most half of MaxPending pending.
func (h *Handler) arrive(q *queue) bool {
	h.mu.Lock()
	q.drains = h.drains
	full, refusing := h.MaxPending > 0 && h.pending >= h.MaxPending, h.refusing
	h.refusing = full || (refusing && 2*h.pending > h.MaxPending)
	h.mu.Unlock()
	if full && !refusing {
		h.logger().Warn("background: MaxPending tasks pending; refusing requests with 503", "max", h.MaxPending)
	}
	return full
}

// release ends the handler's part in a request, once it has returned or
// panicked.
func (h *Handler) release(q *queue, hw *holdingWriter, r *http.Request) {
	// 3. Cut hw off from the response: net/http reuses its own writer once
	// ServeHTTP returns, and a task may have kept hw.
	hw.detach()
	if r.MultipartForm != nil {
		r.MultipartForm.RemoveAll() // net/http removes the files of its own request only
	}
	// 4. Start the tasks in a goroutine of their own, or drop them if the
	// handler panicked: it did not finish what it set out to do.
	h.mu.Lock()
	q.returned, q.panicked = hw.finished, !hw.finished // step 2 ran only if the handler returned
	dropped, gaveUp := 0, h.ctx.Err() != nil
	if q.panicked {
		dropped, q.tasks = len(q.tasks), nil
	}
	h.doneLocked(dropped)
	h.startLocked(q)
	h.mu.Unlock()
	if dropped > 0 && !gaveUp { // if a Shutdown gave up, its line counted them
		h.logger().Warn("background: tasks dropped", "count", dropped, "reason", "the handler panicked", "method", q.method, "path", q.path)
	}
}

// Tasks is the task list of one request. Get it with [FromContext], whose
// ctx gives the values that tasks added through it see. A nil or zero Tasks
// panics on Add. It is safe for concurrent use.
type Tasks struct {
	q   *queue
	ctx taskContext // what its tasks run with
}

// FromContext returns the task list of the request that ctx belongs to, or
// nil if that request is not served through a [Handler]. Tasks added through
// the result see the values of ctx.
func FromContext(ctx context.Context) *Tasks {
	if q, ok := ctx.Value(tasksKey{}).(*queue); ok {
		return &Tasks{q: q, ctx: taskContext{Context: q.h.ctx, values: context.WithoutCancel(ctx)}}
	}
	return nil
}

// Add queues task to run after the response has been sent, and after the
// request's tasks added before it. Add is safe to call from any goroutine,
// and from a running task through FromContext on the task's ctx.
//
// The task's ctx has the values of the context given to FromContext, but it
// is canceled only when [Handler.Shutdown] gives up. The task should capture
// what it needs from the request, not r, w or w.Header(): once the handler has
// returned, w is cut off, uploaded files are removed, and net/http may still
// be reading the header map.
//
// A task's error, or its panic with the stack, is logged with the request's
// method and path, and the request's other tasks still run. They run after an
// error status too: only a panicking handler drops its tasks, with a log line.
// So add tasks once the checks that can fail have passed.
//
// A task added after the request's other tasks have finished still runs,
// and Shutdown waits for it. Add panics if t is nil (the request was not
// served through a Handler) or task is nil.
func (t *Tasks) Add(task func(ctx context.Context) error) {
	if t == nil || t.q == nil || task == nil {
		panic("background: Add on a nil Tasks (FromContext returns nil unless the request is served through background.NewHandler), or with a nil task")
	}
	q, h := t.q, t.q.h
	h.mu.Lock()
	gaveUp, panicked, unwaited := h.ctx.Err() != nil, q.panicked, q.drains != h.drains
	if !gaveUp && !panicked {
		q.tasks = append(q.tasks, func() error { return task(&t.ctx) })
		h.pending++
		h.startLocked(q)
	}
	h.mu.Unlock()
	if gaveUp {
		h.logger().Warn("background: tasks dropped", "count", 1, "reason", "Shutdown's deadline has passed", "method", q.method, "path", q.path)
	} else if panicked {
		h.logger().Warn("background: tasks dropped", "count", 1, "reason", "the handler panicked", "method", q.method, "path", q.path)
	} else if unwaited { // a Shutdown returned since the request arrived, without waiting for task
		h.logger().Warn("background: task added after Shutdown returned; it runs unwaited", "method", q.method, "path", q.path)
	}
}

// startLocked starts a goroutine to run q's tasks, if there are some and none
// runs yet; h.mu must be held. It keeps the connection free: net/http reads a
// keep-alive connection's next request only once ServeHTTP has returned.
func (h *Handler) startLocked(q *queue) {
	if q.returned && !q.running && len(q.tasks) > 0 {
		q.running = true
		go h.run(q)
	}
}

// run runs q's tasks one at a time until none is left, or until a Shutdown
// gives up: then it drops the rest, which that Shutdown's line has counted.
func (h *Handler) run(q *queue) {
	h.mu.Lock()
	for len(q.tasks) > 0 && h.ctx.Err() == nil {
		task := q.tasks[0]
		q.tasks = q.tasks[1:]
		h.mu.Unlock()
		h.runTask(q, task)
		h.mu.Lock()
		h.doneLocked(1)
	}
	h.doneLocked(len(q.tasks)) // left by a Shutdown that gave up, and counted them
	q.tasks, q.running = nil, false
	h.mu.Unlock()
}

// runTask runs task and logs its error or panic. It must recover a panic:
// in a goroutine we started, nothing else would, and it would end the process.
// A task that returns context.Canceled, wrapped or not, once Shutdown has
// canceled its ctx is not logged: that Shutdown's line has counted it.
func (h *Handler) runTask(q *queue, task func() error) {
	defer func() {
		if v := recover(); v != nil {
			h.logger().Error("background: task panicked", "method", q.method, "path", q.path, "panic", v, "stack", string(debug.Stack()))
		}
	}()
	if err := task(); err != nil && !(errors.Is(err, context.Canceled) && h.ctx.Err() != nil) {
		h.logger().Error("background: task failed", "method", q.method, "path", q.path, "err", err)
	}
}

// doneLocked records that n tasks have finished or been dropped, and wakes
// the waiting Shutdowns once none is pending. h.mu must be held.
func (h *Handler) doneLocked(n int) {
	h.pending -= n
	if h.pending == 0 && h.drained != nil {
		h.drains++
		close(h.drained)
		h.drained = nil
	}
}

func (h *Handler) logger() *slog.Logger { return cmp.Or(h.Logger, slog.Default()) }

// Shutdown waits for every queued and running task, including those that
// requests in flight add meanwhile, and returns nil once none is left. If ctx
// ends first, Shutdown gives up: it cancels the running tasks' ctx, drops the
// queued tasks, logs one line that counts them, and returns ctx.Err(). A
// running task then sees its ctx.Err() become context.Canceled; if it returns
// that error, wrapped or not, it is not logged again. From then on, every
// task added is dropped with a log line, and every Shutdown returns that
// first error.
//
// http.Server.Shutdown does not wait for the goroutines that run tasks, so
// stopping takes two steps: first http.Server.Shutdown, which stops new
// requests and lets the responses in flight finish, then this, which waits
// for the tasks they queued. A task added after a Shutdown returned (by a
// goroutine that http.TimeoutHandler left behind, for example) still runs,
// and is logged, since that Shutdown did not wait for it.
//
// Shutdown may be called more than once, and concurrently with requests. As
// long as none has given up, the Handler goes on working afterwards: in a
// test, Shutdown(context.Background()) waits for the tasks so far.
func (h *Handler) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	h.drained = cmp.Or(h.drained, make(chan struct{})) // the channel all waiting Shutdowns share, made by the first
	drained := h.drained
	h.doneLocked(0) // closes it at once if no task is pending
	h.mu.Unlock()

	select {
	case <-drained:
		return context.Cause(h.ctx) // nil unless a Shutdown gave up
	case <-ctx.Done():
	}
	h.mu.Lock()
	if h.drained != drained || h.ctx.Err() != nil { // drained was closed just as ctx ended, or a Shutdown gave up before
		h.mu.Unlock()
		return context.Cause(h.ctx)
	}
	h.cancel(ctx.Err())
	unfinished := h.pending
	h.mu.Unlock()
	h.logger().Error("background: shutdown deadline passed; unfinished tasks canceled or dropped", "count", unfinished)
	return context.Cause(h.ctx)
}

// taskContext is the context a task runs with: the values of the context
// given to FromContext, with the cancellation of its Handler. It cannot be
// the request's context, which net/http cancels as ServeHTTP returns, just as
// the tasks start.
type taskContext struct {
	context.Context                 // the Handler's: Deadline, Done and Err
	values          context.Context // the request's, through WithoutCancel
}

// AfterFunc lets a context derived from the task's ctx (by WithTimeout, say)
// register with the Handler's cancellation. Without it, the context package
// could not see the cancelable context inside this one, and would start a
// goroutine for each derived context, to watch Done.
func (c *taskContext) AfterFunc(f func()) (stop func() bool) { return context.AfterFunc(c.Context, f) }

// Value looks key up in the request's context. That context went through
// WithoutCancel, so that its cancellation cannot leak out through Value
// either: context.Cause, for one, looks there.
func (c *taskContext) Value(key any) any { return c.values.Value(key) }
