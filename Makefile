# gpufed: `make run` starts the embedded demo federation, `make test` runs the test suite.
# Both set up what they need on a fresh machine (virtual environment, etcd binary).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: all setup etcd prometheus chromium compare-nvidia-smi run test test-upgrade test-faults test-fuzz bench proto lint clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) etcd prometheus chromium

etcd:
	@scripts/ensure_etcd.sh

# For the test that runs NVIDIA's Grafana dashboard through a real Prometheus.
prometheus:
	@scripts/ensure_prometheus.sh

# For the console's tests in a headless browser.
chromium:
	@scripts/ensure_chromium.sh

run: setup
	$(BIN)/python -m control_plane.demo

test: setup
	$(BIN)/pytest -q

# The rolling upgrade from the last release tag, alone (`make test` runs it too).
test-upgrade: setup
	$(BIN)/pytest -q tests/upgrade

# The fault suite's long form (three rounds of every fault, twice the clients; about 5 minutes)
# and every other test that kills processes. `make test` runs the short form.
test-faults: setup
	GPUFED_FAULTS=long $(BIN)/pytest -q -s -m fault tests --timeout 1800

# The fuzz suite, 10x deeper than in `make test` (about 15 minutes).
test-fuzz: setup
	GPUFED_FUZZ_EXAMPLES=10 $(BIN)/pytest -q tests/fuzz --timeout 3600

# On a GPU host: the daemon's readings against `nvidia-smi -q -x`, field by field (docs/nvidia.md).
compare-nvidia-smi: $(STAMP)
	$(BIN)/python scripts/compare_nvidia_smi.py --out nvidia-smi-comparison.md

bench: setup
	$(BIN)/python -m bench

proto: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gpufed control_plane node_daemon bench tests scripts hooks
	$(BIN)/python scripts/check_layers.py
	$(BIN)/python scripts/render_authorization.py --check
	@if command -v npm >/dev/null; then npm exec --yes --package=@bufbuild/buf@1.75.0 -- buf lint proto; \
	else echo 'buf lint skipped: no npm'; fi
	@# The wire contract against the last release (proto/buf.yaml lists the exceptions).
	@ref=$$($(BIN)/python scripts/releases.py last) || exit 1; \
	if command -v npm >/dev/null; then echo "buf breaking against $$ref"; \
	  npm exec --yes --package=@bufbuild/buf@1.75.0 -- buf breaking proto --against ".git#ref=$$ref,depth=1000,subdir=proto"; \
	else echo 'buf breaking skipped: no npm'; fi

clean:
	rm -rf $(VENV) .run build *.egg-info
