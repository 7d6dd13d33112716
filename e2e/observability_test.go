package e2e

import (
	"bufio"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lanyard-dev/lanyard/internal/swtpmtest"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// scrape fetches a Prometheus text page and returns its samples by series
// ("name{labels}" as printed).
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s", url, resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("scrape %s: bad sample %q", url, line)
		}
		out[line[:i]] = v
	}
	return out
}

// httpGet returns the status code and body of GET url, or 0 when nothing answers.
func httpGet(url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestMetricsAndHealth scrapes a real agent and signer and probes the
// agent's health endpoints through not attested, healthy and signer down.
func TestMetricsAndHealth(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ekCAPolicy(tpm, fmt.Sprint(os.Getuid())))
	agentHTTP, signerHTTP := freePort(t), freePort(t)
	// One address for metrics and health: they share the listener.
	appendFile(t, e.agentCfg, fmt.Sprintf("metrics_address = %q\nhealth_address = %q\n", agentHTTP, agentHTTP))
	appendFile(t, e.signerCfg, fmt.Sprintf("metrics_address = %q\n", signerHTTP))
	agentURL, signerURL := "http://"+agentHTTP, "http://"+signerHTTP

	// The signer writes the bundle the agent starts from, then goes away:
	// the agent runs, but cannot attest.
	e.startSigner(t).stop(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "attestation failed")
	if code, body := httpGet(agentURL + "/live"); code != http.StatusOK {
		t.Errorf("/live while not attested = %d %q, want 200", code, body)
	}
	if code, body := httpGet(agentURL + "/ready"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not attested") {
		t.Errorf("/ready while not attested = %d %q, want 503 naming 'not attested'", code, body)
	}
	if m := scrape(t, agentURL+"/metrics"); m["lanyard_agent_attestation_failures_total"] < 1 || m["lanyard_agent_signer_connected"] != 0 {
		t.Errorf("unattested agent metrics: attestation_failures_total %v, signer_connected %v; want >= 1 and 0",
			m["lanyard_agent_attestation_failures_total"], m["lanyard_agent_signer_connected"])
	}

	signer := e.startSigner(t)
	agent.waitLog(t, 30*time.Second, "agent ready")
	waitFor(t, 10*time.Second, "/ready to answer 200", func() bool {
		code, _ := httpGet(agentURL + "/ready")
		return code == http.StatusOK
	})

	// Hold two FetchX509SVID streams open, as two workloads would.
	ctx := ctxFor(t, 60*time.Second)
	src1, src2 := newSource(t, ctx, e.socket), newSource(t, ctx, e.socket)
	const streams = `lanyard_agent_open_streams{method="FetchX509SVID"}`
	waitFor(t, 10*time.Second, "2 open streams in the agent's metrics", func() bool {
		return scrape(t, agentURL+"/metrics")[streams] == 2
	})
	m := scrape(t, agentURL+"/metrics")
	for series, ok := range map[string]bool{
		`lanyard_agent_svids_issued_total{kind="x509"}`:             m[`lanyard_agent_svids_issued_total{kind="x509"}`] >= 3,
		"lanyard_agent_signer_connected":                            m["lanyard_agent_signer_connected"] == 1,
		"lanyard_agent_earliest_svid_expiry_seconds":                m["lanyard_agent_earliest_svid_expiry_seconds"] > 60,
		"lanyard_agent_attestation_duration_seconds_count":          m["lanyard_agent_attestation_duration_seconds_count"] >= 1,
		"lanyard_agent_workload_attestation_duration_seconds_count": m["lanyard_agent_workload_attestation_duration_seconds_count"] >= 2,
		"process_resident_memory_bytes":                             m["process_resident_memory_bytes"] > 0,
	} {
		if !ok {
			t.Errorf("agent metric %s = %v", series, m[series])
		}
	}
	var r struct {
		OpenStreams map[string]int `json:"open_streams"`
	}
	out, _ := agentCmd(t, nil, "status", "--json", "--config", e.agentCfg)
	if err := json.Unmarshal([]byte(out), &r); err != nil || r.OpenStreams["FetchX509SVID"] != 2 {
		t.Errorf("status --json open_streams = %v (%v), want FetchX509SVID 2:\n%s", r.OpenStreams, err, out)
	}

	src1.Close()
	waitFor(t, 10*time.Second, "1 open stream after a client left", func() bool {
		m := scrape(t, agentURL+"/metrics")
		return m[streams] == 1 && m[`lanyard_agent_workload_api_calls_total{code="Canceled",method="FetchX509SVID"}`] >= 1
	})
	if _, err := src2.GetX509SVID(); err != nil {
		t.Errorf("the other stream lost its SVID: %v", err)
	}

	sm := scrape(t, signerURL+"/metrics")
	for series, ok := range map[string]bool{
		"lanyard_signer_svids_signed_total":                   sm["lanyard_signer_svids_signed_total"] >= 3,
		`lanyard_signer_attestations_total{result="ok"}`:      sm[`lanyard_signer_attestations_total{result="ok"}`] >= 1,
		"lanyard_signer_sync_streams":                         sm["lanyard_signer_sync_streams"] == 1,
		"lanyard_signer_attestation_duration_seconds_count":   sm["lanyard_signer_attestation_duration_seconds_count"] >= 1,
		`lanyard_signer_policy_reloads_total{result="error"}`: sm[`lanyard_signer_policy_reloads_total{result="error"}`] == 0,
		"lanyard_signer_ca_not_after_seconds":                 sm["lanyard_signer_ca_not_after_seconds"] > float64(time.Now().Unix()),
	} {
		if !ok {
			t.Errorf("signer metric %s = %v", series, sm[series])
		}
	}

	// Signer gone, SVIDs still valid: degraded, and still ready.
	signer.stop(t)
	waitFor(t, 10*time.Second, "signer_connected to drop to 0", func() bool {
		return scrape(t, agentURL+"/metrics")["lanyard_agent_signer_connected"] == 0
	})
	if code, body := httpGet(agentURL + "/ready"); code != http.StatusOK || !strings.Contains(body, "degraded") {
		t.Errorf("/ready with the signer down = %d %q, want 200 'degraded'", code, body)
	}
}

