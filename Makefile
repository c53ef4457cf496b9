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

# The whole DVC pipeline on the demo dataset, then overlays of the fine-tuned model on three test images.
# The demo model is the tiny random-init architecture trained for a few CPU steps: it shows the pipeline
# working end to end, not accuracy (bring facebook/sam3 weights for that: see README).
DEMO_IMAGES := $(addprefix data/raw/demo/test/,coins_bottom_right.png voc_bottom_right.png nuclei_r1c1.png)
demo: $(STAMP)
	dvc repro
	$(PY) -m pipeline predict --model runs/demo/model --image $(DEMO_IMAGES) \
	  --prompt coin --prompt person --prompt chair --prompt nucleus --threshold 0.05 --max-dets 10 \
	  --out reports/demo/overlays
	@echo; echo "demo done:"; \
	  echo "  metrics              reports/demo/metrics.json (before/after: reports/demo/report.md; dvc metrics show)"; \
	  echo "  fine-tuned model     runs/demo/model (transformers format; checkpoints in runs/demo/checkpoints)"; \
	  echo "  prediction overlays  reports/demo/overlays/*_overlay.png"; \
	  echo "  validation report    reports/demo/validate.json (quarantine: data/clean/demo/_quarantine)"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check sam3 pipeline tests bench
	$(VENV)/bin/ruff format --check sam3 pipeline tests bench

# Prefect server and deployments (make prefect-up / prefect-down)
-include make/prefect.mk
