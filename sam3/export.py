"""Export a fine-tuned detector as a self-contained transformers folder: the model, its class names, the image
processor and tokenizer that prepare inputs exactly as our own inference does, and a model card.

    folder/
        config.json, model.safetensors   the Sam3Model (`Sam3Detector.save_pretrained`); the config's id2label /
                                         label2id map id i <-> the i-th class name, the prompts it was fine-tuned on
        processor_config.json            Sam3Processor: the image processor settings below, target_size S
        tokenizer.json, tokenizer_config.json   the prompt tokenizer (transformers' `tokenizers` backend)
        vocab.json, merges.txt           the same vocabulary as CLIPTokenizer's two files
        README.md                        the model card: data, parameters, metrics, how to load it
        adapter/                         only when the model trained an adapter (sam3.adapters): the adapter alone
                                         in PEFT format (adapter_config.json, adapter_model.safetensors, with the
                                         parameters trained in full) and base_model.json, the base model's identity;
                                         config.json + model.safetensors above then hold the merged weights

    Sam3Processor.from_pretrained(folder) and Sam3Model.from_pretrained(folder) then run text-prompt inference in
    plain transformers, offline. The files are written into `<folder>.partial` with the model and swapped in with
    it (`Sam3Detector.save_pretrained`), so `folder` is never a model without its processor or card.

Images (the same as `sam3.inference`, i.e. `sam3.data.transforms.val_transform`): uint8 RGB [3, H, W] -> resized to
S x S (aspect not kept, no padding), bilinear, antialiased -> float [3, S, S] = (x / 255 - 0.5) / 0.5, S = the
model's `config.image_size`. Sam3ImageProcessor runs the same torchvision resize on the same uint8 pixels and
computes (x - 127.5) / 127.5: equal up to float32 rounding (at most 2 ulp of 1.0, 2.4e-7).

Prompts: the tokenizer holds sam3.tokenizer's vocabulary and CLIP's word pattern and gives the same ids and
attention mask (START, tokens, END; 30 tokens at most once truncated). Padding differs: END (49407) where ours has 0,
under a zero attention mask, so the model's outputs are the same. Our tokenizer first cleans the text with ftfy and
html.unescape; a tokenizer file cannot run those, so its normaliser reproduces the parts that change ordinary text:
ftfy's tables for full-width characters, Latin ligatures, curly quotes and control characters, and the HTML entities
&amp; &lt; &gt; &quot; &apos; &#39; &#x27; &nbsp; (twice, as CLIP unescapes twice). Not reproduced: mojibake repair
("cafÃ©"), other entities, and lower-casing by context (final sigma). `export_model` checks every class name and
says in the card which ones (if any) tokenise differently.
"""

from __future__ import annotations

import copy
import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ftfy.chardata
import torch
import yaml
from tokenizers import Regex, decoders, normalizers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast, Sam3ImageProcessor, Sam3Processor
from transformers.image_utils import PILImageResampling

from sam3.adapters import ADAPTER_DIR, detector_peft, save_adapter
from sam3.data.transforms import PIXEL_MEAN, PIXEL_STD
from sam3.errors import ConfigError
from sam3.inference import model_input_size
from sam3.io import write_text
from sam3.model import Sam3Detector
from sam3.tokenizer import CONTEXT_LENGTH, END_TEXT, START_TEXT, attention_mask, clean_text, tokenize, vocabulary

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# OpenAI's CLIP names of the special tokens, which transformers' CLIP tokenizers expect
HF_START_TEXT = "<|startoftext|>"
HF_END_TEXT = "<|endoftext|>"
HTML_ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&#39;": "'", "&#x27;": "'", "&nbsp;": "\xa0"}
DEFAULT_THRESHOLD = 0.5  # the threshold of the card's snippet (pipeline predict's default)


@dataclass(frozen=True)
class ModelCard:
    """What the model card says about training; everything else (classes, input size, usage) comes from the model.

    dataset     the training data: the dataset folder (and annotation file) it was fine-tuned on
    base_model  the weights training started from: "tiny", "full", a folder or a hub name; None: not recorded
    params      the training parameters as resolved for the run (written as YAML)
    metrics     name -> value, e.g. validation AP; None: not measured when the model was exported
    """

    dataset: str
    base_model: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] | None = None


