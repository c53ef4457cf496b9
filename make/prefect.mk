# Local Prefect: `make prefect-up` starts a server on 127.0.0.1:$(PREFECT_PORT) (SQLite under .prefect/) and
# `python -m pipeline.serve` (deployments finetune/demo, rf100, odinw13, vos, mose, retrain), writing .prefect/*.pid and
# .prefect/env; `make prefect-down` stops exactly those processes and all they started. Included by the Makefile.
PREFECT_PORT ?= 4200

.PHONY: prefect-up prefect-down

prefect-up: $(STAMP)
	PREFECT_PORT=$(PREFECT_PORT) PYTHON=$(abspath $(PY)) scripts/prefect_up.sh

prefect-down:
	scripts/prefect_down.sh
