package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
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
	stdout  syncBuffer    // what the tasks print
	echo    overlapWriter // the tasks' stdout: passes writes on to stdout
}

func newApp(t *testing.T) *app {
	a := &app{logPath: filepath.Join(t.TempDir(), "log.txt")}
	a.echo.w = &a.stdout
	a.tasks = background.NewHandler(routes(&notificationLog{path: a.logPath, stdout: &a.echo}, 0))
	return a
}

func (a *app) do(method, target string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	a.tasks.ServeHTTP(rec, httptest.NewRequest(method, target, nil))
	return rec
}

// finish waits for every task the requests queued.
func (a *app) finish(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), failSafe)
	defer cancel()
	if err := a.tasks.Shutdown(ctx); err != nil {
		t.Fatalf("tasks did not finish: %v", err)
	}
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
		t.Error("two appends echoed to stdout at the same time: appends are not serialized")
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
	tasks := background.NewHandler(routes(&notificationLog{path: logPath, stdout: io.Discard}, time.Hour))
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
	if b, err := os.ReadFile(logPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("log file = %q (%v): a task cut off by Shutdown wrote its line", b, err)
	}
}

func TestUnwritableLogFileMakesTheTaskFail(t *testing.T) {
	l := &notificationLog{path: filepath.Join(t.TempDir(), "missing", "log.txt"), stdout: io.Discard}
	if err := l.append("Notification sent to: test@example.com"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("append = %v, want an error saying the file cannot be created", err)
	}
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
}

// maxLines is more lines than any test reads from a process, so that its
// output never blocks on a test that has stopped reading.
const maxLines = 10000

// start runs bin in a new temporary directory, on a free port, and waits
// until it is listening.
func start(t *testing.T, bin string, args ...string) *process {
	t.Helper()
	p := &process{
		dir:    t.TempDir(),
		stdout: make(chan string, maxLines),
		stderr: make(chan string, maxLines),
		exited: make(chan struct{}),
	}
	p.cmd = exec.Command(bin, append([]string{"-addr", "127.0.0.1:0"}, args...)...)
	p.cmd.Dir = p.dir
	p.cmd.Stdout = &lineWriter{lines: p.stdout}
	p.cmd.Stderr = &lineWriter{lines: p.stderr}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait() // returns once all output has gone through lineWriter
		close(p.stdout)
		close(p.stderr)
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill() // if still running
		<-p.exited
	})

	line := p.expect(t, p.stdout, "Listening on ")
	addr, _, _ := strings.Cut(strings.TrimPrefix(line, "Listening on "), " ")
	p.url = addr
	return p
}

// expect reads lines from ch until one contains want, and returns it.
func (p *process) expect(t *testing.T, ch <-chan string, want string) string {
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

// stop sends sig and returns the exit code.
func (p *process) stop(t *testing.T, sig os.Signal) int {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(failSafe):
		t.Fatalf("notify did not exit after %v", sig)
		return -1
	}
}

