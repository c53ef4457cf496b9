# Two commands set up everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The venv's tools first on PATH, so `dvc repro` stage commands run `python -m pipeline` from the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo demo-video test test-fast lint exp

install: $(STAMP)

# Reinstall when the dependency list changes. torch/torchvision come unpinned from the registry.
# stardist goes in with --no-deps: we only read the nuclei TIFF it ships (demo data), not its TensorFlow code.
# labelme's source distribution is only downloaded (not installed): vos-demo-data reads the short annotated video
# its examples ship (the real tiny VOS dataset).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps stardist
	$(PY) -m pip download --quiet --no-deps --no-binary :all: labelme==6.3.1 -d $(VENV)/sdists
	touch $(STAMP)

# The whole DVC pipeline on the demo dataset (generated shapes: prompts such as "red circle"), then overlays of the
# fine-tuned model on three test images. The demo model is the tiny architecture trained from scratch on the CPU for
# 500 steps (about 3 minutes): its report shows real learning over the random model; bring facebook/sam3 weights for
# real accuracy (see README). The same `dvc repro` runs the video stages: the tiny SAM 2.1 tracker trained from scratch
# on generated shapes videos (about a minute and a half more).
DEMO_IMAGES := $(addprefix data/raw/demo/test/,000000.png 000001.png 000002.png)
DEMO_PROMPTS := $(foreach colour,red green blue,$(foreach shape,circle square triangle,--prompt "$(colour) $(shape)"))
demo: $(STAMP)
	dvc repro evaluate
	$(PY) -m pipeline predict --model runs/demo/model --image $(DEMO_IMAGES) $(DEMO_PROMPTS) --threshold 0.19 \
	  --max-dets 4 --out reports/demo/overlays
	@echo; echo "demo done:"; \
	  echo "  before/after         reports/demo/report.md (figures: reports/demo/plots/*.png, runs/demo/plots/training.png)"; \
	  echo "  metrics              reports/summary.json (dvc metrics show; every detail: reports/demo/metrics.json)"; \
	  echo "  fine-tuned model     runs/demo/model (self-contained transformers folder; checkpoints in runs/demo/checkpoints)"; \
	  echo "  prediction overlays  reports/demo/overlays/*_overlay.png"; \
	  echo "  validation report    reports/demo/validate.json (quarantine: data/clean/demo/_quarantine)"; \
	  echo "  the video (VOS) demo make demo-video (or dvc repro: every stage)"

# The video half of the pipeline (the vos_* stages of dvc.yaml), kept out of `make demo` to hold it near 5 minutes.
demo-video: $(STAMP)
	dvc repro vos_evaluate
	@echo; echo "video demo done:"; \
	  echo "  before/after         reports/vos_shapes/vos/report.md (J&F per video and frame strips in its plots/)"; \
	  echo "  metrics              reports/vos_summary.json (dvc metrics show)"; \
	  echo "  fine-tuned tracker   runs/vos_shapes/model (Sam2VideoModel.from_pretrained)"

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check sam3 pipeline tests bench
	$(VENV)/bin/ruff format --check sam3 pipeline tests bench

# Prefect server and deployments (make prefect-up / prefect-down)
-include make/prefect.mk

# `dvc exp show` cut to the numbers people compare (image and video runs) and the params they change most; fits a
# 160-column terminal. Other columns: make exp EXP_COLUMNS='Experiment|bbox_AP|train\.freeze|...' (regexes, | between).
EXP_COLUMNS ?= Experiment|Created|bbox_AP|bbox_AP50|segm_AP|cgF1|train_loss|steps|J&F|dataset\.name|model\.source|optim\.lr_detr
exp: $(STAMP)
	dvc exp show --no-pager --drop '.*' --keep '^($(EXP_COLUMNS))$$'
