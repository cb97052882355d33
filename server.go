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

// maxHeld is how much of a body without a Content-Length is held back.
const maxHeld = 64 << 10

// holdingWriter is the response writer a Handler gives the handler it wraps.
// It holds back the status, the header and up to maxHeld bytes of body, so
// that finish can send them with a Content-Length. It knows nothing of tasks.
//
// That is the heart of the package. net/http writes the end of a response
// (the chunked terminator, or the Content-Length it computes for a small
// body) only after ServeHTTP returns. A wrapper that writes, flushes and then
// starts the tasks leaves the client waiting for that end. With a
// Content-Length, the client knows the response is whole at its last byte.
//
// Responses that take no Content-Length from us pass straight through: 1xx,
// 204 and 304, and responses to HEAD. So do those whose handler set
// Content-Length, Trailer, or a Transfer-Encoding other than chunked before
// WriteHeader, and any response once flushed or past maxHeld bytes.
type holdingWriter struct {
	server  http.ResponseWriter // the server's writer; a stand-in once hijacked or detached
	req     *http.Request       // the request it answers
	buffers *sync.Pool          // the Handler's, where body comes from and goes back to

	status int           // the handler's status, or 0 before WriteHeader
	body   *bytes.Buffer // the held-back body; nil until held takes one from buffers
	// sent once the status and header have gone to the server: writes pass
	// through. chunked if the handler set "Transfer-Encoding: chunked".
	sent, chunked bool
	cutOff        detached // the server's writer's stand-in after detach
}

// Header returns the server's header map, shared by the handler and net/http
// as without the wrapper. After detach, it returns the stand-in's.
func (w *holdingWriter) Header() http.Header { return w.server.Header() }

// WriteHeader holds back a final status that may still get a Content-Length,
// and passes any other status on at once. Like net/http's, it keeps the first
// status it is given, so the other methods call WriteHeader(http.StatusOK) to
// make sure there is one.
func (w *holdingWriter) WriteHeader(code int) {
	if w.status != 0 {
		return
	}
	if code < 100 || code > 999 || (code < 200 && code != http.StatusSwitchingProtocols) {
		// An invalid status makes net/http panic, here in the handler. An
		// informational one goes out at once: the final status is to come.
		w.server.WriteHeader(code)
		return
	}
	w.status = code
	h := w.server.Header()
	if code == http.StatusRequestEntityTooLarge && w.req.ProtoMajor == 1 {
		// When http.MaxBytesReader trips, net/http closes the connection after
		// the 413 rather than wait for a body that a stalled client may never
		// send. It sees the trip only through its own writer, so say it here.
		// (Over HTTP/2, this would close the other streams' connection.)
		h.Set("Connection", "close")
	}
	bodyless := code == http.StatusSwitchingProtocols || code == http.StatusNoContent || code == http.StatusNotModified || w.req.Method == http.MethodHead
	// "Transfer-Encoding: chunked" is net/http's own framing for a body that
	// streams: such a body is held back all the same. Other framing is the
	// handler's.
	te := h.Get("Transfer-Encoding")
	w.chunked = te == "chunked"
	if bodyless || h["Content-Length"] != nil || h["Trailer"] != nil || (te != "" && !w.chunked) {
		w.sent = true
		w.server.WriteHeader(code)
	}
}

// Write holds p back while the body fits in maxHeld bytes. Past that, it
// sends what it holds, if it has not already, and the rest streams.
func (w *holdingWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	if !w.sent && w.held().Len()+len(p) <= maxHeld {
		return w.body.Write(p)
	}
	w.send(-1)
	return w.server.Write(p)
}

// held returns the held-back body, taking a buffer from the pool the first
// time. So a hijacked connection or a long poll, which holds nothing back,
// keeps no buffer while its handler runs.
func (w *holdingWriter) held() *bytes.Buffer {
	if w.body == nil {
		w.body = w.buffers.Get().(*bytes.Buffer)
	}
	return w.body
}

// ReadFrom implements io.ReaderFrom, which is how io.Copy, and with it
// http.FileServer, reaches net/http's sendfile. Once the response streams, src
// goes straight to the server's writer. Until then, src is read into the
// held-back body's spare room, and Write decides, as for any bytes, whether
// to hold them back. That is the idiom bytes.Buffer.AvailableBuffer
// documents: Write is the buffer's next write. A Write error shows on the
// next write.
func (w *holdingWriter) ReadFrom(src io.Reader) (n int64, err error) {
	for !w.sent {
		w.held().Grow(512)
		p := w.body.AvailableBuffer()
		m, err := src.Read(p[:cap(p)])
		if m > 0 {
			w.Write(p[:m])
		}
		n += int64(m)
		if err == io.EOF {
			return n, nil // like net/http, no status for a copy of nothing
		} else if err != nil {
			return n, err
		}
	}
	m, err := io.Copy(w.server, src)
	return n + m, err
}

