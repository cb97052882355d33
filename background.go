// Package background runs functions after an HTTP response has been sent,
// like FastAPI's BackgroundTasks, using nothing but net/http.
//
// Wrap a handler with [NewHandler]. Inside it, FromContext(r.Context()).Add(task)
// queues a task. The wrapper sends the handler's whole response, framed and
// flushed, before the request's first task starts, and runs the tasks in a
// goroutine of their own, so neither the client nor the next request on its
// keep-alive connection waits for them. The tasks of one request run one at a
// time, in the order they were added; tasks of different requests run
// concurrently. A task keeps the values of the context it was added from, but
// it is not canceled when the client leaves or the handler returns: only when
// [Handler.Shutdown] gives up waiting. A task that fails or panics is logged,
// and the request's other tasks still run. A handler that panics has its tasks
// discarded.
//
// What is not guaranteed: tasks live in the process's memory. If the process
// is killed, or Shutdown's deadline passes, tasks that have not finished are
// lost (the latter with a log line), and nothing is ever retried. For work that
// must survive that, use a durable job queue.
//
// This file tells the story of a request's tasks, from Add to Shutdown.
// server.go holds the response writer that makes "after the response" true;
// it knows nothing of tasks.
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
	"sync/atomic"
)

// Tasks is the list of background tasks of one request, as seen from one
// context. Get it with [FromContext]; a nil or zero Tasks panics on Add.
// It is safe for concurrent use.
type Tasks struct {
	q   *queue
	ctx taskContext // what its tasks run with: the values of the context given to FromContext
}

// tasksKey is the context key under which a Handler stores a request's queue.
type tasksKey struct{}

// FromContext returns the task list of the request that ctx belongs to, or
// nil if that request is not being served through a [Handler]. Tasks added
// through the result see the values of ctx.
func FromContext(ctx context.Context) *Tasks {
	if q, ok := ctx.Value(tasksKey{}).(*queue); ok {
		return &Tasks{q: q, ctx: taskContext{Context: q.h.ctx, values: context.WithoutCancel(ctx)}}
	}
	return nil
}

// Add queues task to run once the response has been sent. The tasks of one
// request run one at a time, in the order they were added, in a goroutine of
// their own; tasks of different requests run concurrently. A running task may
// Add more tasks (through FromContext on its own ctx), and they run after
// those already queued. Add is safe to call from any goroutine.
//
// The task's ctx carries the values of the context given to FromContext, but
// not its cancellation: net/http cancels the request's context as ServeHTTP
// returns, just as the tasks start. The task's ctx is canceled only when
// [Handler.Shutdown] stops waiting. Likewise, a task should capture what it
// needs from the request (a string, an ID, the bytes of an upload), not r, w
// or w's Header map: by the time it runs, w is cut off from the response,
// uploaded files (r.MultipartForm) are removed, and net/http may still be
// reading the Header map as it finishes the response.
//
// A task's error, or its panic with the stack, is logged with the request's
// method and path, and the request's remaining tasks still run. This differs
// from Starlette on purpose: there, the first exception skips the rest.
//
// A handler that answers with an error status (a 4xx or 5xx) still has its
// tasks run: only a panic discards them. (FastAPI discards them when the
// endpoint raises HTTPException.) So add tasks once the checks that can fail
// have passed.
//
// Add after the request's tasks have all finished still runs task, at once,
// and Shutdown waits for it. So does Add from a request that was in flight
// when a Shutdown returned, from a goroutine left behind by
// http.TimeoutHandler say; that Shutdown did not wait for the task, so it is
// logged. A task added after the handler panicked, or after Shutdown's
// deadline passed, is dropped with a log line. Add panics if t is
// nil (the request was not served through NewHandler) or task is nil.
func (t *Tasks) Add(task func(ctx context.Context) error) {
	if t == nil || t.q == nil || task == nil {
		panic("background: Add on a nil Tasks (FromContext returns nil unless the request is served through background.NewHandler), or with a nil task")
	}
	q, h := t.q, t.q.h
	h.mu.Lock()
	late := h.ctx.Err() != nil // a Shutdown gave up, so nothing would wait for the task
	if !late {
		q.tasks = append(q.tasks, queuedTask{run: task, ctx: &t.ctx})
		h.pending++
		h.startLocked(q)
	}
	unseen := q.drains != h.drains.Load() // a Shutdown has returned since the request arrived
	h.mu.Unlock()
	if late {
		h.logger().Warn("background: tasks dropped", "count", 1, "reason", "Shutdown's deadline has passed", "method", q.method, "path", q.path)
	} else if unseen {
		h.logger().Warn("background: task added after Shutdown returned; it runs, but that Shutdown did not wait for it",
			"method", q.method, "path", q.path)
	}
}

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
//
// Where the response differs from net/http alone:
//   - A HEAD response is not held back, since it has no body, and it gets a
//     Content-Length only if the handler sets one. (net/http computes one
//     when the handler writes a small body.)
//   - While the response is held back, net/http has not seen its header yet.
//     So header changes made after WriteHeader (or the first Write) are sent,
//     where net/http would ignore them. Framing is the exception: the wrapper
//     frames the body, and ignores Content-Length, Transfer-Encoding and
//     Trailer set after WriteHeader, as net/http does.
//   - Over HTTP/1, trailers named with http.TrailerPrefix are dropped from a
//     held-back body, as net/http itself drops those named after a body of
//     under 2 KiB: declare trailers in the Trailer header before writing.
//   - A handler that writes a body slowly, without flushing, gets it to the
//     client only when it returns or passes 64 KiB, and learns late that the
//     client has gone: handlers that stream should Flush.
//   - A handler that panics sends none of what it held back: the client sees
//     the connection close with no response, and Go's http.Transport may
//     then retry an idempotent request, which runs the handler twice.
//     (Without the wrapper, net/http would have sent the part it had
//     flushed, from about 2 KiB on.)
//   - A 413 response over HTTP/1 closes the connection, as net/http's own
//     writer does when http.MaxBytesReader trips; otherwise net/http would
//     first wait for the rest of a body that a stalled client never sends.
//     Through the wrapper, net/http cannot see the trip itself, so a handler
//     that answers a too-large body with another status should set
//     "Connection: close".
type Handler struct {
	// Logger receives failed and panicking tasks and dropped ones.
	// If nil, slog.Default() at the moment of logging is used.
	Logger *slog.Logger

	next    http.Handler
	ctx     context.Context         // the cancellation every task sees; ended by Shutdown
	cancel  context.CancelCauseFunc // ends ctx, with the error of the first Shutdown that gave up
	buffers sync.Pool               // of *bytes.Buffer, for the response writers' held-back bodies

	// mu guards the counts below, and every queue's tasks and busy flag. It
	// is one lock because a task's start and end change its queue and the
	// counts together.
	mu      sync.Mutex
	pending int           // tasks added and not yet finished or dropped, in all queues
	running int           // tasks running now, out of pending
	idle    chan struct{} // closed when pending drops to 0; nil unless Shutdown waits

	// drains counts the times a Shutdown's wait ended with no task pending,
	// which is when a Shutdown returns nil. It changes only with mu held, but
	// ServeHTTP reads it without, to note in each queue when its request
	// arrived.
	drains atomic.Int64
}

