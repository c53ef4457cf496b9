"""The SAM 3 detector over transformers' `Sam3Model`: loading, and a forward that batches prompts and returns every
decoder layer.

`Sam3Model.forward` pairs one image with one prompt and returns only the last decoder layer. Training needs
(a) every (image, prompt) pair of a batch without running the vision encoder once per pair, and (b) each decoder
layer's logits, boxes and presence logit for the auxiliary losses. `Sam3Detector` calls Sam3Model's own
sub-modules in the order its forward does:

    encode_images   vision_encoder (ViT + FPN)            once per image           B
                    (detection: the ViT and the 1x FPN level only, the one the DETR parts read)
    encode_prompts  text_encoder + text_projection        once per unique prompt   P
    decode          gather by query_image / query_prompt, then detr_encoder -> detr_decoder ->
                    box_head + dot_product_scoring on every layer (-> mask_decoder on the last)   Q pairs

Per-layer outputs, from the decoder's stacked states (hidden [L, Q, N, D], reference boxes [L, Q, N, 4], the
cxcywh box each layer starts from):
    boxes_l    = sigmoid(inverse_sigmoid(reference_l) + box_head(hidden_l))     normalised cxcywh
    logits_l   = dot_product_scoring(hidden_l, prompt)                          [Q, N]
    presence_l = presence head of layer l                                       [Q]
The last layer equals what `Sam3Model.forward` returns (its boxes are xyxy; ours cxcywh).
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, Sam3Config, Sam3Model
from transformers.models.sam3.configuration_sam3 import (
    Sam3DETRDecoderConfig,
    Sam3DETREncoderConfig,
    Sam3GeometryEncoderConfig,
    Sam3MaskDecoderConfig,
    Sam3VisionConfig,
    Sam3ViTConfig,
)
from transformers.models.sam3.modeling_sam3 import inverse_sigmoid

from sam3.batch import PromptBatch
from sam3.decoder_pass import run_decoder
from sam3.errors import ConfigError, ExportError, ModelLoadError
from sam3.io import replace_folder
from sam3.model_files import BUILT_IN_SOURCES, COMPLETE_FOLDER, check_model_folder
from sam3.scratch import apply_scratch_priors
from sam3.tokenizer import CONTEXT_LENGTH, END_ID, PAD_ID, START_ID

logger = logging.getLogger(__name__)

# Sam3Config attribute (saved in config.json) saying whether the model's prompts carry the geometry CLS token
TEXT_GEOMETRY_TOKEN_KEY = "text_geometry_token"
# The geometry encoder's parts that encode boxes only: with no boxes (a text prompt's geometry token) they run on
# empty tensors and get exactly zero gradient.
_BOX_PARTS = ("label_embed", "boxes_direct_project", "boxes_pool_project", "boxes_pos_enc_project", "vision_layer_norm")
GEOMETRY_BOX_PARTS = tuple(f"geometry_encoder.{part}." for part in _BOX_PARTS)


def tiny_config(image_size: int = 224) -> Sam3Config:
    """SAM 3's architecture at about 1M parameters outside the token embedding, for CPU tests and the demo.

    The from-scratch settings of docs/RECIPE.md section 1: width 64 everywhere, 2 ViT layers (the last global, the
    first windowed 8x8), 1 DETR encoder layer, 2 decoder layers, 4 heads, 1 text layer, 16 queries, init std 0.1.
    The token embedding alone is 49,408 x 64 = 3.16M of the 4.28M parameters (the vocabulary is CLIP's).
    Position embeddings are sized for 224 px (16 x 16 patches) whatever `image_size`, so weights load at any size.
    """
    width, heads, init = 64, 4, 0.1
    mlp = 4 * width
    vit = Sam3ViTConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=2,
        num_attention_heads=heads,  # head dim 16: divisible by 4 as the 2-D RoPE needs
        image_size=image_size,
        pretrain_image_size=224,
        window_size=8,
        global_attn_indexes=[1],
        initializer_range=init,
    )
    config = Sam3Config(
        vision_config=Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=width, initializer_range=init),
        text_config=CLIPTextConfig(
            vocab_size=49_408,
            hidden_size=width,
            intermediate_size=mlp,
            projection_dim=width,
            num_hidden_layers=1,
            num_attention_heads=heads,
            max_position_embeddings=CONTEXT_LENGTH,  # CLIPTextConfig's own default is 77
            hidden_act="gelu",
            bos_token_id=START_ID,
            eos_token_id=END_ID,  # CLIP pools at the first eos id; the default 2 would mean "argmax id" instead
            pad_token_id=PAD_ID,
            initializer_range=init,
        ),
        # FPN, DETR, geometry and mask widths must be equal and divisible by 8 (GroupNorm(8) in the pixel decoder).
        geometry_encoder_config=Sam3GeometryEncoderConfig(
            hidden_size=width, num_layers=1, num_attention_heads=heads, intermediate_size=mlp, initializer_range=init
        ),
        detr_encoder_config=Sam3DETREncoderConfig(
            hidden_size=width, num_layers=1, num_attention_heads=heads, intermediate_size=mlp, initializer_range=init
        ),
        detr_decoder_config=Sam3DETRDecoderConfig(
            hidden_size=width,
            num_layers=2,
            num_queries=16,
            num_attention_heads=heads,
            intermediate_size=mlp,
            initializer_range=init,
        ),
        mask_decoder_config=Sam3MaskDecoderConfig(hidden_size=width, num_attention_heads=heads, initializer_range=init),
        initializer_range=init,
    )
    set_image_size(config, image_size)
    return config


def set_image_size(config: Sam3Config, image_size: int) -> None:
    """Make `config` build a model for square inputs of `image_size` pixels (a multiple of the patch size).

    What depends on it: the RoPE position grid of the ViT's global-attention layers (image_size / patch_size per
    side, computed when the model is built, hence set before building) and `backbone_feature_sizes` (the FPN map
    sizes, 4x / 2x / 1x of that grid, read by the video tracker only). What does not: every weight. The learned
    ViT position embeddings are sized by `pretrain_image_size` and tiled to the patch grid; windowed layers pad
    the grid to whole windows; the FPN, DETR and mask decoder follow the feature map sizes. So the same weights
    run at another size, and the input must then have exactly that size.
    """
    patch = config.vision_config.backbone_config.patch_size
    if not isinstance(image_size, int) or image_size <= 0 or image_size % patch:
        raise ConfigError(f"image_size must be a positive multiple of the patch size {patch}, got {image_size!r}")
    config.image_size = image_size  # Sam3Config passes it down to the ViT config
    grid = image_size // patch
    # The last FPN level (0.5x) is not among the sizes: Sam3Model never uses it.
    scales = config.vision_config.scale_factors[:-1]
    config.vision_config.backbone_feature_sizes = [[int(grid * s), int(grid * s)] for s in scales]


def load_model(
    source: str | Path = "tiny",
    image_size: int | None = None,
    seed: int = 0,
    *,
    scratch_priors: bool = True,
    one_to_many: bool = False,
    text_geometry_token: bool | None = None,
) -> Sam3Detector:
    """A `Sam3Detector` in eval mode from "tiny", "full" or a local transformers folder.

    "tiny": `tiny_config`, random weights drawn from `seed` (the caller's random state is left untouched).
    "full": the default `Sam3Config` (840,376,374 parameters, 1008 px), random weights, for benchmarks.
        Both random models get the decoder's spatial priors for training from scratch (`sam3.scratch`) unless
        `scratch_priors` is False (transformers' initialisation alone).
    folder: `Sam3Model.from_pretrained(folder, local_files_only=True)`; a facebook/sam3 download (a video config
        whose `detector_config` is the detector, tracker weights ignored) or our own `save_pretrained` export.
    `image_size` overrides the input size (see `set_image_size`). `one_to_many`, `text_geometry_token`: the
    forward's options (`Sam3Detector`); None for the token: the folder's own setting, else on.
    """
    if isinstance(source, str) and source in BUILT_IN_SOURCES:
        config = tiny_config() if source == "tiny" else Sam3Config()
        if image_size is not None:
            set_image_size(config, image_size)
        # fork_rng: seeding here must not reset the caller's generator (data order, dropout).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Sam3Model(config)
        if scratch_priors:
            apply_scratch_priors(model)
    else:
        model = _load_folder(Path(source), image_size)
    return Sam3Detector(model, one_to_many=one_to_many, text_geometry_token=text_geometry_token).eval()


def _load_folder(folder: Path, image_size: int | None) -> Sam3Model:
    check_model_folder(folder)

    config = Sam3Config.from_pretrained(folder, local_files_only=True)
    detector_config = getattr(config, "detector_config", None)
    if detector_config is not None:
        # facebook/sam3 ships the video model's config; the image detector is its `detector_config`.
        config = detector_config if isinstance(detector_config, Sam3Config) else Sam3Config(**detector_config)
    if image_size is not None:
        set_image_size(config, image_size)
    # float32 whatever the checkpoint's dtype: training keeps fp32 weights and uses autocast for bf16.
    model, info = Sam3Model.from_pretrained(
        folder, config=config, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    # transformers would fill missing weights with random ones and only log it: that is a broken folder.
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(
            f"{folder} lacks {len(missing)} weights of the SAM 3 detector (first: {missing[0]}); "
            f"the folder does not hold a SAM 3 model or is incomplete; {COMPLETE_FOLDER}"
        )
    if info["unexpected_keys"]:
        logger.warning("%s: %d weights not used by the detector were ignored", folder, len(info["unexpected_keys"]))
    return model


@dataclass
class ImageFeatures:
    """Vision encoder output for B images, the FPN levels the detector uses.

    levels    tuple of float [B, C, H_i, W_i], strides 4x, 2x, 1x of the patch grid (the 0.5x level is dropped, as
              Sam3Model.forward does). The DETR parts read only levels[-1]; the mask decoder reads all.
    position  float [1, C, H, W]: sine position encoding of levels[-1], the same for every image.
    """

    levels: tuple[torch.Tensor, ...]
    position: torch.Tensor


@dataclass
class PromptFeatures:
    """Text encoder output for P prompts: every token projected to the DETR width.

    tokens  float [P, L, D]
    mask    bool  [P, L], True for real tokens
    """

    tokens: torch.Tensor
    mask: torch.Tensor


class Sam3Detector(nn.Module):
    """`Sam3Model` with a batched, every-layer forward. `.model` is the transformers model, `.config` its config.

    forward(batch, with_masks) -> dict for the Q (image, prompt) pairs, N = number of decoder queries:
        pred_logits      float [Q, N]        score logits, last decoder layer
        pred_boxes       float [Q, N, 4]     normalised cxcywh
        presence_logits  float [Q]           is the prompt present in the image at all (unclamped)
        pred_masks       float [Q, N, h, w]  mask logits at 4x the patch grid (only when with_masks)
        aux_outputs      list of L - 1 dicts with the first three keys, earlier decoder layers in order
    and while training with `one_to_many`, the one-to-many half of the decoder (sam3.decoder_pass), in the final
    dict and in each aux_outputs entry (Meta's key names; no presence of its own):
        pred_logits_o2m  float [Q, N]        pred_boxes_o2m  float [Q, N, 4]
        pred_masks_o2m   float [Q, N, h, w]  (final layer, with_masks)

    Options (attributes, set at construction):
        one_to_many          run the DAC queries in training (`model.one_to_many`); eval, inference and export
                             never do: the o2o half is all they read, and it is the same with or without them.
        text_geometry_token  join the geometry encoder's CLS token to every prompt, as Meta's model does for a
                             text-only prompt (`model.text_geometry_token`, see `geometry_tokens`). None: the
                             config's `text_geometry_token` (written by our export), else True, since the released
                             SAM 3 was trained that way.
    """

    def __init__(self, model: Sam3Model, one_to_many: bool = False, text_geometry_token: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.one_to_many = one_to_many
        # written into the config either way, so config.json always says which forward the weights expect
        self.text_geometry_token = self.text_geometry_token if text_geometry_token is None else text_geometry_token

    @property
    def text_geometry_token(self) -> bool:
        return bool(getattr(self.model.config, TEXT_GEOMETRY_TOKEN_KEY, True))

    @text_geometry_token.setter
    def text_geometry_token(self, value: bool) -> None:
        # kept in the config, which save_pretrained writes: an exported model is read back with the forward it
        # was trained with
        setattr(self.model.config, TEXT_GEOMETRY_TOKEN_KEY, bool(value))

    @property
    def config(self) -> Sam3Config:
        return self.model.config

    def encode_images(self, pixel_values: torch.Tensor, levels: int | None = None) -> ImageFeatures:
        """Run the vision encoder once on float [B, 3, S, S] (S = config image size).

        levels: compute only the last `levels` of the `num_levels` FPN levels; 1 is all that detection reads (the
            DETR parts use the 1x level alone). None: every level, as the mask decoder needs. The FPN levels are
            independent convolution stacks on the ViT's output, so the skipped ones are never run: on the tiny model
            at 224 px the 4x level (a 3x3 convolution on a 64 x 64 map) costs more than the whole ViT.
        """
        size = self.config.image_size  # an int, or [height, width] in a hand-written config
        height, width = size if isinstance(size, (list, tuple)) else (size, size)
        if tuple(pixel_values.shape[-2:]) != (height, width):
            raise ConfigError(
                f"images are {tuple(pixel_values.shape[-2:])} pixels but the model was built for {height} x {width}; "
                f"preprocess to that size or load the model with image_size={pixel_values.shape[-1]}"
            )
        vision = self.model.vision_encoder
        if levels is None or levels >= self.num_levels:
            out = vision(pixel_values)
            maps = tuple(out.fpn_hidden_states[: self.num_levels])
            return ImageFeatures(levels=maps, position=out.fpn_position_encoding[self.num_levels - 1][:1])
        if levels < 1:
            raise ValueError(f"levels must be at least 1 (the 1x level), got {levels}")
        tokens = vision.backbone(pixel_values).last_hidden_state  # [B, T, C], T = (S / patch)^2 row-major
        patch = self.config.vision_config.backbone_config.patch_size
        grid = tokens.unflatten(1, (height // patch, width // patch)).permute(0, 3, 1, 2)  # [B, C, H, W]
        first = self.num_levels - levels
        return self.image_features(tuple(vision.neck.fpn_layers[i](grid) for i in range(first, self.num_levels)))

    @property
    def num_levels(self) -> int:
        """Number of FPN levels in `ImageFeatures`: every scale factor's but the last (0.5x), which is dropped."""
        return len(self.config.vision_config.scale_factors) - 1

    def image_features(self, levels: tuple[torch.Tensor, ...]) -> ImageFeatures:
        """`ImageFeatures` of FPN levels computed earlier (sam3.features): the last k of the `num_levels`, the 1x
        level at least (all of them for masks). The sine position encoding depends on the 1x level's shape only,
        so it is recomputed rather than stored: the same values `encode_images` takes from the vision encoder."""
        last = levels[-1]
        shape = torch.Size([1, *last.shape[1:]])
        position = self.model.vision_encoder.neck.position_encoding(shape, last.device, last.dtype)
        return ImageFeatures(levels=tuple(levels), position=position)

    def encode_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PromptFeatures:
        """Run the text encoder once on long [P, L] ids (sam3.tokenizer) and project every token."""
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return PromptFeatures(tokens=out.pooler_output, mask=attention_mask.bool())

    def decode(
        self,
        vision_features: ImageFeatures,
        text_features: PromptFeatures,
        query_image: torch.Tensor,
        query_prompt: torch.Tensor,
        with_masks: bool = False,
    ) -> dict:
        """DETR encoder, decoder, heads (and mask decoder) on the Q pairs (query_image[q], query_prompt[q])."""
        if with_masks and len(vision_features.levels) < self.num_levels:
            raise ConfigError(
                f"masks need all {self.num_levels} FPN levels but the image features hold "
                f"{len(vision_features.levels)}: encode the images with levels=None"
            )
        num_queries = query_image.numel()
        image = vision_features.levels[-1].index_select(0, query_image)  # [Q, C, H, W]
        position = vision_features.position.expand(num_queries, -1, -1, -1)
        prompt = text_features.tokens.index_select(0, query_prompt)  # [Q, L, D]
        prompt_mask = text_features.mask.index_select(0, query_prompt)  # [Q, L]
        if self.text_geometry_token:
            geometry = self.geometry_tokens(vision_features).index_select(0, query_image)  # [Q, 1, D]
            prompt = torch.cat([prompt, geometry.to(prompt.dtype)], dim=1)  # [Q, L + 1, D]
            prompt_mask = torch.cat([prompt_mask, prompt_mask.new_ones(num_queries, 1)], dim=1)

        encoded = self.model.detr_encoder(
            vision_features=[image], text_features=prompt, vision_pos_embeds=[position], text_mask=prompt_mask
        )
        one_to_many = self.one_to_many and self.training
        decoded = run_decoder(
            self.model.detr_decoder,
            one_to_many=one_to_many,
            vision_features=encoded.last_hidden_state,
            text_features=encoded.text_features,
            vision_pos_encoding=encoded.pos_embeds_flattened,
            text_mask=prompt_mask,
            spatial_shapes=encoded.spatial_shapes,
        )
        hidden = decoded.hidden  # [L, Q, K, D], K = N (or 2N with one-to-many, o2o first)
        offsets = self.model.detr_decoder.box_head(hidden)  # [L, Q, K, 4], logit space
        boxes = (inverse_sigmoid(decoded.reference_boxes) + offsets).sigmoid()  # [L, Q, K, 4] cxcywh
        logits = self.model.dot_product_scoring(
            decoder_hidden_states=hidden, text_features=encoded.text_features, text_mask=prompt_mask
        ).squeeze(-1)  # [L, Q, K]
        presence = decoded.presence_logits  # [L, Q], unclamped

        masks = None
        if with_masks:
            # The finest levels are gathered per pair only here: at 1008 px the 4x level is 85 MB per pair.
            levels = [level.index_select(0, query_image) for level in vision_features.levels[:-1]] + [image]
            masks = self.model.mask_decoder(
                decoder_queries=hidden[-1],
                backbone_features=levels,
                encoder_hidden_states=encoded.last_hidden_state,
                prompt_features=prompt,
                prompt_mask=prompt_mask,
            ).pred_masks  # [Q, K, h, w]

        n = self.config.detr_decoder_config.num_queries
        layers = []
        for i in range(hidden.shape[0]):
            layer = {"pred_logits": logits[i, :, :n], "pred_boxes": boxes[i, :, :n], "presence_logits": presence[i]}
            if one_to_many:
                layer.update(pred_logits_o2m=logits[i, :, n:], pred_boxes_o2m=boxes[i, :, n:])
            layers.append(layer)
        outputs = layers[-1]
        if masks is not None:
            outputs["pred_masks"] = masks[:, :n]
            if one_to_many:
                outputs["pred_masks_o2m"] = masks[:, n:]
        outputs["aux_outputs"] = layers[:-1]
        return outputs

    def geometry_tokens(self, vision_features: ImageFeatures) -> torch.Tensor:
        """The geometry encoder's CLS token for a prompt without boxes, per image: float [B, 1, D].

        What Meta's image model does for a text-only prompt (sam3/model/sam3_image.py `_encode_prompt`): it always
        runs its geometry encoder, on an empty box list when there are no exemplars. With no boxes the encoder's
        sequence is its CLS embedding alone, which goes through final_proj + LayerNorm, the encoder layers
        (self-attention over that one token, cross-attention to the 1x image features with their position
        encoding) and the output LayerNorm; the result joins the prompt after the text tokens: the DETR encoder,
        decoder cross-attention, the pooled prompt of the dot-product scorer and the mask decoder all see it, and
        it is trained. transformers' `Sam3Model.forward` runs the geometry encoder only when `input_boxes` holds
        a box (`has_geometry_prompts`), so its text-only prompt is the text tokens alone: one token short of what
        the released checkpoint was trained with. The token depends on the image only, hence once per image.

        A transformers user gets the same outputs from `Sam3Model.forward` by passing one padding box:
        input_boxes [[[0, 0, 0, 0]]] with input_boxes_labels [[-10]] (masked out everywhere, so only the CLS
        token remains valid; tests/sam3/test_model.py checks the equality).
        """
        levels, position = vision_features.levels[-1].float(), vision_features.position.float()
        batch, device = levels.shape[0], levels.device
        # fp32, outside autocast: the encoder's box path (roi_align over the empty box list) casts bf16 features to
        # fp16, which autocast's type promotion refuses ("Unexpected floating ScalarType"); one token costs nothing
        with torch.autocast(device_type=device.type, enabled=False):
            out = self.model.geometry_encoder(
                box_embeddings=levels.new_zeros(batch, 0, 4),
                box_mask=torch.zeros(batch, 0, dtype=torch.bool, device=device),
                box_labels=torch.zeros(batch, 0, dtype=torch.long, device=device),
                img_feats=(levels,),
                img_pos_embeds=(position.expand(batch, -1, -1, -1),),
            )
        return out.last_hidden_state  # [B, 1, D]: the CLS token, the only one

    def forward(self, batch: PromptBatch, with_masks: bool = False) -> dict:
        images = self.encode_images(batch.pixel_values, levels=None if with_masks else 1)
        prompts = self.encode_prompts(batch.input_ids, batch.attention_mask)
        return self.decode(images, prompts, batch.query_image, batch.query_prompt, with_masks=with_masks)

    def save_pretrained(self, folder: str | Path, extra_files: Sequence[Callable[[Path], None]] = ()) -> None:
        """Write config.json + model.safetensors (transformers format); `load_model(folder)` reads it back.

        Refused (ExportError, nothing written) when a weight holds NaN or infinity: such a model detects nothing,
        and a user must not deploy it. Written atomically: into `<folder>.partial` beside it, then swapped in
        (`sam3.io.replace_folder`), so `folder` is the previous export or the new one, never half of one.
        `extra_files`: writers called in order with the partial folder after the model is in it and before the swap
        (`sam3.export` adds the processor and the model card this way), so they are part of the same atomic export;
        one that raises leaves `folder` as it was.
        """
        folder = Path(folder)
        bad = non_finite_tensors(self.model)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ExportError(
                f"{folder}: not exported: {len(bad)} weight tensor(s) hold NaN or infinite values ({shown}); "
                "training diverged: resume from an earlier checkpoint with a lower learning rate"
            )
        partial = folder.with_name(folder.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)  # a crashed earlier export
        # with an adapter (sam3.adapters): its update merged into the weights, under transformers' own names, so a
        # plain Sam3Model.from_pretrained loads the fine-tuned model
        from sam3.adapters import detector_peft, merged_state_dict

        state = merged_state_dict(self) if detector_peft(self) is not None else None
        self.model.save_pretrained(partial, state_dict=state)
        for write in extra_files:
            write(partial)
        replace_folder(partial, folder)


def non_finite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of `module` holding any NaN or infinity."""
    tensors = itertools.chain(module.named_parameters(), module.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def parameters_without_text_gradients(
    model: Sam3Detector | Sam3Model, with_masks: bool = True, text_geometry_token: bool | None = None
) -> tuple[str, ...]:
    """Names (as in `Sam3Model.named_parameters()`) of the parameters that never get a gradient from
    `Sam3Detector.forward` with text-only prompts. Freeze them, or DDP needs find_unused_parameters:

        vision_encoder.neck.fpn_layers.<last>     the 0.5x FPN level, computed but dropped by the forward
        text_encoder.text_projection              CLIP's pooled projection; SAM 3 projects every token with the
                                                  top-level text_projection instead
        geometry_encoder                          without the geometry token: all of it (it encodes box exemplars,
                                                  which text prompts do not have). With the token (the default,
                                                  `Sam3Detector.geometry_tokens`), only its box parts
                                                  (GEOMETRY_BOX_PARTS): they run on an empty box list, so their
                                                  gradient is exactly zero, and weight decay alone would shrink
                                                  the box-exemplar weights a user may still want
        mask_decoder.semantic_projection          the semantic-segmentation head, not among our outputs
        mask_decoder.pixel_decoder.{conv_layers,norms}.<k>  for k >= (FPN levels used) - 1: the pixel decoder
                                                  runs one stage per upsampling step between the 3 levels, i.e. 2
                                                  of its num_upsampling_stages = 3
    and when with_masks is False, everything that only feeds masks:
        mask_decoder                              all of it
        vision_encoder.neck.fpn_layers.<0, 1>     the 4x and 2x levels (the DETR parts read only the 1x level)
    """
    sam3_model = model.model if isinstance(model, Sam3Detector) else model
    if text_geometry_token is None:
        text_geometry_token = getattr(sam3_model.config, TEXT_GEOMETRY_TOKEN_KEY, True)
    geometry = GEOMETRY_BOX_PARTS if text_geometry_token else ("geometry_encoder.",)
    num_fpn = len(sam3_model.config.vision_config.scale_factors)
    detr_level = num_fpn - 2  # the forward drops the last level and gives the DETR parts the one before
    if with_masks:
        unused_fpn = [num_fpn - 1]
        stages_run = num_fpn - 2  # upsampling steps between the num_fpn - 1 levels the mask decoder reads
        stages = range(stages_run, sam3_model.config.mask_decoder_config.num_upsampling_stages)
        mask_parts = ["mask_decoder.semantic_projection."]
        mask_parts += [f"mask_decoder.pixel_decoder.{part}.{k}." for k in stages for part in ("conv_layers", "norms")]
    else:
        unused_fpn = [level for level in range(num_fpn) if level != detr_level]
        mask_parts = ["mask_decoder."]
    prefixes = (
        *(f"vision_encoder.neck.fpn_layers.{level}." for level in unused_fpn),
        "text_encoder.text_projection.",
        *geometry,
        *mask_parts,
    )
    return tuple(name for name, _ in sam3_model.named_parameters() if name.startswith(prefixes))
