"""The VOS trackers, the prompt samplers and the differentiable training forward (sam3.video.tracker / .prompts)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import Sam2VideoModel, Sam3TrackerVideoModel

from sam3.errors import ConfigError, ModelLoadError
from sam3.video.config import PromptConfig
from sam3.video.prompts import mask_to_box, sample_box, sample_error_click, sample_positive_click
from sam3.video.tracker import TrackerForward, build_tracker, model_image_size, new_session, tracker_kind
from sam3.video.types import VideoClip

SOURCES = ("tiny-sam2.1", "tiny-sam3")


@pytest.fixture(scope="module", params=SOURCES)
def model(request):
    return build_tracker(request.param)


def make_clip(size: int, num_frames: int = 4, seed: int = 0) -> VideoClip:
    """Two rectangles drifting right over noise; object 2 leaves the frame in the last frame (absent there)."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randn(num_frames, 3, size, size, generator=gen)
    masks = torch.zeros(num_frames, 2, size, size, dtype=torch.bool)
    unit = size // 8
    for t in range(num_frames):
        masks[t, 0, unit : 4 * unit, unit + t : 3 * unit + t] = True
        if t < num_frames - 1:
            masks[t, 1, 5 * unit : 7 * unit, 4 * unit - t : 7 * unit - t] = True
    frames = frames + 2.0 * masks.any(dim=1, keepdim=True).float()  # the objects are brighter than the background
    names = [f"{t:05d}" for t in range(num_frames)]
    return VideoClip("clip", names, frames, masks, [1, 2])


def run(model, prompts: PromptConfig, clip: VideoClip, seed: int = 0):
    torch.manual_seed(seed)  # dropout in the memory attention draws from torch's global generator
    return TrackerForward(model, prompts)(clip, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------- prompts


def test_error_clicks_land_in_the_error_region_with_the_right_label():
    gt = torch.zeros(1, 32, 32, dtype=torch.bool)
    gt[0, 8:24, 8:24] = True
    pred = torch.zeros_like(gt)
    pred[0, 12:28, 12:28] = True  # shifted: false negatives top left, false positives bottom right
    false_neg, false_pos = gt & ~pred, ~gt & pred
    gen = torch.Generator().manual_seed(0)
    labels_seen = set()
    for _ in range(200):
        points, labels = sample_error_click(gt, pred, gen)
        x, y = points[0, 0].long().tolist()
        label = int(labels[0, 0])
        labels_seen.add(label)
        assert (false_neg if label == 1 else false_pos)[0, y, x], (x, y, label)
    assert labels_seen == {0, 1}


def test_clicks_when_the_prediction_is_right_or_empty():
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, 4:8, 4:8] = True  # object 1 absent
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        points, labels = sample_error_click(gt, gt.clone(), gen)  # all correct: negative click on the background
        assert labels.tolist() == [[0], [0]]
        x, y = points[0, 0].long().tolist()
        assert not gt[0, y, x]
        points, labels = sample_positive_click(gt, gen)  # positive on the object, negative where absent
        assert labels.tolist() == [[1], [0]]
        x, y = points[0, 0].long().tolist()
        assert gt[0, y, x]


def test_boxes_from_masks_and_their_noise():
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 10:20, 5:45] = True
    masks[1, 0:40, 0:50] = True
    assert mask_to_box(masks).tolist() == [[5, 10, 44, 19], [0, 0, 49, 39]]
    gen = torch.Generator().manual_seed(0)
    points, labels = sample_box(masks, gen, noise=0.0)
    assert points.tolist() == [[[5, 10], [44, 19]], [[0, 0], [49, 39]]]
    assert labels.tolist() == [[2, 3], [2, 3]]
    for _ in range(20):
        points, _ = sample_box(masks, gen)
        shift = (points[0].flatten() - torch.tensor([5.0, 10, 44, 19])).abs()
        assert (shift <= torch.tensor([3.9, 0.9, 3.9, 0.9]) + 1e-4).all()  # 0.1 x (39 wide, 9 high)
        assert (points[1] >= 0).all() and (points[1, :, 0] <= 49).all() and (points[1, :, 1] <= 39).all()


# -------------------------------------------------------------------------------------------------------- models


