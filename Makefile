# luksext — see README.md. Targets:
#   build     static plugin binaries (CGO_ENABLED=0) in build/bin, version stamped
#   install   DESTDIR=... the xapi-storage-script layout (atomic)
#   test      every tier: unit, conformance, TPM/Tang interop, VM end-to-end
#   lint      gofmt + go vet + staticcheck (pinned in tests/lint/go.mod)
#   bench     figures side by side with the reference tools, as ratios
#   fuzz      FUZZTIME (default 5m) of the structured VHD fuzzer (plugins/vhd FuzzVHD);
#             its seed corpus already runs in every `go test`
#   demo      build, then create/attach/use/detach an encrypted SR in a VM with a vTPM
#   rpm       binary + source RPM (xcp-ng.spec) in build/rpm, offline once `go mod download` ran
GO       ?= go
DESTDIR  ?=
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X github.com/luksext/luksext/sr-types/luksext.Version=$(VERSION)
BIN      := build/bin
TESTTIMEOUT ?= 85m
FUZZTIME ?= 5m

export CGO_ENABLED := 0
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: build install test lint bench fuzz demo clean rpm

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/volume ./volume
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/datapath ./datapath
	@# A __main__.py zip appended: xapi's observer.py wrapper runpy-runs the method files.
	$(GO) run ./packaging/runpyzip $(BIN)/volume $(BIN)/datapath

install: build
	packaging/install-layout.sh '$(DESTDIR)' $(BIN)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool -modfile=tests/lint/go.mod staticcheck ./...

test: lint build
	$(GO) test -count=1 -timeout $(TESTTIMEOUT) ./...

# One table (tests/cmd/benchtable) from the BENCH lines; the whole output
# is kept in build/bench.log, and a failing bench fails the target.
bench: build
	$(GO) test -tags bench -run '^TestBench' -count=1 -v -timeout 60m ./... > build/bench.log 2>&1; \
	status=$$?; grep -E '^(BENCH|--- FAIL|FAIL|ok )' build/bench.log | $(GO) run ./tests/cmd/benchtable; exit $$status

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzVHD$$' -fuzztime $(FUZZTIME) ./plugins/vhd

demo: build
	rm -rf build/demo && mkdir -p build/demo
	$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/build/demo/root BIN=$(CURDIR)/$(BIN)
	$(GO) build -o $(BIN)/vmrun ./tests/vm/cmd/vmrun
	$(BIN)/vmrun -tpm -disk 64M -workdir $(CURDIR)/build/demo -f tests/demo/demo.sh

# RPM_FROM=HEAD packs `git archive HEAD` instead of the working tree's tracked files.
RPMDIR   ?= build/rpm
rpm:
	packaging/build-rpm.sh '$(RPMDIR)'

clean:
	rm -rf build