def export_model(
    detector: Sam3Detector, folder: str | Path, class_names: Sequence[str], card: ModelCard | None = None
) -> Path:
    """Write the self-contained model folder (module docstring) atomically; returns `folder`.

    class_names: the prompts the model was fine-tuned on, in id order (id2label[i] = class_names[i]): for a COCO
    training split, its categories' names sorted by category id.
    Raises ConfigError for an empty, blank or repeated class name and ExportError for non-finite weights, both
    before anything is written.
    """
    folder = Path(folder)
    names = check_class_names(class_names)
    processor = build_processor(detector)
    differing = tokenizer_mismatches(processor.tokenizer, names)
    for name in differing:
        logger.warning(
            "class name %r tokenises differently in the exported tokenizer than in training (see the model card)", name
        )
    readme = render_card(
        card, names, model_input_size(detector), str(folder), differing, geometry_token=detector.text_geometry_token
    )

    def write_labels(partial: Path) -> None:
        # A copy: the in-memory model keeps its config; config.json gets the class names.
        config = copy.deepcopy(detector.config)
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}
        config.save_pretrained(partial)

    def write_processor(partial: Path) -> None:
        processor.save_pretrained(partial)
        write_vocabulary_files(partial)

    def write_card(partial: Path) -> None:
        write_text(partial / CARD_FILE, readme)

    def write_adapter(partial: Path) -> None:
        save_adapter(detector, partial / ADAPTER_DIR, card.base_model if card else None)

    writers = [write_labels, write_processor, write_card]
    if detector_peft(detector) is not None:
        writers.append(write_adapter)
    detector.save_pretrained(folder, extra_files=writers)
    return folder


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """The class names as a list; ConfigError when there are none, one is blank, or two are the same prompt (equal
    after sam3.tokenizer.clean_text: the model sees the same text, and label2id cannot hold both)."""
    if isinstance(class_names, str):
        raise TypeError(f"class_names takes a list of names; got the string {class_names!r}")
    names = list(class_names)
    if not names:
        raise ConfigError("no class names to export: pass the training split's category names in id order")
    seen: dict[str, str] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str) or not clean_text(name):
            raise ConfigError(f"class {index} has no name ({name!r}); every exported class needs a text prompt")
        key = clean_text(name)
        if key in seen:
            raise ConfigError(f"class names {seen[key]!r} and {name!r} are the same prompt; rename one in the dataset")
        seen[key] = name
    return names


