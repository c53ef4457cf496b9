"""`python -m pipeline vos-score`: writes the J/F/J&F JSON and prints a table; a bad input is a DataError (exit 2).

The stage is called through its own parser (`add_arguments` + `run`); once `vos-score` is registered in
`pipeline.cli`, the last test also runs it through `cli.main`, which turns a DataError into one line and exit 2.
"""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from pipeline import cli, vos_score
from sam3.errors import DataError
from sam3.video.palette import write_label_map


def square(rows, cols, value=1):
    mask = np.zeros((10, 10), np.uint8)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = value
    return mask


@pytest.fixture
def folders(tmp_path):
    """Two 3-frame 10x10 videos with one object each; only frame 00001 is scored (first and last are not).

    v1: exact prediction                  -> J 1, F 1
    v2: gt rows 2..5 x cols 2..5, prediction one column to the right (cols 3..6) -> J = 12 / 20 = 0.6; the boundary
        rings are within the 1-pixel tolerance (ceil(0.008 * sqrt(200)) = 1) of each other -> F = 1
    Global: J = (1 + 0.6) / 2 = 0.8, F = 1, J&F = 0.9.
    """
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    target = square((2, 5), (2, 5))
    for frame in range(3):
        write_label_map(gt / "v1" / f"{frame:05d}.png", target)
        write_label_map(gt / "v2" / f"{frame:05d}.png", target)
    write_label_map(pred / "v1" / "00001.png", target)
    write_label_map(pred / "v2" / "00001.png", square((2, 5), (3, 6)))
    return gt, pred


def run(argv):
    parser = argparse.ArgumentParser()
    vos_score.add_arguments(parser)
    return vos_score.run(parser.parse_args(argv))


def test_writes_scores_and_prints_table(folders, tmp_path, capsys):
    gt, pred = folders
    out = tmp_path / "eval" / "scores.json"
    assert run(["--gt", str(gt), "--predictions", str(pred), "--out", str(out)]) == 0

    text = out.read_text()
    scores = json.loads(text)
    assert text == json.dumps(scores, indent=2, sort_keys=True) + "\n"  # indent 2, sorted keys
    assert scores["J"] == pytest.approx(0.8)
    assert scores["F"] == pytest.approx(1.0)
    assert scores["J&F"] == pytest.approx(0.9)
    assert scores["per_video"]["v2"]["objects"]["1"]["J"] == pytest.approx(0.6)
    assert (scores["num_videos"], scores["num_objects"]) == (2, 2)
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines()]
    assert ["video", "objects", "J&F", "J", "F"] in rows
    assert ["v2", "1", "0.800", "0.600", "1.000"] in rows  # J&F (0.6 + 1) / 2 = 0.8
    assert ["global", "2", "0.900", "0.800", "1.000"] in rows
    assert str(out) in printed


def test_video_list_selects_a_subset(folders, tmp_path):
    gt, pred = folders
    listing, out = tmp_path / "val.txt", tmp_path / "scores.json"
    listing.write_text("v2\n\n")  # blank lines are ignored
    assert run(["--gt", str(gt), "--predictions", str(pred), "--out", str(out), "--videos", str(listing)]) == 0
    scores = json.loads(out.read_text())
    assert sorted(scores["per_video"]) == ["v2"]
    assert scores["J"] == pytest.approx(0.6)


def test_video_listed_twice(folders, tmp_path):
    gt, pred = folders
    listing = tmp_path / "val.txt"
    listing.write_text("v1\nv2\nv1\n")
    with pytest.raises(DataError, match=r"val\.txt: video\(s\) listed more than once: v1"):
        run(["--gt", str(gt), "--predictions", str(pred), "--out", str(tmp_path / "s.json"), "--videos", str(listing)])


def test_non_palette_prediction_names_the_file(folders, tmp_path):
    gt, pred = folders
    bad = pred / "v2" / "00001.png"
    Image.fromarray(square((2, 5), (2, 5))).save(bad)  # mode "L": grey levels, not palette indices
    out = tmp_path / "scores.json"
    with pytest.raises(DataError, match=r"v2/00001\.png: annotation PNG is in mode 'L'"):
        run(["--gt", str(gt), "--predictions", str(pred), "--out", str(out)])
    assert not out.exists()


def test_missing_prediction_frame_names_the_file(folders, tmp_path):
    gt, pred = folders
    (pred / "v1" / "00001.png").unlink()
    with pytest.raises(DataError, match=r"video 'v1', frame '00001': no prediction PNG .*v1/00001\.png"):
        run(["--gt", str(gt), "--predictions", str(pred), "--out", str(tmp_path / "scores.json")])


@pytest.mark.skipif("vos-score" not in cli.COMMANDS, reason="vos-score is not registered in pipeline/cli.py yet")
def test_cli_exit_code_two_on_missing_frame(folders, tmp_path, capsys):
    gt, pred = folders
    (pred / "v1" / "00001.png").unlink()
    argv = ["vos-score", "--gt", str(gt), "--predictions", str(pred), "--out", str(tmp_path / "scores.json")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "v1/00001.png" in err and "Traceback" not in err
