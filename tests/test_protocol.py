"""The T-NAS protocol (scripts/evaluate_tnas.py, tnas.stages.protocol) end to end on tiny glyphs, on CPU.

A tiny T-NAS search (glyphs at 16x16, 3-way, C 4, one cell, one epoch of 2 tasks) runs once
per session in process; the protocol then decodes 6 test episodes (one adaptation step),
trains each distinct genotype from scratch for one epoch of 4 tasks and scores each episode
with its own genotype's network. The same protocol under torchrun with 2 gloo ranks must
give the same per-episode accuracies.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tnas.config import parse_args
from tnas.errors import TnasError, cli_entry
from tnas.evaluate import mean_ci95
from tnas.genotypes import group_genotypes
from tnas.stages import protocol
from tnas.stages.cost import cost_record
from script_loader import load_script
from run_locks import held_run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "evaluate_tnas.py")
EPISODES = 6
# Decoding and scoring of 6 test tasks, one adaptation step; one from-scratch epoch of 4 tasks per genotype.
FAST = ["--episodes", str(EPISODES), "--batch_size", "4", "--update_step_test", "1", "--device", "cpu",
        "--epochs", "1", "--tasks_per_epoch", "4", "--tasks_per_batch", "2", "--inner_steps", "1",
        "--inner_lr", "0.1", "--val_episodes", "2", "--val_batch_size", "2", "--log_every", "0"]
RESULT_FIELDS = ("method", "dataset", "n_way", "k_shot", "episodes", "accuracy_mean", "ci95", "per_episode",
                 "genotype_id", "genotypes", "distinct_genotypes", "budget", "schedule", "checkpoint", "seed", "cost")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cache_dir(base: Path) -> str:
    return os.environ.get("TNAS_CACHE_DIR") or str(base / "glyph-cache")


@pytest.fixture(scope="session")
def search_run(tmp_path_factory):
    """A tiny 3-way T-NAS search checkpoint (the real search stage, minus its diagrams)."""
    from tnas.genotypes import save_genotype
    from tnas.stages import search

    base = tmp_path_factory.getbasetemp()
    out = base / "protocol_search"
    if (out / "best.pt").exists():
        return out

    def genotype_json_hook(learner, run_dir, logger):
        def hook(epoch, record):
            save_genotype(learner.model.genotype(), os.path.join(run_dir, "genotype.json"))
            return {}
        return hook

    argv = ["--epochs", "1", "--tasks_per_epoch", "2", "--tasks_per_batch", "2", "--val_episodes", "2",
            "--val_batch_size", "2", "--n_way", "3", "--q_query", "2", "--C", "4", "--layers", "1", "--img_size",
            "16", "--inner_steps", "1", "--inner_steps_test", "1", "--device", "cpu", "--log_every", "0",
            "--cache_dir", _cache_dir(base), "--out", str(out)]
    hook, search.genotype_epoch_hook = search.genotype_epoch_hook, genotype_json_hook
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            search.run(search.settings_from_args(parse_args(search.build_parser(), argv)))
    finally:
        search.genotype_epoch_hook = hook
    return out


def run_protocol(*argv):
    """``protocol.run`` in process: (record, printed text)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        record = protocol.run(protocol.settings_from_args(parse_args(protocol.build_parser(), list(argv))))
    return record, sink.getvalue()


@pytest.fixture(scope="module")
def single(search_run, tmp_path_factory):
    """The protocol in one process: its output directory, record and printed text."""
    out = tmp_path_factory.mktemp("protocol") / "single"
    record, printed = run_protocol("--checkpoint", str(search_run), "--out", str(out), *FAST)
    return {"out": out, "record": record, "printed": printed}


def read_json(path):
    return json.loads(Path(path).read_text())


def run_script(argv, capsys):
    """``cli_entry(main)`` of scripts/evaluate_tnas.py as ``__main__`` runs it: (exit code, stdout, stderr)."""
    module = load_script(SCRIPT)
    capsys.readouterr()
    try:
        cli_entry(lambda: module.main(list(argv)))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --------------------------------------------------------------------------- pure functions