def build_processor(detector: Sam3Detector) -> Sam3Processor:
    """A Sam3Processor preparing images and prompts as our inference does (module docstring)."""
    size = model_input_size(detector)
    patch = detector.config.vision_config.backbone_config.patch_size
    mask_side = 4 * (size // patch)  # the mask decoder's output grid, used only for segmentation-map labels
    image_processor = Sam3ImageProcessor(
        size={"height": size, "width": size},
        resample=PILImageResampling.BILINEAR,  # torchvision's bilinear resize with antialias, as v2.Resize
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(PIXEL_MEAN),
        image_std=list(PIXEL_STD),
        do_convert_rgb=True,
        mask_size={"height": mask_side, "width": mask_side},
    )
    return Sam3Processor(image_processor=image_processor, tokenizer=build_tokenizer(), target_size=size)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The prompt tokenizer: CLIP's BPE over sam3.tokenizer's vocabulary, with the text cleaning it can reproduce.

    transformers' CLIPTokenizer supplies the word pattern, byte-level mapping, BPE model and START/END
    post-processor; it is saved as a plain `tokenizers` tokenizer because CLIPTokenizer rebuilds its normaliser
    on loading and would drop the cleaning rules.
    """
    tokens, merges = hf_vocabulary()
    clip = CLIPTokenizer(vocab=tokens, merges=merges, model_max_length=CONTEXT_LENGTH)
    backend = clip.backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        [
            *_ftfy_rules(),
            normalizers.NFC(),  # ftfy's last step
            *_html_rules(),
            *_html_rules(),  # CLIP unescapes twice
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ]
    )
    # tokens end words with "</w>": decode byte-level symbols, then turn the word ends into spaces
    backend.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=HF_START_TEXT,
        eos_token=HF_END_TEXT,
        pad_token=HF_END_TEXT,  # CLIP's choice; "!" (id 0, our padding) cannot be a special token
        unk_token=HF_END_TEXT,
        model_max_length=CONTEXT_LENGTH,
    )


def hf_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """token -> id (49,408, the special tokens under OpenAI's names) and the merges in rank order."""
    tokens, merges = vocabulary()
    renamed = {START_TEXT: HF_START_TEXT, END_TEXT: HF_END_TEXT}
    return {renamed.get(token, token): i for i, token in enumerate(tokens)}, merges


def write_vocabulary_files(folder: Path) -> None:
    """vocab.json and merges.txt, the files CLIPTokenizer reads: `CLIPTokenizer(vocab.json, merges.txt)` gives our
    ids on text that needs no cleaning (it has CLIP's own normaliser, without ftfy / HTML unescaping)."""
    tokens, merges = hf_vocabulary()
    write_text(folder / VOCAB_FILE, json.dumps(tokens, ensure_ascii=False))
    write_text(folder / MERGES_FILE, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _ftfy_rules() -> list[normalizers.Normalizer]:
    """Character replacements of ftfy.fix_text that a normaliser can run: ligatures, full width, quotes, controls."""
    table: dict[int, str] = {}
    for source in (ftfy.chardata.LIGATURES, ftfy.chardata.WIDTH_MAP, ftfy.chardata.CONTROL_CHARS):
        table.update({code: replacement or "" for code, replacement in source.items()})
    rules = [normalizers.Replace(chr(code), replacement) for code, replacement in table.items()]
    rules.append(normalizers.Replace(Regex(ftfy.chardata.SINGLE_QUOTE_RE.pattern), "'"))
    rules.append(normalizers.Replace(Regex(ftfy.chardata.DOUBLE_QUOTE_RE.pattern), '"'))
    return rules


def _html_rules() -> list[normalizers.Normalizer]:
    """One html.unescape pass over the common entities; &amp; last, so "&amp;lt;" becomes "&lt;" as in one pass."""
    return [normalizers.Replace(entity, char) for entity, char in [*HTML_ENTITIES.items(), ("&amp;", "&")]]


def tokenizer_mismatches(tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str]) -> list[str]:
    """The prompts whose ids or attention mask from `tokenizer` (as Sam3Processor calls it, plus truncation) differ
    from sam3.tokenizer's, comparing ids where the mask is 1 (the padding ids differ by design)."""
    if not prompts:
        return []
    ours = tokenize(list(prompts))
    ours_mask = attention_mask(ours)
    theirs = tokenizer(
        list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    same_mask = (theirs["attention_mask"] == ours_mask).all(dim=1)
    same_ids = (theirs["input_ids"] * ours_mask == ours).all(dim=1)
    return [p for p, ok in zip(prompts, (same_mask & same_ids).tolist(), strict=True) if not ok]


# ---------------------------------------------------------------- the model card


def usage_snippet(model_dir: str, threshold: float = DEFAULT_THRESHOLD, geometry_token: bool = True) -> str:
    """Python code that loads the folder with transformers alone and prints each class's detections on image.jpg.

    One vision pass per image, one decoder pass per prompt; scores = sigmoid(logit) * sigmoid(presence), the scores
    of `pipeline predict`. Boxes are in the image's pixels (xyxy). With `geometry_token` (a model trained with the
    geometry encoder's token on its prompts, `Sam3Detector.geometry_tokens`) each call passes one padding box
    (label -10): transformers then runs the geometry encoder, masks the box out, and the prompt ends with the same
    CLS token as in training; without it `Sam3Model.forward` would skip the encoder.
    """
    boxes = (
        "\n        outputs = model(**text_inputs, input_boxes=no_box, input_boxes_labels=padding)"
        if geometry_token
        else "\n        outputs = model(**text_inputs)"
    )
    # one padding box (label -10) per call: the prompt's geometry token, as in training (the model card says why)
    setup = "no_box, padding = torch.zeros(1, 1, 4), torch.tensor([[-10]])  # see below\n" if geometry_token else ""
    return f"""import torch
from PIL import Image, ImageOps
from transformers import Sam3Model, Sam3Processor

model_dir = {json.dumps(model_dir)}
processor = Sam3Processor.from_pretrained(model_dir)
model = Sam3Model.from_pretrained(model_dir).eval()
prompts = list(model.config.id2label.values())  # the classes it was fine-tuned on; any other text works too

image = ImageOps.exif_transpose(Image.open("image.jpg")).convert("RGB")  # upright, as in training
inputs = processor(images=image, return_tensors="pt")
{setup}with torch.inference_mode():
    vision = model.get_vision_features(pixel_values=inputs.pixel_values)  # once per image
    for prompt in prompts:
        text = processor(text=prompt, return_tensors="pt")
        text_inputs = dict(vision_embeds=vision, input_ids=text.input_ids, attention_mask=text.attention_mask){boxes}
        result = processor.post_process_instance_segmentation(
            outputs, threshold={threshold}, mask_threshold=0.5, target_sizes=inputs.original_sizes.tolist()
        )[0]
        for score, box in zip(result["scores"].tolist(), result["boxes"].tolist()):
            print(f"{{prompt}}: {{score:.3f}} at {{[round(v, 1) for v in box]}}")
"""


def render_card(
    card: ModelCard | None,
    class_names: Sequence[str],
    image_size: int,
    model_dir: str,
    differing: Sequence[str],
    geometry_token: bool = True,
) -> str:
    """The README.md of the exported folder (Hugging Face model card layout: YAML front matter, then Markdown)."""
    dataset = card.dataset if card is not None else "not recorded"
    base = card.base_model if card is not None and card.base_model else "not recorded"
    classes = "\n".join(f"| {i} | {_cell(name)} |" for i, name in enumerate(class_names))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sam3, object-detection, image-segmentation, fine-tuned]",
        "---",
        "",
        f"# SAM 3 fine-tuned on {_inline(dataset)}",
        "",
        "A SAM 3 detector (transformers `Sam3Model`) fine-tuned with sam3-finetune: a text prompt in, every matching",
        "instance's box, mask and score out. It was fine-tuned on these prompts (`config.id2label`):",
        "",
        "| id | prompt |",
        "|---|---|",
        classes,
        "",
        "## Training",
        "",
        f"- data: {_inline(dataset)}",
        f"- started from: {_inline(base)}",
        f"- input size: {image_size} x {image_size} pixels",
        "",
        *_params_section(card),
        "## Metrics",
        "",
        *_metrics_section(card),
        "## How to use",
        "",
        "With transformers alone (nothing is downloaded: the processor and tokenizer are in this folder):",
        "",
        "```python",
        usage_snippet(model_dir, geometry_token=geometry_token).rstrip("\n"),
        "```",
        "",
        *_forward_section(geometry_token),
        "Scores are sigmoid(logit) x sigmoid(presence), as sam3-finetune's `predict` computes them; it writes COCO",
        "results and overlays for images, folders and videos:",
        "",
        "```bash",
        f"python -m pipeline predict --model {shlex.quote(model_dir)} --image IMAGE_OR_FOLDER "
        f"--prompt {shlex.quote(class_names[0])} --out predictions",
        "```",
        "",
        "## Inputs",
        "",
        "- Images: RGB, 8 bits per channel, upright (EXIF orientation applied, as the snippet does). The processor",
        f"  resizes them to {image_size} x {image_size} without keeping the aspect ratio (bilinear, antialiased) and",
        "  normalises (x / 255 - 0.5) / 0.5, as in training; boxes and masks come back in the image's own pixels",
        "  (transformers does not clip boxes to the image; sam3-finetune does).",
        f"- Prompts: CLIP byte-pair encoding, at most {CONTEXT_LENGTH - 2} tokens. `Sam3Processor` does not truncate a",
        "  longer prompt (the model then fails); tokenise it with",
        f'  `processor.tokenizer(text, padding="max_length", max_length={CONTEXT_LENGTH}, truncation=True, '
        'return_tensors="pt")`.',
        "- Text cleaning: training cleaned prompts with ftfy and HTML unescaping; the tokenizer reproduces full-width",
        "  characters, ligatures, curly quotes and the common HTML entities, not mojibake repair.",
        *_differing_section(differing),
        "",
    ]
    return "\n".join(lines)


def _forward_section(geometry_token: bool) -> list[str]:
    """What the card says about the prompt's geometry token (the forward the weights were trained with)."""
    if not geometry_token:
        return [
            "This model was trained without the geometry encoder's token (`text_geometry_token: false` in",
            "config.json): a text prompt is its text tokens alone, which is what `Sam3Model.forward` does by itself.",
            "",
        ]
    return [
        "This model was trained as Meta's SAM 3 was: every text prompt ends with the geometry encoder's CLS token",
        "(`text_geometry_token: true` in config.json). `Sam3Model.forward` adds that token only when it is given a",
        "box, so the snippet passes one padding box (label -10), which is masked out everywhere and leaves the",
        "token; without it the outputs differ from the ones the model was evaluated with.",
        "",
    ]


def _params_section(card: ModelCard | None) -> list[str]:
    if card is None or not card.params:
        return ["Training parameters: not recorded.", ""]
    # through JSON first: YAML of plain values only (tuples, paths and the like as their JSON form or text)
    plain = json.loads(json.dumps(dict(card.params), default=str))
    return ["Training parameters:", "", "```yaml", yaml.safe_dump(plain, sort_keys=True).rstrip("\n"), "```", ""]


def _metrics_section(card: ModelCard | None) -> list[str]:
    if card is None or not card.metrics:
        return ["Not measured when the model was exported.", ""]
    rows = [f"| {_cell(name)} | {_number(value)} |" for name, value in card.metrics.items()]
    return ["| metric | value |", "|---|---|", *rows, ""]


def _differing_section(differing: Sequence[str]) -> list[str]:
    if not differing:
        return ["- Every class name above gives the same tokens as in training."]
    names = ", ".join(repr(name) for name in differing)
    return [f"- These class names tokenise differently than in training (cleaning not reproduced): {names}."]


def _number(value: float) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item()
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    return str(text).replace("\n", " ")
