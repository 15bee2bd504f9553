# ML-Playground: two commands on a fresh clone.
#   make demo   set up .venv if missing, then run the stages in order on the shipped data
#   make test   set up .venv, then run the pytest suite
# Any environment works: `make demo PY=python` (or PY=/path/to/python) uses that interpreter;
# without PY, an activated venv or conda env (VIRTUAL_ENV / CONDA_PREFIX) whose python has torch
# is used (e.g. `conda env create -f envs/mtml.yaml && conda activate mtml && make demo`);
# otherwise .venv is created and used.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))
ifndef PY
ifneq ($(ACTIVE_ENV),)
ifeq ($(shell "$(ACTIVE_ENV)/bin/python" -c "import torch" 2>/dev/null && echo yes),yes)
PY := $(ACTIVE_ENV)/bin/python
endif
endif
endif
PY ?= .venv/bin/python
PYTHON_BOOTSTRAP ?= python3
# torch==2.13.0 is a CPU build on this project's CI machines; a user may set e.g.
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" for a small CPU build.
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 2

.PHONY: help venv demo stage0 stage1 stage2 stage3 gpu test clean
help:
	@echo "make demo    run Stage 0 -> 1 -> 2 -> 3 (quick) on shipped/synthetic data (creates .venv on first use)"
	@echo "make test    run the test suite (creates .venv on first use)"
	@echo "make stage1  Stage 1 in full: the encoding table, the wB trade-off sweep, DataLoader tuning (~22 min)"
	@echo "make stage2  Stage 2 in full: crosses per regime, the MLP probe, MovieLens, benchmarks, the one-epoch phenomenon, sparse vs dense (~155 min)"
	@echo "make stage3  Stage 3 in full: MMoE/PLE, task correlation, imbalance, throughput, latency, user history, ESMM (~175 min)"
	@echo "make gpu     the prepared GPU run (CUDA machines; estimated ~10 GB disk, ~12 GB RAM, ~8 GB GPU memory):"
	@echo "             check_env --require-cuda, 07_gpu.py -> results/gpu.md, then Stage 1 06 and"
	@echo "             Stage 3 06 on --device cuda -> results/*_cuda.md (CPU tables stay)"
	@echo "make ... PY=python  use the interpreter of any environment (default: an active env with torch, else .venv)"
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
	@echo "== Stage 1: UCI Adult, shared-bottom multi-task MLP =="
	$(PY) stage1_adult/01_load_and_peek.py
	$(PY) stage1_adult/02_preprocess.py
	$(PY) stage1_adult/03_train_mtml.py --threads $(THREADS)
	@echo "== Stage 2: Criteo-format CTR (synthetic data with a known optimum) =="
	$(PY) stage2_ctr/01_make_subset.py --synthetic 200000
	$(PY) stage2_ctr/02_dataloader.py stage2_ctr/data/synthetic/train.txt --report-collisions
	$(PY) stage2_ctr/train_ctr.py --model deepfm --epochs 2 --batch-size 2048 --lr 0.002 \
	    --mlp 256,128 --threads $(THREADS)
	$(PY) stage2_ctr/05_movielens.py --quick --threads $(THREADS)
	@echo "== Stage 3: MMoE / PLE on Adult, inference latency vs batch size (quick modes) =="
	$(PY) stage3_advanced/01_mtl_adult.py --quick --threads $(THREADS)
	$(PY) stage3_advanced/06_latency.py --quick
	@$(PY) summary.py

stage1: venv
	$(PY) stage1_adult/01_load_and_peek.py --plots
	$(PY) stage1_adult/02_preprocess.py
	$(PY) stage1_adult/02_preprocess.py --keep-leaky
	$(PY) stage1_adult/04_mtml_tradeoff.py --threads $(THREADS)
	$(PY) stage1_adult/05_what_matters.py --threads $(THREADS)
	$(PY) stage1_adult/06_dataloader_tuning.py

stage2: venv
	$(PY) stage2_ctr/01_make_subset.py --synthetic 2000000 --val-frac 0 --test-frac 0 \
	    --out-dir stage2_ctr/data/bench2m
	$(PY) stage2_ctr/03_compare_models.py
	$(PY) stage2_ctr/04_can_an_mlp_multiply.py --threads $(THREADS)
	$(PY) stage2_ctr/05_movielens.py --threads $(THREADS)
	$(PY) stage2_ctr/06_bench_throughput.py --file stage2_ctr/data/bench2m/train.txt
	$(PY) stage2_ctr/07_binary_cache.py stage2_ctr/data/bench2m/train.txt \
	    --out stage2_ctr/data/bench2m/train.bin
	$(PY) stage2_ctr/07_binary_cache.py --read stage2_ctr/data/bench2m/train.bin
	$(PY) stage2_ctr/08_one_epoch.py
	$(PY) stage2_ctr/09_sparse_or_dense.py

stage3: venv
	$(PY) stage1_adult/02_preprocess.py
	$(PY) stage3_advanced/01_mtl_adult.py --threads $(THREADS)
	$(PY) stage3_advanced/02_task_correlation.py --threads $(THREADS)
	$(PY) stage3_advanced/03_mtl_ctr.py --make-data --threads $(THREADS)
	$(PY) stage3_advanced/04_imbalance.py --make-data --threads $(THREADS)
	$(PY) stage3_advanced/05_throughput.py --threads $(THREADS)
	$(PY) stage3_advanced/06_latency.py
	$(PY) stage3_advanced/08_user_history.py --threads 1
	$(PY) stage3_advanced/09_esmm.py --make-data --threads $(THREADS)

gpu: venv
	$(PY) envs/check_env.py --require-cuda
	$(PY) stage3_advanced/07_gpu.py
	$(PY) stage1_adult/06_dataloader_tuning.py --device cuda
	$(PY) stage3_advanced/06_latency.py --device cuda

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf runs stage1_adult/*.npz stage1_adult/*_meta.json stage2_ctr/data stage3_advanced/data
