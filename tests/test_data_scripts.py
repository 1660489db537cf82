"""scripts/inspect_data.py and benchmarks/bench_episodes.py (tnas.data tooling)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tnas.errors import TnasError
from script_loader import load_script

try:
    import data_fixtures as fx
except ImportError:  # tests/ imported as a package
    from tests import data_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def test_inspect_folder(tmp_path, capsys):
    inspect = load_script("scripts/inspect_data.py")
    classes = {"train": 5, "val": 3, "test": 3}
    fx.build_class_folders(tmp_path / "mine", classes, per_class=4, mixed=True)
    code = inspect.main(["--dataset", "folder", "--data_path", str(tmp_path / "mine"), "--img_size", "24",
                         "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for name, count in classes.items():
        entry = report["splits"][name]
        assert entry["classes"] == count and entry["images"] == 4 * count
        assert entry["image_shape"] == [3, 24, 24] and entry["min_class_size"] == 4
    assert report["classes_shared_between_splits"] == 0
    grid = report["episode_grid"]["path"]
    assert os.path.isfile(grid) and grid.endswith(".png")
    from PIL import Image
    with Image.open(grid) as image:
        assert min(image.size) >= 5 * 56


def test_inspect_reports_missing_split(tmp_path, capsys):
    inspect = load_script("scripts/inspect_data.py")
    fx.build_class_folders(tmp_path / "mine", {"train": 3}, per_class=3)
    with pytest.raises(TnasError, match="val"):
        inspect.main(["--dataset", "folder", "--data_path", str(tmp_path / "mine"), "--img_size", "8",
                      "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["train"]["classes"] == 3 and "error" in report["splits"]["val"]


def test_inspect_cli_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "inspect_data.py"), "--dataset",
                             "miniimagenet", "--data_path", str(tmp_path / "missing"), "--cache_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "missing" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "glyphs", "--n_wa", "3"], "unknown command-line argument(s): --n_wa 3 (did you mean --n_way?)"),
    (["--dataset", "glyphs", "--split", "dev"], "argument --split: invalid choice: 'dev'"),
    (["--n_way", "3"], "the following arguments are required: --dataset"),
])
def test_inspect_bad_flags_are_one_line_errors(argv, message, capsys):
    """A bad, unknown or shortened flag is one TnasError line (cli_entry prints it), not argparse's usage
    block and exit; nothing is read or drawn first."""
    inspect = load_script("scripts/inspect_data.py")
    with pytest.raises(TnasError) as error:
        inspect.main(argv)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert capsys.readouterr() == ("", "")


def test_benchmark_smoke(tmp_path, capsys):
    bench = load_script("benchmarks/bench_episodes.py")
    code = bench.main(["--source", "synthetic", "--img_size", "16", "--synthetic_classes", "6",
                       "--synthetic_per_class", "16", "--seconds", "0.05", "--devices", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    modes = {r["mode"] for r in report["results"]}
    assert {"indices only", "host", "FixedEpisodes.batches"} <= modes
    assert all(r["episodes_per_s"] > 0 for r in report["results"])


def test_inspect_the_glyphs_demo_dataset(tmp_path, capsys):
    """The demo dataset, as a first-time user inspects it: every split's size, no class in two splits, the
    train split's pixel statistics and an episode grid of the documented layout (a row per class; support,
    a blank column, then query)."""
    import numpy as np
    from PIL import Image

    from tnas.data import glyphs, load_split

    inspect = load_script("scripts/inspect_data.py")
    assert inspect.main(["--dataset", "glyphs", "--img_size", "16", "--split", "test", "--n_way", "3",
                         "--k_shot", "2", "--q_query", "3", "--out", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    splits = report["splits"]
    assert sum(entry["classes"] for entry in splits.values()) == len(glyphs.glyph_classes())
    for entry in splits.values():
        assert entry["images"] == 20 * entry["classes"] and entry["image_shape"] == [1, 16, 16]
        assert entry["min_class_size"] == entry["max_class_size"] == 20
    assert report["classes_shared_between_splits"] == 0
    train = np.asarray(load_split("glyphs", "train", img_size=16).images, dtype=np.float64) / 255.0
    assert report["mean"] == [pytest.approx(train.mean(), abs=1e-4)]
    assert report["std"] == [pytest.approx(train.std(), abs=1e-4)]
    grid = report["episode_grid"]
    assert grid["split"] == "glyphs/test" and (grid["n_way"], grid["k_shot"], grid["q_query"]) == (3, 2, 3)
    test_classes = set(load_split("glyphs", "test", img_size=16).class_names)
    assert len(set(grid["classes"])) == 3 and set(grid["classes"]) <= test_classes
    cell, gap = 56, 4  # 16x16 glyphs drawn as 56-pixel tiles, 4 pixels apart
    with Image.open(grid["path"]) as image:
        assert image.size == ((2 + 1 + 3) * (cell + gap) + gap, 3 * (cell + gap) + gap)


def test_a_script_piped_into_a_reader_that_stops_early_ends_quietly():
    """`python scripts/inspect_data.py ... | head`: the reader goes away, the script stops with the shell's
    SIGPIPE status and no BrokenPipeError traceback (cli_entry, shared by every script)."""
    code = ("from tnas.errors import cli_entry\n"
            "def main():\n"
            "    for _ in range(100000):\n"
            "        print('x' * 100)\n"
            "cli_entry(main)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, PYTHONPATH=REPO))
    assert process.stdout.read(1) == b"x"
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and stderr == "", stderr
