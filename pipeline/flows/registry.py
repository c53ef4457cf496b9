"""The champion registry (models/registry.json, in git): the promotion rule, the registry file, and the copy of the
promoted model to models/champion/."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from pipeline.flows.report import MetricRow, artifact_key
from sam3.errors import DataError
from sam3.io import write_json

REGISTRY_FILE = "models/registry.json"  # in git: who the champion is, and why
CHAMPION_DIR = "models/champion"  # the champion's model (a copy: the run folder is overwritten by the next run)


@dataclass(frozen=True)
class Champion:
    """The registry's champion: which run made it, its metric, and where its model lives."""

    run: str  # the Prefect flow run (name and id)
    metric: str
    value: float
    model_path: str  # the promoted copy, relative to the repository
    source: str  # the run's model folder it was copied from
    timestamp: str  # ISO 8601, UTC
    model_md5: str | None = None  # DVC's hash of the source (DVC path): `dvc` finds it in the cache


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide_promotion(metric: str, value: float | None, champion: Champion | None) -> Decision:
    """The promotion rule (higher is better, as for every metric of the evaluate stage): promote the new model
    when there is no champion, or when its `metric` value is strictly greater than the champion's on the same
    metric. No promotion without a value (missing or null metric, NaN) or when the champion was chosen on another
    metric (the values do not compare; choose one metric, or reset the registry)."""
    if value is None or value != value:  # NaN != NaN
        return Decision(False, f"not promoted: the new run has no {metric} value (missing, null or NaN)")
    if champion is None:
        return Decision(True, f"promoted: no champion yet; the new run's {metric} is {value:.4f}")
    if champion.metric != metric:
        return Decision(
            False,
            f"not promoted: the champion was chosen on {champion.metric}, this run is judged on {metric}; "
            f"run with metric={champion.metric} or reset {REGISTRY_FILE}",
        )
    if value > champion.value:
        return Decision(
            True,
            f"promoted: {metric} {value:.4f} beats the champion's {champion.value:.4f} "
            f"(+{value - champion.value:.4f}, champion run {champion.run})",
        )
    return Decision(
        False,
        f"not promoted: {metric} {value:.4f} does not beat the champion's {champion.value:.4f} "
        f"({value - champion.value:+.4f}, champion run {champion.run})",
    )


def read_registry(path: Path) -> tuple[Champion | None, list[dict[str, Any]]]:
    """(champion, history of past champions) of a registry file; (None, []) when it does not exist yet."""
    if not path.is_file():
        return None, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        champion = data["champion"]
        history = data.get("history", [])
        return (Champion(**champion) if champion is not None else None), list(history)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(
            f"{path}: not a model registry ({type(err).__name__}: {err}); expected "
            '{"champion": {"run", "metric", "value", "model_path", "source", "timestamp"} or null, "history": [...]}; '
            "restore it from git"
        ) from None


def promote_model(
    repo: Path, run: str, metric: str, value: float | None, model_dir: Path, model_md5: str | None = None
) -> Decision:
    """Apply `decide_promotion` against the registry of `repo`; when promoted, copy `model_dir` to CHAMPION_DIR
    (the old champion goes to the registry's history) and rewrite the registry."""
    registry = repo / REGISTRY_FILE
    champion, history = read_registry(registry)
    decision = decide_promotion(metric, value, champion)
    if not decision.promote:
        return decision
    if not (repo / model_dir).is_dir():
        raise DataError(f"{repo / model_dir}: model folder to promote does not exist; did the train stage run?")
    target = repo / CHAMPION_DIR
    staging, retired = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    for leftover in (staging, retired):  # from an interrupted promotion
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(repo / model_dir, staging)
    if target.exists():
        target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
    new = Champion(
        run=run,
        metric=metric,
        value=float(value),  # decide_promotion promotes only with a value
        model_path=CHAMPION_DIR,
        source=str(model_dir),
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        model_md5=model_md5,
    )
    write_json(registry, {"champion": asdict(new), "history": history + ([asdict(champion)] if champion else [])})
    return decision


@task(name="promote")
def promote_champion(repo: str, suite: str, metric: str, rows: list[MetricRow], model_md5: str | None) -> Decision:
    """Promote the run's model when it beats the champion; log why or why not, and keep it as an artifact."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    logger = get_run_logger()
    if len(rows) != 1:
        decision = Decision(False, f"not promoted: {len(rows)} candidate runs ({metric}); promotion needs exactly one")
    elif rows[0].model is None:
        decision = Decision(False, "not promoted: the run recorded no model folder (is the train stage in dvc.yaml?)")
    else:
        run = f"{flow_run.name} ({flow_run.id})"
        decision = promote_model(Path(repo), run, metric, rows[0].value, Path(rows[0].model), model_md5)
    logger.info("%s", decision.reason)
    champion, _ = read_registry(Path(repo) / REGISTRY_FILE)
    lines = ["# Champion promotion", "", f"**{decision.reason}**", ""]
    if champion is not None:
        lines += [f"Champion now: run {champion.run}, {champion.metric} {champion.value:.4f}, {champion.model_path}"]
    create_markdown_artifact("\n".join(lines) + "\n", key=artifact_key(suite, "promotion"))
    return decision
