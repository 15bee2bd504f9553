# ML-Playground: two commands on a fresh clone.
#   make demo   set up .venv if missing, then run the stages in order on the shipped data
#   make test   set up .venv, then run the pytest suite
# GPU users: `conda env create -f envs/mtml.yaml && conda activate mtml`, then `make demo`:
# inside the activated `mtml` env the Makefile uses it instead of creating .venv.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ifeq ($(CONDA_DEFAULT_ENV),mtml)
PY ?= $(CONDA_PREFIX)/bin/python
else
PY ?= .venv/bin/python
endif
PYTHON_BOOTSTRAP ?= python3
# torch==2.13.0 is a CPU build on this project's CI machines; a user may set e.g.
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" for a small CPU build.
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2

.PHONY: help venv demo stage0 stage1 test clean
help:
	@echo "make demo    run Stage 0 -> 1 on the shipped data (creates .venv on first use)"
	@echo "make test    run the test suite (creates .venv on first use)"
	@echo "make stage1  Stage 1 in full: the encoding table and the wB trade-off sweep (~10 min)"
	@echo "make clean   remove generated data and runs (keeps .venv and results/)"

# The venv is (re)built when requirements.txt changes; a stamp file records the last install.
.venv/.installed: requirements.txt
	@if [ "$(PY)" = ".venv/bin/python" ] && [ ! -x .venv/bin/python ]; then \
	  echo "creating .venv with $(PYTHON_BOOTSTRAP)"; $(PYTHON_BOOTSTRAP) -m venv .venv; fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -r requirements.txt
	@mkdir -p .venv && touch $@

venv: .venv/.installed

stage0: venv
	$(PY) envs/check_env.py

demo: venv stage0
	$(PY) stage1_adult/01_load_and_peek.py
	$(PY) stage1_adult/02_preprocess.py
	$(PY) stage1_adult/03_train_mtml.py --threads $(THREADS)
	@echo "demo done: see runs/ for metrics.json and curves.png, README.md for what they mean"

stage1: venv
	$(PY) stage1_adult/01_load_and_peek.py --plots
	$(PY) stage1_adult/02_preprocess.py
	$(PY) stage1_adult/02_preprocess.py --keep-leaky
	$(PY) stage1_adult/04_mtml_tradeoff.py --threads $(THREADS)

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf runs stage1_adult/*.npz stage1_adult/*_meta.json stage2_ctr/data
