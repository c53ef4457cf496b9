"""pipeline.predict and sam3.overlay: predictions.json and a real overlay PNG per image; pixels drawn as computed by
hand; one-line errors for missing images and bad prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import cli, predict, video
from pipeline.shapes_data import build_shapes_dataset
from sam3.errors import ConfigError, DataError
from sam3.inference import Detection
from sam3.overlay import MASK_ALPHA, PALETTE, draw_detections, prompt_colour, text_colour


def parse(*argv: str) -> argparse.Namespace:
    """Arguments as `python -m pipeline predict ...` parses them."""
    return cli.build_parser().parse_args(["predict", *(str(a) for a in argv)])


@pytest.fixture(scope="module")
def shapes_image(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    build_shapes_dataset(root, n=1, seed=0, n_valid=1, n_test=1)
    return next((root / "test").glob("*.png"))


# ---------------------------------------------------------------- overlay pixels


def grey_image(width: int = 200, height: int = 150, level: int = 100) -> Image.Image:
    return Image.new("RGB", (width, height), (level, level, level))


def rectangle(x0: int, y0: int, x1: int, y1: int, width: int = 200, height: int = 150) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def blend(under: int, colour: int) -> int:
    """torchvision's mask blend on uint8: (1 - alpha) * under + alpha * colour, truncated to an integer."""
    return int((1 - MASK_ALPHA) * under + MASK_ALPHA * colour)


def test_overlay_draws_mask_box_and_leaves_the_rest():
    detection = Detection(0, "cat", 0.9, (100.0, 60.0, 180.0, 140.0), rectangle(100, 60, 180, 140))
    out = np.asarray(draw_detections(grey_image(), [detection], ["cat", "dog"]))
    assert out.shape == (150, 200, 3)
    red, green, blue = PALETTE[0]  # (230, 25, 75)
    # inside the mask, away from the box outline and the label: 0.55 * 100 + 0.45 * (230, 25, 75)
    # = (55 + 103.5, 55 + 11.25, 55 + 33.75) -> (158, 66, 88)
    assert tuple(out[120, 150]) == (blend(100, red), blend(100, green), blend(100, blue)) == (158, 66, 88)
    assert tuple(out[100, 100]) == PALETTE[0]  # the box's left edge, drawn after the mask
    assert tuple(out[140, 20]) == (100, 100, 100)  # bottom-left: no detection, no legend
    # the label "cat 0.90" sits in a filled box of the prompt colour at the box's top-left, in white on it
    label = out[63:75, 103:140].reshape(-1, 3)
    assert (label == PALETTE[0]).all(axis=1).sum() > 50 and (label == (255, 255, 255)).all(axis=1).any()
    # the legend lists "cat (1)" in the emptiest corner (top-left here) on a dark background, not "dog"
    assert out[2, 2].sum() < 3 * 100


def test_overlay_puts_the_best_detection_on_top():
    low = Detection(1, "dog", 0.3, (40.0, 40.0, 120.0, 120.0), rectangle(40, 40, 120, 120))
    high = Detection(0, "cat", 0.9, (80.0, 80.0, 160.0, 140.0), rectangle(80, 80, 160, 140))
    out = np.asarray(draw_detections(grey_image(), [high, low], ["cat", "dog"], legend=False))
    # both masks cover (100, 100): the low score is blended first, the high one over it
    expected = tuple(blend(blend(100, d), c) for c, d in zip(prompt_colour(0), prompt_colour(1), strict=True))
    assert tuple(out[100, 100]) == expected


def test_text_colour_contrasts():
    assert text_colour((255, 225, 25)) == (0, 0, 0)  # yellow: black text
    assert text_colour((0, 0, 128)) == (255, 255, 255)  # navy: white text


# ---------------------------------------------------------------- the command


