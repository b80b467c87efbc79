# Two commands for a newcomer: `make run` and `make test`. Both create and
# reuse .venv/ and install everything themselves (idempotent: the stamp file
# is redone only when pyproject.toml or this Makefile change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flashcap-installed
# Models are never fetched from a hub: everything is local.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test test-slow lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare `torch` resolved by pip elsewhere may pull GBs.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python jobs/caption_videos.py

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

lint: $(STAMP)
	$(BIN)/ruff check flash pipeline actors jobs bench demo tests

clean:
	rm -rf $(VENV) out .pytest_cache