// TestTelemetryAddressMustBeLoopback: the endpoints have no
// authentication, so a public address is a config error with file:line.
func TestTelemetryAddressMustBeLoopback(t *testing.T) {
	t.Parallel()
	d := shortDir(t)
	agentCfg, signerCfg := filepath.Join(d, "agent.hcl"), filepath.Join(d, "signer.hcl")
	writeFile(t, agentCfg, "trust_domain = \"example.org\"\nsigner_address = \"127.0.0.1:1\"\ntrust_bundle_path = \"b.pem\"\ntpm { socket = \"/nonexistent\" }\nmetrics_address = \"0.0.0.0:9464\"\nhealth_address = \"[::]:8080\"\n")
	writeFile(t, signerCfg, "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\nmetrics_address = \"192.0.2.1:9465\"\n")
	tests := []struct {
		name string
		cmd  []string
		want []string
	}{
		{"agent", []string{"lanyard-agent", "run", "--config", agentCfg}, []string{agentCfg + ":5: metrics_address: \"0.0.0.0:9464\": host must be a loopback address", agentCfg + ":6: health_address"}},
		{"signer", []string{"lanyard-signer", "run", "--config", signerCfg}, []string{signerCfg + ":4: metrics_address: \"192.0.2.1:9465\": host must be a loopback address"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := start(t, tt.cmd[0], tt.cmd[1:]...)
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				t.Fatal("did not exit on an invalid config")
			}
			if p.err == nil {
				t.Errorf("exit 0 on an invalid config")
			}
			for _, w := range tt.want {
				if !strings.Contains(p.out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, p.out.String())
				}
			}
		})
	}
}

// jwtLike matches a compact JWS/JWT: base64url JSON header starting {"...
var jwtLike = regexp.MustCompile(`eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.`)