def test_tiny_models_build_deterministically():
    for source, kind, cls in (("tiny-sam2.1", "sam2.1", Sam2VideoModel), ("tiny-sam3", "sam3", Sam3TrackerVideoModel)):
        first, second = build_tracker(source), build_tracker(source)
        assert isinstance(first, cls) and tracker_kind(first) == kind and first.training
        assert all(
            torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
        )
    assert model_image_size(build_tracker("tiny-sam2.1", image_size=96)) == 96
    with pytest.raises(ConfigError, match="multiple of 14"):
        build_tracker("tiny-sam3", image_size=64)


def test_a_saved_tracker_loads_back(tmp_path):
    model = build_tracker("tiny-sam2.1")
    model.save_pretrained(tmp_path / "m")
    loaded = build_tracker(str(tmp_path / "m"))
    assert isinstance(loaded, Sam2VideoModel)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    with pytest.raises(ConfigError, match="built for 64 px"):
        build_tracker(str(tmp_path / "m"), image_size=128)


def test_unusable_model_folders_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        build_tracker(str(tmp_path / "nowhere"))
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        build_tracker(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "sam2_video"}))
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        build_tracker(str(folder))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text(json.dumps({"model_type": "sam2"}))
    with pytest.raises(ModelLoadError, match="accepted model types: sam2_video"):
        build_tracker(str(folder))


# ---------------------------------------------------------------------------------------------------- the forward


def test_output_shapes(model):
    size = model_image_size(model)
    clip = make_clip(size)
    out = run(model, PromptConfig(prob_points=0.5, correction_clicks=2), clip)
    assert [f.frame_index for f in out.frames] == [0, 1, 2, 3]
    assert out.frames[0].is_conditioning
    for frame in out.frames:
        for step in frame.steps:
            masks = step.mask_logits.shape[1]
            assert masks in (1, 3)
            assert step.mask_logits.shape == (2, masks, size, size)
            assert step.iou_pred.shape == (2, masks)
            assert step.object_score_logits.shape == (2, 1)


def test_mask_prompts(model):
    clip = make_clip(model_image_size(model))
    out = run(model, PromptConfig(prob_points=0.0, max_init_cond_frames=1), clip)
    assert [len(f.steps) for f in out.frames] == [1, 1, 1, 1]  # no correction with mask prompts
    assert [f.is_conditioning for f in out.frames] == [True, False, False, False]
    first = out.frames[0].steps[0]
    assert torch.equal(first.mask_logits[:, 0] > 0, clip.masks[0])  # the mask is the output: +-10 logits
    assert first.mask_logits.abs().max() == 10 and torch.equal(first.iou_pred, torch.ones(2, 1))
    assert (first.object_score_logits == 10).all()
    assert all(f.steps[0].mask_logits.shape[1] == 3 for f in out.frames[1:])  # tracking: multimask (0 clicks)


@pytest.mark.parametrize("prob_box", [0.0, 1.0])
def test_click_and_box_prompts_with_corrections(model, prob_box):
    clicks = 3
    prompts = PromptConfig(prob_points=1.0, prob_box=prob_box, max_init_cond_frames=2, correction_clicks=clicks)
    clip = make_clip(model_image_size(model))
    forward = TrackerForward(model, prompts)
    plan = forward.plan(clip.num_frames, torch.Generator().manual_seed(3))
    assert plan.use_points and plan.init_cond_frames[0] == 0
    assert set(plan.init_cond_frames) <= set(plan.correction_frames) and len(plan.correction_frames) <= 2
    assert plan.box_frames == (set(plan.init_cond_frames) if prob_box else set())
    labels = forward._initial_prompts(clip, plan, torch.Generator().manual_seed(0))[0][1]
    assert labels.tolist() == ([[2, 3]] * 2 if prob_box else [[1]] * 2)  # a box, or a positive click on each object

    for seed in range(3):
        out = run(model, prompts, clip, seed)
        plan = forward.plan(clip.num_frames, torch.Generator().manual_seed(seed))  # the draws the forward made
        for frame in out.frames:
            corrected = frame.frame_index in plan.correction_frames
            assert frame.is_conditioning == (corrected or frame.frame_index in plan.init_cond_frames)
            assert len(frame.steps) == (1 + clicks if corrected else 1)
            if corrected:
                first_is_box = frame.frame_index in plan.box_frames
                # multimask on the first click only; a box is 2 points, a correction adds 1
                assert frame.steps[0].mask_logits.shape[1] == (1 if first_is_box else 3)
                assert all(step.mask_logits.shape[1] == 1 for step in frame.steps[1:])


