"""Low-rank adapters in SAM 3 through `peft` (the `adapter` section of params.yaml): LoRA and DoRA.

An adapted Linear layer keeps its weight W frozen and learns a rank-r update (peft's `lora.Linear`):

    LoRA   y = W x + b + (alpha / r) * B (A dropout(x))          A [r, in] (Kaiming), B [out, r] (zeros at start)
    DoRA   y = m * (W + (alpha / r) B A) x / ||W + (alpha / r) B A||_col + b    m [out], the magnitude, trained too

so at step 0 the adapted model computes exactly what the base model does. The layers are chosen per part of SAM 3
by a regular expression over transformers' module names (`PART_PATTERNS`; tests/sam3/test_adapters.py counts the
layers each one hits in the tiny and the full model):

    vision_attention  ViT blocks' q/k/v/o projections          full model: 32 blocks x 4 = 128 layers
    vision_mlp        ViT blocks' fc1/fc2                       64
    text              CLIP text layers' q/k/v/out and fc1/fc2    24 x 6 = 144
    detr_encoder      fusion encoder: self/cross q/k/v/o, MLP    6 x 10 = 60
    detr_decoder      decoder: self/text/vision q/k/v/o, MLP     6 x 14 = 84
    mask_decoder      the mask decoder's prompt cross-attention  4

`attach_adapter` wraps the detector's `Sam3Model` in a `PeftModel` in place: `detector.model` stays the same
`Sam3Model` (peft swaps the chosen Linear modules inside it), so every forward of ours runs unchanged; the
`PeftModel` is kept beside it (`detector_peft`) for peft's own operations: switching the adapter off (the starting
model of the retention regulariser, `sam3.retain`), saving in PEFT format. What trains
(`set_adapter_trainable`): the adapter weights always; the adapted layers' own weights never; every other parameter
as train.freeze says.

Exports (`merged_state_dict`, `save_adapter`): the merged weights W + (alpha / r) B A under transformers' names, so
a plain `Sam3Model.from_pretrained` loads the fine-tuned model; and the adapter alone in PEFT format, plus the
parameters that trained in full (a head trained with train.freeze heads, say) under the PeftModel's names, so
`PeftModel.from_pretrained(base, folder)` rebuilds the whole fine-tuned model from the base. The base model's
identity (its source and a SHA-256 of its weights outside the saved ones) is written beside it (`BASE_FILE`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sam3.checkpoint_frozen import tensors_fingerprint
from sam3.config import ADAPTER_PARTS, AdapterConfig
from sam3.errors import ConfigError, ExportError

if TYPE_CHECKING:
    from peft import PeftModel

    from sam3.model import Sam3Detector

logger = logging.getLogger(__name__)

_QKVO = r"(q_proj|k_proj|v_proj|o_proj)"
# part -> regular expression that must match a Linear module's whole name in `Sam3Model.named_modules()`
PART_PATTERNS: dict[str, str] = {
    "vision_attention": rf"vision_encoder\.backbone\.layers\.\d+\.attention\.{_QKVO}",
    "vision_mlp": r"vision_encoder\.backbone\.layers\.\d+\.mlp\.(fc1|fc2)",
    "text": r"text_encoder\.text_model\.encoder\.layers\.\d+\."
    r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
    "detr_encoder": rf"detr_encoder\.layers\.\d+\.((self_attn|cross_attn)\.{_QKVO}|mlp\.(fc1|fc2))",
    "detr_decoder": r"detr_decoder\.layers\.\d+\."
    rf"((self_attn|text_cross_attn|vision_cross_attn)\.{_QKVO}|mlp\.(fc1|fc2))",
    "mask_decoder": rf"mask_decoder\.prompt_cross_attn\.{_QKVO}",
}
assert set(PART_PATTERNS) == set(ADAPTER_PARTS)
ADAPTER_NAME = "default"  # peft's name of the one adapter we train
ADAPTER_DIR = "adapter"  # the PEFT-format export inside the exported model folder
BASE_FILE = "base_model.json"  # the base model's identity, beside the adapter
# marks of peft's parameter names: the adapter's own weights, and the adapted layers' original weights
_ADAPTER_MARKS = ("lora_A.", "lora_B.", "lora_magnitude_vector.", "lora_embedding_")
_BASE_LAYER = ".base_layer."
_PEFT_PREFIX = "base_model.model."  # the names of `Sam3Model` parameters inside a PeftModel
_PEFT_ATTR = "_peft_model"  # where the detector keeps its PeftModel (not a registered sub-module: no second prefix)


def target_pattern(parts: Sequence[str]) -> str:
    """One regular expression for peft's target_modules (matched against whole module names) over `parts`."""
    unknown = [part for part in parts if part not in PART_PATTERNS]
    if unknown:
        raise ConfigError(f"adapter.parts: unknown part {unknown[0]!r}; choose from {', '.join(PART_PATTERNS)}")
    return "|".join(f"({PART_PATTERNS[part]})" for part in parts)


