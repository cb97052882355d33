package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode"

	"example.com/background"
)

// failSafe bounds every wait, only so that a broken build cannot hang.
const failSafe = 30 * time.Second

// newHandler returns the program's endpoint as main builds it, for the tests
// in process, with a log file in a temporary directory.
func newHandler(t *testing.T, delay time.Duration) (*background.Handler, *notificationLog) {
	l := &notificationLog{path: filepath.Join(t.TempDir(), "log.txt")}
	t.Cleanup(func() { l.file.Close() })
	mux := http.NewServeMux()
	mux.Handle("POST /send-notification/{email}", acceptEmail(l, sendNotification(l, delay)))
	return background.NewHandler(mux), l
}

// read returns the content of the file at path, or "" if it cannot.
func read(path string) string { b, _ := os.ReadFile(path); return string(b) }
func TestEndpointAnswersLikeTheTutorialOrWith422AndAnInvalidEmailQueuesNothing(t *testing.T) {
	invalid := []string{"Joe <joe@example.com>", "<joe@example.com>", "joe@example.com (Joe)", "joe.example.com",
		"a\xffb@example.com", strings.Repeat("a", 243) + "@example.com"} // invalid UTF-8; 255 bytes
	for r := range rune(unicode.MaxRune) { // every space, control and format character, and the blank-looking
		if unicode.In(r, unicode.Zs, unicode.Cc, unicode.Cf) || unicode.IsSpace(r) || strings.ContainsRune("\u115F\u1160\u3164\uFFA0\u2800\uFFFD", r) {
			invalid = append(invalid, "a"+string(r)+"b@example.com")
		}
	}
	h, l := newHandler(t, 0)
	valid := strings.Repeat("a", 242) + "@example.com" // 254 bytes
	for _, email := range append(invalid, valid) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", "/send-notification/"+url.PathEscape(email), nil))
		code, body := 422, `{"detail":"email `
		if email == valid {
			code, body = 200, `{"message":"Notification sent successfully!"}`
		}
		if rec.Code != code || !strings.HasPrefix(rec.Body.String(), body) || rec.Header().Get("Content-Type") != "application/json" {
			t.Errorf("%+q: %d %s; want %d %s", email, rec.Code, rec.Body, code, body)
		}
	}
	h.Shutdown(context.Background()) // waits for the task
	if got := read(l.path); got != "Notification sent to: "+valid+"\n" || l.close() != 0 {
		t.Errorf("log file = %q, and %d lines lost; want the valid email's line alone", got, l.close())
	}
}

// A listener that Serve cannot accept from ends serving as a signal does.
func TestServeErrorDrainsAndCountsLikeASignal(t *testing.T) {
	h, l := newHandler(t, 200*time.Millisecond)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		(&process{addr: ln.Addr().String()}).flood(t, 1, 1)
		ln.Close() // Accept now fails with an error that Serve does not retry
	}()
	err = serve(ln, nil, h, l, failSafe)
	if want := "use of closed network connection; acknowledged lines not in the log file: 0"; err == nil || !strings.HasSuffix(err.Error(), want) {
		t.Errorf("serve = %v, want an error ending %q", err, want)
	}
	if got := read(l.path); got != "Notification sent to: user1@example.com\n" {
		t.Errorf("log file = %q when serve returned: it did not wait for the task", got)
	}
	if l.append("late\n") == nil {
		t.Error("a line was written after the count")
	}
}

var bin string // the notify binary, which TestMain builds for the tests end to end

func TestMain(m *testing.M) {
	dir, _ := os.MkdirTemp("", "notify")
	bin = filepath.Join(dir, "notify")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		log.Fatalf("go build: %v\n%s", err, out)
	}
	flag.Set("test.parallel", "8") // these tests mostly wait on the program, not on a core; -parallel still wins
	defer os.RemoveAll(dir)
	m.Run() // whose result go test exits with, once TestMain returns
}

// process is a running notify binary, in a directory of its own.
type process struct {
	cmd            *exec.Cmd
	dir, addr      string
	stdout, stderr chan string // its output, line by line
	exited         chan struct{}
	sent           atomic.Int64 // requests flood has sent, which number their emails
}

