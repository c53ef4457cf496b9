# Two commands set up everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The venv's tools first on PATH, so `dvc repro` stage commands run `python -m pipeline` from the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-fast lint clean-demo

install: $(STAMP)

# Reinstall when the dependency list changes. torch/torchvision come unpinned from the registry.
# stardist goes in with --no-deps: we only read the nuclei TIFF it ships (demo data), not its TensorFlow code.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps stardist
	touch $(STAMP)

demo: $(STAMP)
	dvc repro
	@echo; echo "demo done:"; \
	  echo "  raw dataset          data/raw/demo"; \
	  echo "  validation report    reports/demo/validate.json (quarantine: data/clean/demo/_quarantine)"; \
	  echo "  preprocessed dataset data/preprocessed/demo"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check sam3 pipeline tests bench
	$(VENV)/bin/ruff format --check sam3 pipeline tests bench

# Prefect server and deployments (make prefect-up / prefect-down)
-include make/prefect.mk
