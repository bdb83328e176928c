# Two commands do all set-up on a fresh machine:
#   make demo   -- bootstrap .venv, then run the main job on embedded defaults
#   make test   -- bootstrap .venv, then run the test suite
.PHONY: demo test bootstrap
VENV := .venv
PYTEST_ARGS ?= -n 2

$(VENV)/.kvcast-ready: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh

bootstrap: $(VENV)/.kvcast-ready

demo: $(VENV)/.kvcast-ready
	$(VENV)/bin/kvcast demo

test: $(VENV)/.kvcast-ready
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
