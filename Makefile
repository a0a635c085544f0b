# The two commands a new machine needs: `make demo` and `make test`. Each sets up .venv first
# (CPU torch; on a CUDA machine install your CUDA torch into the venv first: it is kept).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEPS := numpy safetensors tqdm transformers tokenizers peft triton matplotlib pytest ninja setuptools wheel lomo-optim badam pyyaml datasets accelerate trl
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

# The suite runs once per ATen CPU capability (native, then capped at AVX2 and at the portable
# build; hift._C's CPU kernel follows the same cap), so a test whose verdict depends on the
# CPU fails here rather than on someone else's machine. The capped runs leave out the slow
# tests (memory measurements in fresh processes), whose verdicts the cap does not touch, except
# the bitwise ones: runs whose sums are cut differently (ranks, threads) held equal bit for bit;
# and the files whose verdicts no instruction set can change (isa_blind: tests/conftest.py).
CAPABILITIES ?= native avx2 default

test: setup
	@for cap in $(CAPABILITIES); do \
	  echo "== tests with ATEN_CPU_CAPABILITY=$$cap"; \
	  if [ "$$cap" = native ]; then $(PY) -m pytest -q tests || exit 1; \
	  else ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -m "(not slow or bitwise) and not isa_blind" tests || exit 1; fi; \
	done

clean:
	rm -rf build *.egg-info python/hift/*.so