// NewHandler returns a Handler that serves requests with next and runs the
// tasks they add.
func NewHandler(next http.Handler) *Handler {
	if next == nil {
		panic("background: NewHandler called with a nil handler")
	}
	h := &Handler{next: next, buffers: sync.Pool{New: func() any { return new(bytes.Buffer) }}}
	h.ctx, h.cancel = context.WithCancelCause(context.Background())
	return h
}

// ServeHTTP serves r with the wrapped handler, sends its whole response, and
// then starts the request's tasks in a goroutine of their own. If the handler
// panics, its tasks are discarded and the panic goes on up to net/http.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := &queue{h: h, method: r.Method, path: r.URL.Path, drains: h.drains.Load(), busy: true}
	rw := &responseWriter{rw: w, req: r, buffers: &h.buffers}
	r2 := r.WithContext(context.WithValue(r.Context(), tasksKey{}, q))
	defer func() {
		// Whether the handler returned or panicked (the panic then goes on up
		// to net/http): cut its w off from the response, so that a task that
		// kept w reaches nothing...
		rw.detach()
		if r2.MultipartForm != nil {
			// ...remove uploads' temporary files, since net/http removes
			// only those of a form parsed on its own request, not on this
			// copy (a task that needs an upload gets it from the handler)...
			r2.MultipartForm.RemoveAll()
		}
		// ...and only then let the tasks start: run drops them if the
		// handler panicked.
		h.mu.Lock()
		q.busy = false
		h.startLocked(q)
		h.mu.Unlock()
	}()
	h.next.ServeHTTP(rw, r2)
	rw.finish() // the whole response, framed and flushed to the client
	q.returned = true
}

// queue is one request's tasks and where they stand. Its first four fields
// never change; h.mu guards tasks and busy. ServeHTTP sets returned without
// the lock, but before it lets the tasks start, and nothing reads it sooner.
type queue struct {
	h            *Handler
	method, path string // for log lines
	drains       int64  // h.drains as the request arrived

	tasks    []queuedTask // waiting to run, in order
	busy     bool         // the handler is still running, or a goroutine runs the tasks: new ones wait
	returned bool         // the handler returned, rather than panicking: its tasks may run
}

type queuedTask struct {
	run func(context.Context) error
	ctx *taskContext // what it runs with
}

// startLocked starts a goroutine to run q's tasks, if there are some to run
// and none runs them yet. h.mu must be held.
//
// The goroutine is what keeps the client and its connection free: net/http
// reads the next request on a keep-alive connection only after ServeHTTP has
// returned, so tasks run inside ServeHTTP would hold up that request.
func (h *Handler) startLocked(q *queue) {
	if !q.busy && len(q.tasks) > 0 {
		q.busy = true
		go h.run(q)
	}
}