def test_predict_writes_predictions_and_an_overlay(shapes_image, tmp_path, capsys):
    out = tmp_path / "out"
    args = parse(
        "--model",
        "tiny",
        "--image",
        shapes_image,
        "--prompt",
        "red circle",
        "--prompt",
        "blue square",
        "--out",
        out,
        "--threshold",
        "0",
        "--max-dets",
        "5",
        "--mode",
        "segmentation",
    )
    assert predict.run(args) == 0

    document = json.loads((out / predict.PREDICTIONS_FILE).read_text())
    assert document["images"] == [{"id": 1, "file_name": str(shapes_image), "width": 224, "height": 224}]
    assert document["categories"] == [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}]
    annotations = document["annotations"]
    assert [a["id"] for a in annotations] == [1, 2, 3, 4, 5]  # 5 kept of 2 prompts x 16 queries, all scores > 0
    scores = [a["score"] for a in annotations]
    assert scores == sorted(scores, reverse=True)
    for a in annotations:
        assert a["image_id"] == 1 and a["category_id"] in (1, 2) and a["iscrowd"] == 0
        x, y, w, h = a["bbox"]
        assert 0 <= x <= x + w <= 224 and 0 <= y <= y + h <= 224
        assert a["segmentation"]["size"] == [224, 224]
        assert a["area"] == int(mask_utils.area(a["segmentation"]))

    overlay_path = out / f"{shapes_image.stem}_overlay.png"
    with Image.open(overlay_path) as overlay:
        assert overlay.format == "PNG" and overlay.size == (224, 224) and overlay.mode == "RGB"
        drawn = np.asarray(overlay).astype(int)
    with Image.open(shapes_image) as source:
        original = np.asarray(source.convert("RGB")).astype(int)
    changed = np.abs(drawn - original).sum(axis=2) > 0
    assert 0.01 < changed.mean() < 1.0  # something drawn, and the picture still shows through
    assert len(np.unique(drawn.reshape(-1, 3), axis=0)) > 50  # a real picture, not a flat fill
    printed = capsys.readouterr().out
    assert f"{shapes_image}: 5 detections above 0.0 -> {overlay_path}" in printed


def test_high_threshold_keeps_nothing_but_still_writes(shapes_image, tmp_path):
    out = tmp_path / "out"
    assert (
        predict.run(
            parse("--model", "tiny", "--image", shapes_image, "--prompt", "cat", "--out", out, "--threshold", "0.999")
        )
        == 0
    )
    assert json.loads((out / predict.PREDICTIONS_FILE).read_text())["annotations"] == []
    assert (out / f"{shapes_image.stem}_overlay.png").is_file()


def test_errors_are_one_line_user_errors(shapes_image, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "missing.png"
    with pytest.raises(DataError, match="missing.png: image file not found") as err:
        predict.run(
            parse("--model", tmp_path / "no_model", "--image", shapes_image, missing, "--prompt", "cat", "--out", out)
        )
    assert "\n" not in str(err.value)  # images are read before the (missing) model is loaded
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(DataError, match="cannot read as an image"):
        predict.run(parse("--model", "tiny", "--image", not_image, "--prompt", "cat", "--out", out))
    with pytest.raises(ConfigError, match="repeats"):
        predict.run(
            parse("--model", "tiny", "--image", shapes_image, "--prompt", "cat", "--prompt", "Cat ", "--out", out)
        )
    other = tmp_path / "other" / shapes_image.name
    other.parent.mkdir()
    other.write_bytes(shapes_image.read_bytes())
    with pytest.raises(ConfigError, match="overwrite each other"):
        predict.run(parse("--model", "tiny", "--image", shapes_image, other, "--prompt", "cat", "--out", out))
    with pytest.raises(ConfigError, match="threshold"):
        predict.run(
            parse("--model", "tiny", "--image", shapes_image, "--prompt", "cat", "--out", out, "--threshold", "1.5")
        )
    assert not out.exists()


# ---------------------------------------------------------------- the exported model in plain transformers

CLASSES = ["red circle", "blue square"]


def match_one_to_one(ours: list[tuple], theirs: list[tuple], score_tol: float, box_tol: float) -> None:
    """Pair every (prompt, score, xyxy box) of `ours` with one of `theirs` within the tolerances (two scores closer
    than the tolerance could swap places in a sort, so the order alone does not pair them)."""
    assert len(ours) == len(theirs)
    left = list(theirs)
    for prompt, score, box in ours:
        match = next(
            (
                t
                for t in left
                if t[0] == prompt and abs(t[1] - score) <= score_tol and np.abs(np.subtract(t[2], box)).max() <= box_tol
            ),
            None,
        )
        assert match is not None, f"{prompt} {score} {box}: no counterpart"
        left.remove(match)


def test_exported_model_in_plain_transformers_scores_like_predict(shapes_image, tmp_path):
    """Acceptance (issue 16.2): Sam3Processor + Sam3Model.from_pretrained on an export give `pipeline predict`'s
    scores within 1e-5 and its boxes within 1e-3 px, on a 300 x 200 picture (so the resize to 224 x 224 is exercised).

    Why 1e-5: the processor's pixels differ from ours by float32 rounding only ((x - 127.5) / 127.5 against
    (x / 255 - 0.5) / 0.5: at most 1.2e-7), which reaches the scores as about 1e-7 (measured 9e-8). Scores are
    probabilities, so 1e-5 leaves 100 x that margin and is still far below what a real difference makes on this
    model: a mean off by 0.01 moves a score by 3e-3, bicubic in place of bilinear resizing by 2e-3, one changed
    letter of the prompt by 8e-3."""
    import torch
    from transformers import Sam3Model, Sam3Processor

    from sam3.export import export_model
    from sam3.model import load_model

    picture = tmp_path / "picture.png"
    with Image.open(shapes_image) as source:
        source.convert("RGB").resize((300, 200), Image.Resampling.BICUBIC).save(picture)
    folder = export_model(load_model("tiny"), tmp_path / "model", CLASSES)
    out = tmp_path / "out"
    argv = ["--model", folder, "--image", picture, "--out", out, "--threshold", "0", "--max-dets", "32"]
    assert predict.run(parse(*argv, "--prompt", CLASSES[0], "--prompt", CLASSES[1])) == 0
    ours = []
    for a in json.loads((out / predict.PREDICTIONS_FILE).read_text())["annotations"]:
        x, y, w, h = a["bbox"]
        ours.append((CLASSES[a["category_id"] - 1], a["score"], [x, y, x + w, y + h]))
    assert len(ours) == 32  # 2 prompts x 16 queries, every score above 0

    processor = Sam3Processor.from_pretrained(folder)
    model = Sam3Model.from_pretrained(folder).eval()
    image = Image.open(picture).convert("RGB")  # a PNG without EXIF: already upright
    inputs = processor(images=image, return_tensors="pt")
    theirs = []
    with torch.inference_mode():
        vision = model.get_vision_features(pixel_values=inputs.pixel_values)
        for prompt in model.config.id2label.values():
            text = processor(text=prompt, return_tensors="pt")
            # one padding box: the geometry token the model was trained with (sam3.model.Sam3Detector.geometry_tokens)
            outputs = model(
                vision_embeds=vision,
                input_ids=text.input_ids,
                attention_mask=text.attention_mask,
                input_boxes=torch.zeros(1, 1, 4),
                input_boxes_labels=torch.tensor([[-10]]),
            )
            result = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(200, 300)])[0]
            # ours are clipped to the image, transformers' are not
            boxes = result["boxes"].clamp(min=0).minimum(torch.tensor([300.0, 200.0, 300.0, 200.0]))
            theirs += [(prompt, s, b) for s, b in zip(result["scores"].tolist(), boxes.tolist(), strict=True)]
    match_one_to_one(ours, theirs, score_tol=1e-5, box_tol=1e-3)


