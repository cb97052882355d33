package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"example.com/background"
)

// failSafe bounds every wait in these tests. Nothing should take more than a
// fraction of it; it only stops a broken build from hanging.
const failSafe = 30 * time.Second

// --- The handler, through httptest ---

// app is the program's handler with its log file in a temporary directory.
type app struct {
	tasks   *background.Handler
	logPath string
	console *console      // the tasks' stdout
	echo    overlapWriter // what the console writes to: passes writes on to stdout
	stdout  syncBuffer    // what the tasks print
}

func newApp(t *testing.T) *app {
	a := &app{logPath: filepath.Join(t.TempDir(), "log.txt")}
	a.echo.w = &a.stdout
	a.console = newConsole(&a.echo)
	a.tasks = background.NewHandler(routes(openTestLog(t, a.logPath, a.console), 0))
	return a
}

// openTestLog opens the log file at path, to be closed when the test ends.
func openTestLog(t *testing.T, path string, echo *console) *notificationLog {
	t.Helper()
	l, err := openLog(path, echo)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.file.Close() })
	return l
}

func (a *app) do(method, target string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	a.tasks.ServeHTTP(rec, httptest.NewRequest(method, target, nil))
	return rec
}

// finish waits for every task the requests queued, and for their lines to
// be printed.
func (a *app) finish(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), failSafe)
	defer cancel()
	if err := a.tasks.Shutdown(ctx); err != nil {
		t.Fatalf("tasks did not finish: %v", err)
	}
	a.console.flush(time.Now().Add(failSafe))
}

// logged returns the log file's content, or "" if there is no file.
func (a *app) logged(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(a.logPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return string(b)
}

func TestNotificationAnswersLikeTheTutorialAndLogsTheLine(t *testing.T) {
	a := newApp(t)
	rec := a.do("POST", "/send-notification/test@example.com")
	if rec.Code != http.StatusOK {
		t.Errorf("status = %d, want 200", rec.Code)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	if body := rec.Body.String(); body != `{"message":"Notification sent successfully!"}` {
		t.Errorf("body = %q", body)
	}
	a.finish(t)
	if got, want := a.logged(t), "Notification sent to: test@example.com\n"; got != want {
		t.Errorf("log file = %q, want %q", got, want)
	}
	if got, want := a.stdout.String(), "Log written: Notification sent to: test@example.com\n"; got != want {
		t.Errorf("stdout = %q, want %q", got, want)
	}
}

func TestLogFileIsAppendedToNotReplaced(t *testing.T) {
	a := newApp(t)
	const earlier = "Notification sent to: earlier@example.com\n"
	if err := os.WriteFile(a.logPath, []byte(earlier), 0o600); err != nil {
		t.Fatal(err)
	}
	a.do("POST", "/send-notification/test@example.com")
	a.finish(t)
	if got, want := a.logged(t), earlier+"Notification sent to: test@example.com\n"; got != want {
		t.Errorf("log file = %q, want %q", got, want)
	}
}

func TestInvalidEmailGets422AndWritesNothing(t *testing.T) {
	for _, tc := range []struct{ name, email, detail string }{
		{"newline", "evil%0AFAKE%20LINE", "U+000A"},
		{"carriage return", "evil@example.com%0D", "U+000D"},
		{"NUL", "evil%00@example.com", "U+0000"},
		{"line separator", "evil%E2%80%A8@example.com", "U+2028"},
		{"display name", "Joe%20%3Cjoe@example.com%3E", "no name"},
		{"angle brackets", "%3Cjoe@example.com%3E", "angle brackets"},
		{"comment", "joe@example.com%20(Joe)", "comments"},
		{"no at sign", "joe.example.com", "not a valid address"},
		{"empty", "", "empty"},
		{"over-long", strings.Repeat("a", 243) + "@example.com", "255 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newApp(t)
			rec := a.do("POST", "/send-notification/"+tc.email)
			if rec.Code != http.StatusUnprocessableEntity {
				t.Errorf("status = %d, want 422", rec.Code)
			}
			if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
			if body := rec.Body.String(); !strings.HasPrefix(body, `{"detail":"email `) || !strings.Contains(body, tc.detail) {
				t.Errorf("body = %s, want a detail that mentions %q", body, tc.detail)
			}
			a.finish(t)
			if got := a.logged(t); got != "" {
				t.Errorf("log file = %q, want nothing written", got)
			}
		})
	}
}

func TestLongestValidEmailIsAccepted(t *testing.T) {
	a := newApp(t)
	email := strings.Repeat("a", 242) + "@example.com" // 254 bytes
	if rec := a.do("POST", "/send-notification/"+email); rec.Code != http.StatusOK {
		t.Fatalf("status = %d, want 200: %s", rec.Code, rec.Body)
	}
	a.finish(t)
	if got, want := a.logged(t), "Notification sent to: "+email+"\n"; got != want {
		t.Errorf("log file = %q, want %q", got, want)
	}
}

func TestConcurrentTasksWriteWholeLinesOnce(t *testing.T) {
	a := newApp(t)
	const n = 64
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { a.do("POST", fmt.Sprintf("/send-notification/user%02d@example.com", i)) })
	}
	wg.Wait()
	a.finish(t)

	if a.echo.overlapped.Load() {
		t.Error("two lines printed to stdout at the same time")
	}
	for _, out := range []struct{ name, text string }{{"log file", a.logged(t)}, {"stdout", a.stdout.String()}} {
		name, text := out.name, out.text
		lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
		seen := make(map[string]int)
		for _, line := range lines {
			seen[line]++
		}
		for i := range n {
			line := fmt.Sprintf("Notification sent to: user%02d@example.com", i)
			if name == "stdout" {
				line = "Log written: " + line
			}
			if seen[line] != 1 {
				t.Errorf("%s has %q %d times, want once", name, line, seen[line])
			}
		}
		if len(lines) != n {
			t.Errorf("%s has %d lines, want %d:\n%s", name, len(lines), n, text)
		}
	}
}

func TestDelayEndsWhenTaskContextIsCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // as Shutdown does when its deadline passes
	done := make(chan error, 1)
	go func() { done <- sleep(ctx, time.Hour) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("sleep = %v, want context.Canceled", err)
		}
	case <-time.After(failSafe):
		t.Fatal("sleep went on after its context was canceled")
	}
}

func TestTaskCutOffByShutdownWritesNothing(t *testing.T) {
	logPath := filepath.Join(t.TempDir(), "log.txt")
	tasks := background.NewHandler(routes(openTestLog(t, logPath, newConsole(io.Discard)), time.Hour))
	tasks.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	tasks.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("POST", "/send-notification/test@example.com", nil))

	// The deadline leaves the task time to start its hour-long wait, so that
	// Shutdown cancels it mid-task; had it not started, it is dropped, and
	// must write nothing either.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := tasks.Shutdown(ctx); err == nil {
		t.Fatal("Shutdown returned nil while the task was still waiting")
	}
	ctx, cancel = context.WithTimeout(context.Background(), failSafe)
	defer cancel()
	// This one waits for the canceled task to return. It reports the first
	// one's error, since that one lost the task.
	if err := tasks.Shutdown(ctx); ctx.Err() != nil {
		t.Fatalf("the canceled task did not return: %v", err)
	}
	if b, err := os.ReadFile(logPath); err != nil || len(b) > 0 {
		t.Errorf("log file = %q (%v): a task cut off by Shutdown wrote its line", b, err)
	}
}

func TestLogFileThatCannotBeCreatedIsAnErrorAtOnce(t *testing.T) {
	_, err := openLog(filepath.Join(t.TempDir(), "missing", "log.txt"), newConsole(io.Discard))
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("openLog = %v, want an error saying the file cannot be created", err)
	}
}

