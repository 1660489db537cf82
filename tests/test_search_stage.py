"""End-to-end runs of the T-NAS search stage on the glyphs demo data (tiny settings, CPU)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "glyphs", "--img_size", "16", "--device", "cpu", "--n_way", "3", "--k_shot", "1",
        "--q_query", "2", "--tasks_per_batch", "2", "--C", "4", "--layers", "1", "--inner_steps", "1",
        "--inner_steps_test", "2", "--val_episodes", "4", "--val_batch_size", "4", "--log_every", "1",
        "--checkpoint_every", "1", "--seed", "3"]


def run_search(out, *extra, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", TNAS_PROGRESS="0")
    command = [sys.executable, os.path.join(REPO, "scripts", "search.py"), *TINY, "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def checkpoint_iteration(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["iteration"]
    except Exception:  # not there yet
        return -1


def model_state(run_dir):
    return torch.load(os.path.join(run_dir, "last.pt"), map_location="cpu", weights_only=True)["learner"]["model"]


def test_search_writes_every_output(tmp_path):
    out = tmp_path / "run"
    result = run_search(out, "--epochs", "2", "--tasks_per_epoch", "4")
    assert result.returncode == 0, result.stderr
    for name in ("config.yaml", "log.txt", "last.pt", "best.pt", "genotype.json", "best_genotype.json",
                 "search.json"):
        assert (out / name).is_file(), name
    assert list((out / "cells").glob("normal.*")) and list((out / "tb").iterdir())
    events = b"".join(path.read_bytes() for path in (out / "tb").rglob("events*"))
    for tag in (b"alphas/alpha_reduce", b"cells/normal", b"cells/reduce", b"genotype", b"epoch/val_accuracy",
                b"meta_train/accuracy_step0"):
        assert tag in events, tag
    summary = json.loads((out / "search.json").read_text())
    assert summary["method"] == "tnas" and summary["epochs_done"] == 2 and len(summary["history"]) == 2
    for record in summary["history"]:
        assert 0 <= record["val_accuracy"] <= 100 and 0 <= record["train_accuracy"] <= 100
        assert set(record["genotype"]) == {"normal", "normal_concat", "reduce", "reduce_concat"}
    # best: the first epoch of the highest validation accuracy (a later tie does not replace it), and best.pt is it
    accuracies = [record["val_accuracy"] for record in summary["history"]]
    assert summary["best_epoch"] == 1 + accuracies.index(max(accuracies))
    assert summary["best_val_accuracy"] == max(accuracies) and summary["best"]["genotype"]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == summary["best_epoch"]
    # the run directory as a genotype is its result: the best epoch's (best.pt's), not the latest epoch's
    from tnas.genotypes import genotype_from_dict, load_genotype

    best = genotype_from_dict(summary["best"]["genotype"])
    assert load_genotype(str(out / "best_genotype.json")) == best and load_genotype(str(out)) == best
    assert load_genotype(str(out / "genotype.json")) == genotype_from_dict(summary["history"][-1]["genotype"])
    # the run directory is never overwritten by accident
    again = run_search(out, "--epochs", "2", "--tasks_per_epoch", "4")
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr


# Runs the search script with the trainer's checkpoint writer wrapped: right after last.pt of
# iteration KILL_AT is on disk the process SIGKILLs itself, as a crash or an OOM kill would, at
# a known point however fast or slow the machine is.
KILL_AT = 3
KILLED_RUN = f"""
import os, runpy, signal, sys
import tnas.engine as engine
save = engine.save_checkpoint
def save_then_die(state, path):
    save(state, path)
    if os.path.basename(str(path)) == "last.pt" and state["iteration"] >= {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
engine.save_checkpoint = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_killed_search_resumes_to_the_same_parameters(tmp_path):
    schedule = ["--epochs", "2", "--tasks_per_epoch", "12"]  # 6 iterations per epoch
    reference = tmp_path / "reference"
    assert run_search(reference, *schedule).returncode == 0
    interrupted = tmp_path / "interrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1", TNAS_PROGRESS="0")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, os.path.join(REPO, "scripts", "search.py"), *TINY,
                             "--out", str(interrupted), *schedule], env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_iteration(interrupted / "last.pt") == KILL_AT  # mid first epoch
    resumed = run_search(interrupted, *schedule, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    want, got = model_state(reference), model_state(interrupted)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    history = json.loads((interrupted / "search.json").read_text())["history"]
    reference_history = json.loads((reference / "search.json").read_text())["history"]
    assert [h["val_accuracy"] for h in history] == [h["val_accuracy"] for h in reference_history]


def test_ctrl_c_saves_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    process = run_search(out, "--epochs", "5", "--tasks_per_epoch", "40", "--checkpoint_every", "1000", wait=False)
    deadline = time.time() + 300
    while not (out / "log.txt").exists() or "search (tnas)" not in (out / "log.txt").read_text():
        assert process.poll() is None and time.time() < deadline, process.stderr.read() if process.poll() else "slow"
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert checkpoint_iteration(out / "last.pt") >= 1
    assert "--resume" in (out / "log.txt").read_text()


def test_non_finite_loss_stops_naming_the_iteration(tmp_path):
    out = tmp_path / "run"
    result = run_search(out, "--epochs", "1", "--tasks_per_epoch", "8", "--inner_lr_weights", "1e38",
                        "--inner_lr_alphas", "1e38")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "non-finite meta-training loss at iteration 0" in lines[0], result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--config", "missing.yaml"], "missing.yaml"),
    (["--n_way", "500"], "n_way=500"),
    (["--bogus_flag", "1"], "--bogus_flag"),
    (["--device", "cuda"], "--device cuda"),
    (["--device", "cpu", "--cuda_graph"], "--cuda_graph needs a CUDA device; --device cpu"),
])
def test_bad_input_is_one_line_error(tmp_path, flags, message):
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_search(tmp_path / "run", "--epochs", "1", "--tasks_per_epoch", "2", *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def test_only_the_main_rank_writes_genotype_files(tmp_path):
    """Data-parallel ranks decode the same genotype, but only rank 0 writes (no race on the diagrams)."""
    from types import SimpleNamespace

    from tnas.models.supernet import Supernet
    from tnas.runlog import RunLogger
    from tnas.stages.search import genotype_epoch_hook

    learner = SimpleNamespace(model=Supernet(n_way=3, C=4, layers=1, in_channels=1))
    for is_main, name in ((False, "rank1"), (True, "rank0")):
        run_dir = tmp_path / name
        logger = RunLogger(str(run_dir), use_tensorboard=False, quiet=True)
        record = genotype_epoch_hook(learner, str(run_dir), logger, is_main=is_main)(1, {})
        assert record["genotype"] == learner.model.genotype().to_dict()
        written = sorted(path.name for path in run_dir.rglob("*") if path.is_file() and "log" not in path.name)
        if is_main:
            assert {"genotype.json", "normal.png", "reduce.png", "normal.dot", "reduce.dot"} <= set(written)
        else:
            assert written == []


def test_omniglot_with_rotated_classes_searches_and_evaluates_on_them(tmp_path):
    """--rotations: four times the characters in every split (a 4-way search needs the 4 rotated
    validation classes of the one validation character); the run records it, and evaluation loads the
    test split the same way. On another dataset it is a one-line error before anything is written."""
    import data_fixtures as fx
    from tnas.config import parse_args
    from tnas.stages import evaluate

    root, cache = tmp_path / "omniglot", str(tmp_path / "cache")
    fx.build_omniglot(str(root))
    omniglot = ["--dataset", "omniglot", "--data_path", str(root), "--cache_dir", cache, "--n_way", "4"]
    out = tmp_path / "run"
    without = run_search(tmp_path / "without", *omniglot, "--epochs", "1", "--tasks_per_epoch", "2")
    assert without.returncode == 2 and "val" in without.stderr and "Traceback" not in without.stderr
    result = run_search(out, *omniglot, "--rotations", "--epochs", "1", "--tasks_per_epoch", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "search.json").read_text())["rotations"] is True
    args = parse_args(evaluate.build_parser(), ["--checkpoint", str(out), "--episodes", "2", "--device", "cpu",
                                                "--cache_dir", cache])
    prepared = evaluate.prepare(args)
    assert len(prepared.split.class_names) == 4 * 5  # the 5 test characters, each 4 times
    refused = run_search(tmp_path / "glyphs", "--rotations", "--epochs", "1", "--tasks_per_epoch", "2")
    assert refused.returncode == 2 and "--rotations: dataset 'glyphs' has no rotated classes" in refused.stderr
    assert not (tmp_path / "glyphs").exists()


