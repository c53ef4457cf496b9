"""Stage `aggregate`: one metric over a benchmark suite's runs, as a JSON summary and a Markdown table.

    python -m pipeline aggregate --suite rf100vl|odinw13 --results DIR_OR_GLOB --out-json agg.json --out-md agg.md
        [--metric bbox_AP] [--domains FILE]

Inputs are the evaluate/score stage's metrics.json files, one per run:
    rf100vl   <results>/<dataset>/metrics.json
    odinw13   <results>/<dataset>/seed<seed>/metrics.json
`--results` is that root folder, or a glob matching root folders or the metrics files themselves (the dataset, and
seed, are then read from the folders above each file).

Summaries (docs/RECIPE.md section 5):
    rf100vl   mean over datasets, and mean per domain (`pipeline.suites`), each with its count
    odinw13   m_s = mean over the datasets of seed s; then mean over seeds  m = (1/S) sum_s m_s and the sample
              standard deviation  sd = sqrt( sum_s (m_s - m)^2 / (S - 1) )  (ddof 1: the seeds are a sample of the
              possible few-shot draws; undefined, null, for a single seed)
Any subset works: datasets of the suite without a run are listed as missing, runs of datasets outside the suite are
listed and left out of the means, and a metric that is null (COCOeval's "undefined", no ground truth) is listed and
left out. JSON values are raw (0..1 for AP); the Markdown table shows them x100 with one decimal.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.suites import ODINW13_DATASETS, ODINW13_SEEDS, UNKNOWN_DOMAIN, rf100vl_domains
from sam3.errors import ConfigError, DataError
from sam3.io import write_json, write_text  # atomic

log = logging.getLogger(__name__)

SUITES: tuple[str, ...] = ("rf100vl", "odinw13")
DEFAULT_METRIC = "bbox_AP"  # key written by the score stage (sam3.evaluation)
METRICS_FILE = "metrics.json"
_SEED_FOLDER = re.compile(r"seed(\d+)")
_GLOB_CHARACTERS = ("*", "?", "[")
MISSING_CELL = "—"  # no run
UNDEFINED_CELL = "n/a"  # a run whose metric is null


@dataclass(frozen=True)
class Run:
    """One metrics file: the dataset (and seed, ODinW13) it belongs to, read from its folders."""

    dataset: str
    seed: int | None
    path: Path


def find_runs(results: str | Path, suite: str) -> list[Run]:
    """Every run under `results` (a folder or a glob), sorted by dataset and seed.

    Raises DataError when nothing matches, a seed folder is misnamed, or two files claim the same run.
    """
    results = str(results)
    per_seed = suite == "odinw13"
    layout = f"<results>/<dataset>/{'seed<seed>/' if per_seed else ''}{METRICS_FILE}"
    matches = sorted(Path(p) for p in glob.glob(results)) if any(c in results for c in _GLOB_CHARACTERS) else []
    if not matches and Path(results).exists():
        matches = [Path(results)]
    files: list[Path] = []
    for match in matches:
        if match.is_dir():
            files += sorted(match.glob(f"*/seed*/{METRICS_FILE}" if per_seed else f"*/{METRICS_FILE}"))
        else:
            files.append(match)
    if not files:
        raise DataError(f"{results}: no metrics files found; expected the layout {layout}")
    runs: dict[tuple[str, int | None], Run] = {}
    for path in files:
        if per_seed:
            seed_match = _SEED_FOLDER.fullmatch(path.parent.name)
            if seed_match is None:
                raise DataError(
                    f"{path}: folder {path.parent.name!r} is not seed<number>; expected the layout {layout}"
                )
            run = Run(path.parent.parent.name, int(seed_match.group(1)), path)
        else:
            run = Run(path.parent.name, None, path)
        key = (run.dataset, run.seed)
        if key in runs:
            raise DataError(f"{runs[key].path} and {path} are both dataset {run.dataset!r}" + _seed_text(run.seed))
        runs[key] = run
    return [runs[key] for key in sorted(runs, key=lambda k: (k[0], k[1] or 0))]


def _seed_text(seed: int | None) -> str:
    return "" if seed is None else f" seed {seed}"


def read_metric(path: Path, metric: str) -> float | None:
    """`metric` of one metrics.json: a number, or None when the file holds null (undefined)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a JSON metrics file ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of metrics")
    if metric not in data:
        numeric = sorted(k for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool))
        raise DataError(f"{path}: no metric {metric!r}; pass --metric with one of: {', '.join(numeric[:12]) or 'none'}")
    value = data[metric]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise DataError(f"{path}: metric {metric!r} is {value!r}, not a number")
    return None if value is None else float(value)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def aggregate_rf100vl(values: dict[str, float | None], domains: dict[str, str] | None) -> dict[str, Any]:
    """Mean over datasets and per domain. `domains` None: the suite's list is unknown, every run counts."""
    expected = set(domains) if domains is not None else set(values)
    included = {d: v for d, v in values.items() if d in expected}
    scored = {d: v for d, v in included.items() if v is not None}
    domain_of = {d: (domains or {}).get(d, UNKNOWN_DOMAIN) for d in expected}
    per_domain = {}
    for domain in sorted(set(domain_of.values())):
        members = sorted(d for d in expected if domain_of[d] == domain)
        scores = [scored[d] for d in members if d in scored]
        per_domain[domain] = {"mean": _mean(scores), "count": len(scores), "expected": len(members)}
    return {
        "datasets": {d: {"value": v, "domain": domain_of[d]} for d, v in sorted(included.items())},
        "mean": _mean(list(scored.values())),
        "count": len(scored),
        "expected": len(expected),
        "domains": per_domain,
        "missing": sorted(expected - set(values)),
        "not_in_suite": sorted(set(values) - expected),
        "undefined": sorted(d for d, v in included.items() if v is None),
    }


