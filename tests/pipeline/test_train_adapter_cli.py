"""`python -m pipeline train` with the `adapter` section and train.retain: parameter mistakes, and a LoRA run whose
export holds the merged model and the PEFT adapter."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import Sam3Model

from pipeline.cli import main
from pipeline.train_job import retain_phrases
from sam3.adapters import ADAPTER_DIR, BASE_FILE
from sam3.model import load_model
from tests.pipeline.test_train_cli import _args
from tests.training_runs import IMAGE_SIZE, build_small_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["adapter.kind=lora", "adapter.parts=[vit]"], "adapter.parts[0] = 'vit': must be one of 'vision_attention'"),
        (["adapter.kind=qlora"], "adapter.kind = 'qlora': must be one of 'none', 'lora', 'dora'"),
        (["adapter.kind=lora", "adapter.rank=0"], "adapter.rank = 0: must be >= 1"),
        (["adapter.kind=lora", "adapter.parts=[mask_decoder]"], "adapter.parts names mask_decoder, which detection"),
        (
            ["adapter.kind=lora", "cache.enabled=true", "train.freeze=vision"],
            "cache.enabled with an adapter in the vision encoder (adapter.parts ['vision_attention', 'vision_mlp'])",
        ),
        (["train.retain=true", "train.retain_prompts=0"], "train.retain_prompts = 0: must be >= 1"),
        (
            ["train.retain=true", "cache.enabled=true", "train.freeze=vision"],
            "train.retain with cache.enabled: the retention regulariser needs the images",
        ),
    ],
)
def test_adapter_and_retain_mistakes_exit_2_with_one_line_naming_the_key(shapes, tmp_path, capsys, overrides, message):
    assert main([*_args(tmp_path / "run", shapes, *overrides), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and message in err


def test_retain_phrases_leave_out_every_training_category_and_its_plural(shapes):
    phrases = retain_phrases(str(shapes))
    assert len(phrases) > 1000  # the bank: COCO, Objects365, LVIS
    lowered = {p.lower() for p in phrases}
    for name in ("circle", "square", "triangle", "circles"):
        assert name not in lowered
    assert "giraffe" in lowered


@pytest.mark.slow
def test_a_lora_run_with_retain_exports_the_merged_model_and_the_adapter(shapes, tmp_path, caplog):
    run_dir = tmp_path / "run"
    overrides = [
        "train.max_steps=2",
        "train.freeze=heads",
        "adapter.kind=lora",
        "adapter.rank=4",
        "train.retain=true",
        "train.retain_prompts=2",
    ]
    with caplog.at_level(logging.INFO):
        assert main(_args(run_dir, shapes, *overrides)) == 0
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("adapter: ")]
    assert summary and "layers (vision_attention 8, vision_mlp 4, detr_encoder 10, detr_decoder 28)" in summary[0]
    assert "base parameters (" in summary[0] and "%)" in summary[0]  # the trainable count and percentage
    records = [json.loads(line) for line in (run_dir / "train_stats.jsonl").read_text().splitlines()]
    assert all("loss_retain" in r for r in records if "loss" in r)

    model_dir = run_dir / "model"
    merged = Sam3Model.from_pretrained(model_dir)  # plain transformers, transformers' names
    assert not any("lora" in k for k in merged.state_dict())
    identity = json.loads((model_dir / ADAPTER_DIR / BASE_FILE).read_text())
    assert identity["source"] == "tiny"
    base = load_model("tiny", image_size=IMAGE_SIZE).model
    peft = PeftModel.from_pretrained(base, model_dir / ADAPTER_DIR)
    rebuilt = peft.merge_and_unload().state_dict()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(rebuilt[name], value, rtol=1e-5, atol=1e-6, msg=name)
