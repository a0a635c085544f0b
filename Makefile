# The two commands a new machine needs: `make demo` and `make test`. Each sets up .venv first
# (CPU torch; on a CUDA machine install your CUDA torch into the venv first: it is kept).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEPS := numpy safetensors tqdm transformers tokenizers peft triton matplotlib pytest ninja setuptools wheel lomo-optim badam
export MAX_JOBS ?= 2

.PHONY: setup demo test bench clean

setup: $(VENV)/.hift-installed

$(VENV)/.hift-installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/hift demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info python/hift/*.so