// A stdout nobody reads fills up, and a print to it blocks. A console must
// not: a task that printed would wait, and hold up shutdown.
func TestConsoleThatCannotWriteBlocksNoCallerAndCountsWhatItSkipped(t *testing.T) {
	out := &gatedWriter{opened: make(chan struct{})}
	c := newConsole(out)
	printed := make(chan struct{})
	go func() {
		for range 2 * cap(c.lines) {
			c.print("Log written: Notification sent to: test@example.com")
		}
		close(printed)
	}()
	select {
	case <-printed:
	case <-time.After(failSafe):
		t.Fatal("print blocked while the console's output could not be written")
	}

	close(out.opened) // the reader is back
	c.flush(time.Now().Add(failSafe), "Every task finished.")
	if got := out.buf.String(); !strings.Contains(got, "lines skipped") || !strings.HasSuffix(got, "Every task finished.\n") {
		t.Errorf("the console printed %d bytes ending in %q; want a count of the lines skipped, then the last line", len(got), got[max(0, len(got)-200):])
	}
}

// gatedWriter's Write blocks until opened is closed.
type gatedWriter struct {
	opened chan struct{}
	buf    syncBuffer
}

func (w *gatedWriter) Write(p []byte) (int, error) {
	<-w.opened
	return w.buf.Write(p)
}

// syncBuffer is a bytes.Buffer that tasks may write to concurrently.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// overlapWriter records whether two Writes were ever in progress at once.
type overlapWriter struct {
	w          io.Writer
	writing    atomic.Int32
	overlapped atomic.Bool
}

func (o *overlapWriter) Write(p []byte) (int, error) {
	if o.writing.Add(1) > 1 {
		o.overlapped.Store(true)
	}
	defer o.writing.Add(-1)
	runtime.Gosched() // give another append the chance to overlap, were it allowed to
	return o.w.Write(p)
}

// --- The program, end to end ---

// process is a running notify binary.
type process struct {
	cmd    *exec.Cmd
	dir    string      // its working directory
	url    string      // where it listens
	stdout chan string // its output, line by line
	stderr chan string
	exited chan struct{} // closed once it has exited and its output is read

	stdoutPipe *os.File      // the read end of its stdout
	unread     chan struct{} // closed by stopReading
}

// maxLines is more lines than any test reads from a process, so that its
// output never blocks on a test that has stopped reading.
const maxLines = 10000

// start runs bin in a new temporary directory, on a free port, and waits
// until it is listening.
func start(t testing.TB, bin string, args ...string) *process {
	t.Helper()
	return startCmd(t, exec.Command(bin, append([]string{"-addr", "127.0.0.1:0"}, args...)...))
}

// startCmd is start for a command of the test's own making.
func startCmd(t testing.TB, cmd *exec.Cmd) *process {
	t.Helper()
	p := &process{
		cmd:    cmd,
		dir:    t.TempDir(),
		stdout: make(chan string, maxLines),
		stderr: make(chan string, maxLines),
		exited: make(chan struct{}),
		unread: make(chan struct{}),
	}
	// Its stdout is a pipe that the test may stop reading, as a stuck log
	// collector would.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p.stdoutPipe = r
	p.cmd.Dir = p.dir
	p.cmd.Stdout = w
	p.cmd.Stderr = &lineWriter{lines: p.stderr}
	err = p.cmd.Start()
	w.Close() // the process has its own copy
	if err != nil {
		t.Fatal(err)
	}
	stdoutRead := make(chan struct{})
	go func() {
		defer close(stdoutRead)
		defer close(p.stdout)
		lines := bufio.NewScanner(r)
		for lines.Scan() {
			select {
			case p.stdout <- lines.Text():
			case <-p.unread:
				return
			}
		}
	}()
	go func() {
		p.cmd.Wait() // returns once all of stderr has gone through lineWriter
		<-stdoutRead
		close(p.stderr)
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill() // if still running
		p.stopReading()
		r.Close()
		<-p.exited
	})

	line := p.expect(t, p.stdout, "Listening on ")
	addr, _, _ := strings.Cut(strings.TrimPrefix(line, "Listening on "), " ")
	p.url = addr
	return p
}

