"""vos-train and vos-evaluate through the CLI on a small generated dataset: the run's files, the before / after
report, the figures, the summary, J&F equal to what vos-score computes from the written PNGs, and user mistakes as
one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.vos_shapes import build_vos_shapes

FAST = ["vos.train.max_steps=2", "vos.train.log_every=1", "vos.clip.num_frames=3", "vos.evaluate.strips=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vos")
    build_vos_shapes(root / "data", train_videos=3, valid_videos=2, frames=5, size=64, seed=0)
    assert main(["vos-train", "--run-dir", str(root / "run"), "--dataset", str(root / "data"), "--set", *FAST]) == 0
    return root / "data", root / "run"


@pytest.mark.slow
def test_vos_train_writes_the_run_and_vos_evaluate_the_report(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    assert (run / "model" / "config.json").is_file() and (run / "model" / "README.md").is_file()
    assert "max_steps: 2" in (run / "params.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (run / "train_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

    out, summary = tmp_path / "eval", tmp_path / "summary.json"
    command = ["vos-evaluate", "--model", str(run / "model"), "--dataset", str(data), "--out", str(out)]
    command += ["--summary", str(summary), "--train-stats", str(run / "train_stats.jsonl"), "--set", *FAST]
    assert main(command) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"model", "baseline"}
    assert set(metrics["model"]["per_video"]) == {"valid_0000", "valid_0001"}
    # the table holds both models' J&F, and the summary what DVC compares
    report = (out / "report.md").read_text()
    for name in ("model", "baseline"):
        assert f"{metrics[name]['J&F']:.4f}" in report
    assert json.loads(summary.read_text()) == {
        "J&F": metrics["model"]["J&F"],
        "J": metrics["model"]["J"],
        "F": metrics["model"]["F"],
        "baseline_J&F": metrics["baseline"]["J&F"],
        "vos_train_loss": json.loads((run / "train_stats.jsonl").read_text().splitlines()[-1])["loss"],
        "vos_steps": 2,
    }
    # one PNG per annotated frame; vos-score on them gives the same J&F
    assert len(list((out / "predictions" / "valid_0000").glob("*.png"))) == 5
    scores = tmp_path / "scores.json"
    gt = data / "valid" / "Annotations"
    assert main(["vos-score", "--gt", str(gt), "--predictions", str(out / "predictions"), "--out", str(scores)]) == 0
    assert json.loads(scores.read_text())["J&F"] == pytest.approx(metrics["model"]["J&F"], abs=1e-12)
    # the figures: J&F per video, and the strips of the two videos (ground truth over prediction: 2 rows of 64 px)
    with Image.open(out / "plots" / "per_video_jf.png") as image:
        assert image.size[0] > 300
    strips = sorted((out / "plots" / "strips").glob("*.png"))
    assert [p.stem for p in strips] == ["valid_0000", "valid_0001"]
    with Image.open(strips[0]) as image:
        assert image.size == (5 * 64, 2 * 64)  # 5 frames (fewer than 6 columns), two rows
    assert "plots/strips/valid_0000.png" in report


@pytest.mark.slow
def test_vos_train_resumes_and_refuses_a_shorter_run(trained: tuple[Path, Path], capsys) -> None:
    data, run = trained
    again = ["vos-train", "--run-dir", str(run), "--dataset", str(data), "--set", *FAST]
    assert main([*again, "vos.train.max_steps=3"]) == 0  # goes on from the step-2 checkpoint
    steps = [json.loads(line)["step"] for line in (run / "train_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    capsys.readouterr()
    assert main([*again, "vos.train.max_steps=1"]) == 2
    assert "step" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["vos-train", "--run-dir", "{tmp}/run", "--dataset", "{tmp}/nothing"], "no JPEGImages/ and Annotations/"),
        (
            ["vos-train", "--run-dir", "{tmp}/run", "--dataset", "{tmp}", "--set", "vos.model.source={tmp}/none"],
            "vos.model.source: model folder",
        ),
        (["vos-train", "--run-dir", "{tmp}/run", "--set", "vos.train.seed=x"], "vos.train.seed = 'x': expected int"),
        (["vos-evaluate", "--model", "{tmp}", "--dataset", "{tmp}", "--out", "{tmp}/o"], "no Annotations/ folder"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(command: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main([part.format(tmp=tmp_path) for part in command]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_a_second_vos_trainer_on_a_held_run_folder_exits_2_and_writes_nothing(
    trained: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    from tests.lock_holder import lock_held_elsewhere

    data, _ = trained
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "params.yaml").write_text("vos: {train: {max_steps: 5}}\n")  # the running trainer's
    with lock_held_elsewhere(run_dir) as holder:
        assert main(["vos-train", "--run-dir", str(run_dir), "--dataset", str(data), "--set", *FAST]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another training run (pid {holder.pid}" in err and "Traceback" not in err
    assert (run_dir / "params.yaml").read_text() == "vos: {train: {max_steps: 5}}\n"
    assert not (run_dir / "checkpoints").exists()
