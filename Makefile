# Two commands do all set-up on a fresh machine:
#   make demo   -- bootstrap .venv, then run the main job on embedded defaults
#   make test   -- bootstrap .venv, then run the test suite
# Also: make lint (ruff + import-linter, run by CI), make lock (refresh requirements/lock.txt).
.PHONY: demo test lint lock bootstrap
VENV := .venv
PYTEST_ARGS ?= -n 2

$(VENV)/.kvcast-ready: pyproject.toml requirements/lock.txt scripts/bootstrap.sh
	bash scripts/bootstrap.sh

bootstrap: $(VENV)/.kvcast-ready

demo: $(VENV)/.kvcast-ready
	$(VENV)/bin/kvcast demo

test: $(VENV)/.kvcast-ready
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.kvcast-ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Re-resolve every dependency (all extras, torch's CPU build) into requirements/lock.txt with hashes.
lock: $(VENV)/.kvcast-ready
	$(VENV)/bin/pip install -q pip-tools
	$(VENV)/bin/pip-compile -q --extra dev --generate-hashes --strip-extras --no-emit-index-url \
	    --no-emit-find-links --unsafe-package torch --unsafe-package kvcast \
	    -o requirements/lock.txt pyproject.toml requirements/torch-cpu.in