def test_group_genotypes_ids_by_first_occurrence():
    a, b, c = ({"normal": [["skip_connect", 0]], "reduce": [["avg_pool_3x3", i]]} for i in range(3))
    b_reordered = {"reduce": b["reduce"], "normal": b["normal"]}  # same genotype, other key order
    ids, by_id, episodes = group_genotypes([b, a, b_reordered, c, a])
    assert ids == ["g0000", "g0001", "g0000", "g0002", "g0001"]
    assert by_id == {"g0000": b, "g0001": a, "g0002": c}
    assert episodes == {"g0000": [0, 2], "g0001": [1, 4], "g0002": [3]}


def from_scratch(args, search_summary):
    """The protocol's from-scratch settings as one flat namespace of train-stage flags."""
    return SimpleNamespace(**protocol.train_settings(args, search_summary, torch.device("cpu")).to_flags())


def _protocol_args(*argv):
    args = protocol.settings_from_args(parse_args(protocol.build_parser(), ["--checkpoint", "x", *argv]))
    args.dataset, args.n_way, args.k_shot, args.q_query, args.img_size = "glyphs", 3, 1, 2, 16
    return args


def test_cost_counts_gpus_shared_by_processes_once():
    def part(rank, gpu):
        return {"rank": rank, "seconds": {"decode": 10.0, "train": 3600.0, "evaluate": 20.0}, "device": "H100",
                "device_type": "cuda", "device_id": f"node:cuda:{gpu}", "runs": {}}

    runs = {"g0000": {"rank": 0, "status": "trained", "wall_time_s": 3600.0, "total_train_wall_time_s": 3600.0}}
    schedule = {"epochs": 1, "tasks_per_epoch": 1000}
    parts = [part(rank, rank % 2) for rank in range(8)]  # 8 processes on 2 GPUs
    cost = cost_record(parts, runs, 7200.0, schedule, decode_cached=False)
    assert cost["world_size"] == 8 and cost["devices"] == 2 and cost["processes_per_device"] == 4
    assert cost["allocated_device_hours"] == pytest.approx(2 * 7200.0 / 3600)
    assert cost["stages"]["train"]["device_hours"] == pytest.approx(8.0)  # process-hours
    assert cost["extrapolation"]["seconds_per_task"] == pytest.approx(3.6)


def test_from_scratch_settings_budget_config_and_flags(tmp_path):
    search_summary = {"model": {"C": 4, "layers": 1}}
    train = lambda args: from_scratch(args, search_summary)
    plain = train(_protocol_args())
    assert (plain.epochs, plain.tasks_per_epoch) == (15, 15000)  # the paper's schedule by default
    assert (plain.method, plain.C, plain.layers, plain.n_way, plain.inner_steps_test) == ("maml", 4, 1, 3, 10)
    # the from-scratch test steps: tied to --update_step_test unless --inner_steps_test is given
    assert train(_protocol_args("--update_step_test", "3")).inner_steps_test == 3
    own = _protocol_args("--inner_steps_test", "5")
    assert (own.update_step_test, train(own).inner_steps_test) == (10, 5)
    assert protocol.schedule_record(protocol.train_settings(own, search_summary, torch.device("cpu")),
                                    own)["inner_steps_test"] == 5
    config = tmp_path / "scratch.yaml"
    config.write_text("epochs: 7\ntasks_per_epoch: 100\nC: 8\nmethod: maml\ngenotype: auto_maml_1shot\n"
                      "n_way: 5\ninner_lr: 0.2\n")
    from_config = train(_protocol_args("--train_config", str(config), "--method", "tnas++"))
    assert (from_config.epochs, from_config.tasks_per_epoch, from_config.C, from_config.layers) == (7, 100, 8, 1)
    assert from_config.method == "maml++" and from_config.n_way == 3 and from_config.inner_lr == 0.2
    budget = train(_protocol_args("--train_config", str(config), "--budget"))
    assert (budget.epochs, budget.tasks_per_epoch) == (2, 2000)  # --budget wins over the config
    plusplus = tmp_path / "plusplus.yaml"  # MAML++'s epoch-counted schedules keep their share of a budget run
    plusplus.write_text("epochs: 15\nmethod: maml++\nmsl_epochs: 10\nfirst_order_epochs: 5\n")
    short = train(_protocol_args("--train_config", str(plusplus), "--budget", "--method", "tnas++"))
    assert (short.epochs, short.msl_epochs, short.first_order_epochs) == (2, 1, 1)
    full = train(_protocol_args("--train_config", str(plusplus), "--method", "tnas++"))
    assert (full.epochs, full.msl_epochs, full.first_order_epochs) == (15, 10, 5)
    kept = train(_protocol_args("--train_config", str(plusplus), "--budget", "--method", "tnas++",
                                "--train_args", "--msl_epochs 2"))
    assert (kept.msl_epochs, kept.first_order_epochs) == (2, 1)
    flags = train(_protocol_args("--budget", "--epochs", "3", "--train_args", "--msl_epochs 4 --second_order",
                                 "--train_seed", "9"))
    assert (flags.epochs, flags.tasks_per_epoch, flags.msl_epochs, flags.second_order, flags.seed) == \
        (3, 2000, 4, True, 9)
    for fixed in ("--inner_steps_test 3", "--n_way=5", "--seed 4", "--out elsewhere"):  # would be overridden
        flag = fixed.split()[0].split("=")[0]
        with pytest.raises(TnasError, match=f"--train_args {flag}: the protocol sets {flag[2:]} for every"):
            train(_protocol_args("--train_args", f"--epochs 2 {fixed}"))
    with pytest.raises(TnasError, match="from-scratch settings: unknown command-line argument"):
        train(_protocol_args("--train_args", "--no_such_flag 1"))
    with pytest.raises(TnasError, match="--train_config missing.yaml: file not found"):
        train(_protocol_args("--train_config", "missing.yaml"))


