"""The feature cache (`sam3.features`) on the real tiny SAM 3 and a generated shapes dataset (CPU, fp32 model).

- the same batch through pixels and through an fp32 cache with V = 1 (view 0 is the validation warp): same targets,
  same loss within 1e-5, same gradients on every trained parameter; with the text encoder training (freeze vision)
  and with cached prompt embeddings (freeze vision_text)
- an fp16 cache: each feature within fp16's rounding bound of the fp32 one, the loss within 1e-3 relative
- the key: weights, not names, identify the model; each mismatch is a ConfigError naming the field and the rebuild
  command; a frozen vision encoder is required; a detection cache cannot serve masks; prompts must be covered
- building is idempotent (same key: nothing rewritten) and deterministic (same bytes); another key rebuilds
- views: geometry a function of (seed, index, view); stored targets = the dataset's own warp through that geometry;
  the view a sample reads a function of (train seed, epoch, index)
- (slow) the trainer from a cache: end to end, export, and a mid-epoch resume with bitwise the uninterrupted weights
- (slow) evaluation of a model trained from the cache: same weights and same metrics as the same steps from pixels
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import Sam3Model

import sam3.trainer as trainer
from sam3.checkpoint import step_checkpoint_name
from sam3.coco import load_coco
from sam3.config import CacheConfig
from sam3.data import CocoPromptDataset, collate_prompts, sample_generator, train_sides
from sam3.engine import train_step
from sam3.errors import ConfigError
from sam3.evaluation.ground_truth import scale_to_original, score_predictions
from sam3.features import (
    CachedDetector,
    build_cache,
    open_training_cache,
    view_geometry,
    write_disabled,
)
from sam3.features.key import vision_digest
from sam3.features.store import pack_masks, unpack_masks
from sam3.freeze import apply_freeze
from sam3.inference import predict_dataset
from sam3.losses import Criterion
from sam3.model import Sam3Detector, load_model, parameters_without_text_gradients
from sam3.optim import build_optimizer
from tests.training_runs import (
    IMAGE_SIZE,
    TEST_OPTIM,
    build_small_shapes,
    make_job,
    read_weights,
    save_dropout_free_tiny,
)
from tests.weights import assert_same_weights

FP32 = CacheConfig(enabled=True, dtype="fp32")
FP16 = CacheConfig(enabled=True, dtype="fp16")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"), n=4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Dropout-free tiny weights: the pixel and cache paths then run the same arithmetic in train mode."""
    return save_dropout_free_tiny(tmp_path_factory.mktemp("model"))


def _detector(model_dir: Path) -> Sam3Detector:
    return load_model(model_dir)


@pytest.fixture(scope="module")
def seg_fp32(shapes, model_dir, tmp_path_factory) -> Path:
    """fp32, V = 1, all three FPN levels (segmentation), masks stored."""
    folder = tmp_path_factory.mktemp("seg_fp32")
    build_cache(shapes, folder, _detector(model_dir), FP32, with_masks=True, source=str(model_dir))
    return folder


