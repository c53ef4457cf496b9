"""`python -m pipeline cache-features` and training from its output through `python -m pipeline train`.

- a build from options: manifest key as asked, one shard and the text file; a second call changes nothing
- `--params` fills the options left out, `--set` overrides it (as the suites pass their train flags); with
  cache.enabled false only an "off" manifest is written (what the DVC stage does by default), the previous features
  removed and other files left alone, without importing torch
- user mistakes exit 2 with one line: missing dataset, bad --views, cache.enabled with a trainable vision encoder
  (in train, and in cache-features with --params, before anything is built)
- the DVC flow by hand: cache-features --params P, then train --params P from the cache; a cache built with other
  views is refused, naming the field and the rebuild command
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.pipeline.prefect_repo import tiny_params
from tests.training_runs import IMAGE_SIZE, build_small_shapes

pytestmark = pytest.mark.usefixtures("outside_repo")  # stage flags only, not the repository's params.yaml


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"), n=4)


def _params_file(folder: Path, **cache: object) -> Path:
    """The repository's params.yaml with tiny settings (112 px, 2 steps of batch 2, fp32) and `cache` values."""
    params = tiny_params()
    params["cache"].update(cache)
    params["train"].update({"freeze": "vision", "log_every": 1})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


def _one_error_line(err: str) -> str:
    """The single "error: ..." line of stderr (progress bars may precede it; no traceback may follow)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_build_from_options_then_a_second_call_changes_nothing(shapes, tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["cache-features", str(shapes), "--out", str(out), "--model", "tiny", "--image-size", str(IMAGE_SIZE)]
    assert main([*args, "--views", "2", "--dtype", "fp32", "--seed", "5"]) == 0
    assert "feature cache: 4 images x 2 views" in capsys.readouterr().out
    key = _manifest(out)["key"]
    assert (key["views"], key["dtype"], key["seed"], key["image_size"], key["levels"]) == (2, "fp32", 5, 112, [2])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "text.safetensors", "train-00000.safetensors"]
    assert len(_manifest(out)["splits"]["train"]) == 4

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([*args, "--views", "2", "--dtype", "fp32", "--seed", "5"]) == 0
    assert f"feature cache up to date: {out}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_params_fill_the_options_and_cache_off_writes_only_its_manifest(shapes, tmp_path, capsys):
    out = tmp_path / "cache"
    on = _params_file(tmp_path, enabled=True, views=2, dtype="fp16")
    assert (
        main(["cache-features", str(shapes), "--out", str(out), "--params", str(on), "--set", "cache.dtype=fp32"]) == 0
    )
    assert (_manifest(out)["key"]["views"], _manifest(out)["key"]["dtype"]) == (2, "fp32")  # --set over the file
    assert _manifest(out)["source"]["model"] == "tiny"  # model.source of the params file
    assert main(["cache-features", str(shapes), "--out", str(out), "--params", str(on), "--views", "1"]) == 0
    assert _manifest(out)["key"]["views"] == 1  # an option beats the params file

    (out / "notes.txt").write_text("mine")
    off_dir = tmp_path / "off"
    off_dir.mkdir()
    off = _params_file(off_dir, enabled=False)
    capsys.readouterr()
    assert main(["cache-features", str(shapes), "--out", str(out), "--params", str(off)]) == 0
    assert "feature cache off" in capsys.readouterr().out
    assert _manifest(out) == {"format": 1, "enabled": False}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt"]  # features gone, notes kept
    assert (
        main(
            [
                "cache-features",
                str(shapes),
                "--out",
                str(tmp_path / "o"),
                "--params",
                str(on),
                "--set",
                "cache.enabled=false",
            ]
        )
        == 0
    )
    assert _manifest(tmp_path / "o") == {"format": 1, "enabled": False}


def test_the_off_manifest_is_written_without_importing_torch(tmp_path):
    # the DVC stage of every dataset (and seed) runs while the cache is off: it must cost about a second
    off = _params_file(tmp_path, enabled=False)
    args = ["cache-features", "nowhere", "--out", str(tmp_path / "c"), "--params", str(off)]
    script = (
        "import json, sys; from pipeline.cli import main; "
        f"code = main({args!r}); "
        "print(json.dumps([code, sorted({'torch', 'transformers'} & set(sys.modules))]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout.splitlines()[-1]) == [0, []], done.stdout + done.stderr
    assert _manifest(tmp_path / "c") == {"format": 1, "enabled": False}


def test_mistakes_exit_2_with_one_line(shapes, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["cache-features", str(missing), "--out", str(tmp_path / "c"), "--image-size", "112"]) == 2
    assert str(missing) in _one_error_line(capsys.readouterr().err)
    assert main(["cache-features", str(shapes), "--out", str(tmp_path / "c"), "--views", "0"]) == 2
    assert "views must be >= 1" in _one_error_line(capsys.readouterr().err)  # the loader names cache.views

    params = _params_file(tmp_path, enabled=True)
    train = ["train", "--params", str(params), "--run-dir", str(tmp_path / "run"), "--dataset", str(shapes)]
    assert main([*train, "--set", "train.freeze=none", "--dry-run"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "cache.enabled needs a frozen vision encoder, but train.freeze is 'none'" in line
    build = ["cache-features", str(shapes), "--out", str(tmp_path / "c"), "--params", str(params)]
    assert main([*build, "--set", "train.freeze=none"]) == 2  # said before a model is loaded or anything written
    line = _one_error_line(capsys.readouterr().err)
    assert f"{params}: cache.enabled needs a frozen vision encoder, but train.freeze is 'none'" in line
    assert not (tmp_path / "c").exists()


def test_cache_then_train_from_it_as_the_dvc_stages_do(shapes, tmp_path, capsys):
    params = _params_file(tmp_path, enabled=True, views=2)
    cache, run_dir = tmp_path / "features", tmp_path / "run"
    assert main(["cache-features", str(shapes), "--out", str(cache), "--params", str(params)]) == 0
    train = ["train", "--params", str(params), "--run-dir", str(run_dir), "--dataset", str(shapes)]
    assert main([*train, "--feature-cache", str(cache)]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "train_stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run_dir / "model" / "model.safetensors").is_file()

    capsys.readouterr()
    assert main([*train, "--feature-cache", str(cache), "--set", "cache.views=3"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "the feature cache does not match this run (views: cache 2, this run 3)" in line
    assert f"rebuild: python -m pipeline cache-features {shapes} --out {cache} --model tiny" in line