@pytest.mark.parametrize("name", ["protocol_miniimagenet_5w1s", "protocol_miniimagenet_5w5s",
                                  "protocol_plusplus_miniimagenet_5w1s", "protocol_plusplus_miniimagenet_5w5s",
                                  "demo_protocol"])
def test_protocol_configs(name):
    args = protocol.settings_from_args(parse_args(
        protocol.build_parser(), ["--config", os.path.join(REPO, "configs", f"{name}.yaml"), "--checkpoint", "x"]))
    args.dataset, args.n_way, args.q_query, args.img_size = "miniimagenet", 5, 15, 84
    args.k_shot = 5 if name.endswith("5s") else 1
    train = from_scratch(args, {"model": {"C": 16, "layers": 2}})
    assert train.method == protocol.METHODS[args.method] and train.k_shot == args.k_shot
    if name == "demo_protocol":
        assert args.method == "tnas" and (train.epochs, train.tasks_per_epoch, train.C) == (1, 200, 8)
    else:
        assert (args.episodes, args.update_step_test, train.inner_steps_test) == (600, 10, 10)
        assert (train.epochs, train.tasks_per_epoch, train.inner_lr, train.C, train.layers) == (15, 15000, 0.01, 16, 2)
        assert args.method == ("tnas++" if "plusplus" in name else "tnas")
        assert train.genotype == ("auto_maml_5shot" if args.k_shot == 5 else "auto_maml_1shot")  # replaced per run


