"""The evaluate stage (scripts/evaluate.py, evaluate.sh): the CI formula, reproducible results.json,
its fields, and one-line errors that leave an existing results.json alone.

A tiny T-NAS search (glyphs at 16x16, C 4, one cell, one epoch of 2 tasks) and a tiny
from-scratch training of its genotype run once per session (in process, shared on disk
through the session's temporary directory, see :func:`tiny_runs`); the other test files
of the evaluate/decode/restore stages reuse them. Most CLI runs go through
``cli_entry(main)`` in process; one real ``evaluate.sh`` run comes last, since starting
Python with torch costs seconds on shared cores (the errors go through the same
``cli_entry``, which is what turns them into one line and exit status 2).
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tnas.errors import cli_entry
from tnas.evaluate import format_accuracy, mean_ci95, results_record
from script_loader import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "evaluate.py")
WRAPPER = os.path.join(REPO, "evaluate.sh")
TIMEOUT_S = 120
# Settings of every evaluation in these tests: a handful of tasks, one adaptation step.
FAST = ["--episodes", "5", "--batch_size", "3", "--update_step_test", "1", "--device", "cpu"]
RESULT_FIELDS = ("method", "dataset", "n_way", "k_shot", "episodes", "accuracy_mean", "ci95", "per_episode",
                 "genotypes", "checkpoint", "update_step_test", "seed", "wall_time_s")


# --------------------------------------------------------------------------- shared tiny runs
def _cache_dir(base: Path) -> str:
    return os.environ.get("TNAS_CACHE_DIR") or str(base / "glyph-cache")


def tiny_runs(base: Path) -> dict:
    """``{"search": dir, "train": dir, "cache_dir": dir}``: a tiny T-NAS search and a tiny MAML training of
    its genotype, made once under ``base`` (the session's temporary root) and reused afterwards."""
    root = base / "tnas_eval_runs"
    runs = {"search": root / "search", "train": root / "train", "cache_dir": _cache_dir(base)}
    done = root / "done"
    if done.exists():
        return runs
    from tnas.config import parse_args
    from tnas.stages import search, train

    shutil.rmtree(root, ignore_errors=True)
    # The real search stage, minus its cell diagrams and alpha heatmaps (seconds of matplotlib each).
    hook = search.genotype_epoch_hook
    search.genotype_epoch_hook = _genotype_json_hook
    common = ["--epochs", "1", "--tasks_per_epoch", "2", "--tasks_per_batch", "2", "--val_episodes", "2",
              "--q_query", "2", "--C", "4", "--layers", "1", "--img_size", "16", "--inner_steps", "1",
              "--inner_steps_test", "1", "--device", "cpu", "--log_every", "0", "--cache_dir", runs["cache_dir"]]
    try:
        search.run(search.settings_from_args(parse_args(search.build_parser(),
                                                        common + ["--out", str(runs["search"])])))
        train.run(train.settings_from_args(parse_args(train.build_parser(), common + [
            "--genotype", str(runs["search"]), "--out", str(runs["train"])])))
    finally:
        search.genotype_epoch_hook = hook
    done.write_text("ok\n")
    return runs


def _genotype_json_hook(learner, run_dir, logger):
    from tnas.genotypes import save_genotype

    def hook(epoch, record):
        genotype = learner.model.genotype()
        save_genotype(genotype, os.path.join(run_dir, "genotype.json"))
        return {"genotype": genotype.to_dict()}

    return hook


def run_in_process(main, argv, capsys):
    """``cli_entry(main)`` as ``__main__`` runs it; a CompletedProcess-like result."""
    capsys.readouterr()
    try:
        cli_entry(lambda: main(list(argv)))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), code, captured.out, captured.err)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def evaluate(capsys):
    module = load_script(SCRIPT)
    return lambda *argv: run_in_process(module.main, argv, capsys)


def results_of(directory) -> dict:
    return json.loads((Path(directory) / "results.json").read_text())


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


