# Lanyard: build, test and demo. `make help` lists the targets.

GO ?= go
BIN := bin
# apt-get needs root; CI runs as root and has no sudo.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: all build swtpm-deps test lint demo bench clean help generate

all: build

help:
	@echo 'build       build lanyard-agent and lanyard-signer into $(BIN)/ (static, CGO_ENABLED=0)'
	@echo 'swtpm-deps  install swtpm and swtpm-tools with apt-get when swtpm is missing'
	@echo 'test        lint, then every test with the race detector (needs swtpm)'
	@echo 'lint        gofmt check and go vet'
	@echo 'demo        run signer + swtpm + agent and fetch an SVID'
	@echo 'bench       build, start swtpm + signer + agent, run lanyard-bench and the Go benchmarks, print one table (BENCHMARKS.md)'
	@echo 'clean       remove build output'
	@echo 'generate    regenerate proto/signerpb (needs protoc, protoc-gen-go, protoc-gen-go-grpc; the output is committed)'

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/lanyard-agent ./cmd/lanyard-signer

# The TPM tests and the demo run a real software TPM. swtpm_setup and
# swtpm_localca come with swtpm-tools, certtool with its dependency gnutls-bin.
swtpm-deps:
	@if command -v swtpm >/dev/null 2>&1 && command -v swtpm_setup >/dev/null 2>&1; then \
		echo "swtpm-deps: swtpm already installed ($$(command -v swtpm))"; \
	else \
		echo "swtpm-deps: installing swtpm and swtpm-tools"; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y swtpm swtpm-tools; \
	fi

lint:
	@unformatted="$$(gofmt -l .)"; \
	if [ -n "$$unformatted" ]; then \
		echo "gofmt: these files need formatting (run gofmt -w):"; \
		echo "$$unformatted"; \
		exit 1; \
	fi
	$(GO) vet ./...

test: swtpm-deps lint
	$(GO) test -race -count=1 -timeout 20m ./...

demo: build swtpm-deps
	bash scripts/demo.sh

# One table: Go benchmarks of the hot paths, the signer scale run, then
# lanyard-bench against real processes (scripts/bench.sh; BENCHMARKS.md).
bench: swtpm-deps
	GO=$(GO) bash scripts/bench.sh

generate:
	protoc --go_out=. --go_opt=paths=source_relative \
		--go-grpc_out=. --go-grpc_opt=paths=source_relative \
		proto/signerpb/signer.proto

clean:
	rm -rf $(BIN)
