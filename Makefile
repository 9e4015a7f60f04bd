# `make run`: install into .venv and run the default job; `make test`: install and run the test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/ppocr_prune_quant.yml

$(VENV)/.installed: setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) tools/run.py -c $(CONFIG)

test: install
	$(PY) -m pytest -m "not slow" tests

.PHONY: install run test