// expect reads lines from ch until one contains want, and returns it.
func (p *process) expect(t testing.TB, ch <-chan string, want string) string {
	t.Helper()
	timeout := time.After(failSafe)
	var seen []string
	for {
		select {
		case line, ok := <-ch:
			if !ok {
				t.Fatalf("notify exited before printing %q; it printed %q", want, seen)
			}
			if strings.Contains(line, want) {
				return line
			}
			seen = append(seen, line)
		case <-timeout:
			t.Fatalf("no line with %q; notify printed %q", want, seen)
		}
	}
}

// notify sends the tutorial's request and returns the response body.
func (p *process) notify(t *testing.T, email string) string {
	t.Helper()
	c := &http.Client{Timeout: failSafe}
	resp, err := c.Post(p.url+"/send-notification/"+email, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status = %d, want 200: %s", resp.StatusCode, body)
	}
	return string(body)
}

// stopReading stops reading the process's stdout, as a stuck log collector
// would: once the pipe is full, each of its writes to stdout blocks.
func (p *process) stopReading() {
	select {
	case <-p.unread:
	default:
		close(p.unread)
	}
}

// signal sends sig.
func (p *process) signal(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// stop sends sig and returns the exit code.
func (p *process) stop(t testing.TB, sig os.Signal) int {
	t.Helper()
	p.signal(t, sig)
	return p.wait(t)
}

// stopWith sends sig and fails the test unless the process then exits with
// code want.
func (p *process) stopWith(t testing.TB, sig os.Signal, want int) {
	t.Helper()
	if code := p.stop(t, sig); code != want {
		t.Errorf("exit code after %v = %d, want %d", sig, code, want)
	}
}

// wait waits for the process to exit, and returns its exit code.
func (p *process) wait(t testing.TB) int {
	t.Helper()
	select {
	case <-p.exited:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(failSafe):
		t.Fatal("notify did not exit")
		return -1
	}
}

// logged returns the content of the log file in the process's directory,
// or "" if there is no file.
func (p *process) logged(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(p.dir, "log.txt"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return string(b)
}

// runOnce runs bin with args, expecting it to exit on its own, and returns
// its output and exit code.
func runOnce(t *testing.T, bin string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), failSafe)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	}
	t.Fatal(err)
	return "", -1
}

// build builds the program into a temporary directory and returns its path.
func build(t testing.TB) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "notify")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// lineWriter passes each whole line written to it on to lines.
type lineWriter struct {
	lines   chan<- string
	partial []byte
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.partial = append(w.partial, b...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			return len(b), nil
		}
		w.lines <- string(w.partial[:i])
		w.partial = w.partial[i+1:]
	}
}