def aggregate_odinw13(values: dict[tuple[str, int], float | None]) -> dict[str, Any]:
    """Per-seed mean over datasets, then mean and sample std (ddof 1) over the seeds found."""
    expected = set(ODINW13_DATASETS)
    included = {key: v for key, v in values.items() if key[0] in expected}
    seeds = sorted({seed for _, seed in included})
    per_seed = {}
    for seed in seeds:
        scores = [v for (_, s), v in sorted(included.items()) if s == seed and v is not None]
        per_seed[str(seed)] = {"mean": statistics.fmean(scores) if scores else None, "count": len(scores)}
    seed_means = [m["mean"] for m in per_seed.values() if m["mean"] is not None]
    datasets_run = {d for d, _ in included}
    return {
        "datasets": {
            d: {str(s): v for (d2, s), v in sorted(included.items()) if d2 == d} for d in sorted(datasets_run)
        },
        "seeds": per_seed,
        "mean": _mean(seed_means),
        "std": statistics.stdev(seed_means) if len(seed_means) >= 2 else None,
        "num_seeds": len(seed_means),
        "expected": len(expected),
        "missing": sorted(expected - datasets_run),
        "missing_runs": [
            {"dataset": d, "seed": s} for d in sorted(datasets_run) for s in seeds if (d, s) not in included
        ],
        "missing_seeds": sorted(set(ODINW13_SEEDS) - set(seeds)),
        "not_in_suite": sorted({d for d, _ in values} - expected),
        "undefined": [{"dataset": d, "seed": s} for (d, s), v in sorted(included.items()) if v is None],
    }