// send passes the held-back status, header and body on to the server, if
// there is a status and it has not gone yet. The Content-Length is length,
// unless that is negative. From then on, the response streams. A write error shows
// again on the caller's next Write or Flush, as net/http's writer keeps
// failing once it has failed.
func (w *holdingWriter) send(length int) {
	if w.status == 0 || w.sent {
		return
	}
	w.sent = true
	// Framing set after WriteHeader, which net/http ignores, may not match
	// the body: the response would not be held back had it been set before.
	h := w.server.Header()
	for _, k := range []string{"Content-Length", "Transfer-Encoding", "Trailer"} {
		delete(h, k)
	}
	if _, typed := h["Content-Type"]; w.chunked && !typed && w.req.ProtoMajor == 1 {
		h["Content-Type"] = nil // HTTP/1 sniffs no body that its handler said to chunk
	}
	if length >= 0 {
		h.Set("Content-Length", strconv.Itoa(length))
	}
	w.server.WriteHeader(w.status)
	w.server.Write(w.held().Bytes())
}

// FlushError sends anything held back and flushes it to the client: the
// response streams from here on. It is what http.ResponseController.Flush
// calls.
func (w *holdingWriter) FlushError() error {
	w.WriteHeader(http.StatusOK) // as net/http's Flush does
	w.send(-1)
	return http.NewResponseController(w.server).Flush()
}

// Flush implements http.Flusher; see FlushError.
func (w *holdingWriter) Flush() { w.FlushError() }

// forHandler returns w as the handler gets it: a Hijacker only if the
// server's writer is one, as HTTP/1's is and HTTP/2's is not. So
// w.(http.Hijacker) answers as it would without the wrapper.
func (w *holdingWriter) forHandler() http.ResponseWriter {
	if _, ok := w.server.(http.Hijacker); ok {
		return hijackingWriter{w}
	}
	return w
}

type hijackingWriter struct{ *holdingWriter }

// Hijack implements http.Hijacker. It sends anything held back first, as
// net/http's Hijack flushes what it holds. From then on, as with net/http's
// own writer, writes fail with http.ErrHijacked, and Header returns the same
// map: httputil.ReverseProxy writes its 101 Switching Protocols from it.
func (w hijackingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.send(-1)
	conn, brw, err := http.NewResponseController(w.server).Hijack()
	if err == nil {
		w.sent, w.server = true, hijacked{w.server}
	}
	return conn, brw, err
}

// Unwrap returns the server's response writer, for http.ResponseController.
func (w *holdingWriter) Unwrap() http.ResponseWriter { return w.server }

// finish completes the response once the handler has returned: it sends
// anything held back, now with a Content-Length, and flushes it all to the
// client. Errors are ignored: a client that has gone does not stop the tasks.
// If nothing was held back, held takes a buffer only to send it empty.
//
// The buffer then goes back to the pool, and w lets go of it: only w ever
// held it, never the handler. After a panic, finish does not run, and the
// buffer is left to the garbage collector.
func (w *holdingWriter) finish() {
	w.WriteHeader(http.StatusOK)
	w.send(w.held().Len())
	http.NewResponseController(w.server).Flush()
	w.body.Reset()
	w.buffers.Put(w.body)
	w.body = nil
}

// detach cuts w off from the response for good, once the handler has
// returned or panicked. The handler may have left w behind, in a task's
// closure say, and net/http reuses its own writer's buffers for other
// connections once ServeHTTP returns.
func (w *holdingWriter) detach() { w.sent, w.server = true, &w.cutOff }

// detached stands in for the server's writer after detach. Its header map is
// its own, made only if a task asks for it. Nothing sends it, and nothing
// can be written.
type detached struct{ header http.Header }

func (d *detached) Header() http.Header {
	if d.header == nil {
		d.header = make(http.Header)
	}
	return d.header
}
func (*detached) WriteHeader(int)           {}
func (*detached) Write([]byte) (int, error) { return 0, errCutOff }

var errCutOff = errors.New("background: Write after the handler returned: its ResponseWriter is cut off from the response")

// hijacked stands in for the server's writer after Hijack: writing,
// flushing or hijacking again fails with http.ErrHijacked. Header, and the
// read and write deadlines that http.ResponseController sets through Unwrap,
// still reach the server's writer, as they would without the wrapper.
type hijacked struct{ http.ResponseWriter }

func (hijacked) WriteHeader(int)                              {}
func (hijacked) Write([]byte) (int, error)                    { return 0, http.ErrHijacked }
func (hijacked) FlushError() error                            { return http.ErrHijacked }
func (hijacked) Hijack() (net.Conn, *bufio.ReadWriter, error) { return nil, nil, http.ErrHijacked }
func (w hijacked) Unwrap() http.ResponseWriter                { return w.ResponseWriter }