# ---------------------------------------------------------------- folders and videos


def write_video(path: Path, frames: int = 6, width: int = 96, height: int = 64, fps: int = 10) -> None:
    """An MPEG-4 video of a red square moving right on grey, written with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            array = np.full((height, width, 3), 120, dtype=np.uint8)
            array[10:30, 10 + 8 * i : 30 + 8 * i] = (220, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decoded_frame(path: Path, index: int) -> Image.Image:
    """Frame `index` of a video as PyAV decodes it, independently of pipeline.predict."""
    import av

    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_image()
    raise AssertionError(f"{path} has no frame {index}")


def test_predict_a_folder_reads_every_image_in_it(shapes_image, tmp_path, capsys):
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    with Image.open(shapes_image) as source:
        source.convert("RGB").save(folder / "b.png")
        source.convert("RGB").save(folder / "a.jpg", quality=90)
        source.convert("RGB").save(folder / "sub" / "c.png")  # subfolders are not read
        source.convert("RGB").save(folder / ".hidden.png")  # nor hidden files
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--image", folder, "--prompt", "red circle", "--out", out, "--max-dets", "2"]
    assert predict.run(parse(*argv, "--threshold", "0")) == 0

    document = json.loads((out / predict.PREDICTIONS_FILE).read_text())
    assert [(i["id"], i["file_name"]) for i in document["images"]] == [
        (1, str(folder / "a.jpg")),
        (2, str(folder / "b.png")),
    ]
    assert "videos" not in document
    assert [a["image_id"] for a in document["annotations"]] == [1, 1, 2, 2]
    assert sorted(p.name for p in out.iterdir()) == ["a_overlay.png", "b_overlay.png", predict.PREDICTIONS_FILE]
    captured = capsys.readouterr()
    assert "predict: 100%" in captured.err and "2/2" in captured.err  # the progress bar over the images
    assert f"{folder / 'b.png'}: 2 detections above 0.0 -> {out / 'b_overlay.png'}" in captured.out


def test_predict_a_video_frame_by_frame(tmp_path, capsys):
    video = tmp_path / "clip.mp4"
    write_video(video)
    still = tmp_path / "frame2.png"
    decoded_frame(video, 2).save(still)  # frame 2 as an image: its predictions must be the video's frame 2's
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--image", still, "--video", video, "--prompt", "red circle", "--prompt", "square"]
    assert predict.run(parse(*argv, "--out", out, "--frame-step", "2", "--threshold", "0", "--max-dets", "3")) == 0

    document = json.loads((out / predict.PREDICTIONS_FILE).read_text())
    assert document["videos"] == [{"id": 1, "file_name": str(video), "fps": 10.0, "frame_step": 2, "frames": 3}]
    images = document["images"]
    assert images[0] == {"id": 1, "file_name": str(still), "width": 96, "height": 64}
    assert [
        (i["id"], i["video_id"], i["frame_index"], i["file_name"], i["width"], i["height"]) for i in images[1:]
    ] == [
        (2, 1, 0, str(video), 96, 64),
        (3, 1, 2, str(video), 96, 64),
        (4, 1, 4, str(video), 96, 64),
    ]
    assert [i["time_s"] for i in images[1:]] == pytest.approx([0.0, 0.2, 0.4])
    annotations = document["annotations"]
    assert [a["id"] for a in annotations] == list(range(1, 13))
    assert [a["image_id"] for a in annotations] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]

    def detections(image_id: int) -> list:
        return [(a["category_id"], a["bbox"], a["score"]) for a in annotations if a["image_id"] == image_id]

    assert detections(3) == detections(1)  # frame 2 of the video == frame 2 saved as a PNG
    assert detections(2) != detections(3)  # the square moved: other frames give other detections
    frames = out / "clip_overlay"
    assert sorted(p.name for p in frames.iterdir()) == ["000000.png", "000002.png", "000004.png"]
    with Image.open(frames / "000002.png") as frame_overlay, Image.open(out / "frame2_overlay.png") as still_overlay:
        assert frame_overlay.size == (96, 64)
        assert np.array_equal(np.asarray(frame_overlay), np.asarray(still_overlay))
    captured = capsys.readouterr()
    assert f"{video}: 3 frames, 9 detections above 0.0 -> {frames}" in captured.out
    assert "4/4" in captured.err  # the bar counts the image and the 3 frames (6 frames / step 2)


def test_video_frames_are_turned_as_players_show_them():
    """PyAV's rotation is counterclockwise: -90 (a phone held upright) turns the stored frame 90 degrees clockwise."""
    stored = np.zeros((2, 3, 3), dtype=np.uint8)
    stored[0, 0] = (255, 0, 0)  # red at the top-left of a 3 x 2 frame
    image = Image.fromarray(stored)
    assert video.upright_frame(image, 0) is image
    clockwise = np.asarray(video.upright_frame(image, -90))
    assert clockwise.shape == (3, 2, 3) and tuple(clockwise[0, 1]) == (255, 0, 0)  # top-left -> top-right
    anticlockwise = np.asarray(video.upright_frame(image, 90))
    assert anticlockwise.shape == (3, 2, 3) and tuple(anticlockwise[2, 0]) == (255, 0, 0)  # -> bottom-left
    assert tuple(np.asarray(video.upright_frame(image, 180))[1, 2]) == (255, 0, 0)  # -> bottom-right


