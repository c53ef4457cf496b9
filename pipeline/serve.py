"""`python -m pipeline.serve`: serve the six `finetune` deployments (demo, rf100, odinw13, vos, mose, retrain).

Needs a Prefect API: PREFECT_API_URL (`make prefect-up` starts a local server and this process, and writes
.prefect/env to source). Flow runs start as child processes of this one, in its working directory: start it from
the repository root. It first creates the "train" tag's global concurrency limit. Ctrl-C (or SIGTERM from
`make prefect-down`) stops it and pauses the deployments' schedule (the retrain cron), so that no runs pile up
while nothing serves them; serving again resumes it.
"""

from __future__ import annotations

from prefect import serve

from pipeline.flows.flow import deployments
from pipeline.flows.tasks import ensure_train_limit


def main() -> None:
    ensure_train_limit()
    serve(*deployments())


if __name__ == "__main__":
    main()
