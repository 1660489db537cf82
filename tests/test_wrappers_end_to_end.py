"""Every root ``*.sh`` wrapper run for real on the glyphs demo dataset, chained as the README chains them.

test_readme checks what each wrapper would run (with a stand-in python) and its --help; these runs start the
real scripts through the wrappers with tiny settings (16x16 glyphs, 3-way, C 4, one cell, one epoch of two or
four tasks), from a directory outside the checkout with relative paths, and check what the next step reads.
evaluate.sh has its own real run in test_evaluate. Each wrapper run costs a Python start and a few seconds.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SEARCH = ["--dataset", "glyphs", "--img_size", "16", "--device", "cpu", "--n_way", "3", "--k_shot", "1",
               "--q_query", "2", "--tasks_per_batch", "2", "--C", "4", "--layers", "1", "--inner_steps", "1",
               "--inner_steps_test", "1", "--val_episodes", "2", "--val_batch_size", "2", "--log_every", "0",
               "--seed", "3", "--epochs", "1", "--tasks_per_epoch", "2", "--threads", "1"]
EPISODES = 4
TINY_PROTOCOL = ["--episodes", str(EPISODES), "--batch_size", "4", "--update_step_test", "1", "--device", "cpu",
                 "--epochs", "1", "--tasks_per_epoch", "4", "--tasks_per_batch", "2", "--inner_steps", "1",
                 "--inner_lr", "0.1", "--val_episodes", "2", "--val_batch_size", "2", "--log_every", "0"]


def run_wrapper(name, args, cwd):
    """``bash NAME ARGS`` from ``cwd`` with this interpreter; fails the test on a nonzero exit."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TNAS_PROGRESS="0")
    done = subprocess.run(["bash", os.path.join(REPO, name)] + list(args), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def test_auto_maml_search_then_its_genotype_trained_from_scratch(tmp_path):
    """train_auto_maml.sh writes a genotype; train_auto_maml_from_scratch.sh --genotype DIR trains exactly it."""
    from tnas.genotypes import load_genotype

    search = run_wrapper("train_auto_maml.sh", TINY_SEARCH + ["--out", "search"], tmp_path)
    assert search.stdout.startswith("train_auto_maml.sh: auto-MAML search with: --dataset glyphs")
    summary = read_json(tmp_path / "search" / "search.json")
    assert summary["method"] == "auto_maml" and summary["epochs_done"] == 1
    assert (tmp_path / "search" / "best.pt").is_file()
    genotype = load_genotype(str(tmp_path / "search" / "genotype.json"))  # a valid genotype, or this raises

    run_wrapper("train_auto_maml_from_scratch.sh", TINY_SEARCH + ["--genotype", "search", "--out", "scratch"],
                tmp_path)
    trained = read_json(tmp_path / "scratch" / "train.json")
    assert trained["epochs_done"] == 1 and trained["best_epoch"] == 1 and len(trained["history"]) == 1
    assert load_genotype(str(tmp_path / "scratch" / "genotype.json")) == genotype  # the searched one, not a default
    assert "search" in str(trained["genotype_source"])
    assert (tmp_path / "scratch" / "best.pt").is_file() and (tmp_path / "scratch" / "last.pt").is_file()


def test_tnas_search_then_from_scratch_training_then_scoring(tmp_path):
    """train_tnas.sh -> train_tnas_from_scratch.sh (decode and train, no scores) -> evaluate_tnas.sh with the same
    flags, which reuses every trained genotype and scores each episode with its own."""
    run_wrapper("train_tnas.sh", TINY_SEARCH + ["--out", "search"], tmp_path)
    assert read_json(tmp_path / "search" / "search.json")["epochs_done"] == 1

    protocol = ["--checkpoint", "search", "--out", "protocol"] + TINY_PROTOCOL
    run_wrapper("train_tnas_from_scratch.sh", protocol, tmp_path)
    out = tmp_path / "protocol"
    assert not (out / "results.json").exists()  # --train_only: nothing scored yet
    index = read_json(out / "genotypes.json")
    trained = sorted(index["genotypes"])
    assert trained and index["distinct_genotypes"] == len(trained)
    for gid in trained:
        assert (out / "genotypes" / gid / "best.pt").is_file(), gid

    scored = run_wrapper("evaluate_tnas.sh", protocol, tmp_path)
    record = read_json(out / "results.json")
    assert record["method"] == "tnas" and record["episodes"] == EPISODES and len(record["per_episode"]) == EPISODES
    assert sorted(record["skipped_genotypes"]) == trained  # nothing trained twice
    assert set(record["genotype_id"]) == set(trained) and record["distinct_genotypes"] == len(trained)
    assert all(0.0 <= value <= 100.0 for value in record["per_episode"])
    assert record["accuracy_mean"] == pytest.approx(sum(record["per_episode"]) / EPISODES, abs=1e-3)
    assert f"({EPISODES} episodes), {len(trained)} distinct genotype(s)" in scored.stdout


def test_reproduce_paper_runs_a_tiny_plan_for_one_method(tmp_path):
    """reproduce_paper.sh --plan: the real stage scripts (Conv-4 MAML trained, then scored on the fixed test
    tasks) and the table, whose one row is the evaluation's own result.
    The whole four-method pipeline is test_reproduce's slow test."""
    from test_reproduce import write_tiny_plan

    plan = write_tiny_plan(tmp_path)
    done = run_wrapper("reproduce_paper.sh", ["--plan", plan, "--out", "out", "--methods", "maml"], tmp_path)
    assert "reproduce: all 2 steps done" in done.stdout
    table = read_json(tmp_path / "out" / "table.json")
    assert [row["method"] for row in table["rows"]] == ["maml"]
    cells = {row["method"]: row["cells"]["1"] for row in table["rows"]}
    result = read_json(tmp_path / "out" / "1shot" / "maml" / "evaluate" / "results.json")
    assert cells["maml"]["state"] == "done" and cells["maml"]["episodes"] == 3 == result["episodes"]
    assert cells["maml"]["accuracy_mean"] == pytest.approx(result["accuracy_mean"], abs=1e-3)
    assert [step["state"] for step in cells["maml"]["steps"]] == ["done", "done"]
    assert "| MAML (Conv-4) |" in (tmp_path / "out" / "table.md").read_text()
