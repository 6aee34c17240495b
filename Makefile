# Every target works on a fresh machine: `make test` builds .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The faithful board models (32-bit builds, the real rp2 firmware; see docs/guides/board-models.md):
# from the environment, else the project's shared folder beside a checkout when there is one.
# Without them the tests that need them are skipped, saying why (CI makes that a failure).
MICROCOT_FIDELITY_DIR ?= $(abspath $(wildcard ../shared/fidelity))
export MICROCOT_FIDELITY_DIR

.PHONY: setup test test-host test-device lint board demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,docs]'
	@bash tools/setup-system.sh
	touch $(STAMP)

test: setup lint
	@[ -n "$(MICROCOT_FIDELITY_DIR)" ] || echo "note: MICROCOT_FIDELITY_DIR is not set: tests on the faithful board models (32-bit builds, the real RP2040 firmware) are skipped; see docs/guides/board-models.md"
	PY=$(PY) bash tools/test.sh

lint: setup
	$(VENV)/bin/ruff check .

board: setup
	$(VENV)/bin/microcot board virtual --name demo --deploy

demo: setup
	$(VENV)/bin/microcot demo

bench: setup
	$(PY) bench/footprint.py
	$(PY) bench/xtea.py
	$(PY) bench/payload.py
	$(PY) bench/ws.py
	$(PY) bench/agent.py
	$(PY) bench/download.py
	$(PY) bench/emulator.py
	$(PY) bench/provision.py
	$(PY) bench/rest.py

clean:
	rm -rf $(VENV) build *.egg-info