# --------------------------------------------------------------------------- the protocol end to end
def test_results_fields_and_genotypes_match_the_decode_stage(single, search_run, tmp_path):
    record, out = single["record"], single["out"]
    assert record == read_json(out / "results.json")
    for name in RESULT_FIELDS:
        assert name in record, name
    assert record["method"] == "tnas" and record["dataset"] == "glyphs"
    assert (record["n_way"], record["k_shot"], record["episodes"]) == (3, 1, EPISODES)
    assert len(record["per_episode"]) == len(record["genotype_id"]) == EPISODES
    assert all(0.0 <= value <= 100.0 for value in record["per_episode"])
    stats = mean_ci95(record["per_episode"])
    assert record["accuracy_mean"] == pytest.approx(stats["accuracy_mean"])
    assert record["ci95"] == pytest.approx(stats["ci95"])
    assert record["budget"] is False and record["schedule"]["epochs"] == 1
    assert record["schedule"]["train_method"] == "maml" and record["seed"] == 0
    assert record["checkpoint"] == str(search_run / "best.pt")
    # no --inner_steps_test: the from-scratch networks validate and score with --update_step_test's 1 step
    assert record["update_step_test"] == record["inner_steps_test"] == record["schedule"]["inner_steps_test"] == 1
    assert f"T-NAS 3-way 1-shot glyphs: {record['accuracy_mean']:.2f} \u00b1 {record['ci95']:.2f}%" in single["printed"]

    # genotype ids: g0000, g0001, ... by first occurrence, one per distinct genotype
    ids = record["genotype_id"]
    first_seen = list(dict.fromkeys(ids))
    assert first_seen == [f"g{i:04d}" for i in range(len(first_seen))] == sorted(record["genotypes"])
    assert record["distinct_genotypes"] == len(first_seen) >= 2

    # ... and the same per-episode genotypes as the decode stage on the same episodes
    from tnas.stages import decode

    jsonl = tmp_path / "decoded.jsonl"
    with contextlib.redirect_stdout(io.StringIO()):
        decode.run(decode.settings_from_args(parse_args(decode.build_parser(), [
            "--checkpoint", str(search_run), "--out", str(jsonl), "--episodes", str(EPISODES),
            "--update_step_test", "1", "--device", "cpu"])))
    decoded = [json.loads(line)["genotype"] for line in jsonl.read_text().splitlines()]
    assert [record["genotypes"][gid] for gid in ids] == decoded
    cached = [json.loads(line) for line in (out / "episode_genotypes.jsonl").read_text().splitlines()]
    assert [line["genotype"] for line in cached] == decoded and [line["genotype_id"] for line in cached] == ids

    # one from-scratch run per distinct genotype, first-order MAML, its genotype.json beside it
    for gid, genotype in record["genotypes"].items():
        run_dir = out / "genotypes" / gid
        assert read_json(run_dir / "genotype.json") == genotype
        summary = read_json(run_dir / "train.json")
        assert summary["method"] == "maml" and summary["learner"]["first_order"] is True
        assert summary["epochs_done"] == 1 and (run_dir / "best.pt").exists()
        assert record["per_genotype"][gid]["count"] == ids.count(gid)

    cost = record["cost"]
    assert cost["world_size"] == 1 and cost["device"].startswith("cpu") and cost["wall_time_s"] > 0
    assert cost["devices"] == 1 and cost["allocated_device_hours"] == pytest.approx(cost["wall_time_s"] / 3600)
    for stage in ("decode", "train", "evaluate"):
        assert cost["stages"][stage]["wall_time_s"] >= 0 and cost["stages"][stage]["device_hours"] >= 0
    per_genotype = cost["stages"]["train"]["per_genotype"]
    assert sorted(per_genotype) == first_seen and all(g["status"] == "trained" for g in per_genotype.values())
    assert cost["stages"]["train"]["trained"] == len(first_seen) and cost["stages"]["decode"]["cached"] is False
    assert cost["extrapolation"]["paper_schedule_train_device_hours"] > 0


def test_each_episode_is_scored_by_its_own_genotype(single, tmp_path):
    """The evaluate stage on each genotype's best.pt gives the protocol's accuracies on that genotype's
    episodes: every episode checked, each against its own genotype's network."""
    from tnas.stages import evaluate

    record = single["record"]
    checked = []
    for gid in sorted(set(record["genotype_id"])):
        with contextlib.redirect_stdout(io.StringIO()):
            scored = evaluate.run(evaluate.settings_from_args(parse_args(evaluate.build_parser(), [
                "--checkpoint", str(single["out"] / "genotypes" / gid), "--out", str(tmp_path / gid), "--episodes",
                str(EPISODES), "--update_step_test", "1", "--device", "cpu"])))
        for episode, owner in enumerate(record["genotype_id"]):
            if owner == gid:
                assert scored["per_episode"][episode] == record["per_episode"][episode], (gid, episode)
                checked.append(episode)
    assert sorted(checked) == list(range(EPISODES)) == list(range(len(record["per_episode"])))


