# Every target works on a fresh machine: `make test` builds .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-host test-device lint board demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@bash tools/setup-system.sh
	touch $(STAMP)

test: setup lint
	$(PY) -m pytest tests -q -p no:cacheprovider
	$(PY) -m pytest --board virtual tests/device -q -p no:cacheprovider

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
	$(PY) bench/emulator.py
	$(PY) bench/provision.py

clean:
	rm -rf $(VENV) build *.egg-info
