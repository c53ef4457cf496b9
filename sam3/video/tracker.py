"""The VOS trackers (transformers' Sam2VideoModel / Sam3TrackerVideoModel) and their differentiable training forward.

    build_tracker(source, image_size)   "tiny-sam2.1" | "tiny-sam3" (small random models) | a transformers folder
    tracker_kind(model), model_image_size(model)
    TrackerForward(model, prompts)      clip -> ClipOutput, the reference's SAM2Train forward (see its docstring)

transformers' own `Sam2VideoModel.forward` runs under `torch.inference_mode` and keeps only the best mask, so the
training forward calls the model's building blocks itself: `get_image_features`, the memory helpers behind
`_prepare_memory_conditioned_features` (memory frames and object pointers read from a session's stored outputs, whose
tensors keep their autograd graph) and `memory_attention`, `prompt_encoder`, `mask_decoder`, `object_pointer_proj`,
`mask_downsample` and `_encode_new_memory`. Both model classes share these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam2VideoConfig, Sam2VideoModel, Sam3TrackerVideoConfig, Sam3TrackerVideoModel
from transformers.models.sam2.configuration_sam2 import Sam2HieraDetConfig, Sam2VisionConfig
from transformers.models.sam2_video.modeling_sam2_video import NO_OBJ_SCORE, Sam2VideoInferenceSession
from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig, Sam3ViTConfig
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

from sam3.errors import ConfigError, ModelLoadError
from sam3.video.config import TINY_SOURCES, PromptConfig, TrackerKind
from sam3.video.prompts import concat_points, sample_box, sample_error_click, sample_positive_click, uniform
from sam3.video.types import ClipOutput, FrameOutput, FrameStep, VideoClip

TINY_IMAGE_SIZE = {"sam2.1": 64, "sam3": 56}  # tiny models' default input side (4 x 4 top-level features each)
SIZE_MULTIPLE = {"sam2.1": 32, "sam3": 14}  # Hiera's coarsest stride / the ViT's patch size
TINY_SEED = 0
MODEL_TYPES = {"sam2_video": "sam2.1", "sam3_tracker_video": "sam3", "sam3_video": "sam3"}
CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
MASK_OUT_SCALE, MASK_OUT_BIAS = 20.0, -10.0  # a mask prompt used as output: logits +10 inside, -10 outside

Tracker = Sam2VideoModel | Sam3TrackerVideoModel


# ----------------------------------------------------------------------------------------------------------- models


def build_tracker(source: str, image_size: int | None = None) -> nn.Module:
    """The tracker named by `source`, in float32 and train mode.

    "tiny-sam2.1" / "tiny-sam3": `tiny_config`, random weights drawn from seed 0 (the caller's random state is left
    untouched), so every call builds the same model. A folder: the transformers model saved there, by its
    config.json's model_type (sam2_video -> Sam2VideoModel; sam3_tracker_video, or sam3_video as in a facebook/sam3
    download, -> Sam3TrackerVideoModel, which takes the tracker out of the video model and ignores the detector).
    `image_size`: the input side; a folder's model keeps its own (any other value is refused).
    """
    if source in TINY_SOURCES:
        kind = TINY_SOURCES[source]
        config = tiny_config(kind, image_size or TINY_IMAGE_SIZE[kind])
        model_class = Sam2VideoModel if kind == "sam2.1" else Sam3TrackerVideoModel
        # fork_rng: seeding here must not reset the caller's generator (data order, dropout).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = model_class(config)
        return model.train()
    return _load_folder(Path(source), image_size)


def tiny_config(kind: TrackerKind, image_size: int) -> Sam2VideoConfig | Sam3TrackerVideoConfig:
    """A small tracker for CPU tests: width 128 everywhere (the mask decoder, FPN, memory attention and memory
    encoder widths must be equal) and 64 memory channels (transformers fixes the memory cross-attention's input at
    64, and its inference needs the width above it: object pointers split into width / 64 tokens, as 256 -> 4 x 64
    in the released models); 1 memory attention layer, 1 fuser block.
    sam2.1: a 4-stage Hiera of 5 blocks (dims 16-128, the 4th block global); sam3: a 2-layer ViT (width 128, 2 heads,
    windows of 2 patches, the last layer global). `image_size` must be a multiple of 32 (sam2.1) or 14 (sam3)."""
    _check_size(kind, image_size)
    width, init = 128, 0.1  # init std 0.1 (transformers: 0.02): logits and object scores far enough from 0 to test
    grid = image_size // 16 if kind == "sam2.1" else image_size // 14
    memory = dict(
        initializer_range=init,
        num_maskmem=7,
        memory_attention_hidden_size=width,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=2 * width,
        memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=width,
        memory_encoder_output_channels=64,  # transformers fixes the memory cross-attention input at 64
        mask_downsampler_embed_dim=width,
        memory_fuser_embed_dim=width,
        memory_fuser_intermediate_dim=2 * width,
        memory_fuser_num_layers=1,
    )
    decoder = dict(hidden_size=width, mlp_dim=2 * width, num_attention_heads=2, iou_head_hidden_dim=width)
    levels = [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]  # strides 4, 8, 16 of the S input (sam2.1)
    if kind == "sam2.1":
        dims = [16, 32, 64, 128]
        hiera = Sam2HieraDetConfig(
            hidden_size=dims[0],
            num_attention_heads=1,
            image_size=[image_size, image_size],
            blocks_per_stage=[1, 1, 2, 1],
            embed_dim_per_stage=dims,
            num_attention_heads_per_stage=[1, 1, 2, 2],
            window_size_per_stage=[4, 4, 2, 2],  # >= 2 wherever the next stage pools its queries
            global_attention_blocks=[3],  # not a pooling block: those need a window
            window_positional_embedding_background_size=[4, 4],
            initializer_range=init,
        )
        vision = Sam2VisionConfig(
            backbone_config=hiera,
            backbone_channel_list=dims[::-1],
            backbone_feature_sizes=levels,
            fpn_hidden_size=width,
            initializer_range=init,
        )
        prompt = dict(hidden_size=width, image_size=image_size, patch_size=16)
        return Sam2VideoConfig(
            vision_config=vision,
            prompt_encoder_config=prompt,
            mask_decoder_config=decoder,
            image_size=image_size,
            **memory,
        )
    vit = Sam3ViTConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        pretrain_image_size=image_size,
        window_size=2,
        global_attn_indexes=[1],
        initializer_range=init,
    )
    vision = Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=width, backbone_feature_sizes=levels, initializer_range=init
    )
    prompt = dict(hidden_size=width, image_size=image_size, patch_size=14)
    return Sam3TrackerVideoConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder, image_size=image_size, **memory
    )


def tracker_kind(model: nn.Module) -> TrackerKind:
    """ "sam2.1" for a Sam2VideoModel, "sam3" for a Sam3TrackerVideoModel."""
    if isinstance(model, Sam2VideoModel):
        return "sam2.1"
    if isinstance(model, Sam3TrackerVideoModel):
        return "sam3"
    raise TypeError(f"not a VOS tracker: {type(model).__name__} (expected Sam2VideoModel or Sam3TrackerVideoModel)")


def model_image_size(model: nn.Module) -> int:
    """The square input side S the model was built for (1024 for SAM 2.1, 1008 for SAM 3 at full size)."""
    tracker_kind(model)
    return int(model.config.image_size)


def _check_size(kind: str, image_size: int) -> None:
    multiple = SIZE_MULTIPLE[kind]
    if image_size <= 0 or image_size % multiple:
        raise ConfigError(f"image_size {image_size}: the {kind} tracker needs a positive multiple of {multiple}")


def _load_folder(folder: Path, image_size: int | None) -> nn.Module:
    accepted = ", ".join(f"{name} ({kind})" for name, kind in MODEL_TYPES.items())
    if not folder.is_dir():
        raise ModelLoadError(
            f"model source {folder}: not 'tiny-sam2.1', 'tiny-sam3' nor an existing folder; pass one of those or a "
            f"transformers model folder ({CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file} is missing; a tracker folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_INDEX_FILE).is_file():
        raise ModelLoadError(f"{folder / WEIGHTS_FILE} is missing (and no {WEIGHTS_INDEX_FILE}): no weights to load")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ModelLoadError(f"{config_file} is not a JSON object ({err})") from err
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"{config_file}: model_type {model_type!r} is not a video tracker; accepted model types: {accepted}"
        )
    model_class = Sam2VideoModel if MODEL_TYPES[model_type] == "sam2.1" else Sam3TrackerVideoModel
    try:
        model, info = model_class.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: weights of other shapes than the config's
        raise ModelLoadError(f"{folder}: transformers cannot load the {model_type} tracker ({err})") from err
    # transformers fills missing weights with random ones and only logs it: that is a broken folder.
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(
            f"{folder} lacks {len(missing)} weights of the {model_class.__name__} (first: {missing[0]}); "
            "the folder is incomplete or holds another model"
        )
    if image_size is not None and image_size != model_image_size(model):
        raise ConfigError(
            f"image_size {image_size}: the model in {folder} was built for {model_image_size(model)} px; "
            "leave image_size unset (null) to use the model's own"
        )
    return model.train()


def new_session(model: nn.Module, dtype: torch.dtype) -> Sam2VideoInferenceSession | Sam3TrackerVideoInferenceSession:
    """An empty inference session of the model's own class (the memory methods read its per-object output dicts)."""
    session_class = Sam2VideoInferenceSession if tracker_kind(model) == "sam2.1" else Sam3TrackerVideoInferenceSession
    return session_class(dtype=dtype)