def test_rerun_skips_training_and_gives_identical_results(single, search_run):
    out = single["out"]
    ids = sorted(single["record"]["genotypes"])
    stamps = {gid: os.stat(out / "genotypes" / gid / "best.pt").st_mtime_ns for gid in ids}
    record, printed = run_protocol("--checkpoint", str(search_run), "--out", str(out), *FAST)
    for gid in ids:
        assert f"genotype {gid} (" in printed and "already trained" in printed
        assert os.stat(out / "genotypes" / gid / "best.pt").st_mtime_ns == stamps[gid]
    assert f"skipped {len(ids)} already trained genotype(s)" in printed
    assert "train (maml" not in printed  # the train stage never started
    assert record["skipped_genotypes"] == ids
    assert record["cost"]["stages"]["train"]["skipped"] == len(ids)
    assert record["cost"]["stages"]["decode"]["cached"] is True
    for key in ("per_episode", "accuracy_mean", "ci95", "genotype_id", "genotypes"):
        assert record[key] == single["record"][key], key


def test_unfinished_genotype_runs_are_resumed(single, search_run, tmp_path):
    """Runs with fewer epochs done than asked for continue from last.pt (--resume), as an interrupted one does."""
    out = tmp_path / "copy"
    shutil.copytree(single["out"], out)
    ids = sorted(single["record"]["genotypes"])
    before = (out / "results.json").read_bytes()
    record, printed = run_protocol("--checkpoint", str(search_run), "--out", str(out), "--train_only",
                                   *FAST, "--epochs", "2")
    assert "resuming the interrupted from-scratch maml run" in printed and "resumed from" in printed
    assert (out / "results.json").read_bytes() == before  # --train_only scores nothing
    assert "per_episode" not in record and read_json(out / "genotypes.json") == record
    assert record["cost"]["stages"]["train"]["resumed"] == len(ids)
    for gid in ids:
        summary = read_json(out / "genotypes" / gid / "train.json")
        assert summary["epochs_done"] == 2 and summary["history"][1]["iteration"] == 4  # continued, not restarted
    # other from-scratch settings than the existing runs': a one-line error, nothing retrained
    with pytest.raises(TnasError, match=r"other from-scratch settings \(inner_lr: 0.1 -> 0.3\)"):
        run_protocol("--checkpoint", str(search_run), "--out", str(out), *FAST, "--epochs", "2", "--inner_lr", "0.3")


def test_inner_steps_test_reaches_the_trainings_and_the_scoring(search_run, tmp_path, monkeypatch):
    """--inner_steps_test 2 beside --update_step_test 1: genotypes decoded after 1 step, every from-scratch run
    validated (best.pt chosen) and every test episode scored after 2, in genotype batches of 2 and one genotype
    at a time; results.json says so. A rerun with other test steps is refused as any other changed
    from-scratch setting is."""
    from tnas.stages import protocol_score

    out, steps = tmp_path / "steps", []
    for name in ("score_learner", "evaluate_together"):  # genotypes scored alone, or together (equal counts)
        def spy(learner, ids, episodes, batch_size, count, *rest, scorer=getattr(protocol_score, name)):
            steps.append(count)
            return scorer(learner, ids, episodes, batch_size, count, *rest)
        monkeypatch.setattr(protocol_score, name, spy)
    argv = ["--checkpoint", str(search_run), "--out", str(out), *FAST, "--episodes", "2"]
    record, _ = run_protocol(*argv, "--inner_steps_test", "2", "--genotypes_per_batch", "2")
    assert steps and set(steps) == {2}
    assert (record["update_step_test"], record["inner_steps_test"], record["schedule"]["inner_steps_test"]) == (1, 2, 2)
    assert read_json(out / "decode_summary.json")["update_step_test"] == 1
    for gid in record["genotypes"]:
        run_dir = out / "genotypes" / gid
        assert "inner_steps_test: 2" in (run_dir / "config.yaml").read_text().splitlines()
        assert read_json(run_dir / "train.json")["learner"]["inner_steps_test"] == 2
    # the same steps again, one genotype at a time: the runs are reused and each scored alone, as in the batch
    steps.clear()
    again, _ = run_protocol(*argv, "--inner_steps_test", "2", "--genotypes_per_batch", "1")
    assert steps and set(steps) == {2} and again["skipped_genotypes"] == sorted(record["genotypes"])
    assert again["per_episode"] == record["per_episode"] and again["inner_steps_test"] == 2
    # dropping the flag on resume means 1 test step again: the trained runs are refused, not reused
    with pytest.raises(TnasError, match=r"other from-scratch settings \(inner_steps_test: 2 -> 1\)"):
        run_protocol(*argv)
    assert read_json(out / "results.json") == again


