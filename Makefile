# The two commands of the README. Both build the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed

.PHONY: run test bench schemas clean

run: $(STAMP)  ## the main job on the embedded defaults
	$(BIN)/feedloop demo

test: $(STAMP)  ## the whole test suite (needs PostgreSQL on 127.0.0.1:5432)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/gateway_ingest.py

schemas: $(STAMP)  ## re-export the event contract's JSON Schemas after changing it
	$(BIN)/feedloop schema export schemas/v1

# torch comes first, pinned, from the local CPU wheel: any other torch request would pull
# gigabytes of CUDA wheels. constraints.txt keeps every later install from moving it.
$(STAMP): setup.cfg constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[train,dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) data runs
