# The two set-up commands of the README live here:
#   make demo   set up a virtual environment and run the main job
#   make test   set up a virtual environment with the test and cluster extras and run the tests
#   make docs   run the tutorial and build the documentation (mkdocs, warnings are errors)
# Both install torch==2.13.0 (CPU) before the project, so that pip never pulls a CUDA build.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: setup setup-test setup-docs demo test docs bench clean

setup: $(VENV)/.molnets-installed

$(VENV)/.molnets-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	touch $@

setup-test: $(VENV)/.molnets-test-installed

# torch-cluster ships only its source on PyPI: it is built against the torch installed above
# (about 7 minutes on 2 cores the first time, then from pip's wheel cache).
$(VENV)/.molnets-test-installed: $(VENV)/.molnets-installed
	$(PIP) install ninja
	$(PIP) install --no-build-isolation "torch-cluster>=1.6"
	$(PIP) install -e ".[test,cluster]"
	touch $@

setup-docs: $(VENV)/.molnets-docs-installed

$(VENV)/.molnets-docs-installed: $(VENV)/.molnets-installed
	$(PIP) install -e ".[docs]"
	touch $@

demo: setup
	$(VENV)/bin/molnets demo

test: setup-test
	$(PY) -m pytest -q

# The tutorial is executed once (its printed output and PNGs go into docs/tutorial/index.md),
# then the site is built into build/site; a broken reference or any warning fails.
docs: setup-docs
	$(PY) docs/render_tutorial.py
	$(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build dist src/*.egg-info