def test_genotype_batches_give_the_same_accuracies(single, search_run, tmp_path):
    """--genotypes_per_batch 4 trains the distinct genotypes as one batch (same seeds, same task streams):
    the same per-episode accuracies as one genotype at a time (float32: rounding differences only)."""
    out = tmp_path / "batched"
    record, printed = run_protocol("--checkpoint", str(search_run), "--out", str(out), *FAST,
                                   "--genotypes_per_batch", "4")
    one = single["record"]
    assert record["genotype_id"] == one["genotype_id"] and record["genotypes"] == one["genotypes"]
    assert record["per_episode"] == pytest.approx(one["per_episode"], abs=1e-4)
    assert record["accuracy_mean"] == pytest.approx(one["accuracy_mean"], abs=1e-4)
    ids = sorted(one["genotypes"])
    assert f"[batch 1/{-(-len(ids) // 4)} on rank 0] genotypes {', '.join(ids[:4])}" in printed
    for gid in ids[:4]:
        log = (out / "genotypes" / gid / "log.txt").read_text()
        assert f"trained in a batch of {min(4, len(ids))} genotypes" in log
        assert read_json(out / "genotypes" / gid / "train.json")["epochs_done"] == 1
    # a rerun with another batch size changes no result: every run is skipped
    again, _ = run_protocol("--checkpoint", str(search_run), "--out", str(out), *FAST, "--genotypes_per_batch", "2")
    assert again["skipped_genotypes"] == ids and again["per_episode"] == record["per_episode"]


def test_trained_genotypes_scored_as_a_batch_score_as_alone(single, search_run, monkeypatch):
    """Real best.pt files and fixed episodes: the distinct genotypes, given equally many test episodes
    (so all in one batch), score each episode exactly as their networks score it alone."""
    from tnas.stages import evaluate as evaluate_stage
    from tnas.stages import protocol_score
    from tnas.stages.protocol_train import GenotypeRun

    record, out = single["record"], single["out"]
    args = protocol.settings_from_args(parse_args(protocol.build_parser(), ["--checkpoint", str(search_run), *FAST]))
    with contextlib.redirect_stdout(io.StringIO()):
        episodes = evaluate_stage.prepare(args, check_summary=lambda summary, checkpoint: None).episodes
    ids = sorted(record["genotypes"])
    each = EPISODES // len(ids)
    runs = [GenotypeRun(gid, record["genotypes"][gid], list(range(j * each, (j + 1) * each)),
                        str(out / "genotypes" / gid)) for j, gid in enumerate(ids)]
    sizes, together = [], protocol_score.evaluate_together
    monkeypatch.setattr(protocol_score, "evaluate_together",
                        lambda learner, *a, **k: sizes.append(learner.genotype_count) or together(learner, *a, **k))
    lines = []
    batched = protocol_score.score_batch(runs, episodes, args, torch.device("cpu"), log=lines.append)
    assert sizes == [len(ids)] and lines == []
    alone = {}
    for run in runs:
        alone.update(protocol_score.score_genotype(run, episodes, args, torch.device("cpu")))
    assert batched == alone and len(batched) == each * len(ids)


def test_two_gloo_ranks_give_the_same_accuracies(single, search_run, tmp_path):
    out = tmp_path / "two_ranks"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TNAS_PROGRESS="0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
               "--checkpoint", str(search_run), "--out", str(out), *FAST]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record, one = read_json(out / "results.json"), single["record"]
    assert record["world_size"] == 2 and record["cost"]["world_size"] == 2
    assert record["genotype_id"] == one["genotype_id"] and record["genotypes"] == one["genotypes"]
    assert record["per_episode"] == pytest.approx(one["per_episode"], abs=1e-6)
    assert record["accuracy_mean"] == pytest.approx(one["accuracy_mean"], abs=1e-6)
    ranks = {gid: run["rank"] for gid, run in record["cost"]["stages"]["train"]["per_genotype"].items()}
    assert set(ranks.values()) == {0, 1}  # both ranks trained genotypes: round robin by id
    assert all(ranks[gid] == int(gid[1:]) % 2 for gid in ranks)
    assert (out / "rank1" / "log.txt").exists() and record["cost"]["stages"]["decode"]["device_hours"] > 0
    assert result.stdout.count("T-NAS 3-way 1-shot glyphs:") == 1  # rank 0 prints the result


