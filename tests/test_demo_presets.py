"""The CPU demo presets learn: validation accuracy after adaptation far above chance (slow: minutes)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHANCE = 20.0  # 5-way


def run(script, config, out, *extra):
    env = dict(os.environ, TNAS_PROGRESS="0")
    command = [sys.executable, os.path.join(REPO, "scripts", script), "--config", os.path.join(REPO, "configs", config),
               "--out", str(out), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_tnas_demo_preset_learns(tmp_path):
    run("search.py", "demo.yaml", tmp_path / "search")
    summary = json.loads((tmp_path / "search" / "search.json").read_text())
    assert summary["best_val_accuracy"] > 2 * CHANCE, summary["history"]


@pytest.mark.slow
def test_from_scratch_demo_preset_learns(tmp_path):
    run("train_from_scratch.py", "demo_scratch.yaml", tmp_path / "train", "--genotype", "auto_maml_1shot")
    summary = json.loads((tmp_path / "train" / "train.json").read_text())
    assert summary["best_val_accuracy"] > 2.5 * CHANCE, summary["history"]
