"""`python -m pipeline score`: writes metrics.json (and plot files), and a bad input is one error line, exit 2.

Runs through `pipeline.cli.main`, which turns a Sam3Error into one line and exit code 2.
"""

import json

import pytest

from pipeline import cli

GT = {
    "images": [
        {"id": 1, "file_name": "1.jpg", "height": 64, "width": 64},
        {"id": 2, "file_name": "2.jpg", "height": 64, "width": 64},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 30, 20, 20], "area": 400, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "background"}],
}
# finds the first nucleus, misses the second
PREDICTIONS = [{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9}]


@pytest.fixture
def files(tmp_path):
    gt, pred = tmp_path / "gt.json", tmp_path / "pred.json"
    gt.write_text(json.dumps(GT))
    pred.write_text(json.dumps(PREDICTIONS))
    return gt, pred


def test_writes_metrics_and_plot_files(files, tmp_path, capsys):
    gt, pred = files
    out, pr, rows = tmp_path / "eval" / "metrics.json", tmp_path / "pr.json", tmp_path / "per_category.json"
    argv = ["score", "--gt", str(gt), "--predictions", str(pred), "--out", str(out)]
    code = cli.main([*argv, "--pr-curve", str(pr), "--per-category", str(rows)])
    assert code == 0

    text = out.read_text()
    metrics = json.loads(text)
    assert text == json.dumps(metrics, indent=2, sort_keys=True) + "\n"  # indent 2, sorted keys
    for key in ["bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl", "bbox_AP_per_category"]:
        assert key in metrics
    for key in ["cgF1", "IL_MCC", "pmF1", "cgF1_50", "pmF1_50", "num_pairs", "num_positive_pairs"]:
        assert key in metrics
    # 1 of 2 nuclei found at precision 1: AP = 51/101 (recall thresholds 0 .. 0.50). Pairs: 2 images x 2
    # categories, (1, nucleus) positive and detected, 3 TN -> MCC 1; pmF1 = 2*1 / (2 + 0 + 1) = 2/3
    assert metrics["bbox_AP"] == pytest.approx(51 / 101)
    assert metrics["bbox_AP_per_category"] == {"nucleus": pytest.approx(51 / 101), "background": None}
    assert metrics["cgF1"] == pytest.approx(200 / 3)
    assert (metrics["num_pairs"], metrics["num_positive_pairs"]) == (4, 1)

    assert len(json.loads(pr.read_text())) == 101
    assert json.loads(rows.read_text()) == [{"AP": pytest.approx(51 / 101), "category": "nucleus", "iou_type": "bbox"}]
    printed = capsys.readouterr().out
    assert "bbox AP 0.505" in printed and "cgF1 66.67" in printed and str(out) in printed

    # same inputs, same bytes
    cli.main(argv)
    assert out.read_text() == text


def test_bad_json_is_one_line_exit_2(files, tmp_path, capsys):
    gt, _ = files
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1, "score": 0.9,}]')
    out = tmp_path / "metrics.json"
    code = cli.main(["score", "--gt", str(gt), "--predictions", str(broken), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {broken}:1:") and "invalid JSON" in err[0]
    assert not out.exists()


def test_missing_gt_file_is_one_line_exit_2(files, tmp_path, capsys):
    _, pred = files
    missing = tmp_path / "nope.json"
    code = cli.main(["score", "--gt", str(missing), "--predictions", str(pred), "--out", str(tmp_path / "m.json")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: file not found"