# --------------------------------------------------------------------------- real subprocesses, started early
@pytest.fixture(scope="module")
def started(runs, tmp_path_factory):
    """Start the real process when the last test asks for it (alongside the in-process tests it would
    only slow them down on two shared cores)."""
    work = tmp_path_factory.mktemp("evaluate_subprocess")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TNAS_PROGRESS="0",
               PYTHON=sys.executable)
    commands = {
        "wrapper": ["bash", WRAPPER, "--checkpoint", str(runs["search"]), "--out", str(work / "ok"), *FAST],
        # 5 episodes in batches of 2 over 2 ranks: batches 0 and 2 on rank 0, batch 1 on rank 1
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
                     "--checkpoint", str(runs["search"]), "--out", str(work / "two_ranks"), "--episodes", "5",
                     "--batch_size", "2", "--update_step_test", "1", "--device", "cpu"],
    }
    processes = {key: subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE) for key, argv in commands.items()}
    yield processes, work
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


# --------------------------------------------------------------------------- the CI and the record
def test_ci95_hand_computed():
    stats = mean_ci95([50.0, 60.0, 70.0])
    assert stats["accuracy_mean"] == pytest.approx(60.0, abs=1e-12)
    assert stats["ci95"] == pytest.approx(1.96 * 10.0 / math.sqrt(3.0), abs=1e-12)  # std(ddof=1) = 10
    assert stats["episodes"] == 3
    assert mean_ci95([42.0])["ci95"] == 0.0


def test_results_record_and_line():
    record = results_record("tnas", "glyphs", 5, 1, [50.0, 60.0, 70.0], {"normal": []}, seed=3)
    assert record["episodes"] == 3 and record["per_episode"] == [50.0, 60.0, 70.0] and record["seed"] == 3
    assert record["ci95"] == pytest.approx(11.316, abs=1e-3)
    assert format_accuracy(record) == "5-way 1-shot glyphs: 60.00 \u00b1 11.32% (3 episodes)"


# --------------------------------------------------------------------------- episodes dealt to ranks
@pytest.mark.parametrize("count,batch_size", [(600, 50), (600, 7), (13, 1), (5, 8)])
def test_ranks_together_score_every_episode_once(count, batch_size):
    from tnas.distributed import DistInfo, shard
    from tnas.evaluate import batch_starts, merge_shares

    starts = batch_starts(count, batch_size)
    for world_size in (1, 2, 3, 7, 8):
        parts = []
        for rank in range(world_size):
            mine = shard(starts, DistInfo(rank=rank, world_size=world_size))
            episodes = np.concatenate([np.arange(s, min(s + batch_size, count)) for s in mine] or [np.zeros(0)])
            parts.append({"starts": mine, "accuracy": 100.0 * episodes / count, "loss": episodes + 0.5})
        merged = merge_shares(parts[::-1], count, batch_size)  # in any order of the ranks
        np.testing.assert_array_equal(merged["accuracy"], 100.0 * np.arange(count) / count)
        np.testing.assert_array_equal(merged["loss"], np.arange(count) + 0.5)
    share = {"starts": starts[:1], "accuracy": np.zeros(min(batch_size, count)), "loss": np.zeros(min(batch_size, count))}
    rest = {"starts": starts[1:], "accuracy": np.zeros(count - len(share["accuracy"])),
            "loss": np.zeros(count - len(share["accuracy"]))}
    with pytest.raises(ValueError, match="scored twice"):
        merge_shares([share, share, rest], count, batch_size)
    if len(starts) > 1:
        with pytest.raises(ValueError, match="no result for episode"):
            merge_shares([rest], count, batch_size)


