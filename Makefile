# Two commands do everything on a fresh machine:
#   make run    set up .venv, generate the sample corpus, run recipes/sample.yaml on an embedded Ray
#               (download, ingest, dedup, tokenize, mix), verify the shards, train a tiny Llama on
#               them for 30 steps, print the mixture statistics
#   make test   set up .venv and run the test suite
#
# TORCH=cpu|cu126|cu130 picks torch's build from PyTorch's index (`make setup TORCH=cpu` on a CPU
# machine, cu126 on GPU nodes whose driver is older than 580); unset, pip takes the pinned release
# from the configured indexes (PyPI: the CUDA 13.0 build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?=
TORCH_VERSION := $(shell sed -n 's/^ *"torch==\([0-9.]*\)".*/\1/p' pyproject.toml)
TORCH_BUILD   := $(if $(TORCH),'torch==$(TORCH_VERSION)+$(TORCH)' --extra-index-url https://download.pytorch.org/whl/$(TORCH))

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH_BUILD)
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/tinyprep sample data/sample
	$(BIN)/tinyprep run recipes/sample.yaml
	$(BIN)/tinyprep verify runs/sample
	$(BIN)/tinyprep train recipes/sample.yaml
	$(BIN)/tinyprep stats runs/sample

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python tests/benchmarks/bench_ingest.py
	$(BIN)/python tests/benchmarks/bench_tokenize.py
	$(BIN)/python tests/benchmarks/bench_encoder.py
	$(BIN)/python tests/benchmarks/bench_dedup.py
	$(BIN)/python tests/benchmarks/bench_loader.py
	$(BIN)/python tests/benchmarks/bench_scaling.py
	$(BIN)/python tests/benchmarks/bench_plan_rates.py
	$(BIN)/python tests/benchmarks/bench_train.py

clean:
	rm -rf runs data .pytest_cache
