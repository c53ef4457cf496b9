"""What trains: freezing parts of `Sam3Model` (`train.freeze` in params.yaml).

Modes, from most to least trainable:
    none         everything trains
    vision       all but the vision encoder (ViT + FPN neck)
    vision_text  all but the vision and text encoders (text projection included)
    heads        decoder heads only: the DETR decoder, the dot-product scorer and the mask decoder; the
                 encoders, the fusion encoder and the geometry (box-exemplar) encoder are frozen
A frozen parameter gets requires_grad False, so autograd keeps no gradient for it and `sam3.optim` gives it no
optimiser state. A frozen encoder's outputs can be computed once and cached (`sam3.features`): the vision encoder's
in every mode but none (`freezes_vision`), the text encoder's prompt embeddings in vision_text and heads
(`freezes_text`).
"""

from __future__ import annotations

from torch import nn

from sam3.config import FREEZE_MODES, FreezeMode  # defined once there, without torch, for the params loader

__all__ = [
    "FREEZE_MODES",
    "FreezeMode",
    "apply_freeze",
    "cache_freeze_problem",
    "freezes_text",
    "freezes_vision",
    "parameter_counts",
]

_FROZEN_PREFIXES: dict[str, tuple[str, ...]] = {
    "none": (),
    "vision": ("vision_encoder.",),
    "vision_text": ("vision_encoder.", "text_encoder.", "text_projection."),
    "heads": ("vision_encoder.", "text_encoder.", "text_projection.", "detr_encoder.", "geometry_encoder."),
}


def apply_freeze(model: nn.Module, mode: str, also_freeze: tuple[str, ...] = ()) -> dict[str, int]:
    """Set requires_grad on every parameter of a `Sam3Model` for `mode`; freeze the names in `also_freeze` too.

    Returns parameter counts: {"trainable": n, "frozen": m, "total": n + m}.
    """
    frozen_prefixes = _prefixes(mode)
    extra = set(also_freeze)
    for name, param in model.named_parameters():
        param.requires_grad_(not (name.startswith(frozen_prefixes) or name in extra))
    return parameter_counts(model)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def freezes_vision(mode: str) -> bool:
    """Whether `mode` freezes the whole vision encoder (ViT + FPN neck), so its outputs can be cached."""
    return "vision_encoder." in _prefixes(mode)


def cache_freeze_problem(mode: str) -> str | None:
    """Why a feature cache cannot serve training with `train.freeze` = `mode`, or None when it can.

    The cache holds the vision encoder's outputs, so the encoder must not train (`freezes_vision`). One message
    for the early params check (`python -m pipeline train --dry-run`) and the library's own guard.
    """
    if mode in FREEZE_MODES and freezes_vision(mode):
        return None
    frozen = ", ".join(m for m in FREEZE_MODES if freezes_vision(m))
    return (
        f"cache.enabled needs a frozen vision encoder, but train.freeze is {mode!r}: cached features would go stale "
        f"as the encoder trains; set train.freeze to one of {frozen}, or cache.enabled false"
    )


def freezes_text(mode: str) -> bool:
    """Whether `mode` freezes the text encoder and its projection, so prompt embeddings can be cached."""
    return {"text_encoder.", "text_projection."} <= set(_prefixes(mode))


def _prefixes(mode: str) -> tuple[str, ...]:
    if mode not in _FROZEN_PREFIXES:
        raise ValueError(f"unknown freeze mode {mode!r}; choose one of {', '.join(FREEZE_MODES)}")
    return _FROZEN_PREFIXES[mode]
