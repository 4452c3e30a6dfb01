# tsnetchat: `make demo` and `make test` set up everything they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
# Every test run's children carry this, so scripts/no-leftovers.sh finds only its own.
RUN_ID := $(shell od -An -N6 -tx1 /dev/urandom | tr -d ' \n')

.PHONY: setup sysdeps lab-bins container-root nats-bin codegen check-codegen lint test demo bench lab-up lab-down clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[server,dev,bench,api]'
	touch $@

sysdeps:
	@scripts/install-sysdeps.sh

lab-bins: $(STAMP)
	@$(BIN)/python scripts/tailnet_lab.py build >/dev/null || { \
	  if [ -n "$$CI" ]; then echo "tailnet binaries are required in CI" >&2; exit 1; fi; \
	  echo "*** tailnet binaries unavailable: tailnet tests will SKIP ***" >&2; }

# The Debian root the systemd tests boot (systemd-nspawn), cached in ~/.cache/tsnetchat/nspawn.
container-root: $(STAMP) sysdeps
	@$(BIN)/python scripts/container_root.py build >/dev/null || { \
	  if [ -n "$$CI" ]; then echo "the container root is required in CI" >&2; exit 1; fi; \
	  echo "*** container root unavailable: systemd boot tests will SKIP ***" >&2; }

nats-bin: $(STAMP)
	@$(BIN)/python scripts/nats_lab.py build >/dev/null || { \
	  if [ -n "$$CI" ]; then echo "nats-server is required in CI" >&2; exit 1; fi; \
	  echo "*** nats-server unavailable: cluster tests will SKIP ***" >&2; }

setup: $(STAMP) sysdeps lab-bins container-root nats-bin

codegen: $(STAMP)
	$(BIN)/python scripts/codegen.py

check-codegen: $(STAMP)
	$(BIN)/python scripts/codegen.py --check

lint: $(STAMP)
	$(BIN)/ruff check tsnetchat tests scripts bench
	$(BIN)/mypy

test: setup check-codegen lint
	TSNETCHAT_RUN_ID=$(RUN_ID) $(BIN)/pytest $(ARGS)
	@TSNETCHAT_RUN_ID=$(RUN_ID) scripts/no-leftovers.sh after

demo: setup
	$(BIN)/python scripts/demo.py $(ARGS)

.PHONY: demo-cluster
demo-cluster: setup
	$(BIN)/python scripts/demo.py --cluster $(ARGS)

bench: setup
	$(BIN)/python bench/run.py $(ARGS)

lab-up: setup
	scripts/dev-tailnet up

lab-down:
	scripts/dev-tailnet down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
