# Two commands on a fresh machine:
#   make demo   - build .venv, then prepare -> train -> predict on dataset_example/ and sample_images/
#   make test   - build .venv, then run the test suite (the command CI runs)
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-all example clean-outputs

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VPY) prepare_dataset.py -p dataset_example
	PYTHON=$(abspath $(VPY)) src/train_lcpn.sh
	$(VPY) src/predict.py -p sample_images
	$(VPY) src/evaluate.py --output result_images/example

test: setup
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(VPY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

example: setup
	$(VPY) tools/make_example_dataset.py
