# Lanyard: build, test and demo. `make help` lists the targets.

GO ?= go
BIN := bin
# apt-get needs root; CI runs as root and has no sudo.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# make install: DESTDIR stages into a tree (packaging); PREFIX picks where the
# binaries go, and the units' ExecStart= follows it.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
CONFDIR := $(SYSCONFDIR)/lanyard

# grpcnotrace leaves gRPC's request tracing (golang.org/x/net/trace, off by
# default and never enabled here) out of the binaries: 5 MB less code, and
# the idle agent 3.4 MiB smaller (24.4 -> 20.9 MiB VmRSS; BENCHMARKS.md).
BUILD_TAGS ?= grpcnotrace

.PHONY: all build deps swtpm-deps nginx-deps test lint demo demo-tier etcd bench clean help generate install uninstall

all: build

help:
	@echo 'build       build lanyard-agent, lanyard-signer and lanyard-bench into $(BIN)/ (static, CGO_ENABLED=0)'
	@echo 'swtpm-deps  install swtpm and swtpm-tools with apt-get when swtpm is missing'
	@echo 'nginx-deps  install nginx with apt-get when /usr/sbin/nginx is missing (the lanyard-agent exec end-to-end test)'
	@echo 'test        lint, then every test with the race detector (needs swtpm and nginx)'
	@echo 'lint        gofmt check and go vet'
	@echo 'demo        run signer + swtpm + agent and fetch an SVID'
	@echo 'demo-tier   run etcd + three signer replicas (a swtpm each) + an agent: policy apply, kill -9 a replica, the agent fails over'
	@echo 'etcd        build the etcd server into $(BIN)/etcd from its Go module (the version in go.mod)'
	@echo 'bench       build, start swtpm + signer + agent, run lanyard-bench and the Go benchmarks, print one table (BENCHMARKS.md)'
	@echo 'clean       remove build output'
	@echo 'install     install binaries ($$(BINDIR)), systemd units ($$(SYSTEMD_UNIT_DIR)) and example configs ($$(CONFDIR), never overwritten); honours DESTDIR and PREFIX'
	@echo 'uninstall   remove the binaries and units (configs and signer state stay)'
	@echo 'generate    regenerate proto/signerpb (needs protoc, protoc-gen-go, protoc-gen-go-grpc; the output is committed)'

build:
	@echo 'build: lanyard-agent, lanyard-signer, lanyard-bench into $(BIN)/ (the first build downloads and compiles the dependencies: a minute or two)'
	CGO_ENABLED=0 $(GO) build -tags $(BUILD_TAGS) -o $(BIN)/ ./cmd/lanyard-agent ./cmd/lanyard-signer ./cmd/lanyard-bench

# The TPM tests and the demo run a real software TPM (swtpm_setup and
# swtpm_localca come with swtpm-tools, certtool with its dependency
# gnutls-bin); the end-to-end test of `lanyard-agent exec` runs Debian's
# nginx. What is missing is installed with one apt-get update.
deps:
	@missing=""; \
	if ! command -v swtpm >/dev/null 2>&1 || ! command -v swtpm_setup >/dev/null 2>&1; then missing="$$missing swtpm swtpm-tools"; fi; \
	if [ ! -x /usr/sbin/nginx ]; then missing="$$missing nginx"; fi; \
	if [ -z "$$missing" ]; then \
		echo "deps: swtpm and nginx already installed"; \
	else \
		echo "deps: installing$$missing"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
	fi

swtpm-deps nginx-deps: deps

lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then \
		echo "gofmt: these files need formatting (run gofmt -w):"; \
		echo "$$unformatted"; \
		exit 1; \
	fi
	$(GO) vet ./...

# The end-to-end package runs last and verbose, so CI shows each of its
# tests as it passes; the others print one line per package.
test: deps lint
	@echo 'test: every package with the race detector; alongside, the end-to-end package (real binaries and swtpm), each test named as it passes'
	@$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v '/e2e$$') & unit=$$!; \
	$(GO) test -race -count=1 -timeout 20m -parallel 4 -v ./e2e; e2e=$$?; \
	wait $$unit; unit=$$?; \
	if [ $$e2e -ne 0 ] || [ $$unit -ne 0 ]; then echo "test: FAILED (unit packages exit $$unit, e2e exit $$e2e)"; exit 1; fi

demo: build swtpm-deps
	bash scripts/demo.sh

# The etcd server of the tier demo, built from the module go.mod pins (a
# `tool` there, so go mod tidy keeps what it needs): no package to install,
# the same version the tests embed.
etcd:
	$(GO) build -o $(BIN)/etcd go.etcd.io/etcd/server/v3

# Not part of `make test`: the tier's tests are e2e/tier*_test.go.
demo-tier: build etcd swtpm-deps
	bash scripts/demo-tier.sh

# One table: Go benchmarks of the hot paths, the signer scale run, then
# lanyard-bench against real processes (scripts/bench.sh; BENCHMARKS.md).
bench: swtpm-deps
	GO=$(GO) BUILD_TAGS=$(BUILD_TAGS) bash scripts/bench.sh

generate:
	protoc --go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative \
		proto/signerpb/signer.proto

clean:
	rm -rf $(BIN)

install: build
	install -d -m 0755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMD_UNIT_DIR) $(DESTDIR)$(CONFDIR)
	install -m 0755 $(BIN)/lanyard-agent $(BIN)/lanyard-signer $(DESTDIR)$(BINDIR)/
	for u in lanyard-agent.service lanyard-signer.service; do \
		sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/etc/lanyard/|$(CONFDIR)/|g' deploy/$$u >$(DESTDIR)$(SYSTEMD_UNIT_DIR)/$$u.tmp && \
		chmod 0644 $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$$u.tmp && \
		mv $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$$u.tmp $(DESTDIR)$(SYSTEMD_UNIT_DIR)/$$u || exit 1; \
	done
	@# World-readable: the signer runs as a DynamicUser; none of these is secret.
	@for f in agent.hcl signer.hcl policy.hcl; do \
		if [ -e $(DESTDIR)$(CONFDIR)/$$f ]; then \
			echo "install: keeping existing $(DESTDIR)$(CONFDIR)/$$f"; \
		else \
			install -m 0644 deploy/$$f $(DESTDIR)$(CONFDIR)/$$f && echo "install: $(DESTDIR)$(CONFDIR)/$$f (example: edit it)"; \
		fi; \
	done
	@echo 'install: done. Then: systemctl daemon-reload && systemctl enable --now lanyard-signer (signer host) or lanyard-agent (every host)'

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/lanyard-agent $(DESTDIR)$(BINDIR)/lanyard-signer
	rm -f $(DESTDIR)$(SYSTEMD_UNIT_DIR)/lanyard-agent.service $(DESTDIR)$(SYSTEMD_UNIT_DIR)/lanyard-signer.service
	@echo 'uninstall: $(DESTDIR)$(CONFDIR) and $(DESTDIR)/var/lib/lanyard-signer are left in place'
