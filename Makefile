# fleetckpt.xen — developer and user entry points. Targets create and reuse a local venv (.venv) with the
# pinned requirements. `make demo` runs the main job on the local Xen lab; `make test` runs what CI runs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAB := $(BIN)/python tests/lab/labctl.py
PYTEST := $(BIN)/python -m pytest -p no:cacheprovider

.PHONY: help bench venv units sanity lint build docs-check changelog-lint check test e2e demo lab-deps lab-build lab-up lab-down lab-status clean

help:
	@echo "make demo      bring up the local Xen lab and checkpoint its VMs (memory exclusion vs native)"
	@echo "make test      everything CI runs: sanity, lint, unit tests, the lab's end-to-end tests"
	@echo "make bench     memory exclusion vs native xl save on the lab (QUICK=1: ten minutes); docs/benchmarks.md"
	@echo "make units | sanity | lint | build | e2e | lab-up | lab-down | lab-status"

$(STAMP): requirements.txt requirements-dev.txt requirements-host.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

venv: $(STAMP)

units: $(STAMP)
	$(PYTEST) -q tests/unit

sanity: $(STAMP)
	VENV=$(abspath $(VENV)) tests/tools/sanity.sh

lint: $(STAMP)
	@rm -rf /tmp/fleetckpt-lint && tests/tools/collection-tree.sh /tmp/fleetckpt-lint >/dev/null
	cd /tmp/fleetckpt-lint/ansible_collections/fleetckpt/xen && \
	  ANSIBLE_COLLECTIONS_PATH=/tmp/fleetckpt-lint $(abspath $(BIN))/ansible-lint --offline

build: $(STAMP)
	@mkdir -p build && rm -f build/fleetckpt-xen-*.tar.gz
	$(BIN)/ansible-galaxy collection build --force --output-path build .

docs-check: build
	$(BIN)/python tests/tools/check_docs.py build

changelog-lint: $(STAMP)
	$(BIN)/antsibull-changelog lint

check: units sanity lint docs-check changelog-lint

lab-deps:
	bash tests/lab/install-deps.sh

lab-build: $(STAMP) lab-deps
	$(LAB) build

lab-up: $(STAMP) lab-deps
	$(LAB) up

lab-down: $(STAMP)
	$(LAB) down

lab-status: $(STAMP)
	$(LAB) status

# The lab first (so that a broken lab fails here, with its logs), then one pytest per Xen host at once
# (tests/e2e/run-per-host.sh); FLEETCKPT_LAB_DOWN_AFTER=1 (CI) stops the lab afterwards, whatever happened.
e2e: $(STAMP) lab-deps
	@rc=0; $(LAB) up && { PYTEST="$(PYTEST)" tests/e2e/run-per-host.sh || rc=$$?; } || rc=$$?; \
	  if [ "$${FLEETCKPT_LAB_DOWN_AFTER:-0}" = 1 ]; then $(LAB) down || true; fi; exit $$rc

test: check e2e

demo: $(STAMP) lab-deps
	$(BIN)/python tests/demo.py

# Memory exclusion against native xl save on the lab (docs/benchmarks.md); QUICK=1: the ten-minute subset;
# CELLS="idle:aged:1024:3 ...": only these cells of the full run (WORKLOAD:STATE:RAM_MB[:REPS]); BUDGET=minutes
# (the full run's default: 60); DISKS=1: only the disk-capture study (docs/disk-strategies.md); FLEET=1: only the
# fleet-scaling study (its own section of docs/benchmarks.md)
bench: $(STAMP) lab-deps
	$(BIN)/python bench/run.py $(if $(QUICK),--quick) $(if $(STORE),--store $(STORE)) $(foreach c,$(CELLS),--cell $(c)) \
		$(if $(BUDGET),--budget-min $(BUDGET)) $(if $(DISKS),--disks-only) $(if $(FLEET),--fleet-only)

clean:
	rm -rf build tests/output
