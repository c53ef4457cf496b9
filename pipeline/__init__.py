"""pipeline: stages, CLI, data validation and orchestration (DVC, Prefect) over the `sam3` library."""