def write_audio(path: Path) -> None:
    """A WAV file of 0.1 s of silence: a media file without a video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


def test_folder_and_video_errors_are_one_line_before_the_model_loads(tmp_path, capsys):
    no_model = tmp_path / "no_model"  # never reached: every check happens before the model loads
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "clip.mp4", frames=2)
    (tmp_path / "notes.mp4").write_text("hello")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((videos / "clip.mp4").read_bytes()[:600])
    write_audio(tmp_path / "sound.wav")
    cases = [
        (["--image", empty], DataError, r"empty: no image files in this folder \(looked for \.jpg"),
        (
            ["--image", videos],
            DataError,
            r"videos: no image files .* holds videos \(clip\.mp4, \.\.\.\): pass them with --video",
        ),
        (["--image", videos / "clip.mp4"], DataError, r"clip\.mp4: is a video; pass it with --video"),
        (["--video", tmp_path / "missing.mp4"], DataError, r"missing\.mp4: video file not found"),
        (["--video", videos], DataError, r"videos: is a folder; --video takes video files"),
        (["--video", tmp_path / "notes.mp4"], DataError, r"notes\.mp4: cannot read as a video \(Invalid data"),
        (["--video", truncated], DataError, r"truncated\.mp4: FFmpeg finds no streams in it; is the file complete"),
        (["--video", tmp_path / "sound.wav"], DataError, r"sound\.wav: holds no video stream \(only audio\)"),
        (
            ["--video", videos / "clip.mp4", "--frame-step", "0"],
            ConfigError,
            r"--frame-step must be a positive integer",
        ),
        ([], ConfigError, r"nothing to predict: give --image \(files or folders\) or --video"),
    ]
    for argv, error, message in cases:
        with pytest.raises(error, match=message) as err:
            predict.run(parse("--model", no_model, "--prompt", "cat", "--out", out, *argv))
        assert "\n" not in str(err.value)
    assert not out.exists()

    # the CLI prints the message on one line and exits 2
    assert (
        cli.main(
            [
                "predict",
                "--model",
                str(no_model),
                "--video",
                str(tmp_path / "notes.mp4"),
                "--prompt",
                "cat",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("error: ") and "notes.mp4: cannot read as a video" in printed[0]
