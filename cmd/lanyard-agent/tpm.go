package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/lanyard-dev/lanyard/agent"
	"github.com/lanyard-dev/lanyard/attestor/node"
	"github.com/lanyard-dev/lanyard/internal/cli"
)

// tpmInfo prints what an operator pastes into the signer's policy.
func tpmInfo(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tpm info", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "agent config file (HCL): its tpm block says which TPM")
	if pos, err := cli.ParseFlags(fs, args); err != nil || len(pos) > 0 {
		if err == nil {
			fmt.Fprintf(stderr, "tpm info: unexpected argument %q\n", pos[0])
		}
		return cli.FlagExit(err, 2)
	}
	if *path == "" {
		fmt.Fprintln(stderr, "tpm info: --config is required")
		return 2
	}
	cfg, err := agent.LoadConfig(*path)
	if err != nil {
		fmt.Fprintf(stderr, "lanyard-agent: invalid config:\n%v\n", err)
		return 1
	}
	tpm, err := node.OpenTPM(cfg.TPM)
	if err != nil {
		fmt.Fprintf(stderr, "open TPM: %v\n", err)
		return 1
	}
	defer tpm.Close()
	info, err := tpm.Info()
	if err != nil {
		fmt.Fprintf(stderr, "read TPM: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "EK SHA-256:        %s\n", info.EKSHA256)
	fmt.Fprintf(stdout, "TPM manufacturer:  %s (firmware %s)\n", info.Manufacturer, info.FirmwareVersion)
	if c := info.EKCertificate; c != nil {
		fmt.Fprintf(stdout, "EK certificate:    present\n")
		fmt.Fprintf(stdout, "  subject:         %s\n", c.Subject)
		fmt.Fprintf(stdout, "  issuer:          %s\n", c.Issuer)
		fmt.Fprintf(stdout, "  manufacturer:    %s\n", info.CertManufacturer)
		fmt.Fprintf(stdout, "  model:           %s\n", info.CertModel)
		fmt.Fprintf(stdout, "  version:         %s\n", info.CertVersion)
		fmt.Fprintf(stdout, "  not after:       %s\n", c.NotAfter.UTC().Format("2006-01-02"))
	} else {
		fmt.Fprintf(stdout, "EK certificate:    none (pin the EK SHA-256 in policy)\n")
	}
	fmt.Fprintf(stdout, "\npolicy:\n  node \"this-host\" {\n    ek_sha256 = [%q]\n  }\n", info.EKSHA256)
	return 0
}