// TestNoSecretsWritten runs signer and agent through attestation, issuance
// and rotation at debug level, then looks through every file they wrote and
// everything they logged for the served private keys (DER, PEM, base64),
// any PEM private key and anything that looks like a JWT; and checks that
// both run with core dumps off.
func TestNoSecretsWritten(t *testing.T) {
	t.Parallel()
	tpm := swtpmtest.Start(t)
	e := newEnv(t, tpm, ttlPolicy(tpm, "10s", "short"))
	appendFile(t, e.agentCfg, "log_level = \"debug\"\n")
	appendFile(t, e.signerCfg, "log_level = \"debug\"\n")
	signer := e.startSigner(t)
	agent := e.startAgent(t)
	agent.waitLog(t, 20*time.Second, "agent ready")

	ctx := ctxFor(t, 60*time.Second)
	src := newSource(t, ctx, e.socket)
	var keys [][]byte // PKCS#8 DER of every SVID key served
	seen := map[string]bool{}
	waitFor(t, 30*time.Second, "a rotated SVID (two distinct serials)", func() bool {
		s, err := src.GetX509SVID()
		if err != nil {
			return false
		}
		serial := s.Certificates[0].SerialNumber.Text(16)
		if !seen[serial] {
			der, err := x509.MarshalPKCS8PrivateKey(s.PrivateKey)
			if err != nil {
				t.Fatal(err)
			}
			seen[serial] = true
			keys = append(keys, der)
		}
		return len(seen) >= 2
	})
	agent.waitLog(t, 10*time.Second, "pushed rotated X.509-SVIDs")

	// A JWT-SVID too, minted by the signer and handed out by the agent:
	// neither may write it anywhere.
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	jwt, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "no-secrets"})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	token := jwt.Marshal()

	needles := map[string][]byte{}
	for i, der := range keys {
		needles[fmt.Sprintf("key %d DER", i)] = der
		needles[fmt.Sprintf("key %d PEM", i)] = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		needles[fmt.Sprintf("key %d base64", i)] = []byte(base64.StdEncoding.EncodeToString(der))
		needles[fmt.Sprintf("key %d base64url", i)] = []byte(base64.RawURLEncoding.EncodeToString(der))
	}
	needles["a PEM private key"] = []byte("PRIVATE KEY")
	needles["the JWT-SVID"] = []byte(token)
	needles["the JWT-SVID's signature"] = []byte(token[strings.LastIndexByte(token, '.')+1:])
	check := func(name string, b []byte) {
		for what, n := range needles {
			if strings.Contains(string(b), string(n)) {
				t.Errorf("%s contains %s", name, what)
			}
		}
		if m := jwtLike.Find(b); m != nil {
			t.Errorf("%s contains a JWT-looking token %.20q...", name, m)
		}
	}

	// Core dumps off, from the kernel's own account (read before they stop).
	for _, p := range []*proc{signer, agent} {
		limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", p.cmd.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		if !regexp.MustCompile(`(?m)^Max core file size +0 +0 `).Match(limits) {
			t.Errorf("%s: core dumps not disabled:\n%s", filepath.Base(p.cmd.Path), limits)
		}
	}

	// Stop both so every file and log line is final.
	agent.stop(t)
	signer.stop(t)
	check("signer output", []byte(signer.out.String()))
	check("agent output", []byte(agent.out.String()))
	var files int
	err = filepath.WalkDir(e.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		check(path, b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// configs, policy, bundle, CA state at least: the walk saw the files.
	if files < 5 {
		t.Errorf("walked %d files under %s, want at least 5", files, e.dir)
	}
	if !strings.Contains(agent.out.String(), "x509-svid issued") || !strings.Contains(signer.out.String(), "x509-svid signed") {
		t.Error("the logs lack the issuance lines the check relies on")
	}
}

func appendFile(t *testing.T, path, content string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(content); err != nil {
		t.Fatal(err)
	}
}