// start runs notify with args on a free port, after the shell command setup
// (a ulimit) if any, and waits until it listens. Its stdout is "read", or
// "unread" as by a stuck log collector (writes block), or "closed" (they fail).
func start(t testing.TB, setup, stdout string, args ...string) *process {
	t.Helper()
	p := &process{dir: t.TempDir(), stdout: make(chan string, 100_000), stderr: make(chan string, 100_000), exited: make(chan struct{})}
	args = append([]string{"-addr", "127.0.0.1:0"}, args...)
	p.cmd = exec.Command("sh", append([]string{"-c", setup + "\nexec \"$0\" \"$@\"", bin}, args...)...)
	p.cmd.Dir = p.dir
	outR, _ := p.cmd.StdoutPipe()
	errR, _ := p.cmd.StderrPipe()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	scan := func(r io.Reader, lines chan<- string) {
		defer close(lines)
		for s := bufio.NewScanner(r); s.Scan(); {
			lines <- s.Text()
		}
	}
	var scanned sync.WaitGroup
	scanned.Go(func() { scan(errR, p.stderr) })
	if stdout == "read" {
		scanned.Go(func() { scan(outR, p.stdout) })
	} else if stdout == "closed" {
		outR.Close()
	}
	go func() {
		scanned.Wait() // until the process has exited, as Wait closes the pipes
		p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() { p.cmd.Process.Kill(); <-p.exited })
	p.addr = strings.TrimPrefix(strings.Fields(p.expect(t, p.stderr, "Listening on "))[2], "http://")
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
				t.Fatalf("notify closed its output before a line with %q; it printed %q", want, seen)
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

// stop sends sig, fails the test unless the process then exits with code,
// and returns its last line.
func (p *process) stop(t testing.TB, sig os.Signal, code int) (last string) {
	t.Helper()
	p.cmd.Process.Signal(sig)
	select {
	case <-p.exited:
	case <-time.After(failSafe):
		t.Fatalf("notify did not exit after %v", sig)
	}
	if got := p.cmd.ProcessState.ExitCode(); got != code {
		t.Errorf("exit code after %v = %d, want %d", sig, got, code)
	}
	for line := range p.stderr {
		last = line
	}
	return last
}

// dial connects to the process until the test ends. Any goroutine may call it.
func (p *process) dial(t testing.TB) net.Conn {
	conn, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Error(err)
		conn, _ = net.Pipe()
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// flood sends n requests over conns keep-alive connections, until the server
// stops. It returns the emails answered 200, and the count of 503s.
func (p *process) flood(t testing.TB, n, conns int) (ok []string, refused int) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	last := p.sent.Load() + int64(n)
	for range conns {
		wg.Go(func() {
			conn := p.dial(t)
			r := bufio.NewReader(conn)
			for i := p.sent.Add(1); i <= last; i = p.sent.Add(1) {
				email := fmt.Sprintf("user%d@example.com", i)
				fmt.Fprintf(conn, "POST /send-notification/%s HTTP/1.1\r\nHost: notify\r\n\r\n", email)
				resp, err := http.ReadResponse(r, nil)
				if err != nil {
					return // the server has stopped
				}
				io.Copy(io.Discard, resp.Body)
				mu.Lock()
				if resp.StatusCode == 200 {
					ok = append(ok, email)
				} else if resp.StatusCode == 503 && resp.Header.Get("Retry-After") == "1" {
					refused++
				} else {
					t.Errorf("%s, Retry-After %q; want 200, or 503 with Retry-After 1", resp.Status, resp.Header.Get("Retry-After"))
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return ok, refused
}

// checkLines fails the test unless the log files hold one whole line for each
// email answered 200, but for those the last line counts, and no other line.
func (p *process) checkLines(t testing.TB, answered []string, last string) {
	t.Helper()
	lost := 0 // unless last ends with a count
	fmt.Sscan(last[strings.LastIndex(last, " ")+1:], &lost)
	files, _ := filepath.Glob(filepath.Join(p.dir, "log.txt*"))
	seen := make(map[string]int)
	for _, file := range files {
		for line := range strings.Lines(read(file)) {
			seen[line]++ // a part line has no "\n", and so matches no email
		}
	}
	missing := 0
	for _, email := range answered {
		line := "Notification sent to: " + email + "\n"
		missing += max(0, 1-seen[line])
		seen[line] -= min(1, seen[line])
	}
	if maps.DeleteFunc(seen, func(_ string, n int) bool { return n == 0 }); len(seen) > 0 || missing != lost {
		t.Errorf("of %d answered 200, %d have no line, and %q counts %d; other lines: %q", len(answered), missing, last, lost, seen)
	}
}

func TestProgramFollowsTheTutorialAndDrainsOnEveryStopSignal(t *testing.T) {
	t.Parallel()
	for _, sig := range []os.Signal{os.Interrupt, syscall.SIGTERM, syscall.SIGHUP} {
		t.Run(sig.String(), func(t *testing.T) {
			t.Parallel()
			p := start(t, "", "read", "-delay", "100ms", "-drain", "200ms")
			ok, _ := p.flood(t, 1, 1) // answered before the task's delay ends
			p.dial(t)                 // a client that sends nothing must not fail a clean shutdown
			if last := p.stop(t, sig, 0); last != "Every task finished." {
				t.Errorf("last line %q", last)
			}
			p.expect(t, p.stdout, "Log written: Notification sent to: user1@example.com")
			p.checkLines(t, ok, "")
		})
	}
}

func TestBadFlagsOrLogPathStopItBeforeServing(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), failSafe)
	defer cancel()
	for _, args := range [][]string{{"-delay", "-1s"}, {"-drain", "0s"}, {"-max-pending", "-1"}, {"-log", ""}, {"extra"}, {"-log", "no/such/dir/log.txt"}} {
		out, err := exec.CommandContext(ctx, bin, append([]string{"-addr", "127.0.0.1:0"}, args...)...).CombinedOutput()
		if last := strings.TrimSpace(string(out)); err == nil || !strings.HasPrefix(last[strings.LastIndex(last, "\n")+1:], "notify: ") || strings.Contains(last, "Listening") {
			t.Errorf("notify %q: %v, output %q; want a non-zero exit, with a last line saying why", args, err, out)
		}
	}
}

// However a flood is stopped, each 200 has its line, or the last line counts it.
func TestFloodStoppedAnyWayKeepsALineOrACountForEach200(t *testing.T) {
	t.Parallel()
	for _, stop := range []struct {
		name, delay, drain, last string
		second                   os.Signal // signal 0 is none
		code                     int
	}{
		{"SIGTERM", "200ms", "1h", "Every task finished.", syscall.Signal(0), 0},
		{"drain deadline", "1s", "10ms", "notify: tasks still running after 10ms; ", syscall.Signal(0), 1}, // 1s: a loaded machine may starve the flood for 200 ms
		{"second signal", "200ms", "1h", "notify: second signal (terminated): exiting at once; ", syscall.SIGTERM, 1},
	} {
		t.Run(stop.name, func(t *testing.T) {
			t.Parallel()
			p := start(t, "", "read", "-delay", stop.delay, "-drain", stop.drain)
			var ok []string
			flooded := make(chan struct{})
			go func() { ok, _ = p.flood(t, 1_000_000, 16); close(flooded) }()
			for range 200 { // lines, so that tasks end while those of the last -delay wait
				<-p.stdout
			}
			if stop.second == syscall.SIGTERM {
				p.dial(t) // sends nothing, and holds srv.Shutdown for seconds: the drain outlasts any delay here
			}
			p.cmd.Process.Signal(syscall.SIGTERM)
			p.expect(t, p.stderr, "Shutting down") // two signals sent at once may arrive as one
			last := p.stop(t, stop.second, stop.code)
			if <-flooded; !strings.HasPrefix(last, stop.last) {
				t.Errorf("last line %q, want %q", last, stop.last)
			}
			p.checkLines(t, ok, last)
		})
	}
}

func TestRequestsPastMaxPendingGet503WithRetryAfter(t *testing.T) {
	t.Parallel()
	p := start(t, "", "read", "-delay", "1h", "-max-pending", "1", "-drain", "10ms")
	ok, refused := p.flood(t, 3, 1) // flood fails the test on a 503 without Retry-After: 1
	if len(ok) != 1 || refused != 2 {
		t.Errorf("%d answered 200 and %d refused; want 1 and 2, at -max-pending 1", len(ok), refused)
	}
	p.checkLines(t, ok, p.stop(t, syscall.SIGTERM, 1))
}

// A stdout nobody reads holds up tasks only once they have written their lines.
func TestStdoutNobodyReadsCostsNoLine(t *testing.T) {
	t.Parallel()
	for stdout, code := range map[string]int{"unread": 1, "closed": 0} {
		t.Run(stdout, func(t *testing.T) {
			t.Parallel()
			p := start(t, "", stdout, "-drain", "300ms")
			ok, _ := p.flood(t, 2500, 16) // more "Log written" lines than a pipe holds
			p.checkLines(t, ok, p.stop(t, syscall.SIGTERM, code))
		})
	}
}

// At a file size limit, a write stops part way, as on a full disk; prlimit frees it.
func TestFullDiskLeavesNoPartLineAndCountsExactly(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Skip("needs prlimit, to raise the file size limit of a running process")
	}
	p := start(t, "ulimit -S -f 1", "read") // 512 bytes: 12 lines, and part of a 13th
	ok, _ := p.flood(t, 20, 1)
	p.expect(t, p.stderr, "file too large") // the first failure: the write that stopped part way
	if out, err := exec.Command("prlimit", "--pid", fmt.Sprint(p.cmd.Process.Pid), "--fsize=unlimited").CombinedOutput(); err != nil {
		t.Fatalf("prlimit: %v %s", err, out)
	}
	after, _ := p.flood(t, 1, 1)
	p.expect(t, p.stdout, after[0])
	p.checkLines(t, append(ok, after...), p.stop(t, syscall.SIGTERM, 1))
}

// Each line goes to what is at the path then. A FIFO there, as a hung disk, holds up no exit.
func TestLinesGoToWhatIsAtThePathAfterRotationOrDeletionAndAFIFOHoldsUpNoExit(t *testing.T) {
	t.Parallel()
	p := start(t, "", "read", "-drain", "100ms")
	path := filepath.Join(p.dir, "log.txt")
	write := func() string {
		sent, _ := p.flood(t, 1, 1)
		p.expect(t, p.stdout, sent[0])
		return sent[0]
	}
	first := write()
	os.Rename(path, path+".1") // as logrotate does; gzip would then remove it
	write()
	os.Remove(path)
	last := write()
	if got := read(path); got != "Notification sent to: "+last+"\n" {
		t.Errorf("log.txt = %q; want the line written after it was deleted", got)
	}
	os.Rename(path, path+".2")
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Fatal(err)
	}
	blocked, _ := p.flood(t, 1, 1)
	stopped := p.stop(t, syscall.SIGTERM, 1)
	os.Remove(path) // nobody would open the FIFO to write, and so checkLines could not read it
	p.checkLines(t, []string{first, last, blocked[0]}, stopped)
}

func TestTasksWriteTheirLinesThoughFileDescriptorsRunOut(t *testing.T) {
	t.Parallel()
	p := start(t, "ulimit -n 24", "read", "-drain", "200ms")
	conn := p.dial(t)
	for range 30 {
		p.dial(t) // idle, to use up the rest
	}
	p.expect(t, p.stderr, "too many open files")
	fmt.Fprintf(conn, "POST /send-notification/after@example.com HTTP/1.1\r\nHost: notify\r\n\r\n")
	p.expect(t, p.stdout, "after@example.com")
	p.stop(t, syscall.SIGTERM, 0)
}

func TestHeaderFloodStaysUnder512MB(t *testing.T) {
	t.Parallel()
	p := start(t, "", "read", "-drain", "200ms")
	request := []byte("POST /send-notification/a@example.com HTTP/1.1\r\nHost: x\r\nX-Pad: " + strings.Repeat("a", 1<<20)) // never ended
	var wg sync.WaitGroup
	for range 2000 {
		wg.Go(func() { p.dial(t).Write(request) }) // returns once the server has read it all, or refused it
	}
	wg.Wait()
	if peak := p.memory(t, "VmHWM"); peak > 512<<20 {
		t.Errorf("peak RSS %d MB under 2,000 connections each sending 1 MB of headers; want under 512 MB", peak>>20)
	}
	p.stop(t, syscall.SIGTERM, 0)
}

// memory returns VmRSS (held now) or VmHWM (held at most) from /proc, in bytes.
func (p *process) memory(t testing.TB, field string) (kB int) {
	if runtime.GOOS != "linux" {
		t.Skip("reads memory figures from /proc")
	}
	status := read(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	fmt.Sscan(strings.Fields(status[strings.Index(status, field+":"):])[1], &kB)
	return kB << 10
}

// BenchmarkPendingTasks floods the program at its default -max-pending with
// b.N requests whose tasks wait 30 s. It reports the memory per task and at
// the peak, the requests refused, and how long SIGTERM takes past -drain.
// README quotes go test -run '^$' -bench . -benchtime 250000x ./cmd/notify.
func BenchmarkPendingTasks(b *testing.B) {
	p := start(b, "", "read", "-delay", "30s", "-drain", "2s")
	warm, _ := p.flood(b, 1000, 64)
	before := p.memory(b, "VmRSS")
	ok, refused := p.flood(b, b.N, 64)
	b.ReportMetric(float64(p.memory(b, "VmRSS")-before)/float64(len(ok)), "B/pending-task")
	b.ReportMetric(float64(p.memory(b, "VmHWM"))/1e6, "MB-peak-RSS")
	b.ReportMetric(float64(refused), "refused")
	signaled := time.Now()
	last := p.stop(b, syscall.SIGTERM, 1)
	b.ReportMetric((time.Since(signaled) - 2*time.Second).Seconds(), "s-exit-past-drain")
	p.checkLines(b, append(warm, ok...), last)
}
