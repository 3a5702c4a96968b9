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
# Root installs Debian packages directly; anyone else through passwordless sudo, if there is one.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: install serve test test-services students clean

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

test: install test-services
	$(BIN)/python -m pytest tests

# A real Prometheus for tests/test_prometheus.py (Debian's package, about 15 s). Without root or
# sudo the install fails, the warning says so, and those tests skip with the same reason.
test-services:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
		echo "WARNING: could not install Debian's prometheus package: the Prometheus tests will be SKIPPED"

# The distilled students served as tiny.en:distilled and base:distilled (python -m optim.distill;
# about 15 and 35 minutes on 2 cores). DISTILL_DATA: unlabeled audio (a manifest.jsonl, a folder
# with one, or a folder of audio files); default: ../shared/eval/en_untranscribed.
students: install
	$(BIN)/python -m optim.distill --teacher tiny.en $(if $(DISTILL_DATA),--data $(DISTILL_DATA))
	$(BIN)/python -m optim.distill --teacher base $(if $(DISTILL_DATA),--data $(DISTILL_DATA))

clean:
	rm -rf $(VENV) .pytest_cache
