package background

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
)

// This file holds the response writer that a Handler passes to the handler it
// wraps. It knows nothing of tasks: once the handler has returned, the Handler
// calls finish and then detach, and only then starts the tasks.

// maxBuffered is how much of a body without Content-Length is held back.
const maxBuffered = 64 << 10

// responseWriter is the writer the wrapped handler gets. It holds back the
// status, headers and up to maxBuffered bytes of body, so that finish can send
// the response with a Content-Length.
//
// That is the heart of the package. net/http writes the end of a response
// (the chunked terminator, or the Content-Length it computes for small
// bodies) only after ServeHTTP returns. A wrapper that writes, flushes and
// then runs the tasks would leave the client waiting for them, since it has
// no way to tell the body is complete. With a Content-Length it can.
//
// Responses that take no Content-Length from us pass straight through: 1xx,
// 204 and 304, responses to HEAD, and those whose handler sets
// Content-Length or Transfer-Encoding, or declares trailers, before
// WriteHeader. So does any response once flushed or past maxBuffered bytes.
type responseWriter struct {
	rw      http.ResponseWriter // the server's, until Hijack or detach
	req     *http.Request       // the request it answers
	buffers *sync.Pool          // the Handler's: where body comes from and goes back to

	status int           // the handler's status, or 0 before WriteHeader
	body   *bytes.Buffer // the held-back body; nil until held takes one from buffers
	sent   bool          // status and headers have gone to rw, so writes pass through
}

// Header returns the server's header map: the handler and net/http share it,
// as they do without the wrapper. After detach, it returns the stand-in's.
func (w *responseWriter) Header() http.Header { return w.rw.Header() }

// WriteHeader holds back a final status that may still get a Content-Length,
// and passes any other status on at once. Like net/http's, it keeps the first
// status it is given, so the other methods call WriteHeader(http.StatusOK)
// to make sure there is one.
func (w *responseWriter) WriteHeader(code int) {
	if w.status != 0 {
		return
	}
	if code < 200 && code != http.StatusSwitchingProtocols || code > 999 {
		// An informational status goes out at once: the final one is still
		// to come. An invalid one makes net/http panic here, in the handler.
		w.rw.WriteHeader(code)
		return
	}
	w.status = code
	h := w.rw.Header()
	if code == http.StatusRequestEntityTooLarge && w.req.ProtoMajor == 1 {
		// When http.MaxBytesReader trips, net/http closes the connection
		// after the response instead of first reading the rest of the body,
		// which a stalled client would never send. It learns of the trip
		// only through its own writer, not this one, so say it here: 413 is
		// what handlers answer then. (HTTP/2 reads no body before it
		// answers; there, the header would close every stream's connection.)
		h.Set("Connection", "close")
	}
	// Hold the response back if it can take a Content-Length of our making:
	// it may have a body, and the handler has chosen no framing of its own,
	// nor declared trailers, which need a chunked body. A HEAD response has
	// no body either, so net/http's framing of it is left alone.
	framed := h["Content-Length"] != nil || h["Transfer-Encoding"] != nil || h["Trailer"] != nil
	bodyless := code == http.StatusSwitchingProtocols || code == http.StatusNoContent || code == http.StatusNotModified
	if !framed && !bodyless && w.req.Method != http.MethodHead {
		return // held back until finish, or until it must stream
	}
	w.sent = true
	w.rw.WriteHeader(code)
}

// Write holds p back if it fits, and otherwise starts streaming.
func (w *responseWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	if !w.sent && w.held().Len()+len(p) > maxBuffered {
		w.send(-1)
	}
	if w.sent {
		return w.rw.Write(p)
	}
	return w.body.Write(p)
}

// held returns the held-back body's buffer, taking one from the pool the
// first time: a response that never holds anything back, such as a
// hijacked connection or a long poll, keeps none while its handler runs.
func (w *responseWriter) held() *bytes.Buffer {
	if w.body == nil {
		w.body = w.buffers.Get().(*bytes.Buffer)
	}
	return w.body
}