# --------------------------------------------------------------------------- each task adapted on its own
class DoubleEpisodes:
    """``FixedEpisodes`` in float64 (``batches``/``batch`` as there), for exact comparisons."""

    def __init__(self, episodes):
        self.episodes = episodes

    def __len__(self):
        return len(self.episodes)

    @staticmethod
    def _double(batch):
        return type(batch)(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)

    def batch(self, ids, device="cpu"):
        return self._double(self.episodes.batch(ids, device))

    def batches(self, batch_size, device="cpu"):
        return (self._double(batch) for batch in self.episodes.batches(batch_size, device))


def _tiny_learners():
    """Conv-4 with MAML, a derived network with MAML++ (per-step BN, learned rates, drop-path in training
    mode) and a T-NAS supernet: the three kinds of network the evaluation scores; float64."""
    import torch

    from tnas.genotypes import resolve_genotype
    from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
    from tnas.meta.tnas import TNAS
    from tnas.models.conv4 import Conv4
    from tnas.models.network import Network
    from tnas.models.supernet import Supernet

    torch.manual_seed(0)
    network = Network(resolve_genotype("auto_maml_1shot"), n_way=5, C=4, layers=1, in_channels=1, drop_path_prob=0.3)
    return {"conv4": MAMLPlusPlus(Conv4(n_way=5, filters=4, in_channels=1, image_size=16).double(),
                                  MAMLConfig(inner_lr=0.1)),
            "network": MAMLPlusPlus(network.double(), MAMLConfig(inner_lr=0.1, per_step_bn=True, learn_inner_lr=True)),
            "supernet": TNAS(Supernet(n_way=5, C=4, layers=1, in_channels=1).double())}


def test_batched_evaluation_scores_each_task_as_alone_and_leaves_the_learner_as_it_was(runs):
    """Tasks adapted together (batches of 4 and 13) get exactly the accuracy they get one at a time (no
    batch statistics or fast weights shared across tasks), a share of the batches gets those batches'
    results, and scoring changes nothing a later training reads: parameters, gradients, the
    train/eval mode, torch's random stream."""
    import torch

    from tnas.data import FixedEpisodes, load_split
    from tnas.evaluate import evaluate_episodes

    split = load_split("glyphs", "test", img_size=16, cache_dir=runs["cache_dir"])
    episodes = DoubleEpisodes(FixedEpisodes.generate(split, 5, 1, 3, episodes=13, seed=0))
    for name, learner in _tiny_learners().items():
        learner.model.train()
        before = {key: value.clone() for key, value in learner.model.state_dict().items()}
        random_state = torch.get_rng_state()
        alone, *together = [evaluate_episodes(learner, episodes, size, "cpu", steps=2, desc=None)
                            for size in (1, 4, 13)]
        for result in together:
            np.testing.assert_array_equal(result["accuracy"], alone["accuracy"], err_msg=name)
            np.testing.assert_allclose(result["loss"], alone["loss"], rtol=0, atol=1e-12, err_msg=name)
        share = evaluate_episodes(learner, episodes, 4, "cpu", steps=2, desc=None, starts=[12, 4])
        np.testing.assert_array_equal(share["accuracy"], alone["accuracy"][[12, 4, 5, 6, 7]], err_msg=name)
        nothing = evaluate_episodes(learner, episodes, 4, "cpu", steps=2, desc=None, starts=[])  # a rank left idle
        assert nothing["accuracy"].shape == nothing["loss"].shape == (0,), name
        assert len(set(alone["accuracy"].round(4))) > 1, name  # a real spread of scores, not one constant
        assert learner.model.training, name
        assert torch.equal(torch.get_rng_state(), random_state), name
        assert all(torch.equal(before[key], value) for key, value in learner.model.state_dict().items()), name
        assert all(p.grad is None for p in learner.model.parameters()), name


