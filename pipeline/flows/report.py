"""The run's metric table: one row per run (dataset x seed), a Markdown summary, and both as Prefect artifacts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import get_run_logger, task

FLOW_NAME = "finetune"


@dataclass(frozen=True)
class MetricRow:
    """One run's metric: the table artifact's row."""

    dataset: str
    seed: int
    value: float | None  # None: no metrics file (the run failed or evaluate did not run) or the metric is null
    metrics_file: str
    model: str | None  # the run's model folder; None when no run recorded one


def read_metric_value(path: Path, metric: str) -> float | None:
    """`metric` of a metrics.json (None when the file is absent or holds null); DataError for a broken file."""
    from pipeline.aggregate import read_metric

    return read_metric(path, metric) if path.is_file() else None


def mean_of(rows: list[MetricRow]) -> float | None:
    values = [row.value for row in rows if row.value is not None]
    return sum(values) / len(values) if values else None


def metrics_markdown(title: str, metric: str, rows: list[MetricRow], notes: list[str]) -> str:
    """A Markdown summary: one row per run (raw values, 0..1 for AP), the mean over runs with a value, then notes."""
    lines = [f"# {title}", "", f"| dataset | seed | {metric} | metrics file |", "|---|---:|---:|---|"]
    for row in rows:
        value = "n/a" if row.value is None else f"{row.value:.4f}"
        lines.append(f"| {row.dataset} | {row.seed} | {value} | {row.metrics_file} |")
    mean = mean_of(rows)
    counted = sum(row.value is not None for row in rows)
    lines += ["", f"Mean {metric} over {counted} of {len(rows)} runs: " + ("n/a" if mean is None else f"{mean:.4f}")]
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def artifact_key(suite: str, what: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{FLOW_NAME}-{suite}-{what}".lower())


@task(name="report")
def report(suite: str, metric: str, rows: list[MetricRow], notes: list[str]) -> str:
    """Table artifact of the metric per dataset and seed, and the Markdown summary artifact; returns the Markdown."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    markdown = metrics_markdown(f"{FLOW_NAME} {suite}: {metric}", metric, rows, notes)
    create_table_artifact(
        [asdict(row) for row in rows], key=artifact_key(suite, "metrics"), description=f"{metric} per dataset and seed"
    )
    create_markdown_artifact(markdown, key=artifact_key(suite, "summary"), description=f"{FLOW_NAME} {suite}")
    get_run_logger().info("%s", markdown)
    return markdown