def test_the_best_genotype_is_written_when_best_pt_is(tmp_path, monkeypatch):
    """best_genotype.json follows best.pt (validation 60%, 40%, 50%: epoch 1's), genotype.json every epoch;
    a run directory given as a genotype reads best_genotype.json before genotype.json."""
    from tnas.config import parse_args
    from tnas.engine import MetaTrainer
    from tnas.genotypes import PUBLISHED, load_genotype, save_genotype
    from tnas.stages import search

    accuracies = iter([60.0, 40.0, 50.0])
    monkeypatch.setattr(MetaTrainer, "validate", lambda self: {"val_accuracy": next(accuracies), "val_ci95": 1.0})
    written = []
    monkeypatch.setattr(search, "save_genotype", lambda genotype, path: written.append(os.path.basename(path)))
    argv = [*TINY, "--out", str(tmp_path / "run"), "--epochs", "3", "--tasks_per_epoch", "2"]
    search.run(search.settings_from_args(parse_args(search.build_parser(), argv)))
    assert written.count("genotype.json") == 3 and written.count("best_genotype.json") == 1
    assert json.loads((tmp_path / "run" / "search.json").read_text())["best_epoch"] == 1

    run = tmp_path / "dir"
    run.mkdir()
    save_genotype(PUBLISHED["auto_maml_1shot"], str(run / "genotype.json"))
    assert load_genotype(str(run)) == PUBLISHED["auto_maml_1shot"]  # an older search, a training run
    save_genotype(PUBLISHED["auto_maml_5shot"], str(run / "best_genotype.json"))
    assert load_genotype(str(run)) == PUBLISHED["auto_maml_5shot"]


def test_graph_untracked_leaves_tracked_steps_eager():
    from tnas.stages.common import graph_untracked

    calls = []

    def call(batch, track):
        calls.append((batch, track))
        return track

    assert graph_untracked(call, False) is call
    step = graph_untracked(call, True)
    assert step("batch", True) is True and calls == [("batch", True)]
