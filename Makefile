# The two entry points of the README. Each sets up the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/visionmamba demo --overwrite  # make demo replaces its previous run

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations 15 tests  # two workers, a test file each (pytest-xdist); the slowest listed

clean:
	rm -rf $(VENV) build *.egg-info