// run runs q's tasks one at a time until none are left. It drops them
// instead if the handler panicked, as FastAPI drops the tasks of an endpoint
// that raises, or once Shutdown has given up, whose log line counted them.
func (h *Handler) run(q *queue) {
	h.mu.Lock()
	for len(q.tasks) > 0 && q.returned && h.ctx.Err() == nil {
		t := q.tasks[0]
		q.tasks[0] = queuedTask{} // let the garbage collector have it once it has run
		q.tasks = q.tasks[1:]
		h.running++
		h.mu.Unlock()
		h.runTask(q, t)
		h.mu.Lock()
		h.running--
		h.doneLocked(1)
	}
	if n := len(q.tasks); n > 0 && !q.returned && h.ctx.Err() == nil {
		// Logged with h.mu held, on this rare path, so that no task added
		// meanwhile slips past uncounted, and Shutdown cannot return first.
		// (Once Shutdown has given up, its own line has counted them.)
		h.logger().Warn("background: tasks dropped", "count", n, "reason", "the handler panicked", "method", q.method, "path", q.path)
	}
	h.doneLocked(len(q.tasks))
	q.tasks = nil
	q.busy = false
	h.mu.Unlock()
}

// runTask runs t and logs its error or panic. A panic must be recovered here:
// in a goroutine we started, nothing else would, and it would end the process.
//
// A task that returns the cancellation Shutdown caused is not logged:
// Shutdown's own line counted it, and a line for each of thousands of tasks
// would bury the rest of the log.
func (h *Handler) runTask(q *queue, t queuedTask) {
	defer func() {
		if v := recover(); v != nil {
			h.logger().Error("background: task panicked", "method", q.method, "path", q.path,
				"panic", v, "stack", string(debug.Stack()))
		}
	}()
	if err := t.run(t.ctx); err != nil && !(errors.Is(err, context.Canceled) && t.ctx.Err() != nil) {
		h.logger().Error("background: task failed", "method", q.method, "path", q.path, "err", err)
	}
}

// doneLocked records that n tasks have finished or been dropped, and wakes
// a waiting Shutdown once no task is pending. h.mu must be held.
func (h *Handler) doneLocked(n int) {
	h.pending -= n
	if h.pending == 0 && h.idle != nil {
		h.drains.Add(1)
		close(h.idle)
		h.idle = nil
	}
}

// Shutdown waits for every queued and running task, including those that
// requests still being served add meanwhile, and returns once they have all
// finished: nil if no task was lost, and otherwise the ctx.Err() of the first
// Shutdown that gave up, earlier or meanwhile. If ctx ends first, Shutdown
// gives up: it cancels the context of the running tasks, drops the queued
// ones, and returns without waiting further. The first Shutdown to give up
// logs one line saying how many tasks of each kind it lost; a canceled task
// that returns that cancellation (context.Canceled, wrapped or not) is not
// logged again, but any other error it returns is. From then on, tasks added
// are dropped, each with a log line.
//
// http.Server.Shutdown knows nothing of the goroutines that run tasks, so
// shutting down takes two steps: first http.Server.Shutdown, which stops new
// requests and lets responses finish, then this, which drains the tasks those
// responses queued. Shutdown may be called more than once, and concurrently
// with requests.
//
// In a test, Shutdown(context.Background()) is how to wait for the tasks of
// the requests served so far. The Handler goes on working afterwards, as long
// as no Shutdown has given up.
func (h *Handler) Shutdown(ctx context.Context) error {
	h.mu.Lock()
	if h.idle == nil { // one channel for every Shutdown that waits
		h.idle = make(chan struct{})
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
	defer h.mu.Unlock()
	if h.pending > 0 && h.ctx.Err() == nil { // unless the tasks finished just as ctx ended, or a Shutdown gave up before
		// As in run, the line is logged with h.mu held, on a rare path, so
		// that it counts every task lost, and counts it once.
		h.cancel(ctx.Err())
		h.logger().Error("background: shutdown deadline passed; running tasks canceled, queued ones dropped",
			"dropped", h.pending-h.running, "running", h.running)
	}
	return context.Cause(h.ctx)
}

func (h *Handler) logger() *slog.Logger { return cmp.Or(h.Logger, slog.Default()) }

// taskContext is the context a task runs with: the values of the context
// given to FromContext, with the cancellation of its Handler. It cannot
// simply be the request's context: net/http cancels that as ServeHTTP
// returns, just as the tasks start.
type taskContext struct {
	context.Context                 // the Handler's: Deadline, Done and Err
	values          context.Context // the request's, through WithoutCancel
}

// AfterFunc arranges for f to run once the Handler's context ends. Through
// it, a context derived from a task's ctx (context.WithTimeout, say)
// registers with the Handler's cancellation, as it would with any context
// from context.WithCancel. Without it, the context package could not see the
// cancelable context inside this one, and would start a goroutine for each
// derived context, to watch Done.
func (c *taskContext) AfterFunc(f func()) (stop func() bool) { return context.AfterFunc(c.Context, f) }

// Value looks key up in the request's context. That context went through
// WithoutCancel, so that its cancellation cannot leak out through Value
// either: context.Cause, for one, looks there.
func (c *taskContext) Value(key any) any { return c.values.Value(key) }