# --------------------------------------------------------------------------- successful runs
def test_results_fields(runs, evaluate, tmp_path):
    result = ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(tmp_path), *FAST))
    record = results_of(tmp_path)
    for field in RESULT_FIELDS:
        assert field in record, field
    assert record["method"] == "tnas" and record["dataset"] == "glyphs"
    assert (record["n_way"], record["k_shot"], record["q_query"]) == (5, 1, 2)  # the checkpoint's
    assert record["episodes"] == 5 == len(record["per_episode"])
    assert all(0.0 <= value <= 100.0 for value in record["per_episode"])
    assert record["accuracy_mean"] == pytest.approx(np.mean(record["per_episode"]))
    assert record["ci95"] == pytest.approx(mean_ci95(record["per_episode"])["ci95"])
    assert record["checkpoint"] == str(runs["search"] / "best.pt")
    assert record["update_step_test"] == 1 and record["seed"] == 0 and record["wall_time_s"] > 0
    assert record["image_shape"] == [1, 16, 16] and record["split"] == "glyphs/test" and record["world_size"] == 1
    # which checkpoint (its bytes, how far it had trained) and which tasks, checkable from the record alone
    from tnas.data import FixedEpisodes, load_split
    from tnas.checkpoints import load_checkpoint
    from tnas.files import sha256_file

    state = load_checkpoint(runs["search"] / "best.pt")
    assert record["checkpoint_sha256"] == sha256_file(runs["search"] / "best.pt")
    assert (record["checkpoint_epoch"], record["checkpoint_iteration"]) == (state["epoch"], state["iteration"]) == (1, 1)
    split = load_split("glyphs", "test", img_size=16, cache_dir=runs["cache_dir"])
    assert record["episodes_sha256"] == FixedEpisodes.generate(split, 5, 1, 2, episodes=5, seed=0).indices_sha256()
    assert record["episodes_sha256"] != FixedEpisodes.generate(split, 5, 1, 2, episodes=5, seed=1).indices_sha256()
    from tnas.stages.restore import learner_from_checkpoint

    learner, _ = learner_from_checkpoint(runs["search"])
    assert record["genotypes"] == learner.genotype().to_dict()  # the meta-architecture
    lines = result.stdout.splitlines()  # progress lines (no terminal here), the result, the path
    assert lines[-2] == (f"5-way 1-shot glyphs: {record['accuracy_mean']:.2f} \u00b1 {record['ci95']:.2f}% (5 episodes)")
    assert re.search(rf"\] evaluate tasks 5/5 \| acc {record['accuracy_mean']:.2f}% \| \d+\.\d tasks/s \| elapsed ",
                     lines[-3]), lines


def test_the_record_names_the_checkpoint_bytes_that_were_scored_when_a_run_replaces_it_meanwhile(
        runs, tmp_path, monkeypatch):
    """A training still running replaces its best.pt (atomically) whenever validation improves, e.g. while
    the evaluation loads its test data: the SHA-256 in results.json (and in the protocol's decoding cache
    key) must be that of the weights read, not of the file found later, and must agree with their epoch."""
    from tnas.checkpoints import load_checkpoint, save_checkpoint
    from tnas.files import sha256_file
    from tnas.stages import evaluate as evaluate_stage
    from tnas.stages.protocol_decode import decode_cache_key

    run = tmp_path / "run"
    shutil.copytree(runs["search"], run)
    read_sha256 = sha256_file(run / "best.pt")
    newer = load_checkpoint(run / "best.pt")
    newer["epoch"] += 1  # the next epoch's best.pt (other bytes)
    save_checkpoint(newer, tmp_path / "newer.pt")
    load_split = evaluate_stage.load_split

    def load_split_while_the_run_saves(*args, **kwargs):  # the run saves its next best.pt meanwhile
        if (tmp_path / "newer.pt").exists():
            os.replace(tmp_path / "newer.pt", run / "best.pt")
        return load_split(*args, **kwargs)

    monkeypatch.setattr(evaluate_stage, "load_split", load_split_while_the_run_saves)
    settings = evaluate_stage.EvaluateSettings(checkpoint=str(run), device="cpu", episodes=3, batch_size=3,
                                               update_step_test=1, cache_dir=runs["cache_dir"])
    prepared = evaluate_stage.prepare(settings)
    assert sha256_file(run / "best.pt") != read_sha256  # the file did change during the preparation
    assert prepared.provenance["checkpoint_sha256"] == read_sha256
    assert prepared.provenance["checkpoint_epoch"] == newer["epoch"] - 1  # the same checkpoint as the hash
    assert decode_cache_key(prepared, settings)["checkpoint_sha256"] == read_sha256


