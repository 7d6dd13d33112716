package agent

import (
	"sync/atomic"
	"time"

	"github.com/lanyard-dev/lanyard/internal/telemetry"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
)

// streamMethods are the streaming methods of the socket (the Workload
// API's and Envoy SDS's), whose open streams the agent counts
// (open_streams, and status).
var streamMethods = [...]string{"FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles", "StreamSecrets"}

// Reasons an SVID could not be obtained (svid_failures_total's reason
// label): a fixed, small set, never an entry or SPIFFE ID.
const (
	failNotConnected = "not_connected" // no connection to the signer
	failSigner       = "signer_error"  // the signing call failed
	failRefused      = "refused"       // the signer refused the entry
	failBadResponse  = "bad_response"  // the answer did not parse or match our key
	failLocal        = "local"         // generating the key or CSR failed
)

// metrics is the agent's Prometheus registry and the instruments the loops
// update. It also observes the Workload API (workloadapi.Observer), whose
// open-stream counts status reports too, so it exists even when no
// metrics_address is set.
type metrics struct {
	reg                    *prometheus.Registry
	svidsIssued            *prometheus.CounterVec
	svidFailures           *prometheus.CounterVec
	calls                  *prometheus.CounterVec
	attestDuration         prometheus.Histogram
	attestFailures         prometheus.Counter
	workloadAttestDuration prometheus.Histogram
	syncFailures           prometheus.Counter
	refusals               *prometheus.CounterVec
	streams                map[string]*atomic.Int64 // keys fixed at construction
}

func newMetrics() *metrics {
	const ns = "lanyard_agent"
	m := &metrics{
		reg: telemetry.NewRegistry(),
		svidsIssued: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "svids_issued_total",
			Help: "Workload SVIDs the signer signed for this agent, by kind."}, []string{"kind"}),
		svidFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "svid_failures_total",
			Help: "Workload SVIDs the agent tried and failed to get signed, by reason."}, []string{"reason"}),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "workload_api_calls_total",
			Help: "Finished Workload API calls by method and gRPC code (a stream ends Canceled when its client hangs up)."}, []string{"method", "code"}),
		attestDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "attestation_duration_seconds",
			Help:    "Successful node attestations with the TPM, from opening the TPM session to the agent SVID.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}}),
		attestFailures: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "attestation_failures_total",
			Help: "Failed node attestations."}),
		workloadAttestDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "workload_attestation_duration_seconds",
			Help:    "Attestation of each Workload API caller (reading /proc and re-checking the pidfd).",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2.5, 10)}),
		syncFailures: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "sync_failures_total",
			Help: "Times the sync stream to the signer broke or could not open."}),
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "workload_api_refusals_total",
			Help: "Workload API connections and calls refused or closed by a limit, and failed accepts, by reason (README \"Limits\")."}, []string{"reason"}),
		streams: make(map[string]*atomic.Int64, len(streamMethods)),
	}
	m.svidsIssued.WithLabelValues("x509") // present at 0 from the start
	m.reg.MustRegister(m.svidsIssued, m.svidFailures, m.calls, m.attestDuration, m.attestFailures, m.workloadAttestDuration, m.syncFailures, m.refusals)
	for _, method := range streamMethods {
		n := new(atomic.Int64)
		m.streams[method] = n
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: "open_streams",
			Help:        "Open Workload API streams by method.",
			ConstLabels: prometheus.Labels{"method": method}}, func() float64 { return float64(n.Load()) }))
	}
	return m
}

// watch registers the gauges read at scrape time from the parts'
// snapshots: whether the sync stream is up, and when the first SVID held
// expires.
func (m *metrics) watch(connected func() bool, earliest func() (time.Time, bool)) {
	const ns = "lanyard_agent"
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: "signer_connected",
		Help: "1 while the sync stream to the signer is open and delivering, else 0."}, func() float64 {
		if connected() {
			return 1
		}
		return 0
	}))
	m.reg.MustRegister(expiryCollector{earliest: earliest, desc: prometheus.NewDesc(ns+"_earliest_svid_expiry_seconds",
		"Seconds until the earliest workload SVID the agent holds expires (absent when it holds none).", nil, nil)})
}

// svidFailed counts n SVIDs that could not be obtained for reason.
func (m *metrics) svidFailed(reason string, n int) {
	m.svidFailures.WithLabelValues(reason).Add(float64(n))
}

// openStreams returns the open streams per streaming method.
func (m *metrics) openStreams() map[string]int64 {
	out := make(map[string]int64, len(m.streams))
	for method, n := range m.streams {
		out[method] = n.Load()
	}
	return out
}

// CallDone implements workloadapi.Observer.
func (m *metrics) CallDone(method string, code codes.Code) {
	m.calls.WithLabelValues(method, code.String()).Inc()
}

// StreamOpened implements workloadapi.Observer.
func (m *metrics) StreamOpened(method string) {
	if n, ok := m.streams[method]; ok {
		n.Add(1)
	}
}

// StreamClosed implements workloadapi.Observer.
func (m *metrics) StreamClosed(method string) {
	if n, ok := m.streams[method]; ok {
		n.Add(-1)
	}
}

// Refused implements workloadapi.LimitObserver.
func (m *metrics) Refused(reason string) {
	m.refusals.WithLabelValues(reason).Inc()
}

// CallerAttested implements workloadapi.Observer.
func (m *metrics) CallerAttested(d time.Duration, _ bool) {
	m.workloadAttestDuration.Observe(d.Seconds())
}

// expiryCollector computes earliest_svid_expiry_seconds at scrape time, so
// it is exact whenever it is read, and leaves it out when there is nothing
// to expire (0 would read as "expiring now").
type expiryCollector struct {
	earliest func() (time.Time, bool)
	desc     *prometheus.Desc
}

func (c expiryCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c expiryCollector) Collect(ch chan<- prometheus.Metric) {
	earliest, ok := c.earliest()
	if !ok {
		return
	}
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, time.Until(earliest).Seconds())
}