def test_two_ranks_with_one_genotype_and_a_new_episodes_file(search_run, tmp_path):
    """No alpha adaptation at decode time: every task keeps the meta-architecture, so rank 1 trains nothing;
    rank 0 writes the episodes file the other rank then reads."""
    out, episodes_file = tmp_path / "one_genotype", tmp_path / "episodes.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TNAS_PROGRESS="0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
               "--checkpoint", str(search_run), "--out", str(out), "--decode_lr_alphas", "0", "--episodes_file",
               str(episodes_file), *FAST]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = read_json(out / "results.json")
    from tnas.stages.restore import learner_from_checkpoint

    learner, _ = learner_from_checkpoint(search_run)
    assert record["distinct_genotypes"] == 1 and record["genotypes"] == {"g0000": learner.genotype().to_dict()}
    assert record["genotype_id"] == ["g0000"] * EPISODES and len(record["per_episode"]) == EPISODES
    assert record["decode_inner_lrs"]["alphas"] == 0.0 and record["episodes_file"] == str(episodes_file)
    assert record["cost"]["stages"]["train"]["per_genotype"]["g0000"]["rank"] == 0
    assert episodes_file.exists() and not (out / "genotypes" / "g0001").exists()


# --------------------------------------------------------------------------- bad input
def test_a_train_checkpoint_is_a_one_line_error(single, search_run, capsys, tmp_path):
    train_checkpoint = single["out"] / "genotypes" / "g0000"
    code, _, err = run_script(["--checkpoint", str(train_checkpoint), "--out", str(tmp_path / "x"), *FAST], capsys)
    assert_one_line_error(code, err, "T-NAS search checkpoint", "'train' checkpoint of method 'maml'")
    assert not (tmp_path / "x").exists()
    code, _, err = run_script(["--checkpoint", str(tmp_path / "none.pt"), *FAST], capsys)
    assert_one_line_error(code, err, "checkpoint not found")
    code, _, err = run_script([*FAST], capsys)
    assert_one_line_error(code, err, "--checkpoint")
    # a from-scratch setting the training would refuse, refused before decoding and writing anything
    code, _, err = run_script(["--checkpoint", str(search_run), "--out", str(tmp_path / "y"), *FAST,
                               "--train_args=--cuda_graph"], capsys)
    assert_one_line_error(code, err, "from-scratch settings: --cuda_graph needs a CUDA device")
    assert not (tmp_path / "y").exists()
    code, _, err = run_script(["--checkpoint", str(search_run), "--out", str(tmp_path / "z"), *FAST,
                               "--genotypes_per_batch", "0"], capsys)
    assert_one_line_error(code, err, "--genotypes_per_batch must be >= 1, got 0")
    assert not (tmp_path / "z").exists()
    code, _, err = run_script(["--checkpoint", str(search_run), "--out", str(tmp_path / "s"), *FAST,
                               "--inner_steps_test", "0"], capsys)
    assert_one_line_error(code, err, "--inner_steps_test must be positive, got 0")
    assert not (tmp_path / "s").exists()


def test_a_second_protocol_into_a_busy_out_is_refused_and_writes_nothing(search_run, capsys, tmp_path):
    """One protocol at a time owns --out: a second one would rewrite the first's config.yaml and decoding cache."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.yaml").write_text("the first run's settings\n")
    with held_run_lock(busy):
        code, _, err = run_script(["--checkpoint", str(search_run), "--out", str(busy), *FAST], capsys)
        assert_one_line_error(code, err, f"--out {busy} is in use by another run")
    assert sorted(os.listdir(busy)) == ["config.yaml", "run.lock"]
    assert (busy / "config.yaml").read_text() == "the first run's settings\n"


def test_wrappers_without_a_demo_search_say_what_to_run(tmp_path):
    env = dict(os.environ, TNAS_DEMO_SEARCH=str(tmp_path / "no_demo"))
    for wrapper in ("evaluate_tnas.sh", "train_tnas_from_scratch.sh"):
        result = subprocess.run(["bash", os.path.join(REPO, wrapper)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "bash train_tnas.sh" in lines[0] and str(tmp_path / "no_demo") in lines[0]
