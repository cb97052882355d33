// Command notify is the FastAPI background-tasks tutorial in Go. It answers
// POST /send-notification/{email} at once and then, in a background task,
// appends "Notification sent to: EMAIL" to a log file.
//
//	go run ./cmd/notify
//	curl -X POST http://127.0.0.1:8000/send-notification/test@example.com
//
// Run it with -delay 2s to see that the client does not wait for the task;
// -h lists the flags. On SIGINT or SIGTERM it stops taking requests, runs the
// tasks already queued, and exits 0 if they all finished in time.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/mail"
	"os"
	"os/signal"
	"sync"
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
		background.FromContext(r.Context()).Add(func(ctx context.Context) error {
			if err := sleep(ctx, delay); err != nil {
				return err
			}
			return logFile.append(line)
		})
		writeJSON(w, http.StatusOK, "message", "Notification sent successfully!")
	}
}

// notificationLog appends lines to a file and echoes each to stdout.
type notificationLog struct {
	path   string
	stdout io.Writer

	mu sync.Mutex // serializes appends, so that concurrent tasks write whole lines
}

// append adds line to the file. The file is opened for each line, as the
// tutorial's write_log does, so that it may be moved or deleted meanwhile.
func (l *notificationLog) append(line string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString(line + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	fmt.Fprintln(l.stdout, "Log written:", line)
	return nil
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

// The rest is the server around the endpoint: flags, routes, timeouts, and
// the two-step shutdown.

func main() {
	addr := flag.String("addr", "127.0.0.1:8000", "address to listen on")
	logPath := flag.String("log", "log.txt", "file the notifications are appended to")
	delay := flag.Duration("delay", 0, "how long each task waits before writing, like a slow mail server")
	drain := flag.Duration("drain", 10*time.Second, "how long shutdown waits for responses and tasks")
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
	}
	if bad != "" {
		fmt.Fprintln(os.Stderr, "notify:", bad)
		flag.Usage()
		os.Exit(2)
	}

	logFile := &notificationLog{path: *logPath, stdout: os.Stdout}
	tasks := background.NewHandler(routes(logFile, *delay))
	if err := serve(newServer(tasks), tasks, *addr, *drain); err != nil {
		fmt.Fprintln(os.Stderr, "notify:", err)
		os.Exit(1)
	}
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

// serve serves on addr until SIGINT or SIGTERM, then shuts down in two steps
// within drain. It returns an error if it could not listen, or if shutdown's
// deadline cut off responses or tasks.
func serve(srv *http.Server, tasks *background.Handler, addr string, drain time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	fmt.Printf("Listening on http://%s (Ctrl-C to stop)\n", ln.Addr())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	stop() // a second Ctrl-C kills the process at once

	fmt.Printf("Shutting down: finishing responses and tasks (up to %v)\n", drain)
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	// Step 1: stop taking requests, and let the responses in flight finish.
	// Their tasks are queued by the time each handler returns.
	if err := srv.Shutdown(ctx); err != nil {
		tasks.Shutdown(ctx) // ctx has ended: this drops the queued tasks, with a log line
		return fmt.Errorf("responses still in flight after %v: %w", drain, err)
	}
	// Step 2: http.Server.Shutdown does not wait for the tasks' goroutines,
	// so wait for them here.
	if err := tasks.Shutdown(ctx); err != nil {
		return fmt.Errorf("tasks still unfinished after %v, so they were lost: %w", drain, err)
	}
	fmt.Println("Every task finished.")
	return nil
}