def is_adapter_parameter(name: str) -> bool:
    """Whether `name` (a parameter or state_dict key) is an adapter weight (LoRA's A, B, DoRA's magnitude)."""
    return any(mark in name for mark in _ADAPTER_MARKS)


def attach_adapter(detector: Sam3Detector, config: AdapterConfig) -> PeftModel:
    """Put `config`'s adapters into `detector.model` (in place) and keep the `PeftModel` on the detector.

    Call before freezing, activation checkpointing, compiling and moving to a device. The adapter's initial A
    matrices draw from torch's global generator, so a seeded run draws the same ones. Returns the PeftModel.
    """
    from peft import LoraConfig, get_peft_model

    if config.kind == "none":
        raise ValueError("attach_adapter with adapter.kind none")
    if detector_peft(detector) is not None:
        raise ValueError("the detector already holds an adapter")
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_pattern(config.parts),
        use_dora=config.kind == "dora",
        bias="none",
    )
    peft_model = get_peft_model(detector.model, lora, adapter_name=ADAPTER_NAME)
    assert peft_model.base_model.model is detector.model  # injected in place: our forward runs the adapted layers
    object.__setattr__(detector, _PEFT_ATTR, peft_model)
    return peft_model


def detector_peft(detector: Sam3Detector) -> PeftModel | None:
    """The detector's PeftModel, or None when it holds no adapter."""
    return detector.__dict__.get(_PEFT_ATTR)


def adapted_layer_counts(model: nn.Module) -> dict[str, int]:
    """part -> number of adapted (peft) layers of `model` (a `Sam3Model`) whose name that part's pattern matches."""
    from peft.tuners.lora import LoraLayer

    counts = dict.fromkeys(PART_PATTERNS, 0)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for part, pattern in PART_PATTERNS.items():
                if re.fullmatch(pattern, name):
                    counts[part] += 1
    return counts


def set_adapter_trainable(model: nn.Module, keep_frozen: Sequence[str] = ()) -> None:
    """After train.freeze: the adapter weights train, the adapted layers' own weights do not (what LoRA means).
    `keep_frozen`: names that stay frozen whatever they are (the parts text prompts never reach)."""
    frozen = set(keep_frozen)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
        elif is_adapter_parameter(name):
            param.requires_grad_(True)
        elif _BASE_LAYER in name:
            param.requires_grad_(False)


def adapter_summary(model: nn.Module) -> str:
    """'adapter: N weights in K layers (part: k, ...); trainable P of T parameters (x.xx%)' for the start log."""
    counts = {part: n for part, n in adapted_layer_counts(model).items() if n}
    adapter = sum(p.numel() for name, p in model.named_parameters() if is_adapter_parameter(name))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for name, p in model.named_parameters() if not is_adapter_parameter(name))
    layers = ", ".join(f"{part} {n}" for part, n in counts.items())
    return (
        f"adapter: {adapter:,} weights in {sum(counts.values())} layers ({layers}); trainable {trainable:,} of "
        f"{total:,} base parameters ({100 * trainable / total:.2f}%)"
    )


