"""sam3.export: the exported folder runs in plain transformers (Sam3Processor + Sam3Model, offline) with our inputs:
pixels and token ids equal to ours, class names in the config, a model card whose code runs, written atomically."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from torchvision.transforms.v2.functional import pil_to_tensor
from transformers import AutoProcessor, CLIPTokenizer, Sam3Config, Sam3Model, Sam3Processor

from sam3.data.transforms import val_transform
from sam3.errors import ConfigError, ExportError
from sam3.export import (
    CARD_FILE,
    ModelCard,
    build_processor,
    export_model,
    tokenizer_mismatches,
    usage_snippet,
)
from sam3.images import read_image
from sam3.inference import predict_images
from sam3.model import Sam3Detector, load_model
from sam3.tokenizer import CONTEXT_LENGTH, END_ID, START_ID, attention_mask, tokenize

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["red circle", "blue square"]
CARD = ModelCard(
    dataset="data/preprocessed/shapes",
    base_model="tiny",
    params={"train": {"lr_detr": 1e-4, "epochs": 3, "freeze": "heads"}, "model": {"image_size": 224}},
    metrics={"bbox_AP": 0.4321, "cgF1": 0.25},
)
EXPORTED_FILES = {
    "config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    CARD_FILE,
}


@pytest.fixture(scope="module")
def detector():
    return load_model("tiny")


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory) -> Path:
    return export_model(detector, tmp_path_factory.mktemp("run") / "model", CLASSES, CARD)


def shapes_picture(width: int = 160, height: int = 120) -> Image.Image:
    """A red disc and a blue square on grey, not square (the processor must warp it as we do)."""
    image = Image.new("RGB", (width, height), (120, 120, 120))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 70, 70), fill=(220, 30, 30))
    draw.rectangle((95, 50, 140, 95), fill=(30, 40, 220))
    return image


# ---------------------------------------------------------------- the folder


def test_folder_holds_model_processor_tokenizer_card_and_class_names(detector, exported):
    assert {p.name for p in exported.iterdir()} == EXPORTED_FILES
    assert not exported.with_name("model.partial").exists()

    model = Sam3Model.from_pretrained(exported)  # offline: HF_HUB_OFFLINE is set for the tests
    assert model.config.id2label == {0: "red circle", 1: "blue square"}
    assert model.config.label2id == {"red circle": 0, "blue square": 1}
    ours = dict(detector.model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ours[name]), name
    # the in-memory model's config is left as it was
    assert detector.config.id2label != model.config.id2label

    processor = Sam3Processor.from_pretrained(exported)
    assert type(AutoProcessor.from_pretrained(exported)) is Sam3Processor
    assert processor.target_size == 224
    assert processor.image_processor.size["height"] == processor.image_processor.size["width"] == 224
    assert list(processor.image_processor.image_mean) == list(processor.image_processor.image_std) == [0.5] * 3
    assert processor.tokenizer.model_max_length == CONTEXT_LENGTH


def test_processor_size_follows_the_model_input_size(tmp_path):
    folder = export_model(load_model("tiny", image_size=112), tmp_path / "model", ["cat"])
    assert Sam3Config.from_pretrained(folder).image_size == 112
    pixels = Sam3Processor.from_pretrained(folder)(images=shapes_picture(), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 112, 112)


def test_processor_for_the_full_model_is_1008_pixels():
    """SAM 3's own size: 1008 px input, masks at 4 x the 72-patch grid = 288 (transformers' Sam3 defaults)."""
    with torch.device("meta"):  # the config is all the processor reads: no 840M weights in memory
        full = Sam3Detector(Sam3Model(Sam3Config()))
    image_processor = build_processor(full).image_processor
    assert image_processor.size["height"] == image_processor.size["width"] == 1008
    assert image_processor.mask_size["height"] == image_processor.mask_size["width"] == 288


def test_processor_pixels_equal_our_validation_transform(exported):
    """The same uint8 resize (torchvision, bilinear, antialiased), then (x - 127.5) / 127.5 against our
    (x / 255 - 0.5) / 0.5: equal up to float32 rounding, at most 2 ulp of 1.0 (2.4e-7)."""
    processor = Sam3Processor.from_pretrained(exported)
    rng = np.random.default_rng(0)
    for image in (shapes_picture(), Image.fromarray(rng.integers(0, 256, (171, 300, 3), dtype=np.uint8))):
        theirs = processor(images=image, return_tensors="pt").pixel_values
        ours = val_transform(pil_to_tensor(image), torch.zeros(0, 4), None, 224).image[None]
        assert theirs.shape == ours.shape == (1, 3, 224, 224)
        assert (theirs - ours).abs().max().item() <= 2.4e-7


# ---------------------------------------------------------------- the tokenizer

PLAIN_PROMPTS = [
    "red circle",
    "a photo of a cat!",
    "it's   the DOG's toy",
    "don't",
    "3.5 m/s, 1,000 km²",
    "x-ray (left) [right] {both}",
    "hello... world?!",
    "café naïve Straße ÅNGSTRÖM İstanbul",
    "東京 中文 日本語 한국어 Ελληνικά עברית العربية",
    "emoji 👍🏽 family 👨‍👩‍👧",
    "  leading and trailing\tspaces\n",
    "e\u0301 combining accent",
    "12345 67890",
    "!!!",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    " ".join(["word"] * 40),  # 40 tokens: truncated to 30 + START + END
    "a" * 31,
]
CLEANED_PROMPTS = [  # what ftfy / html.unescape change, reproduced by the exported normaliser
    "Men’s shoes",  # curly apostrophe -> '
    "“quoted” label",  # curly double quotes -> "
    "ﬁsh and ﬂowers",  # Latin ligatures
    "ｆｕｌｌ ｗｉｄｔｈ　ＡＢＣ１２３！",  # full-width letters, digits, space, punctuation
    "salt &amp; pepper",
    "&lt;tag&gt; &quot;x&quot; it&#39;s &apos;y&apos; a&nbsp;b",
    "double &amp;amp; escaped",
    "bom\ufeff and control\x07 chars",
]


def phrase_bank() -> list[str]:
    """1,704 real category names (COCO, LVIS, Objects365) shipped with the repository."""
    names = []
    for path in sorted((REPO / "pipeline" / "phrase_bank").glob("*.txt")):
        names += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return names


def test_tokenizer_gives_our_ids_and_mask(exported):
    tokenizer = Sam3Processor.from_pretrained(exported).tokenizer
    bank = phrase_bank()
    assert len(bank) > 1500
    assert tokenizer_mismatches(tokenizer, [*PLAIN_PROMPTS, *CLEANED_PROMPTS, *bank]) == []

    # spelled out on one prompt: the ids under the mask, the mask, and END as padding where ours has 0
    encoded = tokenizer(["a photo of a cat!"], padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="pt")
    ours = tokenize(["a photo of a cat!"])
    assert (
        encoded["input_ids"][0, :8].tolist()
        == ours[0, :8].tolist()
        == [START_ID, 320, 1125, 539, 320, 2368, 256, END_ID]
    )
    assert encoded["attention_mask"].tolist() == attention_mask(ours).tolist()
    assert encoded["input_ids"][0, 8:].tolist() == [END_ID] * 24 and ours[0, 8:].tolist() == [0] * 24

    # the truncated prompt keeps its first 30 tokens and ends with END, as ours; Sam3Processor itself does not truncate
    long = " ".join(["word"] * 40)
    truncated = tokenizer([long], padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)["input_ids"][0]
    assert truncated == tokenize([long])[0].tolist() and truncated[-1] == END_ID
    assert Sam3Processor.from_pretrained(exported)(text=long, return_tensors="pt").input_ids.shape[1] == 42


def test_tokenizer_limits_are_the_documented_ones(exported):
    """Mojibake repair and context-dependent lower-casing (final sigma) are ftfy / Python steps a tokenizer file
    cannot run: these prompts differ, as the module docstring says."""
    tokenizer = Sam3Processor.from_pretrained(exported).tokenizer
    assert tokenizer_mismatches(tokenizer, ["cafÃ©", "ΟΔΟΣ", "red circle"]) == ["cafÃ©", "ΟΔΟΣ"]


def test_vocab_and_merges_files_make_a_clip_tokenizer(exported, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(exported / name, tmp_path / name)
    clip = CLIPTokenizer.from_pretrained(tmp_path)  # from these two files alone
    assert len(json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))) == 49_408
    assert tokenizer_mismatches(clip, PLAIN_PROMPTS) == []


# ---------------------------------------------------------------- the model card


def test_card_describes_data_params_metrics_and_classes(exported):
    card = (exported / CARD_FILE).read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# SAM 3 fine-tuned on data/preprocessed/shapes" in card
    assert "| 0 | red circle |\n| 1 | blue square |" in card
    assert "- started from: tiny" in card and "- input size: 224 x 224 pixels" in card
    params = re.search(r"```yaml\n(.*?)```", card, re.DOTALL)
    assert params is not None and yaml.safe_load(params.group(1)) == CARD.params
    assert "| bbox_AP | 0.4321 |\n| cgF1 | 0.2500 |" in card
    assert usage_snippet(str(exported)) in card
    assert f"predict --model {exported} --image IMAGE_OR_FOLDER --prompt 'red circle' --out predictions" in card
    assert "Every class name above gives the same tokens as in training." in card


def test_card_without_training_record_and_with_a_differing_name(detector, tmp_path):
    folder = export_model(detector, tmp_path / "model", ["cat", "cafÃ©"])
    card = (folder / CARD_FILE).read_text(encoding="utf-8")
    assert "# SAM 3 fine-tuned on not recorded" in card
    assert "Training parameters: not recorded." in card and "Not measured when the model was exported." in card
    assert "tokenise differently than in training (cleaning not reproduced): 'cafÃ©'." in card


def run_snippet(code: str, model_dir: Path, image: Image.Image, workdir: Path, monkeypatch) -> list[tuple]:
    """Run usage code as a user would (image.jpg in the working folder), on `model_dir` and with threshold 0 (the
    tiny random model scores below 0.5); (prompt, score, box) of each printed line."""
    code, found_dir = re.subn(r"^model_dir = .*$", f"model_dir = {str(model_dir)!r}", code, flags=re.MULTILINE)
    code, found_threshold = re.subn(r"\bthreshold=[0-9.]+", "threshold=0.0", code)  # not mask_threshold
    assert found_dir == 1 and found_threshold == 1
    image.save(workdir / "image.jpg", quality=95)
    monkeypatch.chdir(workdir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "snippet", "exec"), {})
    lines = []
    for line in printed.getvalue().splitlines():
        match = re.fullmatch(r"(.+): ([0-9.]+) at \[(.*)\]", line)
        assert match, line
        lines.append((match.group(1), float(match.group(2)), [float(v) for v in match.group(3).split(",")]))
    return lines


def assert_same_as_our_inference(lines: list[tuple], model_dir: Path, image_file: Path) -> None:
    """Printed scores (3 decimals) and boxes (1 decimal) equal ours to their rounding: |d| <= 5e-4 and 0.05 px,
    plus float32 noise. HF's boxes are not clipped to the image, ours are: compared after clipping. Lines are matched
    to our detections one to one (rounding can tie two scores, so the order alone does not pair them)."""
    image = read_image(image_file)
    ours = predict_images(load_model(model_dir), [image], CLASSES, max_dets=1000)[0]
    assert len(lines) == len(ours) == 2 * 16  # every query of both prompts: all scores are above 0
    unmatched = list(ours)
    for prompt, score, box in lines:
        clipped = np.clip(box, 0, [image.width, image.height] * 2)
        match = next(
            (
                d
                for d in unmatched
                if d.prompt == prompt
                and abs(score - d.score) <= 5e-4 + 1e-6
                and np.abs(clipped - np.asarray(d.box)).max() <= 0.05 + 1e-3
            ),
            None,
        )
        assert match is not None, f"printed {prompt}: {score} at {box}, which our inference does not give"
        unmatched.remove(match)
    assert unmatched == []


def test_card_snippet_runs_in_plain_transformers(exported, tmp_path, monkeypatch):
    lines = run_snippet(usage_snippet("runs/NAME/model"), exported, shapes_picture(), tmp_path, monkeypatch)
    assert_same_as_our_inference(lines, exported, tmp_path / "image.jpg")


def test_a_model_trained_without_the_geometry_token_gets_the_plain_call(tmp_path, monkeypatch):
    """text_geometry_token false travels in config.json; its card's snippet calls Sam3Model.forward without the padding
    box, and still prints what our inference (which reads the setting back) gives."""
    folder = export_model(load_model("tiny", text_geometry_token=False), tmp_path / "model", CLASSES, CARD)
    card = (folder / "README.md").read_text(encoding="utf-8")
    snippet = usage_snippet(str(folder), geometry_token=False)
    assert snippet in card and "input_boxes" not in snippet and "trained without the geometry encoder's token" in card
    lines = run_snippet(snippet, folder, shapes_picture(), tmp_path, monkeypatch)
    assert_same_as_our_inference(lines, folder, tmp_path / "image.jpg")


def test_readme_snippet_runs_in_plain_transformers(exported, tmp_path, monkeypatch):
    """The README's transformers example (the python block that loads Sam3Processor) runs on an export."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "Sam3Processor.from_pretrained" in b]
    assert blocks, "README.md has no python example loading an export with Sam3Processor (text: /tmp/notes_export.md)"
    lines = run_snippet(blocks[0], exported, shapes_picture(), tmp_path, monkeypatch)
    assert_same_as_our_inference(lines, exported, tmp_path / "image.jpg")


# ---------------------------------------------------------------- refusals and atomicity


def test_bad_class_names_are_refused_before_anything_is_written(detector, tmp_path):
    target = tmp_path / "model"
    for names, message in (
        ([], "no class names"),
        (["cat", "  "], "class 1 has no name"),
        (["cat", "Cat "], "'cat' and 'Cat ' are the same prompt"),
    ):
        with pytest.raises(ConfigError, match=message):
            export_model(detector, target, names)
    with pytest.raises(TypeError, match="list of names"):
        export_model(detector, target, "cat")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_the_previous_one_whole(detector, exported, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(exported, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail(partial: Path) -> None:
        assert (partial / "model.safetensors").is_file()  # writers run after the model is in the partial folder
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        detector.save_pretrained(target, extra_files=[fail])
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before

    broken = load_model("tiny")
    with torch.no_grad():
        next(iter(broken.model.parameters())).view(-1)[0] = float("inf")
    with pytest.raises(ExportError, match="NaN or infinite"):
        export_model(broken, target, CLASSES)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
