"""`params.yaml` as typed dataclasses: one dataclass per section, loaded once at the entry point.

`load_params(path, overrides)` reads the YAML, applies `section.key=value` overrides, and checks every key:
an unknown or misspelled key is a `ConfigError` naming the key and the closest valid one, a value of the wrong
type names the key, the expected type and the value (a choice, typed `Literal` in `sam3.config`, names the allowed
values). Then `check_values` checks what types cannot say (counts >= 1, the feature cache's freeze mode, the settings
that need validation: `sam3.config.loop_problem`), so every stage that loads params refuses the same mistakes. Lower
layers receive plain values from these objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.vos_params import VosParams, vos_problems
from sam3.config import (
    DEFAULT_MAX_DETS,
    DEFAULT_PROMPT_CHUNK,
    META_DROP_PATH,
    SAM3_IMAGE_SIZE,
    AdapterConfig,
    CacheConfig,
    DDPConfig,
    GuardConfig,
    LoopConfig,
    LossConfig,
    OptimConfig,
    adapter_cache_problem,
    adapter_problem,
    loop_problem,
)
from sam3.errors import ConfigError


@dataclass
class DatasetParams:
    """Which dataset the pipeline runs on, and where its stages write."""

    name: str = "demo"
    raw: str = "data/raw/demo"  # Roboflow COCO layout: {train,valid,test}/_annotations.coco.json + images


@dataclass
class ValidateParams:
    max_pixels: int = 100_000_000  # images above this many pixels are quarantined (decompression bombs)
    # few-shot files train/fewshot_train_shot{K}_seed{S}.json checked and carried along, drawn when missing (ODinW13)
    fewshot_seeds: list[int] = field(default_factory=list)
    fewshot_k: int = 10


@dataclass
class PreprocessParams:
    size: int = SAM3_IMAGE_SIZE  # longest side after resizing (never upscaled); SAM 3's input resolution
    workers: int = 2


@dataclass
class NegativesParams:
    """Extra negative prompts per image (`pipeline negatives`)."""

    strategies: str = "absent"  # space-separated, in fill order: absent | bank | mined (bank/mined use the model)
    per_image: int = 30
    seed: int = 0
    similarity_threshold: float = 0.9  # bank/mined: leave out phrases this close to a present category
    score_threshold: float = 0.5  # mined: keep phrases the model fires on above this score
    mine_candidates: int = 64  # mined: nearest bank phrases scored per image


@dataclass
class ModelParams:
    source: str = "tiny"  # "tiny" | "full" | a local transformers-format folder (e.g. a facebook/sam3 download)
    image_size: int | None = None  # None: the model's own (1008 full, 224 tiny)
    mode: Literal["detection", "segmentation"] = "detection"
    one_to_many: bool = True  # DAC: the queries run twice in training, the copy matched one-to-many (loss.o2m_*)
    text_geometry_token: bool = True  # prompts end with the geometry encoder's CLS token, as in Meta's model
    drop_path: float = META_DROP_PATH  # ViT stochastic depth in training: 0 .. drop_path over the blocks


@dataclass
class EvaluateParams:
    split: str = "test"
    baseline: str | None = None  # also evaluated, for the before / after table: the model before fine-tuning
    prompt_chunk: int = DEFAULT_PROMPT_CHUNK  # prompts per decoder call; lower it if memory runs out
    max_dets: int = DEFAULT_MAX_DETS  # detections kept per image across prompts (the recipe's top 100)
    threads: int | None = None  # CPU threads of torch's kernels (None: one per core); fixed, scores reproduce
    # retention (pipeline.retention): what fine-tuning costs outside the dataset's categories
    retention_prompts: int = 32  # negative phrases from the phrase bank, asked on every image (0: not measured)
    retention_neighbours: float = 0.5  # the fraction of them nearest to the categories; the rest drawn at random
    retention_seed: int = 0  # seed of the random draw
    retention_dataset: str | None = None  # a COCO dataset folder of held-out concepts: AP on its evaluate.split


@dataclass
class LauncherParams:
    """Where `train` runs: this machine (torchrun-style processes) or a SLURM cluster through submitit."""

    kind: Literal["local", "slurm"] = "local"
    nodes: int = 1
    gpus_per_node: int = 1  # processes per node; on CPU, processes to start (gloo)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 240
    cpus_per_task: int = 8
    mem_gb: int | None = None
    log_dir: str = "runs/slurm"


@dataclass
class Params:
    dataset: DatasetParams = field(default_factory=DatasetParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    negatives: NegativesParams = field(default_factory=NegativesParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    launcher: LauncherParams = field(default_factory=LauncherParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    cache: CacheConfig = field(default_factory=CacheConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    vos: VosParams = field(default_factory=VosParams)  # video object segmentation (pipeline.vos_params)


def read_yaml(path: Path) -> Any:
    """The YAML document in `path` ({} when empty); ConfigError in one line when it does not parse."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}".replace("\n", " ")) from None


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read `path` (None: defaults only), apply `section.key=value` overrides, return checked `Params`."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: parameter file not found")
        raw = read_yaml(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        _apply_override(raw, item)
    source = str(path) if path else "params"
    params = _build(Params, raw, source=source, prefix="")
    check_values(params, source)
    return params


def check_values(params: Params, source: str = "params") -> None:
    """Value checks that types alone cannot express; ConfigError '<source>: <message>' naming the key.

    Run by `load_params` on every load, so every stage refuses the same mistakes before it does any work.
    """
    train, cache, launcher = params.train, params.cache, params.launcher
    checks = [
        (train.val_every_epochs >= 0, "train.val_every_epochs must be >= 0 (0: no validation)"),
        (train.batch_size >= 1, "train.batch_size must be >= 1"),
        (train.accumulation >= 1, "train.accumulation must be >= 1"),
        (train.epochs >= 1 or train.max_steps, "train.epochs must be >= 1 (or set train.max_steps)"),
        (train.threads is None or train.threads >= 1, "train.threads must be >= 1 (null: one per core)"),
        (
            params.evaluate.threads is None or params.evaluate.threads >= 1,
            "evaluate.threads must be >= 1 (null: one per core)",
        ),
        (
            params.evaluate.retention_prompts >= 0,
            "evaluate.retention_prompts must be >= 0 (0: retention not measured), "
            f"got {params.evaluate.retention_prompts}",
        ),
        (
            0 <= params.evaluate.retention_neighbours <= 1,
            "evaluate.retention_neighbours must be in [0, 1] (the fraction of nearest-neighbour phrases), "
            f"got {params.evaluate.retention_neighbours}",
        ),
        (
            params.evaluate.retention_seed >= 0,
            f"evaluate.retention_seed must be >= 0, got {params.evaluate.retention_seed}",
        ),
        (train.max_steps is None or train.max_steps >= 1, "train.max_steps must be >= 1 (null: train.epochs decide)"),
        (train.log_every >= 1, "train.log_every must be >= 1 (steps between logged records and progress lines)"),
        (launcher.nodes >= 1 and launcher.gpus_per_node >= 1, "launcher.nodes/gpus_per_node >= 1"),
        (cache.views >= 1, "cache.views must be >= 1 (1: the plain warp only, no augmentation)"),
        (0 <= params.model.drop_path < 1, "model.drop_path must be in [0, 1) (0: no stochastic depth)"),
        (params.loss.o2m_weight >= 0, "loss.o2m_weight must be >= 0"),
        (params.loss.o2m_topk >= 1, "loss.o2m_topk must be >= 1"),
        (0 <= params.loss.o2m_alpha <= 1, "loss.o2m_alpha must be in [0, 1]"),
    ]
    loop_issue = loop_problem(train, with_masks=params.model.mode == "segmentation")
    checks.append((loop_issue is None, loop_issue))
    adapter = params.adapter
    adapter_issue = adapter_problem(adapter)
    checks.append((adapter_issue is None, adapter_issue))
    checks.append(
        (
            adapter.kind == "none" or "mask_decoder" not in adapter.parts or params.model.mode == "segmentation",
            "adapter.parts names mask_decoder, which detection mode never runs: set model.mode segmentation or "
            "remove it from adapter.parts",
        )
    )
    checks.append(
        (
            not (train.retain and cache.enabled),
            "train.retain with cache.enabled: the retention regulariser needs the images; set one of them false",
        )
    )
    if cache.enabled:  # only then: sam3.freeze imports torch, which a stage with the cache off never needs
        from sam3.freeze import cache_freeze_problem

        problem = cache_freeze_problem(train.freeze) or adapter_cache_problem(adapter)
        checks.append((problem is None, problem))
    checks.extend((False, message) for message in vos_problems(params.vos))
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")


def to_dict(params: Params) -> dict[str, Any]:
    """Plain nested dict (for writing the resolved params next to a run)."""
    return dataclasses.asdict(params)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `section.key=value` (or `section.sub.key=value`, as in `vos.train.max_steps=50`) in `raw`."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not 2 <= len(parts) <= 3 or not all(parts):
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. preprocess.size=512")
    mapping = raw
    for depth, part in enumerate(parts[:-1]):
        mapping = mapping.setdefault(part, {})
        if not isinstance(mapping, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])!r} is not a mapping")
    mapping[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    """Instantiate dataclass `cls` from mapping `raw`; `prefix` is the dotted path so far (for messages)."""
    where = f"{source}: {prefix.rstrip('.') or 'top level'}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint} (valid here: {', '.join(names)})")
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], source, f"{prefix}{name}.")
        else:
            values[name] = _check_value(raw[name], hint, f"{source}: {prefix}{name}")
    return cls(**values)


def _check_value(value: Any, hint: Any, where: str) -> Any:
    """Return `value` if it fits the type `hint` (int accepted for float); raise ConfigError otherwise."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(repr(a) for a in typing.get_args(hint))
            raise ConfigError(f"{where} = {value!r}: must be one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_value(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(hint)}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where} = {value!r}: expected a list of {len(args)} values")
        return tuple(_check_value(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected a list")
        (item_type,) = typing.get_args(hint)
        return [_check_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where} = {value!r}: expected null")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept any number Python can read
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if not isinstance(value, hint):
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(hint)}")
    return value


def _type_name(hint: Any) -> str:
    """How a message names a type: int, float | None, an integer or 'auto' (not typing's Union[...] spelling)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(repr(value) for value in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