# --------------------------------------------------------------------------------------------------- the forward


@dataclass
class PromptPlan:
    """A clip's prompts, drawn once before tracking (the reference's `prepare_prompt_inputs`).

    use_points: clicks / boxes on the conditioning frames (else their ground-truth masks)
    init_cond_frames: frame 0 first, then the other initial conditioning frames (in drawing order)
    box_frames: the initial conditioning frames prompted with a box (only with use_points)
    correction_frames: the frames receiving correction clicks (only with use_points): every initial conditioning
        frame plus random others; each becomes a conditioning frame
    """

    use_points: bool
    init_cond_frames: list[int]
    box_frames: set[int]
    correction_frames: list[int]


@dataclass
class DecoderPass:
    """One mask-decoder pass for O objects (the reference's `_forward_sam_heads` outputs).

    low_res_multimasks (O, M, S/4, S/4), high_res_multimasks (O, M, S, S), iou_pred (O, M); the best mask by predicted
    IoU (the only one when M = 1): low_res_masks (O, 1, S/4, S/4), high_res_masks (O, 1, S, S); object_pointer (O, C);
    object_score_logits (O, 1).
    """

    low_res_multimasks: torch.Tensor
    high_res_multimasks: torch.Tensor
    iou_pred: torch.Tensor
    low_res_masks: torch.Tensor
    high_res_masks: torch.Tensor
    object_pointer: torch.Tensor
    object_score_logits: torch.Tensor

    def step(self) -> FrameStep:
        return FrameStep(self.high_res_multimasks, self.iou_pred, self.object_score_logits)