// logged returns the content of the log file in the process's directory,
// or "" if there is no file.
func (p *process) logged(t *testing.T) string {
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
	bin := filepath.Join(t.TempDir(), "notify")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	t.Run("curl flow writes the exact line", func(t *testing.T) {
		p := start(t, bin)
		if body := p.notify(t, "test@example.com"); body != `{"message":"Notification sent successfully!"}` {
			t.Errorf("body = %q", body)
		}
		p.expect(t, p.stdout, "Log written: Notification sent to: test@example.com")
		if got, want := p.logged(t), "Notification sent to: test@example.com\n"; got != want {
			t.Errorf("log.txt = %q, want %q", got, want)
		}
		if code := p.stop(t, os.Interrupt); code != 0 {
			t.Errorf("exit code after Ctrl-C = %d, want 0", code)
		}
	})

	t.Run("response comes before a slow task, and SIGTERM waits for it", func(t *testing.T) {
		p := start(t, bin, "-delay", "1s")
		sent := time.Now()
		p.notify(t, "slow@example.com")
		answered := time.Since(sent)
		if got := p.logged(t); got != "" {
			t.Fatalf("log.txt = %q when the response arrives: the client waited for the task", got)
		}
		if code := p.stop(t, syscall.SIGTERM); code != 0 {
			t.Errorf("exit code = %d, want 0", code)
		}
		t.Logf("response after %v, exit after %v", answered, time.Since(sent))
		if got, want := p.logged(t), "Notification sent to: slow@example.com\n"; got != want {
			t.Errorf("log.txt = %q, want %q", got, want)
		}
	})

	t.Run("tasks cut off by the drain deadline make it exit 1", func(t *testing.T) {
		p := start(t, bin, "-delay", "1h", "-drain", "100ms")
		p.notify(t, "never@example.com")
		if code := p.stop(t, syscall.SIGTERM); code != 1 {
			t.Errorf("exit code = %d, want 1", code)
		}
		p.expect(t, p.stderr, "tasks still unfinished after 100ms")
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
		for _, args := range [][]string{{"-delay", "-1s"}, {"-drain", "0s"}, {"-log", ""}, {"extra"}} {
			out, code := runOnce(t, bin, append([]string{"-addr", "127.0.0.1:0"}, args...)...)
			if code != 2 || !strings.HasPrefix(out, "notify: ") {
				t.Errorf("notify %q: exit code %d, output %q; want exit code 2 and a notify: line saying why", args, code, out)
			}
		}
	})

	t.Run("SIGTERM under load keeps one line for each 200 and no other", func(t *testing.T) {
		const requests, conns = 2000, 32
		p := start(t, bin, "-delay", "20ms")
		transport := &http.Transport{MaxConnsPerHost: conns, MaxIdleConnsPerHost: conns}
		defer transport.CloseIdleConnections()
		client := &http.Client{Transport: transport, Timeout: failSafe}

		emails := make(chan string, requests)
		for i := range requests {
			emails <- fmt.Sprintf("user%04d@example.com", i)
		}
		close(emails)
		var mu sync.Mutex
		answered := make(map[string]bool) // the emails whose request got 200
		half := make(chan struct{})
		var wg sync.WaitGroup
		for range conns {
			wg.Go(func() {
				for email := range emails {
					resp, err := client.Post(p.url+"/send-notification/"+email, "", nil)
					if err != nil {
						continue // refused, once the server has stopped listening
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						continue
					}
					mu.Lock()
					answered[email] = true
					if len(answered) == requests/2 {
						close(half)
					}
					mu.Unlock()
				}
			})
		}
		select {
		case <-half:
		case <-time.After(failSafe):
			t.Fatal("half of the requests were not answered")
		}
		code := p.stop(t, syscall.SIGTERM)
		wg.Wait()
		if code != 0 {
			t.Errorf("exit code = %d, want 0", code)
		}

		lines := strings.Split(strings.TrimSuffix(p.logged(t), "\n"), "\n")
		seen := make(map[string]int)
		for _, line := range lines {
			email, ok := strings.CutPrefix(line, "Notification sent to: ")
			if !ok || !answered[email] {
				t.Errorf("log.txt has a line for no answered request: %q", line)
			}
			seen[email]++
		}
		for _, email := range slices.Sorted(maps.Keys(answered)) {
			if seen[email] != 1 {
				t.Errorf("%s got 200 and has %d lines, want 1", email, seen[email])
			}
		}
		t.Logf("%d of %d requests answered before the server stopped; %d lines", len(answered), requests, len(lines))
	})

	t.Run("unwritable log file keeps the server answering", func(t *testing.T) {
		p := start(t, bin, "-log", filepath.Join("missing", "log.txt"))
		p.notify(t, "first@example.com")
		p.expect(t, p.stderr, "background: task failed")
		p.notify(t, "second@example.com")
		p.expect(t, p.stderr, "background: task failed")
		if code := p.stop(t, syscall.SIGTERM); code != 0 {
			t.Errorf("exit code = %d, want 0: the failed tasks did finish", code)
		}
	})
}
