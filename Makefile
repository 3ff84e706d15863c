# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The simulator core is compiled with mypyc at install; rebuild whenever its sources change.
CORE := simulator/engine.py simulator/timing.py

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml setup.py $(CORE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # the CPU build, before anything can pull a CUDA one
	$(PY) -m pip install -q -e '.[dev,length]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/block demo --workspace workspace/demo --qps 30 --requests 400 --max-output 512

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) build *.egg-info simulator/*.so