def test_a_checkpoint_replaced_while_it_is_read_is_named_by_the_bytes_loaded(runs, tmp_path, monkeypatch):
    """The file is read once: the hash is that of the weights loaded, whatever a run saving its best.pt does
    to the file meanwhile."""
    import torch

    from tnas.files import sha256_file
    from tnas.stages import restore

    path = tmp_path / "best.pt"
    shutil.copyfile(runs["search"] / "best.pt", path)
    read_sha256 = sha256_file(path)
    load = torch.load

    def load_while_saving(source, *args, **kwargs):  # the run saves another checkpoint during the read
        shutil.copyfile(runs["train"] / "best.pt", str(path) + ".new")
        os.replace(str(path) + ".new", path)
        return load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load_while_saving)
    state, digest = restore.load_state_and_sha256(str(path))
    assert sha256_file(path) == sha256_file(runs["train"] / "best.pt") != read_sha256  # the file did change
    assert digest == read_sha256 and state["stage"] == "search"  # the hash names the weights loaded


def test_same_seed_same_results_other_seed_other_episodes(runs, evaluate, tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(first), "--episodes_file",
                str(tmp_path / "seed0.npz"), *FAST))
    ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(second), *FAST))
    ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(other), "--seed", "1", "--episodes_file",
                str(tmp_path / "seed1.npz"), *FAST))
    a, b, c = results_of(first), results_of(second), results_of(other)
    assert a["per_episode"] == b["per_episode"] and a["accuracy_mean"] == b["accuracy_mean"]
    assert a["ci95"] == b["ci95"]
    assert c["seed"] == 1
    seed0, seed1 = (np.load(tmp_path / name)["indices"] for name in ("seed0.npz", "seed1.npz"))
    assert seed0.shape == seed1.shape == (5, 5, 3)
    assert not np.array_equal(seed0, seed1)


def test_episodes_file_fixes_the_tasks(runs, evaluate, tmp_path):
    episodes = tmp_path / "episodes.json"
    ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(tmp_path / "a"), "--episodes_file",
                str(episodes), *FAST))
    assert episodes.exists()
    # Another seed, same file: the file's tasks (and so the same accuracies).
    ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(tmp_path / "b"), "--episodes_file",
                str(episodes), "--seed", "7", *FAST))
    assert results_of(tmp_path / "a")["per_episode"] == results_of(tmp_path / "b")["per_episode"]
    assert results_of(tmp_path / "b")["seed"] == 0  # the seed the file's episodes were drawn with
    result = evaluate("--checkpoint", str(runs["search"]), "--out", str(tmp_path / "c"), "--episodes_file",
                      str(episodes), "--episodes", "4", "--batch_size", "3", "--update_step_test", "1")
    assert_one_line_error(result, "--episodes 4", "5 episodes")


def test_default_out_is_the_checkpoint_run_dir(runs, evaluate, tmp_path):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for name in ("best.pt", "config.yaml"):
        shutil.copy(runs["search"] / name, run_dir / name)
    ok(evaluate("--checkpoint", str(run_dir), *FAST))  # data/cache come from the run's config.yaml
    assert results_of(run_dir)["episodes"] == 5


def test_train_checkpoint_scores_the_derived_network(runs, evaluate, tmp_path):
    ok(evaluate("--checkpoint", str(runs["train"]), "--out", str(tmp_path), "--genotype",
                str(runs["search"] / "genotype.json"), *FAST))
    record = results_of(tmp_path)
    ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(tmp_path / "search"), *FAST))
    # the searched supernet and the network trained from scratch: the same test tasks, other checkpoints
    assert record["episodes_sha256"] == results_of(tmp_path / "search")["episodes_sha256"]
    assert record["checkpoint_sha256"] != results_of(tmp_path / "search")["checkpoint_sha256"]
    genotype = json.loads((runs["train"] / "genotype.json").read_text())
    assert record["method"] == "maml" and record["stage"] == "train"
    assert record["genotypes"] == genotype
    assert record["parameters"] > 0 and len(record["per_episode"]) == 5


