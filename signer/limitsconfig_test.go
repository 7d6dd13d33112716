package signer

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/lanyard-dev/lanyard/internal/hclconf"
)

func TestParseConfigLimits(t *testing.T) {
	const required = "trust_domain = \"example.org\"\npolicy_path = \"p.hcl\"\nbundle_path = \"b.pem\"\n" // lines 1-3
	def := DefaultLimits()
	with := func(f func(*Limits)) Limits { l := def; f(&l); return l }
	good := []struct {
		name string
		src  string
		want Limits
	}{
		{"no block", "", def},
		{"empty block", "limits {}\n", def},
		{"every field", `limits {
  attest_first_message_timeout         = "1s"
  max_pending_attestations             = 100
  max_pending_attestations_per_address = 10
  max_streams_per_connection           = 50
  keepalive_time                       = "1m"
  keepalive_timeout                    = "5s"
  max_connection_idle                  = "1h"
  min_ping_interval                    = "20s"
  max_sync_streams_per_agent           = 1
  jwt_mints_per_second                 = 10
  jwt_mint_burst                       = 20
  refusal_log_interval                 = "1m"
}
`, Limits{
			AttestFirstMessageTimeout: time.Second, MaxPendingAttestations: 100, MaxPendingAttestationsPerAddress: 10,
			MaxStreamsPerConnection: 50, KeepaliveTime: time.Minute, KeepaliveTimeout: 5 * time.Second,
			MaxConnectionIdle: time.Hour, MinPingInterval: 20 * time.Second, MaxSyncStreamsPerAgent: 1,
			JWTMintsPerSecond: 10, JWTMintBurst: 20, RefusalLogInterval: time.Minute,
		}},
		{"a small total lowers the per-address default", "limits {\n  max_pending_attestations = 16\n}\n",
			with(func(l *Limits) { l.MaxPendingAttestations, l.MaxPendingAttestationsPerAddress = 16, 16 })},
		{"first message at the whole bound", "limits {\n  attest_first_message_timeout = \"30s\"\n}\n",
			with(func(l *Limits) { l.AttestFirstMessageTimeout = 30 * time.Second })},
	}
	for _, tt := range good {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(required+tt.src), "c.hcl")
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if diff := cmp.Diff(tt.want, cfg.Limits); diff != "" {
				t.Errorf("limits (-want +got):\n%s", diff)
			}
		})
	}

	bad := []struct {
		name string
		src  string
		want []string
	}{
		{"zero count", "limits {\n  max_pending_attestations = 0\n}\n", []string{
			`c.hcl:5: max_pending_attestations: 0 is not a whole number from 1 to 1048576`,
		}},
		{"fraction", "limits {\n  jwt_mints_per_second = 2.5\n}\n", []string{
			`c.hcl:5: jwt_mints_per_second: 2.5 is not a whole number from 1 to 1048576`,
		}},
		{"huge", "limits {\n  jwt_mint_burst = 1e12\n}\n", []string{
			`c.hcl:5: jwt_mint_burst: 1000000000000 is not a whole number from 1 to 1048576`,
		}},
		{"quoted count", "limits {\n  max_streams_per_connection = \"256\"\n}\n", []string{
			`c.hcl:5: max_streams_per_connection: expected a whole number, got string`,
		}},
		{"unquoted duration", "limits {\n  keepalive_time = 30\n}\n", []string{
			`c.hcl:5: keepalive_time: expected a string, got number`,
		}},
		{"first message below the floor", "limits {\n  attest_first_message_timeout = \"10ms\"\n}\n", []string{
			`c.hcl:5: attest_first_message_timeout: 10ms is below the minimum of 100ms`,
		}},
		{"first message beyond the whole attestation", "limits {\n  attest_first_message_timeout = \"31s\"\n}\n", []string{
			`c.hcl:5: attest_first_message_timeout: 31s is longer than the whole attestation's bound (30s)`,
		}},
		{"per address above total", "limits {\n  max_pending_attestations = 10\n  max_pending_attestations_per_address = 11\n}\n", []string{
			`c.hcl:6: max_pending_attestations_per_address: 11 is above max_pending_attestations (10)`,
		}},
		{"unknown field", "limits {\n  max_streams = 1\n}\n", []string{
			`c.hcl:5: Unsupported argument: An argument named "max_streams" is not expected here.`,
		}},
		{"two blocks", "limits {}\nlimits {}\n", []string{
			`c.hcl:5: only one limits block is allowed (first at line 4)`,
		}},
		{"labelled block", "limits \"x\" {}\n", []string{
			`c.hcl:4: Extraneous label for limits: No labels are expected for limits blocks.`,
		}},
		{"every problem at once", "limits {\n  refusal_log_interval = \"1ms\"\n  max_sync_streams_per_agent = -1\n}\n", []string{
			`c.hcl:5: refusal_log_interval: 1ms is below the minimum of 1s`,
			`c.hcl:6: max_sync_streams_per_agent: -1 is not a whole number from 1 to 1048576`,
		}},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(required+tt.src), "c.hcl")
			if cfg != nil {
				t.Errorf("ParseConfig returned a config along with errors")
			}
			var errs hclconf.Errors
			if !errors.As(err, &errs) {
				t.Fatalf("ParseConfig error = %v, want hclconf.Errors", err)
			}
			if diff := cmp.Diff(strings.Join(tt.want, "\n"), err.Error()); diff != "" {
				t.Errorf("errors (-want +got):\n%s", diff)
			}
		})
	}
}
