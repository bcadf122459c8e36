# The two entry points of the README. Each sets up the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) benchmarks/parity_demo.py

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