# --------------------------------------------------------------------------- errors
@pytest.fixture
def sentinel(tmp_path):
    """An output directory with a results.json that a failing run must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"sentinel": true}\n')
    return out


def _untouched(out):
    assert (out / "results.json").read_text() == '{"sentinel": true}\n'
    assert sorted(os.listdir(out)) == ["results.json"]


def test_error_n_way(runs, evaluate, sentinel):
    result = evaluate("--checkpoint", str(runs["search"]), "--n_way", "10", "--out", str(sentinel), *FAST)
    assert_one_line_error(result, "--n_way 10", "5-way")
    _untouched(sentinel)


def test_error_cuda_graph_without_gpu(runs, evaluate, sentinel):
    result = evaluate("--checkpoint", str(runs["search"]), "--cuda_graph", "--device", "cpu", "--out", str(sentinel),
                      *FAST)
    assert_one_line_error(result, "--cuda_graph needs a CUDA device", "--device cpu")
    _untouched(sentinel)
    from tnas.evaluate import evaluate_episodes
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        evaluate_episodes(None, [], 4, "cpu", cuda_graph=True)


def test_error_img_size(runs, evaluate, sentinel):
    result = evaluate("--checkpoint", str(runs["search"]), "--img_size", "32", "--out", str(sentinel), *FAST)
    assert_one_line_error(result, "--img_size 32", "16x16", "[1, 16, 16]")
    _untouched(sentinel)


def test_error_genotype(runs, evaluate, sentinel):
    result = evaluate("--checkpoint", str(runs["train"]), "--genotype", "auto_maml_1shot", "--out", str(sentinel),
                      *FAST)
    assert_one_line_error(result, "--genotype auto_maml_1shot", "avg_pool_3x3 0, avg_pool_3x3 1",
                          str(runs["train"] / "best.pt"))
    actual = json.loads((runs["train"] / "genotype.json").read_text())
    assert f"{actual['normal'][0][0]} {actual['normal'][0][1]}" in result.stderr  # the checkpoint's genotype
    _untouched(sentinel)


def test_error_channels(runs, evaluate, sentinel, tmp_path):
    """A checkpoint of 3-channel images scored on grayscale glyphs."""
    from tnas.checkpoints import load_checkpoint, save_checkpoint
    from tnas.meta.tnas import TNAS
    from tnas.models.supernet import Supernet

    state = load_checkpoint(runs["search"] / "best.pt")
    summary = dict(state["summary"], image_shape=[3, 16, 16], model=dict(state["summary"]["model"], in_channels=3))
    learner = TNAS(Supernet(**summary["model"]))
    path = tmp_path / "rgb.pt"
    save_checkpoint({"stage": "search", "summary": summary, "learner": learner.state_dict()}, path)
    result = evaluate("--checkpoint", str(path), "--out", str(sentinel), "--cache_dir", runs["cache_dir"], *FAST)
    assert_one_line_error(result, "1-channel", "3-channel", "[3, 16, 16]")
    _untouched(sentinel)


def test_error_missing_and_corrupt_checkpoints(runs, evaluate, sentinel, tmp_path):
    missing = tmp_path / "nothing.pt"
    assert_one_line_error(evaluate("--checkpoint", str(missing), "--out", str(sentinel), *FAST),
                          "checkpoint not found", str(missing))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint\x00\x01")
    assert_one_line_error(evaluate("--checkpoint", str(corrupt), "--out", str(sentinel), *FAST),
                          "cannot read checkpoint", str(corrupt))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((runs["search"] / "best.pt").read_bytes()[:5000])
    assert_one_line_error(evaluate("--checkpoint", str(truncated), "--out", str(sentinel), *FAST), str(truncated))
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert_one_line_error(evaluate("--checkpoint", str(empty_run), "--out", str(sentinel), *FAST),
                          "no best.pt", str(empty_run))
    assert_one_line_error(evaluate("--out", str(sentinel), *FAST), "--checkpoint")
    _untouched(sentinel)


@pytest.mark.parametrize("entry, value, fragment", [
    ("model", "oops", "model 'oops', not a dict"),
    ("n_way", "five", "n_way 'five', not an integer"),
    ("image_shape", 5, "image_shape 5, not [channels, height, width]"),
])
def test_error_checkpoint_summary_entry_of_the_wrong_type(evaluate, sentinel, tmp_path, entry, value, fragment):
    """A checkpoint someone sent whose summary has an entry of the wrong type (crafted, or from another
    tool): one line naming the file and the entry, not a traceback from the flag checks that read it."""
    from tnas.checkpoints import save_checkpoint

    summary = {"method": "tnas", "dataset": "glyphs", "n_way": 3, "k_shot": 1, "q_query": 2,
               "image_shape": [3, 16, 16], "model": {"C": 4}, "learner": {}}
    summary[entry] = value
    path = tmp_path / "sent.pt"
    save_checkpoint({"stage": "search", "summary": summary, "learner": {}}, path)
    assert_one_line_error(evaluate("--checkpoint", str(path), "--out", str(sentinel), *FAST), str(path), fragment)
    _untouched(sentinel)


# --------------------------------------------------------------------------- the real processes (collected last)
def _collect(process):
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_subprocess_wrapper_writes_results(started):
    processes, work = started
    result = ok(_collect(processes["wrapper"]))
    record = results_of(work / "ok")
    assert f"\n5-way 1-shot glyphs: {record['accuracy_mean']:.2f} \u00b1 " in result.stdout
    assert record["episodes"] == 5 and len(record["per_episode"]) == 5


def test_torchrun_ranks_share_the_batches_and_rank_0_writes_one_process_record(started, runs, evaluate, tmp_path):
    processes, work = started
    result = ok(_collect(processes["torchrun"]))
    ok(evaluate("--checkpoint", str(runs["search"]), "--out", str(tmp_path), "--episodes", "5", "--batch_size", "2",
                "--update_step_test", "1", "--device", "cpu"))
    two, one = results_of(work / "two_ranks"), results_of(tmp_path)
    assert two["world_size"] == 2 and two["episodes"] == 5 and len(two["per_episode"]) == 5
    assert two["per_episode"] == one["per_episode"] and two["episodes_sha256"] == one["episodes_sha256"]
    assert (two["accuracy_mean"], two["ci95"]) == (one["accuracy_mean"], one["ci95"])
    assert result.stdout.count("5-way 1-shot glyphs:") == 1  # rank 0 alone prints (and writes) the result


def test_ranks_wait_for_rank_0s_preparation_longer_than_torchs_default(monkeypatch):
    """Under torchrun the evaluate and decode stages prepare on rank 0 first (it may build a large dataset's
    cache) while the others wait in a barrier: torch's default 30-minute collective timeout would kill them."""
    from datetime import timedelta
    from types import SimpleNamespace

    from tnas import distributed
    from tnas.stages import evaluate as evaluate_stage

    joined = {}

    def join(device, timeout=None, share_gpus=False):
        joined.update(timeout=timeout, share_gpus=share_gpus)
        raise RuntimeError("joined")

    monkeypatch.setattr(distributed, "init_distributed", join)
    with pytest.raises(RuntimeError, match="joined"):
        with evaluate_stage.prepared_on_ranks(SimpleNamespace(device="cpu")):
            pass
    assert joined["share_gpus"] and joined["timeout"] >= timedelta(hours=6)