def aggregate(
    suite: str, results: str | Path, metric: str = DEFAULT_METRIC, domains_file: str | Path | None = None
) -> dict[str, Any]:
    """Read the runs of `suite` under `results` and summarise `metric` (see the module docstring)."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if domains_file is not None and suite != "rf100vl":
        raise ConfigError(f"--domains gives RF100-VL domains; suite {suite!r} has none, leave it out")
    runs = find_runs(results, suite)
    values = {(run.dataset, run.seed): read_metric(run.path, metric) for run in runs}
    if suite == "rf100vl":
        domains, source = rf100vl_domains(domains_file)
        if domains is None:
            log.warning(
                "RF100-VL dataset list and domains unknown (the rf100vl package is not installed and no --domains "
                "file was given): every run counts, domain %r, missing datasets cannot be listed",
                UNKNOWN_DOMAIN,
            )
        result = aggregate_rf100vl({d: v for (d, _), v in values.items()}, domains)
        result["domains_source"] = source
    else:
        result = aggregate_odinw13(values)
    result = {"suite": suite, "metric": metric, **result}
    _log_summary(result)
    return result


def _log_summary(result: dict[str, Any]) -> None:
    if result["missing"]:
        missing = ", ".join(result["missing"])
        log.warning("%d of %d suite datasets have no run: %s", len(result["missing"]), result["expected"], missing)
    if result["not_in_suite"]:
        log.warning("left out, not in the suite: %s", ", ".join(result["not_in_suite"]))
    if result["undefined"]:
        log.warning("left out, metric %s is null: %s", result["metric"], result["undefined"])
    if result["suite"] == "odinw13":
        counts = {seed: entry["count"] for seed, entry in result["seeds"].items()}
        if len(set(counts.values())) > 1:
            log.warning("seeds have different numbers of datasets %s: their means are not comparable", counts)


def _cell(value: float | None) -> str:
    return UNDEFINED_CELL if value is None else f"{100 * value:.1f}"


def _name(text: str) -> str:
    return text.replace("|", "\\|")  # a "|" would split the table cell


def rf100vl_markdown(result: dict[str, Any]) -> str:
    """A table: one row per dataset, then one mean row per domain and the overall mean; then what was left out."""
    metric = result["metric"]
    lines = [
        f"# RF100-VL: {metric} (x100)",
        "",
        f"| dataset | domain | {metric} |",
        "|---|---|---:|",
    ]
    lines += [
        f"| {_name(d)} | {_name(entry['domain'])} | {_cell(entry['value'])} |"
        for d, entry in result["datasets"].items()
    ]
    for domain, entry in result["domains"].items():
        lines.append(
            f"| **mean {_name(domain)}** ({entry['count']} of {entry['expected']}) | | {_cell(entry['mean'])} |"
        )
    lines.append(f"| **mean** ({result['count']} of {result['expected']}) | | {_cell(result['mean'])} |")
    lines += ["", f"Domains from: {result['domains_source']}"]
    lines += _left_out_lines(result)
    return "\n".join(lines) + "\n"


def odinw13_markdown(result: dict[str, Any]) -> str:
    """A table: one row per dataset (a column per seed and the dataset's mean over seeds), the per-seed means, and
    the mean +- sample std over seeds; then what was left out."""
    metric, seeds = result["metric"], list(result["seeds"])
    lines = [
        f"# ODinW13: {metric} (x100)",
        "",
        "| dataset | " + " | ".join(f"seed {s}" for s in seeds) + " | mean over seeds |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    for dataset, by_seed in result["datasets"].items():
        cells = [_cell(by_seed[s]) if s in by_seed else MISSING_CELL for s in seeds]
        row_mean = _mean([v for v in by_seed.values() if v is not None])
        lines.append(f"| {_name(dataset)} | " + " | ".join(cells) + f" | {_cell(row_mean)} |")
    seed_cells = [f"{_cell(result['seeds'][s]['mean'])} ({result['seeds'][s]['count']})" for s in seeds]
    lines.append("| **mean over datasets** (count) | " + " | ".join(seed_cells) + " | |")
    spread = "" if result["std"] is None else f" ± {100 * result['std']:.1f}"
    lines.append("| **mean ± std over seeds** | " + " | " * len(seeds) + f"{_cell(result['mean'])}{spread} |")
    lines += ["", f"std: sample standard deviation (n - 1) over {result['num_seeds']} seeds."]
    if result["missing_seeds"]:
        lines.append(f"Missing seeds: {', '.join(str(s) for s in result['missing_seeds'])}")
    if result["missing_runs"]:
        runs = ", ".join(f"{r['dataset']} seed {r['seed']}" for r in result["missing_runs"])
        lines.append(f"Missing runs: {runs}")
    lines += _left_out_lines(result)
    return "\n".join(lines) + "\n"


def _left_out_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    if result["missing"]:
        lines.append(f"Missing ({len(result['missing'])} of {result['expected']}): {', '.join(result['missing'])}")
    if result["not_in_suite"]:
        lines.append(f"Not in the suite, left out: {', '.join(result['not_in_suite'])}")
    if result["undefined"]:
        items = [u if isinstance(u, str) else f"{u['dataset']} seed {u['seed']}" for u in result["undefined"]]
        lines.append(f"Metric undefined (null), left out: {', '.join(items)}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", required=True, choices=SUITES, help="which benchmark suite")
    parser.add_argument("--results", required=True, help="root folder of the runs, or a glob (quote it)")
    parser.add_argument("--out-json", required=True, type=Path, help="summary to write (json, raw values)")
    parser.add_argument("--out-md", required=True, type=Path, help="table to write (Markdown, values x100)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"key of metrics.json (default {DEFAULT_METRIC})")
    parser.add_argument(
        "--domains",
        type=Path,
        help='rf100vl: JSON {"<dataset>": "<domain>"} (default: the rf100vl package\'s own list when installed)',
    )


def run(args: argparse.Namespace) -> int:
    result = aggregate(args.suite, args.results, args.metric, args.domains)
    write_json(args.out_json, result)
    markdown = rf100vl_markdown(result) if args.suite == "rf100vl" else odinw13_markdown(result)
    write_text(args.out_md, markdown)
    print(markdown, end="")
    print(f"wrote {args.out_json} and {args.out_md}")
    return 0
