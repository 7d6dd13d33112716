package workloadapi

import (
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// TestServerSendsNoBDPPing: a one-shot FetchX509SVID gets its response with
// no PING from the server on the way. gRPC's bandwidth estimator would send
// one (with a WINDOW_UPDATE) on the client's first DATA frame, costing both
// sides a write and a read per call on a local socket (server.go).
func TestServerSendsNoBDPPing(t *testing.T) {
	ca := newTestCA(t)
	src := newFakeSource(ca.bundlesResponse())
	src.set(uidSelector(), ca.svidResponse(t, "/web"))
	srv := startServer(t, unixOnly, src)

	c := dialRawH2(t, srv.path)
	if err := c.conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	id := c.open("FetchX509SVID")
	for frames := 0; ; frames++ {
		if frames == 100 {
			t.Fatal("no response DATA frame within 100 frames")
		}
		f, err := c.fr.ReadFrame()
		if err != nil {
			t.Fatalf("read frame: %v", err)
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := c.fr.WriteSettingsAck(); err != nil {
					t.Fatal(err)
				}
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				t.Fatalf("the server sent a PING %x before the response", f.Data)
			}
		case *http2.RSTStreamFrame:
			t.Fatalf("stream reset: %v", f.ErrCode)
		case *http2.DataFrame:
			if f.StreamID == id && len(f.Data()) > 5 {
				return // the response, with no PING before it
			}
		}
	}
}
