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
package background

import (
	"context"
	"errors"
	"runtime/debug"
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
	q, _ := ctx.Value(tasksKey{}).(*queue)
	if q == nil {
		return nil
	}
	return &Tasks{q: q, ctx: taskContext{Context: q.h.ctx, values: context.WithoutCancel(ctx)}}
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
// Add after the request's tasks have all finished still runs task, at once,
// and Shutdown waits for it. So does Add from a request that was in flight
// when a Shutdown returned, from a goroutine left behind by
// http.TimeoutHandler say; that Shutdown did not wait for the task, so it is
// logged. A task added after the handler panicked, or after Shutdown's
// deadline passed, is dropped with a log line. Add panics if t is
// nil (the request was not served through NewHandler) or task is nil.
func (t *Tasks) Add(task func(ctx context.Context) error) {
	if t == nil || t.q == nil {
		panic("background: Add on a nil Tasks: serve the request through background.NewHandler")
	}
	if task == nil {
		panic("background: Add called with a nil task")
	}
	t.q.h.add(t.q, queuedTask{run: task, ctx: &t.ctx})
}

// queue is one request's tasks and where they stand. Its first four fields
// never change; h.mu guards the rest.
type queue struct {
	h            *Handler
	method, path string // for log lines
	drains       int64  // h.drains as the request arrived

	tasks     []queuedTask // waiting to run, in order
	responded bool         // the response has been sent, so tasks may start
	running   bool         // a goroutine is running the tasks
	discarded bool         // the handler panicked, so tasks are dropped
}

type queuedTask struct {
	run func(context.Context) error
	ctx *taskContext // what it runs with
}

// add queues t on q, or drops it with a log line if q can no longer run tasks.
func (h *Handler) add(q *queue, t queuedTask) {
	h.mu.Lock()
	dropped := ""
	switch {
	case q.discarded:
		dropped = "the handler panicked"
	case h.ctx.Err() != nil:
		dropped = "Shutdown's deadline has passed"
	default:
		q.tasks = append(q.tasks, t)
		h.track(q)
		h.startLocked(q)
	}
	unseen := dropped == "" && q.drains != h.drains.Load() // a Shutdown has returned since the request arrived
	h.mu.Unlock()
	if dropped != "" {
		h.logger().Warn("background: tasks dropped", "count", 1, "reason", dropped, "method", q.method, "path", q.path)
	} else if unseen {
		h.logger().Warn("background: task added after Shutdown returned; it runs, but that Shutdown did not wait for it",
			"method", q.method, "path", q.path)
	}
}

// respond records that q's response has been sent, and starts its tasks.
func (h *Handler) respond(q *queue) {
	h.mu.Lock()
	q.responded = true
	h.startLocked(q)
	h.mu.Unlock()
}

// startLocked starts a goroutine to run q's tasks, if there are some to run
// and none runs them yet. h.mu must be held.
//
// The goroutine is what keeps the client and its connection free: net/http
// reads the next request on a keep-alive connection only after ServeHTTP has
// returned, so tasks run inside ServeHTTP would hold up that request.
func (h *Handler) startLocked(q *queue) {
	if q.responded && !q.running && len(q.tasks) > 0 {
		q.running = true
		go h.run(q)
	}
}

// run runs q's tasks one at a time until none are left.
func (h *Handler) run(q *queue) {
	for {
		h.mu.Lock()
		if len(q.tasks) == 0 {
			q.running = false
			h.track(q)
			h.mu.Unlock()
			return
		}
		t := q.tasks[0]
		q.tasks[0] = queuedTask{} // let the garbage collector have it once it has run
		q.tasks = q.tasks[1:]
		h.mu.Unlock()
		h.runTask(q, t)
	}
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
func (c *taskContext) AfterFunc(f func()) (stop func() bool) {
	return context.AfterFunc(c.Context, f)
}

// Value looks key up in the request's context. That context went through
// WithoutCancel, so that its cancellation cannot leak out through Value
// either: context.Cause, for one, looks there.
func (c *taskContext) Value(key any) any { return c.values.Value(key) }
