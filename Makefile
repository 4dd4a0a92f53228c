# `make serve`: set up (first time) and serve the default model on http://127.0.0.1:8000/v1
# `make test`:  set up (first time) and run the test suite
.PHONY: setup setup-models serve generate test test-all test-cuda
HOST ?= 127.0.0.1
PORT ?= 8000
PROMPT ?= Write a haiku about looms.

setup:
	@bash scripts/setup.sh

setup-models:
	@LOOM_EXTRA_MODELS=1 bash scripts/setup.sh

serve: setup
	.venv/bin/loom serve --host $(HOST) --port $(PORT)

generate: setup
	.venv/bin/loom generate "$(PROMPT)"

test: setup
	.venv/bin/python -m pytest -q

test-all: setup-models
	.venv/bin/python -m pytest -q -m 'not cuda'

test-cuda: setup
	.venv/bin/python -m pytest -q -m cuda
