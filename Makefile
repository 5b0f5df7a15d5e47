# Fresh machine:  make demo   (set up, then generate with the bundled model)
#                 make test   (set up, then run the whole test suite)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test chat clean

setup: $(STAMP)

# torch is pinned and installed first: a bare requirement would fetch the newest CUDA build.
# From PyPI alone, torch==2.13.0 on Linux x86_64 is still the CUDA build (about 17 NVIDIA
# packages, several GB); TORCH_INDEX=URL of PyTorch's CPU wheel index installs the CPU-only
# wheel (~200 MB) instead, e.g. make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/edgemoe generate --prompt "def fibonacci(n):" --max-tokens 80 --temperature 0 --repetition-penalty 1.15

chat: setup
	$(BIN)/edgemoe chat

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