// ReadFrom implements io.ReaderFrom, which is how io.Copy, and with it
// http.FileServer and http.ServeContent, reach net/http's sendfile. Once the
// response streams, or at once if the handler framed the body itself, src
// goes straight to the server's writer. Until then, src is read into the
// spare room of the held-back body and handed to Write, which decides, as for
// any other bytes, whether to hold them back; like net/http, it sends no
// status for a copy of nothing. A Write error shows again on the next write.
func (w *responseWriter) ReadFrom(src io.Reader) (n int64, err error) {
	for !w.sent {
		w.held().Grow(512)
		p := w.body.AvailableBuffer()
		m, err := src.Read(p[:cap(p)])
		if m > 0 {
			w.Write(p[:m])
		}
		n += int64(m)
		if err == io.EOF {
			return n, nil
		} else if err != nil {
			return n, err
		}
	}
	m, err := io.Copy(w.rw, src)
	return n + m, err
}

// send passes the held-back status, headers and body on to rw, with a
// Content-Length of length unless it is negative, if there is a status and it
// has not gone already. From then on, the response streams. A write error is
// left to the caller's next Write or Flush, which sees it again: net/http's
// writer keeps failing once it has failed.
func (w *responseWriter) send(length int) {
	if w.status == 0 || w.sent {
		return
	}
	w.sent = true
	// The handler framed the body itself only after WriteHeader, or the
	// response would not be held back: net/http would ignore that framing,
	// and it may not match the body.
	h := w.rw.Header()
	for _, k := range []string{"Content-Length", "Transfer-Encoding", "Trailer"} {
		delete(h, k)
	}
	if length >= 0 {
		h.Set("Content-Length", strconv.Itoa(length))
	}
	w.rw.WriteHeader(w.status)
	w.rw.Write(w.held().Bytes())
}

// FlushError sends anything held back and flushes it to the client: the
// response streams from here on. It is what http.ResponseController.Flush
// calls.
func (w *responseWriter) FlushError() error {
	w.WriteHeader(http.StatusOK) // as net/http's Flush does
	w.send(-1)
	return http.NewResponseController(w.rw).Flush()
}

// Flush implements http.Flusher; see FlushError.
func (w *responseWriter) Flush() { w.FlushError() }

// Hijack implements http.Hijacker. It passes anything held back on first, as
// net/http's own Hijack flushes what it holds. The wrapper needs its own
// Hijack, rather than leaving it to Unwrap, to write nothing after: from then
// on, writes fail with http.ErrHijacked, as net/http's own writer's do.
func (w *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.send(-1)
	conn, brw, err := http.NewResponseController(w.rw).Hijack()
	if err == nil {
		w.sent, w.rw = true, hijackedWriter{detachedWriter(make(http.Header))}
	}
	return conn, brw, err
}

// Unwrap returns the server's response writer, for http.ResponseController.
func (w *responseWriter) Unwrap() http.ResponseWriter { return w.rw }

// finish completes the response once the handler has returned: it sends
// anything held back, now with a Content-Length, and flushes it all to the
// client. Errors are ignored: a client that has gone away does not stop the
// tasks.
func (w *responseWriter) finish() {
	w.WriteHeader(http.StatusOK)
	w.send(w.held().Len())
	http.NewResponseController(w.rw).Flush()
}

// detach cuts w off from the response for good, once the handler has
// returned. The handler may have left w behind, captured by a task's
// closure say, and net/http finishes its own writer as ServeHTTP returns and
// then reuses its buffers for other connections: nothing may reach it from
// a task, which runs meanwhile.
//
// The held-back body's buffer goes back to the pool here, and w lets go of
// it, since the pool hands it to other requests. It was never w itself,
// which a handler can keep, but memory that only w held, and by now its
// bytes have been sent, or discarded after a panic.
func (w *responseWriter) detach() {
	if w.body != nil {
		w.body.Reset()
		w.buffers.Put(w.body)
		w.body = nil
	}
	w.sent, w.rw = true, detachedWriter(make(http.Header)) // nothing held back any more
}

// detachedWriter stands in for the server's writer after detach: its header
// map is its own, nothing sends it, and nothing can be written. (A map type,
// so that storing it in w.rw allocates nothing more.)
type detachedWriter http.Header

func (d detachedWriter) Header() http.Header { return http.Header(d) }
func (detachedWriter) WriteHeader(int)       {}
func (detachedWriter) Write([]byte) (int, error) {
	return 0, errors.New("background: Write after the handler returned: its ResponseWriter is cut off from the response")
}

// hijackedWriter stands in for the server's writer after Hijack: writing, or
// hijacking again, fails with http.ErrHijacked, as with net/http's own.
type hijackedWriter struct{ detachedWriter }

func (hijackedWriter) Write([]byte) (int, error) { return 0, http.ErrHijacked }
func (hijackedWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return nil, nil, http.ErrHijacked
}
