# Two entry points: `make serve` and `make test`. Both set up .venv first (idempotent:
# the set-up re-runs only when pyproject.toml or this Makefile change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
WHISPER_VERSION := 20250625
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU wheel first: an unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# openai-whisper last and without its `triton` dependency (CUDA-only; pyproject.toml lists
	# its other dependencies), so pip neither fetches triton nor reports it missing.
	$(BIN)/python -m pip install --quiet --no-deps openai-whisper==$(WHISPER_VERSION)
	touch $(STAMP)

serve: install
	HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m app

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