func TestProgramEndToEnd(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("sends SIGTERM")
	}
	bin := build(t)

	t.Run("curl flow writes the exact line", func(t *testing.T) {
		p := start(t, bin)
		if body := p.notify(t, "test@example.com"); body != `{"message":"Notification sent successfully!"}` {
			t.Errorf("body = %q", body)
		}
		p.expect(t, p.stdout, "Log written: Notification sent to: test@example.com")
		if got, want := p.logged(t), "Notification sent to: test@example.com\n"; got != want {
			t.Errorf("log.txt = %q, want %q", got, want)
		}
		p.stopWith(t, os.Interrupt, 0)
	})

	t.Run("response comes before a slow task, and SIGTERM waits for it", func(t *testing.T) {
		p := start(t, bin, "-delay", "1s")
		sent := time.Now()
		p.notify(t, "slow@example.com")
		answered := time.Since(sent)
		if got := p.logged(t); got != "" {
			t.Fatalf("log.txt = %q when the response arrives: the client waited for the task", got)
		}
		p.stopWith(t, syscall.SIGTERM, 0)
		t.Logf("response after %v, exit after %v", answered, time.Since(sent))
		if got, want := p.logged(t), "Notification sent to: slow@example.com\n"; got != want {
			t.Errorf("log.txt = %q, want %q", got, want)
		}
	})

	t.Run("tasks cut off by the drain deadline make it exit 1", func(t *testing.T) {
		p := start(t, bin, "-delay", "1h", "-drain", "100ms")
		p.notify(t, "never@example.com")
		p.stopWith(t, syscall.SIGTERM, 1)
		p.expect(t, p.stderr, "notify: tasks still running after 100ms; tasks lost unfinished: 1, failed: 0")
		if got := p.logged(t); got != "" {
			t.Errorf("log.txt = %q: the canceled task wrote its line", got)
		}
	})

	t.Run("defaults are the documented ones", func(t *testing.T) {
		out, _ := runOnce(t, bin, "-h")
		for _, want := range []string{`default "127.0.0.1:8000"`, `default "log.txt"`, "default 10s"} {
			if !strings.Contains(out, want) {
				t.Errorf("notify -h does not say %s:\n%s", want, out)
			}
		}
	})

	t.Run("bad flags are refused", func(t *testing.T) {
		for _, args := range [][]string{{"-delay", "-1s"}, {"-drain", "0s"}, {"-max-pending", "-1"}, {"-log", ""}, {"extra"}} {
			out, code := runOnce(t, bin, append([]string{"-addr", "127.0.0.1:0"}, args...)...)
			if code != 2 || !strings.HasPrefix(out, "notify: ") {
				t.Errorf("notify %q: exit code %d, output %q; want exit code 2 and a notify: line saying why", args, code, out)
			}
		}
	})

	t.Run("SIGTERM under load keeps one line for each 200 and no other", func(t *testing.T) {
		const requests, conns = 2000, 32
		p := start(t, bin, "-delay", "20ms")
		answered := make(map[string]bool) // the emails whose request got 200
		half := make(chan struct{})
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			sendAll(p, requests, conns, func(email string, resp *http.Response, err error) {
				// An error is a request refused once the server has stopped listening.
				if err == nil && resp.StatusCode == http.StatusOK {
					answered[email] = true
					if len(answered) == requests/2 {
						close(half)
					}
				}
			})
		}()
		select {
		case <-half:
		case <-time.After(failSafe):
			t.Fatal("half of the requests were not answered")
		}
		code := p.stop(t, syscall.SIGTERM)
		<-sent
		if code != 0 {
			t.Errorf("exit code = %d, want 0", code)
		}

		checkLines(t, p.logged(t), slices.Sorted(maps.Keys(answered)))
		t.Logf("%d of %d requests answered before the server stopped", len(answered), requests)
	})

	t.Run("at -max-pending, a flood gets 503s with Retry-After, and every 200 its line", func(t *testing.T) {
		const limit, requests, conns = 20, 1000, 16
		p := start(t, bin, "-delay", "1s", "-max-pending", fmt.Sprint(limit))
		var answered []string
		var refused int
		sendAll(p, requests, conns, func(email string, resp *http.Response, err error) {
			switch {
			case err != nil:
				t.Error(err)
			case resp.StatusCode == http.StatusOK:
				answered = append(answered, email)
			case resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") == "1":
				refused++
			default:
				t.Errorf("%s: Retry-After %q; want 200, or 503 with Retry-After 1", resp.Status, resp.Header.Get("Retry-After"))
			}
		})
		if refused == 0 {
			t.Errorf("none of %d requests refused: the limit of %d tasks pending was not kept", requests, limit)
		}
		p.stopWith(t, syscall.SIGTERM, 0)
		checkLines(t, p.logged(t), answered)
		t.Logf("%d answered, %d refused", len(answered), refused)
	})

	t.Run("a log file that cannot be opened stops it before it listens", func(t *testing.T) {
		out, code := runOnce(t, bin, "-addr", "127.0.0.1:0", "-log", filepath.Join(t.TempDir(), "missing", "log.txt"))
		if code != 1 || !strings.HasPrefix(out, "notify: cannot open the log file: ") || strings.Contains(out, "Listening") {
			t.Errorf("exit code %d, output %q; want exit code 1 and only a line saying why", code, out)
		}
	})

	t.Run("failed writes are counted in the last line, and it exits 1", func(t *testing.T) {
		if _, err := os.Stat("/dev/full"); err != nil {
			t.Skip("needs /dev/full, where every write fails")
		}
		p := start(t, bin, "-log", "/dev/full")
		p.notify(t, "first@example.com")
		p.notify(t, "second@example.com")
		p.stopWith(t, syscall.SIGTERM, 1)
		p.expect(t, p.stderr, "notify: tasks failed: 2 of 2; their lines are not in the log file")
	})

	t.Run("SIGHUP drains like SIGTERM", func(t *testing.T) {
		p := start(t, bin, "-delay", "100ms")
		p.notify(t, "hangup@example.com")
		p.stopWith(t, syscall.SIGHUP, 0)
		if got, want := p.logged(t), "Notification sent to: hangup@example.com\n"; got != want {
			t.Errorf("log.txt = %q, want %q", got, want)
		}
	})

	t.Run("a second signal during the drain exits at once, counting what it abandons", func(t *testing.T) {
		p := start(t, bin, "-delay", "1h", "-drain", "1h")
		for _, email := range []string{"a@example.com", "b@example.com", "c@example.com"} {
			p.notify(t, email)
		}
		p.signal(t, syscall.SIGTERM)
		p.expect(t, p.stdout, "Shutting down")
		p.stopWith(t, syscall.SIGTERM, 1)
		p.expect(t, p.stderr, "notify: second signal (terminated): exiting at once; acknowledged tasks abandoned: 3")
	})

	t.Run("a stdout nobody reads stalls neither the tasks nor SIGTERM", func(t *testing.T) {
		p := start(t, bin)
		p.stopReading()
		// More lines than the pipe and the console's queue hold together.
		emails := sendMany(t, p, 8000)
		p.stopWith(t, syscall.SIGTERM, 0)
		checkLines(t, p.logged(t), emails)
	})

	t.Run("a stdout nobody reads keeps the last line from stderr", func(t *testing.T) {
		p := start(t, bin, "-delay", "200ms", "-drain", "100ms")
		p.stopReading()
		sendMany(t, p, 8000) // their lines, printed as each task ends, fill the pipe
		sendMany(t, p, 1)    // a task still waiting when the drain's deadline passes
		p.stopWith(t, syscall.SIGTERM, 1)
		p.expect(t, p.stderr, "notify: tasks still running after 100ms")
	})

	t.Run("a client that never sends a request does not fail a clean shutdown", func(t *testing.T) {
		p := start(t, bin, "-drain", "1s")
		p.notify(t, "done@example.com")
		p.expect(t, p.stdout, "Log written: Notification sent to: done@example.com")
		silent, err := net.Dial("tcp", strings.TrimPrefix(p.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer silent.Close()
		p.stopWith(t, syscall.SIGTERM, 0)
		p.expect(t, p.stdout, "Every task finished.")
	})

	t.Run("a stdout whose reader has gone does not end it", func(t *testing.T) {
		p := start(t, bin)
		p.stopReading()
		p.stdoutPipe.Close() // writes to stdout now fail with EPIPE, and raise SIGPIPE
		emails := sendMany(t, p, 100)
		p.stopWith(t, syscall.SIGTERM, 0)
		checkLines(t, p.logged(t), emails)
	})

	t.Run("tasks write their lines though file descriptors have run out", func(t *testing.T) {
		// The shell sets a low limit, which Go's runtime cannot raise, and
		// runs notify with it. Idle connections then use up the rest.
		p := startCmd(t, exec.Command("sh", "-c", `ulimit -n 24 && exec "$0" "$@"`, bin, "-addr", "127.0.0.1:0"))
		client := &http.Client{Timeout: failSafe, Transport: &http.Transport{MaxConnsPerHost: 1}}
		defer client.CloseIdleConnections()
		post(t, client, p.url+"/send-notification/before@example.com")
		var idle []net.Conn
		defer func() {
			for _, c := range idle {
				c.Close()
			}
		}()
		for range 30 {
			c, err := net.Dial("tcp", strings.TrimPrefix(p.url, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			idle = append(idle, c)
		}
		p.expect(t, p.stderr, "too many open files")
		post(t, client, p.url+"/send-notification/after@example.com") // on the connection already open
		for _, c := range idle {
			c.Close()
		}
		idle = nil
		p.stopWith(t, syscall.SIGTERM, 0)
		checkLines(t, p.logged(t), []string{"before@example.com", "after@example.com"})
	})
}

// post sends a POST to url with c and fails the test unless it gets 200.
func post(t *testing.T, c *http.Client, url string) {
	t.Helper()
	resp, err := c.Post(url, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: %s", url, resp.Status)
	}
}

// sendAll sends requests notifications from conns clients at once, and
// passes each email with its response, or its error, to record, one call at
// a time. It returns once every request has been answered or has failed.
func sendAll(p *process, requests, conns int, record func(email string, resp *http.Response, err error)) {
	transport := &http.Transport{MaxConnsPerHost: conns, MaxIdleConnsPerHost: conns}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: failSafe}
	emails := make(chan string, requests)
	for i := range requests {
		emails <- fmt.Sprintf("user%04d@example.com", i)
	}
	close(emails)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() {
			for email := range emails {
				resp, err := client.Post(p.url+"/send-notification/"+email, "", nil)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				mu.Lock()
				record(email, resp, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

// sendMany sends n notifications, one after another over a keep-alive
// connection, and returns their emails.
func sendMany(t *testing.T, p *process, n int) []string {
	t.Helper()
	client := &http.Client{Timeout: failSafe, Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	var emails []string
	for i := range n {
		email := fmt.Sprintf("user%05d@example.com", i)
		post(t, client, p.url+"/send-notification/"+email)
		emails = append(emails, email)
	}
	return emails
}

// checkLines fails the test unless logged has exactly one line for each of
// emails, and no other line.
func checkLines(t *testing.T, logged string, emails []string) {
	t.Helper()
	seen := make(map[string]int)
	for _, email := range emails {
		seen[email] = 0
	}
	for line := range strings.Lines(logged) {
		email, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "Notification sent to: ")
		if _, answered := seen[email]; !ok || !answered {
			t.Errorf("log.txt has a line for no answered request: %q", line)
			continue
		}
		seen[email]++
	}
	var wrong []string
	for _, email := range emails {
		if seen[email] != 1 {
			wrong = append(wrong, fmt.Sprintf("%s: %d", email, seen[email]))
		}
	}
	if len(wrong) > 0 {
		t.Errorf("%d of %d answered requests have other than one line in log.txt; the first: %s", len(wrong), len(emails), wrong[0])
	}
}

// --- Benchmarks ---

// BenchmarkPendingTasks runs the program, floods it with b.N requests whose
// tasks wait, and reports what that costs, from /proc (so on Linux only):
//
//   - no-limit: memory per pending task, with -max-pending 0, and then how
//     long SIGTERM takes to exit past -drain, with b.N tasks pending;
//   - default-limit: the peak memory under a flood of 30 s tasks, and how
//     many requests the default -max-pending refused. Every 200's line is
//     either written or counted in the last line, or the benchmark fails.
//
// README's figures come from go test -run '^$' -bench PendingTasks
// -benchtime 250000x ./cmd/notify, with nothing else running.
func BenchmarkPendingTasks(b *testing.B) {
	if runtime.GOOS != "linux" {
		b.Skip("reads memory figures from /proc")
	}
	bin := build(b)
	const drain = 2 * time.Second

	b.Run("no-limit", func(b *testing.B) {
		p := start(b, bin, "-delay", "1h", "-drain", drain.String(), "-max-pending", "0")
		flood(b, p, 1000)
		before := p.memory(b, "VmRSS")
		ok, _ := flood(b, p, b.N)
		if ok != b.N {
			b.Fatalf("%d of %d requests answered 200; want all, with no limit", ok, b.N)
		}
		b.ReportMetric(float64(p.memory(b, "VmRSS")-before)/float64(b.N), "B/pending-task")
		b.ReportMetric(float64(p.memory(b, "VmRSS"))/1e6, "MB-RSS")

		signaled := time.Now()
		code := p.stop(b, syscall.SIGTERM)
		b.ReportMetric((time.Since(signaled) - drain).Seconds(), "s-exit-past-drain")
		if code != 1 {
			b.Errorf("exit code = %d; want 1, as every task was cut off", code)
		}
	})

	b.Run("default-limit", func(b *testing.B) {
		p := start(b, bin, "-delay", "30s", "-drain", drain.String())
		ok, refused := flood(b, p, b.N)
		b.ReportMetric(float64(p.memory(b, "VmHWM"))/1e6, "MB-peak-RSS")
		b.ReportMetric(float64(refused), "refused")
		p.stop(b, syscall.SIGTERM)
		lost := 0
		if ok > 0 {
			line := p.expect(b, p.stderr, "tasks lost unfinished: ")
			fmt.Sscanf(line[strings.Index(line, "unfinished: "):], "unfinished: %d", &lost)
		}
		if written := strings.Count(p.logged(b), "\n"); written+lost != ok {
			b.Errorf("%d answered 200, but %d lines written and %d counted as lost", ok, written, lost)
		}
	})
}

// flood sends n notifications over 64 keep-alive connections, at once, with
// a client light enough not to hide the server's cost, and returns how many
// were answered 200 and how many 503.
func flood(b *testing.B, p *process, n int) (ok, refused int) {
	b.Helper()
	const conns = 64
	var answered, unavailable atomic.Int64
	var next atomic.Int64
	var wg sync.WaitGroup
	for range conns {
		wg.Go(func() {
			conn, err := net.Dial("tcp", strings.TrimPrefix(p.url, "http://"))
			if err != nil {
				b.Error(err)
				return
			}
			defer conn.Close()
			r := bufio.NewReader(conn)
			for i := next.Add(1); i <= int64(n); i = next.Add(1) {
				fmt.Fprintf(conn, "POST /send-notification/user%d@example.com HTTP/1.1\r\nHost: notify\r\nContent-Length: 0\r\n\r\n", i)
				resp, err := http.ReadResponse(r, nil)
				if err != nil {
					b.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				switch resp.StatusCode {
				case http.StatusOK:
					answered.Add(1)
				case http.StatusServiceUnavailable:
					unavailable.Add(1)
				default:
					b.Errorf("status %s", resp.Status)
					return
				}
			}
		})
	}
	wg.Wait()
	return int(answered.Load()), int(unavailable.Load())
}

// memory returns a figure from /proc/PID/status, in bytes: VmRSS, the
// memory the process holds now, or VmHWM, the most it has held.
func (p *process) memory(b *testing.B, field string) int {
	b.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			var kB int
			fmt.Sscanf(strings.TrimSpace(rest), "%d kB", &kB)
			return kB << 10
		}
	}
	b.Fatalf("no %s in /proc/%d/status", field, p.cmd.Process.Pid)
	return 0
}