def test_same_seed_same_output_other_seed_other_prompts(model):
    prompts = PromptConfig(correction_clicks=2)
    clip = make_clip(model_image_size(model))
    first, second = run(model, prompts, clip, seed=5), run(model, prompts, clip, seed=5)
    for a, b in zip(first.frames, second.frames, strict=True):
        assert len(a.steps) == len(b.steps)
        for x, y in zip(a.steps, b.steps, strict=True):
            assert torch.equal(x.mask_logits, y.mask_logits) and torch.equal(x.iou_pred, y.iou_pred)
    forward = TrackerForward(model, prompts)
    plans = {repr(forward.plan(8, torch.Generator().manual_seed(seed))) for seed in range(10)}
    assert len(plans) > 1


def test_a_last_frame_loss_reaches_memory_and_earlier_frames(model):
    """Only frame 0 is prompted (its mask): frame 3 sees the object through memory alone, so its gradient must reach
    the memory encoder, the memory attention and the earlier frames' pixels (through the image encoder)."""
    clip = make_clip(model_image_size(model))
    clip.frames.requires_grad_(True)
    model.zero_grad()
    out = run(model, PromptConfig(prob_points=0.0, max_init_cond_frames=1), clip)
    last = out.frames[-1].steps[-1]
    (last.mask_logits.sigmoid().mean() + last.object_score_logits.sum()).backward()

    def touched(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert touched(model.memory_encoder) and touched(model.memory_attention) and touched(model.vision_encoder)
    for t in range(3):  # earlier frames
        assert clip.frames.grad[t].abs().sum() > 0, t
    model.zero_grad()


def test_eval_forward_agrees_with_transformers_inference(model):
    """With the ground-truth mask on frame 0 only and the model in eval mode, the training forward must predict what
    transformers' own inference does on the same frames (it re-implements the same steps, batched over objects)."""
    size = model_image_size(model)
    clip = make_clip(size)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():  # objects predicted present, so the masks are not all NO_OBJ_SCORE (a vacuous match)
        model.mask_decoder.pred_obj_score_head.proj_out.bias += 5.0
    ours = run(model, PromptConfig(prob_points=0.0, max_init_cond_frames=1), clip)
    with torch.inference_mode():
        session = new_session(model, torch.float32)
        session.processed_frames = dict(enumerate(clip.frames))
        for k, object_id in enumerate(clip.object_ids):
            session.add_mask_inputs(session.obj_id_to_idx(object_id), 0, clip.masks[0, k][None, None].float())
        session.obj_with_new_inputs = list(clip.object_ids)
        model(session, frame_idx=0)
        theirs = {out.frame_idx: out.pred_masks for out in model.propagate_in_video_iterator(session)}
    for t in range(1, clip.num_frames):
        step = ours.frames[t].steps[0]
        assert (step.object_score_logits > 0).all() and step.mask_logits.std() > 0.1
        best = step.mask_logits[torch.arange(2), step.iou_pred.argmax(dim=1)]
        expected = F.interpolate(theirs[t], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        # Two deliberate differences, both following the reference: frame 0's memory encodes sigmoid(+-10) where
        # transformers binarises a mask prompt, and its object pointer comes from the single-mask token where
        # transformers' _use_mask_as_output takes the best of 3. With both aligned the match is within 1e-2.
        assert torch.allclose(best, expected, atol=5e-2), (t, (best - expected).abs().max())
        assert ((best > 0) == (expected > 0)).float().mean() > 0.99


def test_bad_clips_and_prompt_settings_are_refused():
    model = build_tracker("tiny-sam2.1")
    with pytest.raises(ConfigError, match="64 x 64"):
        TrackerForward(model, PromptConfig())(make_clip(32), torch.Generator())
    with pytest.raises(ConfigError, match="prob_box"):
        TrackerForward(model, PromptConfig(prob_box=1.5))
    with pytest.raises(ConfigError, match="max_correction_frames"):
        TrackerForward(model, PromptConfig(max_init_cond_frames=3, max_correction_frames=2))