@contextlib.contextmanager
def adapter_disabled(detector: Sam3Detector) -> Iterator[None]:
    """The starting model, within: the adapted layers compute W x + b alone (peft's disable_adapter), no copy."""
    peft_model = detector_peft(detector)
    if peft_model is None:
        raise ValueError("the detector holds no adapter")
    with peft_model.disable_adapter():
        yield


def merged_state_dict(detector: Sam3Detector) -> dict[str, torch.Tensor]:
    """The adapted model's weights with every adapter merged in, under transformers' `Sam3Model` names.

    Each adapted layer is copied alone to the CPU and merged there by peft (W <- W + (alpha / r) B A, DoRA's
    magnitude rescaling included), so the detector itself is never touched: an in-place merge and unmerge would
    leave float round-off in the frozen weights, which checkpoints fingerprint. Peak extra memory: one layer.
    """
    from peft.tuners.lora import LoraLayer

    if detector_peft(detector) is None:
        raise ValueError("the detector holds no adapter")
    merged = {
        key.replace(_BASE_LAYER, "."): value.detach()
        for key, value in detector.model.state_dict().items()
        if not is_adapter_parameter(key)
    }
    for name, module in detector.model.named_modules():
        if isinstance(module, LoraLayer):
            layer = copy.deepcopy(module).to("cpu")
            layer.merge(adapter_names=[ADAPTER_NAME])
            merged[f"{name}.weight"] = layer.get_base_layer().weight.detach()
    return merged


def save_adapter(detector: Sam3Detector, folder: Path, base_source: str | None) -> None:
    """Write the adapter in PEFT format to `folder` (adapter_config.json, adapter_model.safetensors) and the base
    model's identity (`BASE_FILE`).

    The safetensors file also holds the parameters that trained in full (neither adapter weights nor adapted
    layers' own weights), under the PeftModel's names: `PeftModel.from_pretrained(base, folder)` loads them into
    the base model with the adapter, so it computes what the fine-tuned model does. The identity: the source the
    base was loaded from and {"names", "sha256"} over the base model's other weights (`checkpoint_frozen.fingerprint`
    over the sorted keys, `base_fingerprint` recomputes it from a loaded base).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_model = detector_peft(detector)
    if peft_model is None:
        raise ValueError("the detector holds no adapter")
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = base_source
    peft_model.peft_config[ADAPTER_NAME].save_pretrained(str(folder))
    state = {
        key: value.detach().cpu().contiguous()
        for key, value in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()
    }
    full = fully_trained_names(detector.model)
    params = dict(detector.model.named_parameters())
    for name in full:
        state[_PEFT_PREFIX + name] = params[name].detach().cpu().contiguous()
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ExportError(f"{folder}: adapter not exported: {len(bad)} tensors hold NaN or infinity (first {bad[0]})")
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    identity = {
        "source": base_source,
        "peft_type": peft_model.peft_config[ADAPTER_NAME].peft_type.value,
        "fully_trained": len(full),
        "weights": base_fingerprint(detector.model, exclude=full),
        "load": "PeftModel.from_pretrained(Sam3Model.from_pretrained(source), this folder)",
    }
    (folder / BASE_FILE).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def fully_trained_names(model: nn.Module) -> list[str]:
    """Trainable parameters of an adapted `Sam3Model` that are not adapter weights: the ones trained in full."""
    return [name for name, p in model.named_parameters() if p.requires_grad and not is_adapter_parameter(name)]


def base_fingerprint(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, int | str]:
    """{"names", "sha256"} over the base weights of `model` (a plain or an adapted `Sam3Model`) under transformers'
    names, leaving out `exclude` (names of either form): the same record for a base model and for the adapted
    model trained from it, as long as only the excluded parameters and the adapter changed."""
    excluded = {name.replace(_BASE_LAYER, ".") for name in exclude}
    plain = {key.replace(_BASE_LAYER, "."): param for key, param in model.named_parameters()}
    kept = sorted(key for key in plain if not is_adapter_parameter(key) and key not in excluded)
    return tensors_fingerprint([(key, plain[key]) for key in kept])
