"""The from-scratch training stage (scripts/train_from_scratch.py, tnas.stages.train) end to end on tiny glyphs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tnas.checkpoints import load_checkpoint
from tnas.stages import restore, train
from script_loader import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "train_from_scratch.py")
TINY = ["--dataset", "glyphs", "--img_size", "16", "--C", "4", "--layers", "1", "--n_way", "3", "--q_query", "2",
        "--tasks_per_batch", "2", "--tasks_per_epoch", "4", "--val_episodes", "4", "--val_batch_size", "4",
        "--inner_steps", "2", "--inner_steps_test", "3", "--inner_lr", "0.1", "--log_every", "1",
        "--checkpoint_every", "1", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The session's shared cache when TNAS_CACHE_DIR is set, else a fresh one (glyphs render once)."""
    return os.environ.get("TNAS_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))


def run_in_process(argv, monkeypatch, capsys):
    """The script's main through cli_entry, as the command line would run it: (exit code, stderr)."""
    from tnas.errors import cli_entry

    script = load_script(SCRIPT)
    monkeypatch.setattr(sys, "argv", [SCRIPT] + list(argv))
    code = 0
    try:
        cli_entry(script.main)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def start(argv, cache):
    env = dict(os.environ, TNAS_CACHE_DIR=cache, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, SCRIPT] + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The command-line runs of this file, started together at once (they overlap their start-up)."""
    from tnas.data import load_split

    for split in ("train", "val"):  # render the glyphs once, before the runs share the cache
        load_split("glyphs", split, img_size=16, cache_dir=cache_dir)
    base = tmp_path_factory.mktemp("runs")
    outs = {"maml": str(base / "maml"), "maml++": str(base / "mamlpp")}
    processes = {
        "maml": start(TINY + ["--genotype", "auto_maml_1shot", "--epochs", "1", "--out", outs["maml"],
                              "--cache_dir", cache_dir], cache_dir),
        "maml++": start(TINY + ["--genotype", "auto_maml_5shot", "--method", "maml++", "--epochs", "2",
                                "--msl_epochs", "1", "--first_order_epochs", "1", "--out", outs["maml++"],
                                "--cache_dir", cache_dir], cache_dir),
    }
    yield {"out": outs, "process": processes}
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def check_run_dir(out, epochs):
    for name in ("train.json", "last.pt", "best.pt", "config.yaml", "log.txt", "genotype.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "train.json")) as handle:
        summary = json.load(handle)
    assert summary["stage"] == "train" and summary["epochs_done"] == epochs and len(summary["history"]) == epochs
    for key in ("method", "dataset", "n_way", "k_shot", "q_query", "image_shape", "model", "learner", "parameters",
                "macs"):
        assert key in summary, key
    assert summary["image_shape"] == [1, 16, 16] and summary["n_way"] == 3
    assert set(summary["model"]) >= {"n_way", "C", "layers", "in_channels", "stem_multiplier", "genotype"}
    from tnas.models.factory import network_from_config

    network = network_from_config(summary["model"])
    assert summary["parameters"] == sum(p.numel() for p in network.parameters()) and summary["macs"] > 0
    accuracies = [record["val_accuracy"] for record in summary["history"]]
    assert all(0.0 <= value <= 100.0 for value in accuracies)
    # best: the first epoch of the highest validation accuracy, and best.pt holds that epoch
    assert summary["best_epoch"] == 1 + accuracies.index(max(accuracies))
    assert summary["best_val_accuracy"] == max(accuracies)
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["epoch"] == summary["best_epoch"]
    assert all(epoch["precision"] == "fp32" for epoch in summary["history"])
    return summary


def test_maml_end_to_end_resume_and_rebuild(runs, cache_dir, monkeypatch, capsys):
    out = runs["out"]["maml"]
    done = finish(runs["process"]["maml"])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = check_run_dir(out, 1)
    assert summary["method"] == "maml" and summary["learner"]["first_order"] is True
    assert not any(summary["learner"][k] for k in ("per_step_bn", "learn_inner_lr", "multi_step_loss", "cosine_lr"))

    # --resume continues the run for a second epoch
    code, err = run_in_process(TINY + ["--genotype", "auto_maml_1shot", "--epochs", "2", "--out", out,
                                       "--cache_dir", cache_dir, "--resume"], monkeypatch, capsys)
    assert code == 0, err
    summary = check_run_dir(out, 2)
    assert summary["history"][1]["iteration"] == 4  # 2 iterations per epoch, continued

    # the contract with the evaluator: rebuild from the summary, then load the learner state
    state = load_checkpoint(os.path.join(out, "best.pt"))
    learner = restore.build_learner(state, torch.device("cpu"))
    learner.load_state_dict(state["learner"])
    for name, value in learner.model.state_dict().items():
        assert torch.equal(value, state["learner"]["model"][name])
    rebuilt_from_json = restore.build_learner({"stage": "train", "summary": summary}, "cpu")
    rebuilt_from_json.load_state_dict(state["learner"])

    # resuming with another genotype: one line, exit 2
    code, err = run_in_process(TINY + ["--genotype", "auto_maml_5shot", "--epochs", "3", "--out", out,
                                       "--cache_dir", cache_dir, "--resume"], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: --resume:") and "genotype differs" in err and len(err.strip().splitlines()) == 1


def test_maml_plus_plus_end_to_end(runs, cache_dir, monkeypatch, capsys):
    out = runs["out"]["maml++"]
    done = finish(runs["process"]["maml++"])
    assert done.returncode == 0, done.stderr[-2000:]
    summary = check_run_dir(out, 2)
    learner_settings = summary["learner"]
    assert summary["method"] == "maml++"
    assert all(learner_settings[k] for k in ("per_step_bn", "learn_inner_lr", "multi_step_loss", "cosine_lr"))
    first, second = summary["history"]
    assert first["first_order"] is True and second["first_order"] is False
    assert first["multi_step_loss"] is True and second["multi_step_loss"] is False
    # MAML++'s cosine over 2 epochs: halfway between 1e-3 and 1e-5 in the second (its minimum would come after it)
    assert first["meta_lr"] == pytest.approx(1e-3) and second["meta_lr"] == pytest.approx(0.5 * (1e-3 + 1e-5))
    assert summary["meta_learned_parameters"] > summary["parameters"]
    state = load_checkpoint(os.path.join(out, "last.pt"))
    learner = restore.build_learner(state, "cpu")
    learner.load_state_dict(state["learner"])
    assert learner.batch_norm_names and learner.learned_lrs
    # resuming with a learner of another shape is a one-line error
    code, err = run_in_process(TINY + ["--genotype", "auto_maml_5shot", "--method", "maml++", "--epochs", "3",
                                       "--msl_epochs", "1", "--first_order_epochs", "1", "--no-learn_inner_lr",
                                       "--out", out, "--cache_dir", cache_dir, "--resume"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --resume:") and "learn_inner_lr: True -> False" in err


def test_a_run_killed_in_its_last_validation_resumes_with_that_epochs_record(tmp_path, cache_dir, monkeypatch,
                                                                             capsys):
    """Killed while validating after the epoch's last iteration (its last.pt written): the resumed run runs
    no iteration of that epoch, and its record still gives the epoch's schedule (learning rate, order,
    multi-step loss), as the run that was not killed records it."""
    from tnas.engine import MetaTrainer

    argv = TINY + ["--genotype", "auto_maml_5shot", "--method", "maml++", "--epochs", "2", "--msl_epochs", "1",
                   "--first_order_epochs", "1", "--cache_dir", cache_dir]
    assert run_in_process(argv + ["--out", str(tmp_path / "whole")], monkeypatch, capsys)[0] == 0
    validate, calls = MetaTrainer.validate, []

    def killed_in_epoch_2(self):
        calls.append(self.epoch)
        if self.epoch == 1:
            raise RuntimeError("killed")
        return validate(self)

    monkeypatch.setattr(MetaTrainer, "validate", killed_in_epoch_2)
    with pytest.raises(RuntimeError, match="killed"):
        run_in_process(argv + ["--out", str(tmp_path / "killed")], monkeypatch, capsys)
    monkeypatch.setattr(MetaTrainer, "validate", validate)
    assert load_checkpoint(os.path.join(tmp_path, "killed", "last.pt"))["iteration"] == 4  # the epoch's last
    assert run_in_process(argv + ["--out", str(tmp_path / "killed"), "--resume"], monkeypatch, capsys)[0] == 0
    whole, resumed = (check_run_dir(str(tmp_path / name), 2)["history"][1] for name in ("whole", "killed"))
    for key in ("meta_lr", "first_order", "multi_step_loss", "iteration", "train_loss"):
        assert resumed[key] == pytest.approx(whole[key]), key


def test_missing_genotype_is_one_line_error(tmp_path, monkeypatch, capsys):
    code, err = run_in_process(["--out", str(tmp_path / "x"), "--device", "cpu"], monkeypatch, capsys)
    assert code == 2
    assert err.startswith("error: --genotype is required") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("genotype, message", [("no_such_genotype", "unknown genotype"),
                                               ("{dir}", "without best_genotype.json or genotype.json"),
                                               ("{file}", "genotype")])
def test_bad_genotype_is_one_line_error(tmp_path, monkeypatch, capsys, genotype, message):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"normal": [["conv_9x9", 0]], "reduce": []}))
    genotype = genotype.format(dir=str(tmp_path), file=str(bad))
    code, err = run_in_process(["--genotype", genotype, "--out", str(tmp_path / "run"), "--device", "cpu"],
                               monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def settings(parser, argv):
    return train.settings_from_args(parser.parse_args(argv))


def test_flags_to_learner_settings():
    parser = train.build_parser()
    plain = train.maml_config(settings(parser, ["--genotype", "auto_maml_1shot"]))
    assert not any(getattr(plain, name) for name in train.MAML_PP_SWITCHES) and plain.first_order_epochs is None
    assert plain.first_order and plain.inner_steps == 5
    assert plain.inner_steps_test == 10 and plain.inner_lr == 0.01 and plain.meta_lr == 1e-3
    second = train.maml_config(settings(parser, ["--genotype", "x", "--second_order"]))
    assert not second.first_order
    plus = train.maml_config(settings(parser, ["--genotype", "x", "--method", "maml++"]))
    assert plus.per_step_bn and plus.learn_inner_lr and plus.multi_step_loss and plus.cosine_lr
    assert plus.first_order_epochs == 5 and plus.msl_epochs == 10  # a third of the 15 epochs
    some = train.maml_config(settings(parser, ["--genotype", "x", "--method", "maml++", "--no-per_step_bn",
                                                "--first_order_epochs", "2"]))
    assert not some.per_step_bn and some.learn_inner_lr and some.first_order_epochs == 2
    one = train.maml_config(settings(parser, ["--genotype", "x", "--learn_inner_lr"]))
    assert one.learn_inner_lr and not one.per_step_bn and not one.multi_step_loss


def test_count_macs_matches_convolutions_and_linear():
    from tnas.genotypes import PUBLISHED
    from tnas.models.network import Network

    model = Network(PUBLISHED["auto_maml_1shot"], n_way=5, C=4, layers=1, in_channels=1)
    from tnas.models.complexity import conv_linear_macs, count_macs

    counted = count_macs(model, (1, 16, 16))
    macs, by_hand = counted["macs"], conv_linear_macs(model, (1, 16, 16))
    assert by_hand <= macs <= 2 * by_hand and counted["macs_source"] in ("ptflops", "conv+linear")
    bigger = count_macs(Network(PUBLISHED["auto_maml_1shot"], n_way=5, C=8, layers=1, in_channels=1),
                        (1, 16, 16))["macs"]
    assert bigger > macs
    assert model.training  # untouched


@pytest.mark.parametrize("flags, message", [
    (["--device", "cpu", "--cuda_graph"], "--cuda_graph needs a CUDA device; --device cpu"),
    (["--cuda_graph", "--method", "maml++", "--cosine_unit", "iteration"], "--cuda_graph needs --cosine_unit epoch"),
], ids=["cpu", "cosine_per_iteration"])
def test_cuda_graph_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, flags, message):
    if "--device" not in flags:  # pass the device check on a CPU machine; the schedule check follows it
        from tnas.stages import common
        monkeypatch.setattr(common, "resolve_device", lambda name: torch.device("cuda"))
    code, err = run_in_process(["--genotype", "auto_maml_1shot", "--out", str(tmp_path / "run"), *flags],
                               monkeypatch, capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run")


def test_cuda_graph_under_torchrun_graphs_the_gradients(monkeypatch):
    """Split meta-batches graph each step's gradients (all-reduce and step eager); the protocol's own
    trainings, one process each, graph the whole step."""
    from tnas import distributed
    from tnas.stages import common

    monkeypatch.setattr(common, "resolve_device", lambda name: torch.device("cuda"))
    args = train.build_parser().parse_args(["--genotype", "auto_maml_1shot", "--cuda_graph"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    decision = common.check_cuda_graph(args)
    assert decision.enabled and "the gradients of each untracked step replayed" in decision.reason
    with distributed.local_process():  # the protocol: each rank trains its own genotypes alone
        decision = common.check_cuda_graph(args)
    assert decision.enabled and "each untracked step replayed as one CUDA graph" in decision.reason