@pytest.fixture(scope="module")
def seg_fp16(shapes, model_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seg_fp16")
    build_cache(shapes, folder, _detector(model_dir), FP16, with_masks=True, source=str(model_dir))
    return folder


def _pixel_dataset(shapes: Path, with_masks: bool = True, **kwargs) -> CocoPromptDataset:
    return CocoPromptDataset(shapes, "train", image_size=IMAGE_SIZE, train=False, with_masks=with_masks, **kwargs)


def _loss_and_grads(model, batch, freeze: str, with_masks: bool = True):
    """Loss terms and the gradient of every trainable parameter after one backward (train mode, as the trainer)."""
    detector = model.detector if isinstance(model, CachedDetector) else model
    apply_freeze(detector.model, freeze, parameters_without_text_gradients(detector, with_masks=with_masks))
    model.train()
    detector.model.zero_grad(set_to_none=True)
    losses = Criterion(with_masks=with_masks)(model(batch, with_masks=with_masks), batch.targets)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in detector.model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize(("freeze", "with_masks"), [("vision", False), ("vision_text", True)])
def test_pixels_and_fp32_cache_give_the_same_loss_and_gradients(shapes, model_dir, seg_fp32, freeze, with_masks):
    pixels = _pixel_dataset(shapes, with_masks=with_masks)
    detector = _detector(model_dir)
    cached = open_training_cache(seg_fp32, pixels, detector, FP32, freeze, model_source=str(model_dir))
    pixel_batch = collate_prompts([pixels[0], pixels[1]])
    cache_batch = cached.collate([cached[0], cached[1]])
    # the same queries and targets: the cache stored the dataset's own validation warp of boxes and masks
    assert cache_batch.prompts == pixel_batch.prompts
    assert torch.equal(cache_batch.query_image, pixel_batch.query_image)
    assert torch.equal(cache_batch.query_prompt, pixel_batch.query_prompt)
    assert pixel_batch.num_target_boxes > 0
    for ours, theirs in zip(cache_batch.targets, pixel_batch.targets, strict=True):
        assert ours.keys() == theirs.keys() == {"boxes", "category_id", *(["masks"] if with_masks else [])}
        assert all(torch.equal(ours[k], theirs[k]) for k in ("boxes", "masks") if k in ours)
    assert tuple(cache_batch.pixel_values.shape) == (2, 0)  # no pixels travel
    # a segmentation cache serves both: all 3 levels for masks, the 1x level alone for detection
    assert len(cache_batch.levels) == (3 if with_masks else 1)
    assert (cache_batch.prompt_tokens is not None) == (freeze == "vision_text")

    pixel_losses, pixel_grads = _loss_and_grads(detector, pixel_batch, freeze, with_masks)
    cache_losses, cache_grads = _loss_and_grads(CachedDetector(_detector(model_dir)), cache_batch, freeze, with_masks)

    for name, value in pixel_losses.items():
        torch.testing.assert_close(cache_losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert pixel_grads.keys() == cache_grads.keys()
    assert any(n.startswith("text_encoder.") for n in pixel_grads) == (freeze == "vision")
    assert not any(n.startswith("vision_encoder.") for n in pixel_grads)
    for name, grad in pixel_grads.items():
        torch.testing.assert_close(cache_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fp16_cache_within_fp16_rounding_and_loss_within_1e_3(shapes, model_dir, seg_fp16, seg_fp32):
    pixels = _pixel_dataset(shapes, with_masks=False)
    half = open_training_cache(seg_fp16, pixels, _detector(model_dir), FP16, "vision_text", model_source="m")
    full = open_training_cache(seg_fp32, pixels, _detector(model_dir), FP32, "vision_text", model_source="m")
    for index in range(len(pixels)):
        for rounded, exact in zip(half[index].levels, full[index].levels, strict=True):
            assert rounded.dtype == torch.float16 and exact.dtype == torch.float32
            # round to nearest: |error| <= half a unit in the last place. Normal fp16 numbers have 10 stored mantissa
            # bits, so half an ulp is at most 2^-11 of the value; below 2^-14 (subnormal) the spacing is 2^-24,
            # half of it 2^-25.
            bound = exact.abs() * 2**-11 + 2**-25
            assert ((rounded.float() - exact).abs() <= bound).all()
    batch_half = half.collate([half[0], half[1]])
    batch_full = full.collate([full[0], full[1]])
    loss_half, _ = _loss_and_grads(CachedDetector(_detector(model_dir)), batch_half, "vision_text", with_masks=False)
    loss_full, _ = _loss_and_grads(CachedDetector(_detector(model_dir)), batch_full, "vision_text", with_masks=False)
    # measured: relative loss error ~1e-5 on this model; the stated tolerance is 1e-3
    torch.testing.assert_close(loss_half["loss"], loss_full["loss"], rtol=1e-3, atol=0)


def test_which_freeze_modes_let_the_cache_stand_in_for_which_encoder():
    from sam3.freeze import FREEZE_MODES, freezes_text, freezes_vision

    table = {mode: (freezes_vision(mode), freezes_text(mode)) for mode in FREEZE_MODES}
    assert table == {
        "none": (False, False),
        "vision": (True, False),
        "vision_text": (True, True),
        "heads": (True, True),
    }
    with pytest.raises(ValueError, match="unknown freeze mode 'decoder'"):
        freezes_vision("decoder")


def test_pack_masks_by_hand():
    # a 3 x 3 diagonal: row-major bits 100 010 001 (9 bits), padded to 16: 10001000 10000000 = bytes 136, 128
    mask = torch.eye(3, dtype=torch.bool)[None]
    packed = pack_masks(mask)
    assert packed.tolist() == [[136, 128]]
    assert torch.equal(unpack_masks(packed, 3), mask)


def test_model_identity_is_its_weights(model_dir, tmp_path):
    tiny, copy = load_model("tiny", image_size=IMAGE_SIZE), tmp_path / "copy"
    tiny.save_pretrained(copy)
    assert vision_digest(load_model(copy)) == vision_digest(tiny)  # a folder holding the same weights: same key
    assert vision_digest(load_model("tiny", image_size=IMAGE_SIZE, seed=1)) != vision_digest(tiny)


def test_each_mismatch_is_a_config_error_naming_the_field_and_the_rebuild_command(
    shapes, model_dir, seg_fp32, tmp_path
):
    pixels = _pixel_dataset(shapes)
    other_model = load_model("tiny", image_size=IMAGE_SIZE, seed=1)
    cases = [
        (other_model, FP32, "vision", r"vision: cache \w{12}, this run \w{12}"),
        (_detector(model_dir), replace(FP32, views=2), "vision", "views: cache 1, this run 2"),
        (_detector(model_dir), FP16, "vision", "dtype: cache 'fp32', this run 'fp16'"),
        (_detector(model_dir), replace(FP32, seed=3), "vision", "seed: cache 0, this run 3"),
        # the text digest counts only when the run reads cached prompt embeddings
        (other_model, FP32, "heads", r"text: cache \w{12}, this run \w{12}"),
    ]
    for detector, cache, freeze, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            open_training_cache(seg_fp32, pixels, detector, cache, freeze, model_source="tiny")
        assert f"rebuild: python -m pipeline cache-features {shapes} --out {seg_fp32} --model tiny" in str(err.value)
        assert f"--views {cache.views} --dtype {cache.dtype} --seed {cache.seed}" in str(err.value)


def test_a_detection_cache_cannot_serve_masks_but_a_segmentation_cache_serves_detection(
    shapes, model_dir, seg_fp32, tmp_path
):
    detection = tmp_path / "det"
    build_cache(shapes, detection, _detector(model_dir), FP32, with_masks=False)
    with pytest.raises(ConfigError, match=r"levels: cache \[2\], this run needs \[0, 1, 2\]"):
        open_training_cache(detection, _pixel_dataset(shapes), _detector(model_dir), FP32, "vision", model_source="m")
    # the 1x level alone is read from the segmentation cache for a detection run, and no masks
    cached = open_training_cache(
        seg_fp32, _pixel_dataset(shapes, with_masks=False), _detector(model_dir), FP32, "vision", model_source="m"
    )
    sample = cached[0]
    assert len(sample.levels) == 1 and tuple(sample.levels[0].shape) == (64, 8, 8)  # 112 / 14 = 8 patches a side
    assert all(q.masks is None for q in sample.queries)


def test_the_vision_encoder_must_be_frozen_and_the_folder_must_hold_an_enabled_cache(
    shapes, model_dir, seg_fp32, tmp_path
):
    pixels, detector = _pixel_dataset(shapes), _detector(model_dir)
    with pytest.raises(ConfigError, match="needs a frozen vision encoder, but train.freeze is 'none'"):
        open_training_cache(seg_fp32, pixels, detector, FP32, "none", model_source="m")
    with pytest.raises(ConfigError, match="no feature cache"):
        open_training_cache(tmp_path / "nothing", pixels, detector, FP32, "vision", model_source="m")
    write_disabled(tmp_path / "off")
    with pytest.raises(ConfigError, match="written with cache.enabled false"):
        open_training_cache(tmp_path / "off", pixels, detector, FP32, "vision", model_source="m")
    with pytest.raises(ConfigError, match="no feature cache folder was given"):
        open_training_cache(None, pixels, detector, FP32, "vision", model_source="m")


def test_prompts_must_be_cached_when_the_text_encoder_is_frozen(shapes, model_dir, seg_fp32):
    first_image = _pixel_dataset(shapes).records[0].image_id
    pixels = _pixel_dataset(shapes, negatives={first_image: ["purple hexagon"]})
    detector = _detector(model_dir)
    with pytest.raises(ConfigError, match="1 prompts of this run have no cached embedding .first: 'purple hexagon'"):
        open_training_cache(seg_fp32, pixels, detector, FP32, "vision_text", model_source="m", negatives="n.json")
    # with the text encoder training, prompts are encoded as usual: the cache serves the run
    cached = open_training_cache(seg_fp32, pixels, detector, FP32, "vision", model_source="m")
    assert "purple hexagon" in cached.collate([cached[0]]).prompts


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_building_is_idempotent_and_deterministic(shapes, model_dir, seg_fp32, tmp_path):
    detector = _detector(model_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in seg_fp32.iterdir()}
    again = build_cache(shapes, seg_fp32, detector, FP32, with_masks=True, source=str(model_dir))
    assert not again.built
    assert {p.name: p.stat().st_mtime_ns for p in seg_fp32.iterdir()} == mtimes  # not a byte rewritten

    twin = build_cache(shapes, tmp_path / "twin", detector, FP32, with_masks=True, source=str(model_dir))
    assert twin.built and twin.images == 4 and twin.views == 1
    assert _file_hashes(tmp_path / "twin") == _file_hashes(seg_fp32)

    # another key (2 views) rebuilds in place: same file names, the manifest says 2
    rebuilt = build_cache(shapes, tmp_path / "twin", detector, replace(FP32, views=2), with_masks=True, source="m")
    assert rebuilt.built and rebuilt.views == 2
    manifest = json.loads((tmp_path / "twin" / "manifest.json").read_text())
    assert manifest["key"]["views"] == 2 and set(_file_hashes(tmp_path / "twin")) == set(_file_hashes(seg_fp32))


def test_views_are_seeded_geometries_and_store_the_datasets_own_warp(shapes, model_dir, tmp_path):
    assert view_geometry(0, 5, 0, IMAGE_SIZE) is None  # view 0: the validation warp
    drawn = [view_geometry(0, index, view, IMAGE_SIZE) for index in range(4) for view in (1, 2, 3)]
    assert drawn == [view_geometry(0, index, view, IMAGE_SIZE) for index in range(4) for view in (1, 2, 3)]
    assert drawn != [view_geometry(1, index, view, IMAGE_SIZE) for index in range(4) for view in (1, 2, 3)]
    assert len(set(drawn)) > 1
    for geometry in drawn:
        assert geometry.side in train_sides(IMAGE_SIZE)
        assert 0 <= geometry.left <= IMAGE_SIZE - geometry.side and 0 <= geometry.top <= IMAGE_SIZE - geometry.side

    views = replace(FP32, views=3, seed=4)
    detector = _detector(model_dir)
    build_cache(shapes, tmp_path / "v3", detector, views, with_masks=True)
    pixels = _pixel_dataset(shapes)
    cached = open_training_cache(tmp_path / "v3", pixels, detector, views, "vision", model_source="m")
    for index in range(len(pixels)):
        for view in range(3):
            warped = pixels.warp(index, view_geometry(4, index, view, IMAGE_SIZE))
            record = pixels.records[index]
            levels, boxes, masks = cached.store.read("train", record.image_id, view, [0, 1, 2], True)
            assert torch.equal(boxes, warped.boxes) and torch.equal(masks, warped.masks)
            with torch.no_grad():
                expected = detector.encode_images(warped.image[None]).levels
            # atol 1e-5 on values of order 1: the cache encoded 8 views per call, this check one, and CPU kernels
            # round differently by batch size (measured: at most 2e-6)
            for stored, level in zip(levels, expected, strict=True):
                torch.testing.assert_close(stored, level[0], rtol=1e-5, atol=1e-5)

    # each epoch a sample reads one view, a function of (train seed, epoch, index) only
    def chosen(epoch: int) -> list[int]:
        cached.set_epoch(epoch)
        return [cached[index].view for index in range(len(pixels))]

    by_epoch = [chosen(epoch) for epoch in range(6)]
    assert by_epoch == [chosen(epoch) for epoch in range(6)]
    assert {view for views_of_epoch in by_epoch for view in views_of_epoch} == {0, 1, 2}
    assert len({tuple(v) for v in by_epoch}) > 1
    # the choice is the first draw of the pixel dataset's own per-sample generator
    assert by_epoch[2][1] == int(torch.randint(3, (1,), generator=sample_generator(0, 2, 1)))


def _cache_job(run_dir: Path, shapes: Path, cache_dir: Path, cache: CacheConfig, **loop):
    return replace(make_job(run_dir, shapes, freeze="vision", **loop), cache=cache, feature_cache_dir=str(cache_dir))


@pytest.mark.slow
def test_trainer_from_the_cache_runs_end_to_end_and_resumes_bitwise(shapes, tmp_path):
    cache = CacheConfig(enabled=True, views=2, dtype="fp16")
    build_cache(shapes, tmp_path / "cache", load_model("tiny", image_size=IMAGE_SIZE), cache)  # make_job's model
    # 4 images at batch 2: 2 steps per epoch; checkpoint at 3 is in the middle of epoch 1
    reference = _cache_job(tmp_path / "ref", shapes, tmp_path / "cache", cache, max_steps=6, checkpoint_every=3)
    trainer.train(reference)
    records = [json.loads(line) for line in (tmp_path / "ref" / "train_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and all(r["loss"] > 0 for r in records)
    exported = Sam3Model.from_pretrained(tmp_path / "ref" / "model")
    assert exported.state_dict().keys() == read_weights(tmp_path / "ref" / "model").keys()
    initial = load_model("tiny", image_size=IMAGE_SIZE).model.state_dict()
    final = read_weights(tmp_path / "ref" / "model")
    assert all(torch.equal(final[n], initial[n]) for n in initial if n.startswith("vision_encoder."))
    assert any(not torch.equal(final[n], initial[n]) for n in initial if n.startswith("detr_decoder."))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for step in (0, 3):
        shutil.copy(tmp_path / "ref" / "checkpoints" / step_checkpoint_name(step), resumed / "checkpoints")
    trainer.train(_cache_job(resumed, shapes, tmp_path / "cache", cache, max_steps=6, checkpoint_every=3))
    resumed_records = [json.loads(line) for line in (resumed / "train_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_records] == [4, 5, 6]
    assert [r["loss"] for r in resumed_records] == [r["loss"] for r in records[3:]]  # same views, same dropout
    weights = read_weights(resumed / "model")
    for name, value in final.items():
        assert torch.equal(weights[name], value), name


@pytest.mark.slow
def test_a_model_trained_from_the_cache_evaluates_as_the_same_steps_from_pixels(shapes, model_dir, seg_fp32):
    """3 AdamW steps over the same two batches from pixels and from the cache: same weights, then the one
    evaluation path (pixels through the whole detector, `predict_dataset`) gives the same metrics."""
    pixels = _pixel_dataset(shapes, with_masks=False)
    cached = open_training_cache(seg_fp32, pixels, _detector(model_dir), FP32, "vision", model_source="m")
    pixel_batches = [collate_prompts([pixels[0], pixels[1]]), collate_prompts([pixels[2], pixels[3]])]
    cache_batches = [cached.collate([cached[0], cached[1]]), cached.collate([cached[2], cached[3]])]

    def trained(model: torch.nn.Module, detector: Sam3Detector, batches) -> Sam3Detector:
        apply_freeze(detector.model, "vision", parameters_without_text_gradients(detector, with_masks=False))
        optimizer = build_optimizer(detector.model, TEST_OPTIM, 2)
        model.train()
        for step in range(3):
            assert train_step(model, Criterion(), optimizer, [batches[step % 2]], device=torch.device("cpu")).finite
        return detector.eval()

    pixel_detector, cache_detector = _detector(model_dir), _detector(model_dir)
    from_pixels = trained(pixel_detector, pixel_detector, pixel_batches)
    from_cache = trained(CachedDetector(cache_detector), cache_detector, cache_batches)
    initial = _detector(model_dir)
    pairs = zip(from_pixels.parameters(), initial.parameters(), strict=True)
    assert max(float((p - q).detach().abs().max()) for p, q in pairs) > 1e-3  # 3 steps at lr 1e-3 moved the weights
    assert_same_weights(from_cache.named_parameters(), from_pixels.named_parameters())  # tests/weights.py

    gt = scale_to_original(load_coco(shapes / "valid" / "_annotations.coco.json"))
    metrics = [score_predictions(gt, predict_dataset(d, shapes, "valid"), False) for d in (from_pixels, from_cache)]
    assert metrics[0].keys() == metrics[1].keys()
    for key, value in metrics[0].items():
        assert metrics[1][key] == pytest.approx(value, abs=1e-6), key
