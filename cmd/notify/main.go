// Command notify is the FastAPI background-tasks tutorial in Go. It answers
// POST /send-notification/{email} at once and then, in a background task,
// appends "Notification sent to: EMAIL" to a log file.
//
//	go run ./cmd/notify
//	curl -X POST http://127.0.0.1:8000/send-notification/test@example.com
//
// Run it with -delay 2s to see that the client does not wait for the task;
// -h lists the flags. With -max-pending tasks pending, it answers 503. On
// SIGINT, SIGTERM or SIGHUP it stops taking requests, runs the tasks already
// queued, and exits 0 if each wrote its line in time; otherwise its last line
// counts those that did not, and it exits 1. A second signal ends the wait.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/mail"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"example.com/background"
)

// sendNotification answers at once and leaves the log line to a task, which
// runs after the response has been sent. With a delay, the task first waits
// that long, as if sending an email.
func sendNotification(logFile *notificationLog, delay time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		email := r.PathValue("email")
		if err := checkEmail(email); err != nil {
			writeJSON(w, http.StatusUnprocessableEntity, "detail", err.Error())
			return
		}
		line := "Notification sent to: " + email
		logFile.queued.Add(1)
		background.FromContext(r.Context()).Add(func(ctx context.Context) error {
			if err := sleep(ctx, delay); err != nil {
				return err
			}
			return logFile.append(line)
		})
		writeJSON(w, http.StatusOK, "message", "Notification sent successfully!")
	}
}

// notificationLog appends lines to a file and shows each on a console. It
// counts the lines queued, so that shutdown can say how many were lost.
type notificationLog struct {
	file *os.File // opened once, with O_APPEND
	echo *console

	queued, written, failed atomic.Int64
}

// openLog opens the log file once, at startup, unlike the tutorial's
// write_log, which opens it for each line. So a path that cannot be opened
// stops the program before it takes a request, and a task needs no file
// descriptor of its own, which a flood of connections may have used up.
func openLog(path string, echo *console) (*notificationLog, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("cannot open the log file: %w", err)
	}
	return &notificationLog{file: f, echo: echo}, nil
}

// append adds line to the file in a single Write, which os.File makes whole
// even with other tasks writing, and O_APPEND puts at the end of the file: no
// lock of ours, so no task waits on another's write or echo.
func (l *notificationLog) append(line string) error {
	if _, err := l.file.WriteString(line + "\n"); err != nil {
		l.failed.Add(1)
		return err
	}
	l.written.Add(1)
	l.echo.print("Log written: " + line)
	return nil
}

// unfinished returns how many queued lines were neither written nor failed.
func (l *notificationLog) unfinished() int64 {
	done := l.written.Load() + l.failed.Load()
	return l.queued.Load() - done // loaded last, as a line is queued before it is done
}

// checkEmail accepts a bare address such as ada@example.com and nothing
// else. The address goes into a line of the log file, so a newline in it
// would forge a second line.
func checkEmail(email string) error {
	if email == "" {
		return errors.New("email is empty")
	}
	if len(email) > 254 {
		return fmt.Errorf("email is %d bytes long; the limit is 254", len(email))
	}
	for i, r := range email {
		if !unicode.IsGraphic(r) {
			return fmt.Errorf("email contains a control or invisible character, %U, at byte %d", r, i)
		}
	}
	addr, err := mail.ParseAddress(email)
	if err != nil {
		return fmt.Errorf("email is not a valid address: %v", err)
	}
	if addr.Name != "" || addr.Address != email {
		return fmt.Errorf("email must be a bare address such as %s, with no name, quotes, comments or angle brackets", addr.Address)
	}
	return nil
}

// writeJSON sends {"key":"value"} as the response body. Like FastAPI, it
// sends no trailing newline, which json.Encoder would add.
func writeJSON(w http.ResponseWriter, status int, key, value string) {
	body, _ := json.Marshal(map[string]string{key: value}) // strings always encode
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(body)
}

