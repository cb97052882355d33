// Command notify is the FastAPI background-tasks tutorial in Go: POST
// /send-notification/{email} answers at once, and a task appends a line to a
// log file. On a signal or a serving error it runs the queued tasks, and exits
// 0 only if a signal stopped it and each wrote its line; else its last line says why.
package main

import (
	"cmp"
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
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"example.com/background"
)

// sendNotification is the tutorial's endpoint, for an email acceptEmail has
// checked. It answers at once; its task writes the line after the response.
func sendNotification(logFile *notificationLog, delay time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		message := "Notification sent to: " + r.PathValue("email")
		background.FromContext(r.Context()).Add(func(ctx context.Context) error {
			select {
			case <-time.After(delay): // -delay: like a slow mail server
			case <-ctx.Done(): // Shutdown ran out of time
				return ctx.Err()
			}
			return logFile.writeLog(message)
		})
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"message":"Notification sent successfully!"}`)
	}
}

// writeLog is the tutorial's write_log: it appends message as a line, and prints it.
func (l *notificationLog) writeLog(message string) error {
	if err := l.append(message + "\n"); err != nil {
		return err
	}
	fmt.Println("Log written:", message)
	return nil
}

// The rest is plumbing: the log file, the email check, and the server.

// notificationLog appends lines to the file at path, and counts them.
type notificationLog struct {
	path            string
	queued, written atomic.Int64 // lines acknowledged to a client, and lines in the file
	closed          atomic.Bool  // by close, so that no line lands after the count
	mu              sync.Mutex   // held by append throughout; guards file
	file            *os.File
}

// append writes line at the end of the file that path names, in one write.
func (l *notificationLog) append(line string) error {
	l.mu.Lock() // one append at a time, as the kernel does for one file anyway
	defer l.mu.Unlock()
	if l.closed.Load() {
		return errors.New("not written: the program is exiting")
	}
	if err := l.follow(); err != nil {
		return err
	}
	end, err := l.file.Seek(0, io.SeekEnd)
	if err == nil {
		_, err = l.file.WriteString(line)
	}
	if err != nil {
		// A disk that filled mid-line keeps part of it. Cut it off at end, where
		// O_APPEND began it, or the next line would be glued on.
		l.file.Truncate(end)
		return err
	}
	l.written.Add(1)
	return nil
}

// follow opens the file at l.path at first (the nil l.file's Stat fails), and
// again once it was rotated or deleted. Kept open, it needs no fd per line.
func (l *notificationLog) follow() error {
	atPath, err := os.Stat(l.path)
	if open, _ := l.file.Stat(); err == nil && os.SameFile(atPath, open) {
		return nil
	}
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	l.file.Close() // nil the first time, which Close allows
	l.file = f
	return nil
}

// close stops all appends, and counts the acknowledged lines not in the file.
// An append in progress gets a second; one stuck longer counts as not written.
func (l *notificationLog) close() (lost int64) {
	l.closed.Store(true) // an append that takes l.mu from now on writes nothing
	appended := make(chan struct{})
	go func() { l.mu.Lock(); l.mu.Unlock(); close(appended) }()
	select {
	case <-appended:
	case <-time.After(time.Second):
	}
	return l.queued.Load() - l.written.Load()
}

// acceptEmail answers 422 unless the email is a bare address, as FastAPI checks
// parameters first. Otherwise it counts the line that next acknowledges.
func acceptEmail(l *notificationLog, next http.Handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := checkEmail(r.PathValue("email")); err != nil {
			detail, _ := json.Marshal(map[string]string{"detail": err.Error()})
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnprocessableEntity)
			w.Write(detail)
			return
		}
		l.queued.Add(1)
		next.ServeHTTP(w, r)
	}
}

// checkEmail accepts a bare address. In the log, a newline would forge a line,
// and a blank-looking character would fool a reader that splits on spaces.
func checkEmail(email string) error {
	for i, r := range email {
		// Hangul fillers, blank braille, and U+FFFD, which stands in for invalid UTF-8:
		if !unicode.IsGraphic(r) || unicode.IsSpace(r) || strings.ContainsRune("\u115F\u1160\u3164\uFFA0\u2800\uFFFD", r) {
			return fmt.Errorf("email contains a space, control or invisible character, %U, at byte %d", r, i)
		}
	}
	if addr, err := mail.ParseAddress(email); err != nil || addr.Name != "" || addr.Address != email || len(email) > 254 {
		return errors.New("email must be a bare address of at most 254 bytes, such as ada@example.com")
	}
	return nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8000", "address to listen on")
	path := flag.String("log", "log.txt", "file the notifications are appended to")
	delay := flag.Duration("delay", 0, "how long each task waits before writing, like a slow mail server")
	drain := flag.Duration("drain", 10*time.Second, "how long shutdown waits for responses and tasks")
	maxPending := flag.Int("max-pending", 40_000, "tasks pending at most; past it, requests get 503 (0: no limit)")
	flag.Parse()
	if flag.NArg() > 0 || *path == "" || *delay < 0 || *drain <= 0 || *maxPending < 0 {
		flag.Usage()
		exit(2, "notify: -log must name a file, -drain must be positive, -delay and -max-pending must not be negative, and no argument may follow the flags")
	}
	signal.Ignore(syscall.SIGPIPE) // a stdout whose reader has gone must not end the process
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	logFile := &notificationLog{path: *path}
	ln, err := net.Listen("tcp", *addr)
	if err == nil {
		err = logFile.follow() // before serving, so that a bad path stops it at once
	}
	if err == nil {
		mux := http.NewServeMux()
		mux.Handle("POST /send-notification/{email}", acceptEmail(logFile, sendNotification(logFile, *delay)))
		tasks := background.NewHandler(mux)
		tasks.MaxPending = *maxPending
		err = serve(ln, signals, tasks, logFile, *drain)
	}
	if err != nil {
		exit(1, "notify: "+err.Error())
	}
	exit(0, "Every task finished.")
}

// exit prints last, and exits with code: within a second if nobody reads stderr.
func exit(code int, last string) {
	log.SetOutput(io.Discard) // where background's and net/http's lines go: none may follow the last
	go func() { fmt.Fprintln(os.Stderr, last); os.Exit(code) }()
	time.Sleep(time.Second)
	os.Exit(code)
}

// serve serves on ln until a signal or an error, and shuts down in two steps
// within drain. It returns nil only if every acknowledged line is written.
func serve(ln net.Listener, signals <-chan os.Signal, tasks *background.Handler, logFile *notificationLog, drain time.Duration) error {
	srv := &http.Server{
		Handler:           tasks,
		ReadHeaderTimeout: 5 * time.Second, // so that no slow or idle client holds a connection
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second, // the response only: tasks run after it
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    8 << 10, // net/http's 1 MB would let 2,000 clients hold 2 GB
	}
	fmt.Fprintf(os.Stderr, "Listening on http://%s (Ctrl-C to stop)\n", ln.Addr())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	var err error
	select {
	case err = <-served: // accept failed: drain and count all the same
	case <-signals:
	}
	go func() { // a second signal exits at once
		sig := <-signals
		exit(1, fmt.Sprintf("notify: second signal (%v): exiting at once; acknowledged lines not in the log file: %d", sig, logFile.close()))
	}()
	fmt.Fprintf(os.Stderr, "Shutting down: finishing responses and tasks, %d pending (up to %v)\n", tasks.Pending(), drain)
	ctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	// Step 1: stop taking requests; finish the responses in flight, or cut them off.
	if srv.Shutdown(ctx) != nil {
		srv.Close()
	}
	if tasks.Shutdown(ctx) != nil && err == nil { // Step 2, which srv.Shutdown does not do: wait for the tasks.
		err = fmt.Errorf("tasks still running after %v", drain)
	}
	if lost := logFile.close(); err != nil || lost > 0 {
		return fmt.Errorf("%w; acknowledged lines not in the log file: %d", cmp.Or(err, errors.New("writes failed")), lost)
	}
	return nil
}