class TrackerForward(nn.Module):
    """The differentiable training forward of SAM 2's SAM2Train over a transformers tracker, one clip at a time.

    1. Image features of all T frames in one batched call.
    2. Prompts (`plan`): with p `prob_points` the clip is prompted with clicks, else with ground-truth masks (one
       draw per clip, as the reference). 1..`max_init_cond_frames` initial conditioning frames, frame 0 always. With
       masks, each conditioning frame's output is its mask (logits +-10) and the object pointer comes from the decoder
       fed that mask (`_use_mask_as_output`). With clicks, each conditioning frame gets a box with p `prob_box` (per
       frame), else one click uniform on each object; correction frames are every initial conditioning frame plus
       random others, `max_init_cond_frames`..`max_correction_frames` frames in all.
    3. Tracking: the initial conditioning frames first (they use no memory), then the others in time order, as the
       reference does (`forward_tracking`); each object's features attend to its memory: every conditioning frame
       plus the `num_maskmem - 1` previous frames, and object pointers of up to 16 frames (transformers'
       `_prepare_memory_conditioned_features`). Multimask output (M = 3) where transformers' `_use_multimask` says:
       0 or 1 click (a tracked frame, a first click), single mask with a box or after a correction click.
    4. Correction (`_correct`): `correction_clicks` clicks per correction frame, each uniform in the error region of
       the current best mask (from the ground truth instead with p `prob_click_from_gt`, one draw per click for all
       objects), appended to the frame's clicks; the decoder re-runs on all clicks so far plus the previous best
       low-res mask logits as mask prompt. A corrected frame is stored as a conditioning frame.
    5. Memory: each frame's final best mask, sigmoid * 20 - 10 (the config's scale / bias), is encoded with the
       frame's features (`_encode_new_memory`); nothing is detached, so the loss of a late frame reaches earlier
       frames' predictions, the memory encoder and the image encoder.

    All O objects run as one batch of O. Every random draw comes from the `generator` passed to `forward`; dropout
    in the model (memory attention) uses torch's global generator, as any nn.Dropout does.
    """

    def __init__(self, model: nn.Module, prompts: PromptConfig) -> None:
        super().__init__()
        tracker_kind(model)
        _check_prompts(prompts)
        self.model = model
        self.prompts = prompts

    def forward(self, clip: VideoClip, generator: torch.Generator) -> ClipOutput:
        model = self.model
        size = model_image_size(model)
        if tuple(clip.frames.shape[-2:]) != (size, size):
            raise ConfigError(
                f"clip {clip.video}: frames are {tuple(clip.frames.shape[-2:])}, the model takes {size} x {size}; "
                "preprocess the dataset to the model's image size"
            )
        num_frames, num_objects = clip.num_frames, clip.num_objects
        plan = self.plan(num_frames, generator)
        features = model.get_image_features(clip.frames.to(model.dtype), return_dict=True)
        feats, pos = features.fpn_hidden_states, features.fpn_position_encoding  # levels of (HW_l, T, C_l)
        session = new_session(model, model.dtype)
        memory = session.output_dict_per_obj[session.obj_id_to_idx(0)]  # one session "object" holds all O
        prompt_points = self._initial_prompts(clip, plan, generator)

        order = plan.init_cond_frames + [t for t in range(num_frames) if t not in plan.init_cond_frames]
        outputs: dict[int, FrameOutput] = {}
        for t in order:
            frame_feats = [level[:, t : t + 1].expand(-1, num_objects, -1) for level in feats]
            frame_pos = [level[:, t : t + 1].expand(-1, num_objects, -1) for level in pos]
            high_res = [
                _to_map(level, shape)
                for level, shape in zip(frame_feats[:-1], model.backbone_feature_sizes[:-1], strict=True)
            ]
            is_init = t in plan.init_cond_frames
            gt = clip.masks[t]
            if is_init and not plan.use_points:
                last = self._mask_as_output(_to_map(frame_feats[-1], model.backbone_feature_sizes[-1]), high_res, gt)
                steps, points = [last.step()], None
            else:
                pix_feat = self._memory_conditioned(session, t, is_init, frame_feats[-1], frame_pos[-1], num_frames)
                points = prompt_points.get(t)
                last = self._decode(pix_feat, high_res, points, None, self._multimask(is_init, points))
                steps = [last.step()]
                if t in plan.correction_frames:
                    last, points = self._correct(pix_feat, high_res, gt, is_init, points, last, steps, generator)
            is_cond = is_init or t in plan.correction_frames
            features_mem, pos_mem = model._encode_new_memory(
                current_vision_feats=frame_feats[-1],
                pred_masks_high_res=last.high_res_masks,
                object_score_logits=last.object_score_logits[:, :, None],  # (O, 1, 1): broadcast over (O, C, h, w)
                is_mask_from_pts=points is not None,
            )
            memory["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][t] = {
                "maskmem_features": features_mem,
                "maskmem_pos_enc": pos_mem,
                "object_pointer": last.object_pointer,
            }
            outputs[t] = FrameOutput(frame_index=t, steps=steps, is_conditioning=is_cond)
        return ClipOutput(frames=[outputs[t] for t in range(num_frames)])

    def plan(self, num_frames: int, generator: torch.Generator) -> PromptPlan:
        """Draw the clip's prompt kinds and frames (the reference's `prepare_prompt_inputs`, training settings)."""
        cfg = self.prompts
        if num_frames == 1:  # an image as a 1-frame video: always clicks, corrected (as the reference)
            use_points, num_init, num_correct = True, 1, 1
        else:
            use_points = _draw(generator) < cfg.prob_points
            num_init = _integer(generator, 1, min(cfg.max_init_cond_frames, num_frames))
            num_correct = max(num_init, min(cfg.max_correction_frames, num_frames))
            if use_points and num_correct > num_init:
                num_correct = _integer(generator, num_init, num_correct)
        init = [0] + [1 + i for i in _sample(generator, num_frames - 1, num_init - 1)]
        box_frames = {t for t in init if use_points and _draw(generator) < cfg.prob_box}
        correction: list[int] = []
        if use_points:
            rest = [t for t in range(num_frames) if t not in init]
            correction = init + [rest[i] for i in _sample(generator, len(rest), num_correct - num_init)]
        return PromptPlan(use_points, init, box_frames, correction)

    def _memory_conditioned(
        self,
        session: Sam2VideoInferenceSession | Sam3TrackerVideoInferenceSession,
        frame: int,
        is_init: bool,
        feats: torch.Tensor,
        pos: torch.Tensor,
        num_frames: int,
    ) -> torch.Tensor:
        """Frame features (HW, O, C) attending to the O objects' memory -> (O, C, h, w) for the mask decoder.

        transformers' `_prepare_memory_conditioned_features` step by step, through its own helpers (memory frames
        and their temporal encodings, object pointers and theirs): its final reshape assumes one object
        (`squeeze(1)` of the (1, B, HW, C) attention output), so the batched reshape is done here. An initial
        conditioning frame gets no memory, only the learnt no-memory embedding added (directly_add_no_mem_embed).
        """
        model = self.model
        num_objects, channels = feats.shape[1], model.hidden_dim
        shape = model.backbone_feature_sizes[-1]
        if is_init or model.num_maskmem == 0:
            return _to_map(feats + model.no_memory_embedding if model.num_maskmem else feats, shape)
        previous = model._gather_memory_frame_outputs(session, 0, frame)
        memories, memory_pos = model._build_memory_attention_inputs(previous, feats.device)
        offsets, pointers, max_pointers = model._get_object_pointers(session, 0, frame, num_frames, feats.device)
        num_pointer_tokens = 0
        if pointers:
            pointer_tokens, pointer_pos = model._process_object_pointers(
                offsets, pointers, max_pointers, num_objects, channels, feats.device
            )
            memories.append(pointer_tokens)
            memory_pos.append(pointer_pos)
            num_pointer_tokens = pointer_tokens.shape[0]
        attended = model.memory_attention(
            current_vision_features=feats,
            current_vision_position_embeddings=pos,
            memory=torch.cat(memories, dim=0).to(feats.dtype),
            memory_posision_embeddings=torch.cat(memory_pos, dim=0),
            num_object_pointer_tokens=num_pointer_tokens,
        )  # (1, O, HW, C)
        return attended[0].transpose(1, 2).reshape(num_objects, channels, *shape)

    def _initial_prompts(
        self, clip: VideoClip, plan: PromptPlan, generator: torch.Generator
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The clicks (O, K, 2) and labels (O, K) of each initial conditioning frame: a box (K = 2) or one click."""
        if not plan.use_points:
            return {}
        prompts = {}
        for t in plan.init_cond_frames:
            masks = clip.masks[t]
            prompts[t] = (
                sample_box(masks, generator) if t in plan.box_frames else sample_positive_click(masks, generator)
            )
        return prompts

    def _multimask(self, is_init: bool, points: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
        """transformers' rule (config multimask_output_in_sam, _for_tracking, min/max_pt_num): 0..1 clicks."""
        return self.model._use_multimask(is_init, None if points is None else {"point_labels": points[1][:, None]})

    def _correct(
        self,
        pix_feat: torch.Tensor,
        high_res: list[torch.Tensor],
        gt: torch.Tensor,
        is_init: bool,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        last: DecoderPass,
        steps: list[FrameStep],
        generator: torch.Generator,
    ) -> tuple[DecoderPass, tuple[torch.Tensor, torch.Tensor] | None]:
        """`correction_clicks` correction passes on one frame (the reference's `_iter_correct_pt_sampling`), each
        appended to `steps`. Returns the last pass and the frame's final clicks."""
        coords, labels = points if points is not None else (None, None)
        for _ in range(self.prompts.correction_clicks):
            from_gt = self.prompts.prob_click_from_gt > 0 and _draw(generator) < self.prompts.prob_click_from_gt
            pred = None if from_gt else last.high_res_masks[:, 0] > 0
            new_coords, new_labels = sample_error_click(gt, pred, generator)
            coords, labels = concat_points(coords, labels, new_coords, new_labels)
            points = (coords, labels)
            # the previous low-res logits go in as a mask prompt with the clicks, as the reference feeds them
            last = self._decode(pix_feat, high_res, points, last.low_res_masks, self._multimask(is_init, points))
            steps.append(last.step())
        return last, points

    def _decode(
        self,
        pix_feat: torch.Tensor,
        high_res: list[torch.Tensor],
        points: tuple[torch.Tensor, torch.Tensor] | None,
        mask_input: torch.Tensor | None,
        multimask: bool,
    ) -> DecoderPass:
        """Prompt encoder + mask decoder for O objects, each its own image of the batch (its memory-conditioned
        features differ), as transformers' `_single_frame_forward` does but keeping all M masks.

        pix_feat (O, C, h, w); high_res: the decoder's (O, C/8, 4h, 4w) and (O, C/4, 2h, 2w) features; points:
        (O, K, 2) pixel (x, y) and (O, K) labels, or None (an empty point labelled -1 stands in, as transformers
        pads); mask_input: (O, 1, 4h, 4w) logits or None. Masks of objects predicted absent (object score <= 0) are
        set to NO_OBJ_SCORE (-1024), as transformers and the reference do.
        """
        model = self.model
        num_objects = pix_feat.shape[0]
        if points is None:
            coords = pix_feat.new_zeros(num_objects, 1, 1, 2)
            labels = -torch.ones(num_objects, 1, 1, dtype=torch.int32, device=pix_feat.device)
        else:
            coords, labels = points[0][:, None].to(pix_feat.dtype), points[1][:, None]
        if mask_input is not None and mask_input.shape[-2:] != model.prompt_encoder.mask_input_size:
            mask_input = F.interpolate(
                mask_input.float(), size=model.prompt_encoder.mask_input_size, mode="bilinear", antialias=True
            ).to(mask_input.dtype)
        sparse, dense = model.prompt_encoder(
            input_points=coords, input_labels=labels, input_boxes=None, input_masks=mask_input
        )
        image_pe = model.get_image_wide_positional_embeddings().repeat(num_objects, 1, 1, 1)
        low_res, iou_pred, tokens, object_score_logits = model.mask_decoder(
            image_embeddings=pix_feat,
            image_positional_embeddings=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            high_resolution_features=high_res,
        )
        # drop the point-batch axis of 1: (O, 1, M, ...) -> (O, M, ...)
        low_res, iou_pred, tokens, object_score_logits = (
            low_res[:, 0],
            iou_pred[:, 0],
            tokens[:, 0],
            object_score_logits[:, 0],
        )
        appearing = object_score_logits > 0  # (O, 1)
        low_res = torch.where(appearing[:, :, None, None], low_res, NO_OBJ_SCORE)
        size = model_image_size(model)
        high_res_masks = F.interpolate(low_res.float(), size=(size, size), mode="bilinear", align_corners=False)
        high_res_masks = high_res_masks.to(low_res.dtype)
        objects = torch.arange(num_objects, device=low_res.device)
        best = iou_pred.argmax(dim=-1) if multimask else torch.zeros_like(objects)
        token = tokens[
            objects, best
        ]  # the pointer comes from the chosen mask's token (use_multimask_token_for_obj_ptr)
        pointer = model.object_pointer_proj(token)
        present = appearing.to(pointer.dtype)
        pointer = present * pointer + (1 - present) * model.no_object_pointer
        return DecoderPass(
            low_res_multimasks=low_res,
            high_res_multimasks=high_res_masks,
            iou_pred=iou_pred,
            low_res_masks=low_res[objects, best][:, None],
            high_res_masks=high_res_masks[objects, best][:, None],
            object_pointer=pointer,
            object_score_logits=object_score_logits,
        )

    def _mask_as_output(self, pix_feat: torch.Tensor, high_res: list[torch.Tensor], masks: torch.Tensor) -> DecoderPass:
        """A mask prompt taken as the frame's prediction (the reference's and transformers' `_use_mask_as_output`,
        batched over objects): logits 20 * mask - 10, IoU 1, object score +-10 by whether the mask is empty; the
        object pointer from the decoder fed the mask (downsampled by `mask_downsample`). masks: (O, S, S) bool."""
        model = self.model
        mask = masks[:, None].to(pix_feat.dtype)
        high_res_masks = mask * MASK_OUT_SCALE + MASK_OUT_BIAS
        low_res_masks = F.interpolate(
            high_res_masks.float(), size=model.prompt_encoder.mask_input_size, mode="bilinear", antialias=True
        ).to(pix_feat.dtype)
        pointer = self._decode(pix_feat, high_res, None, model.mask_downsample(mask), multimask=False).object_pointer
        present = masks.flatten(1).any(dim=1, keepdim=True).to(pix_feat.dtype)  # (O, 1)
        pointer = present * pointer + (1 - present) * model.no_object_pointer
        return DecoderPass(
            low_res_multimasks=low_res_masks,
            high_res_multimasks=high_res_masks,
            iou_pred=mask.new_ones(mask.shape[0], 1),
            low_res_masks=low_res_masks,
            high_res_masks=high_res_masks,
            object_pointer=pointer,
            object_score_logits=MASK_OUT_SCALE * present + MASK_OUT_BIAS,
        )


def _to_map(level: torch.Tensor, shape: Any) -> torch.Tensor:
    """(HW, B, C) -> (B, C, H, W), the layout change transformers does on its flattened features."""
    return level.permute(1, 2, 0).reshape(level.shape[1], level.shape[2], *shape)


def _draw(generator: torch.Generator) -> float:
    return float(uniform(generator, 1)[0])


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform in low..high inclusive."""
    return low + int(torch.randint(high - low + 1, (1,), generator=generator, device=generator.device))


def _sample(generator: torch.Generator, population: int, count: int) -> list[int]:
    """`count` distinct indices of range(population), in random order (at most `population`)."""
    if count <= 0 or population <= 0:
        return []
    return torch.randperm(population, generator=generator, device=generator.device)[:count].tolist()


def _check_prompts(cfg: PromptConfig) -> None:
    for name in ("prob_points", "prob_box", "prob_click_from_gt"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"vos.prompts.{name}: {value} is not a probability in [0, 1]")
    if cfg.max_init_cond_frames < 1:
        raise ConfigError(f"vos.prompts.max_init_cond_frames: {cfg.max_init_cond_frames}; frame 0 always conditions")
    if cfg.correction_clicks < 0:
        raise ConfigError(f"vos.prompts.correction_clicks: {cfg.correction_clicks} is negative")
    if cfg.prob_points > 0 and cfg.max_correction_frames < cfg.max_init_cond_frames:
        raise ConfigError(
            f"vos.prompts.max_correction_frames ({cfg.max_correction_frames}) < max_init_cond_frames "
            f"({cfg.max_init_cond_frames}): every conditioning frame prompted with clicks is corrected, as in the "
            "reference, so allow at least as many correction frames"
        )