// sleep waits for d and returns nil, or returns ctx.Err() if ctx is
// canceled first, as it is when shutdown's deadline passes.
func sleep(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// The rest is the server around the endpoint: flags, routes, timeouts, the
// two-step shutdown, and a console that never blocks.

// defaultMaxPending bounds what pending tasks cost to about 175 MB: each
// costs about 4.4 KB, by BenchmarkPendingTasks, which saw the whole process
// peak at 245 MB under a flood held at this limit.
const defaultMaxPending = 40_000

func main() {
	addr := flag.String("addr", "127.0.0.1:8000", "address to listen on")
	logPath := flag.String("log", "log.txt", "file the notifications are appended to")
	delay := flag.Duration("delay", 0, "how long each task waits before writing, like a slow mail server")
	drain := flag.Duration("drain", 10*time.Second, "how long shutdown waits for responses and tasks")
	maxPending := flag.Int("max-pending", defaultMaxPending, "tasks pending at most; past it, requests get 503 (0: no limit)")
	flag.Parse()
	var bad string
	switch {
	case flag.NArg() > 0:
		bad = fmt.Sprintf("unexpected argument %q", flag.Arg(0))
	case *logPath == "":
		bad = "-log must name a file"
	case *delay < 0:
		bad = "-delay must not be negative"
	case *drain <= 0:
		bad = "-drain must be positive"
	case *maxPending < 0:
		bad = "-max-pending must not be negative"
	}
	if bad != "" {
		fmt.Fprintln(os.Stderr, "notify:", bad)
		flag.Usage()
		os.Exit(2)
	}

	// From here on, output goes through consoles, which never block: a
	// stdout or stderr that nobody reads must stall neither the tasks nor
	// shutdown. One whose reader has gone must not end the process, which
	// is what SIGPIPE does by default.
	stdout, stderr := newConsole(os.Stdout), newConsole(os.Stderr)
	log.SetOutput(stderr) // where slog.Default, and so background's lines, and net/http's go
	signal.Ignore(syscall.SIGPIPE)
	outLast, errLast, code := []string{"Every task finished."}, []string(nil), 0
	if err := run(*addr, *logPath, *delay, *drain, *maxPending, stdout); err != nil {
		outLast, errLast, code = nil, []string{"notify: " + err.Error()}, 1
	}
	// Both at once, so that a stdout nobody reads delays the last line on
	// stderr by nothing, and the exit by half a second at most.
	flushBy := time.Now().Add(500 * time.Millisecond)
	var flushed sync.WaitGroup
	flushed.Go(func() { stdout.flush(flushBy, outLast...) })
	flushed.Go(func() { stderr.flush(flushBy, errLast...) })
	flushed.Wait()
	os.Exit(code)
}

// run opens the log file, serves until a signal, and shuts down. It returns
// nil only if every task queued wrote its line.
func run(addr, logPath string, delay, drain time.Duration, maxPending int, stdout *console) error {
	logFile, err := openLog(logPath, stdout) // left open for tasks still running as the process exits
	if err != nil {
		return err
	}
	tasks := background.NewHandler(routes(logFile, delay))
	tasks.MaxPending = maxPending
	return serve(newServer(tasks), tasks, addr, drain, logFile, stdout)
}

// routes returns the program's one endpoint. An empty email gets the same
// handler, so that it is told why (422) rather than "404 page not found".
func routes(logFile *notificationLog, delay time.Duration) http.Handler {
	mux := http.NewServeMux()
	h := sendNotification(logFile, delay)
	mux.Handle("POST /send-notification/{email}", h)
	mux.Handle("POST /send-notification/{$}", h)
	return mux
}

// newServer returns a server for h whose timeouts keep a slow or idle
// client from holding a connection forever.
func newServer(h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second, // the response only: tasks run after it
		IdleTimeout:       60 * time.Second,
	}
}

// serve serves on addr until SIGINT, SIGTERM or SIGHUP, then shuts down in
// two steps within drain. A second signal ends the wait at once. It returns
// an error if it could not listen, or if a queued line was not written.
func serve(srv *http.Server, tasks *background.Handler, addr string, drain time.Duration, logFile *notificationLog, stdout *console) error {
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	stdout.print(fmt.Sprintf("Listening on http://%s (Ctrl-C to stop)", ln.Addr()))
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case <-signals:
	}

	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- shutdown(ctx, srv, tasks) }() // before anything else, so that nothing delays it
	stdout.print(fmt.Sprintf("Shutting down: finishing responses and tasks (up to %v)", drain))
	select {
	case err = <-stopped:
	case sig := <-signals:
		return fmt.Errorf("second signal (%v): exiting at once; acknowledged tasks abandoned: %d", sig, logFile.unfinished())
	}
	switch unfinished, failed := logFile.unfinished(), logFile.failed.Load(); {
	case err != nil:
		return fmt.Errorf("%w after %v; tasks lost unfinished: %d, failed: %d", err, drain, unfinished, failed)
	case failed > 0:
		return fmt.Errorf("tasks failed: %d of %d; their lines are not in the log file", failed, logFile.queued.Load())
	}
	return nil
}

// shutdown stops srv and then waits for tasks, within ctx.
func shutdown(ctx context.Context, srv *http.Server, tasks *background.Handler) error {
	// Step 1: stop taking requests, and let the responses in flight finish.
	// Their tasks are queued by the time each handler returns. A response
	// not sent by the deadline (a client that sent nothing, or reads
	// nothing) acknowledged nothing: close its connection, and let the
	// tasks decide the result.
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
	}
	// Step 2: http.Server.Shutdown does not wait for the tasks' goroutines,
	// so wait for them here.
	if err := tasks.Shutdown(ctx); err != nil {
		return errors.New("tasks still running")
	}
	return nil
}

// console prints lines from a goroutine of its own, so that printing never
// blocks. A line that finds the queue full is skipped, and counted on the
// next line that gets through.
type console struct {
	lines   chan string // "" asks the printer to close flushed and stop
	skipped atomic.Int64
	flushed chan struct{}
}

func newConsole(w io.Writer) *console {
	c := &console{lines: make(chan string, 4096), flushed: make(chan struct{})}
	go func() {
		for line := range c.lines {
			if line == "" {
				close(c.flushed)
				return
			}
			if n := c.skipped.Swap(0); n > 0 {
				fmt.Fprintf(w, "(%d lines skipped: this output fell behind)\n", n)
			}
			io.WriteString(w, line)
		}
	}()
	return c
}

// print queues line, adding a newline, or skips it if the queue is full.
func (c *console) print(line string) { c.Write([]byte(line + "\n")) }

// Write queues p, or skips it if the queue is full. It makes c an io.Writer,
// for log.SetOutput.
func (c *console) Write(p []byte) (int, error) {
	if len(p) > 0 {
		select {
		case c.lines <- string(p):
		default:
			c.skipped.Add(1)
		}
	}
	return len(p), nil
}

// flush prints last after the lines already queued, waiting for room in the
// queue rather than skipping, then stops the printer once all are printed.
// It returns by deadline, printed or not.
func (c *console) flush(deadline time.Time, last ...string) {
	timeout := time.After(time.Until(deadline))
	for _, line := range last {
		select {
		case c.lines <- line + "\n":
		case <-timeout:
			return
		}
	}
	select {
	case c.lines <- "": // the printer closes flushed when it gets here
	case <-timeout:
		return
	}
	select {
	case <-c.flushed:
	case <-timeout:
	}
}
