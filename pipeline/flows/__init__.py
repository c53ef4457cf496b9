"""Prefect orchestration of the pipeline's stages: the `finetune` flow (`pipeline.flows.flow`), its tasks, the suite
and DVC paths, the metrics report and the champion registry, one module each. `finetune` and `deployments` are
imported from `pipeline.flows.flow` (served by `python -m pipeline.serve`)."""
