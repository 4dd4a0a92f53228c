# `make serve`: set up (first time) and serve the default model on http://127.0.0.1:8000/v1
# `make test`:  set up (first time) and run the test suite
.PHONY: setup serve generate test test-all bench
HOST ?= 127.0.0.1
PORT ?= 8000
PROMPT ?= Write a haiku about looms.

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/loom serve --host $(HOST) --port $(PORT)

generate: setup
	.venv/bin/loom generate "$(PROMPT)"

test: setup
	.venv/bin/python -m pytest -q

test-all: setup
	.venv/bin/python -m pytest -q -m ''
