"""tnas.meta.cuda_graph on CPU: the helpers and the errors (the capture itself is tested in test_gpu.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tnas.meta.cuda_graph import GraphedStep, _clone_outputs, make_optimizers_capturable
from tnas.meta.learner import StepStats


def test_outputs_are_copied_with_their_structure():
    stats = StepStats(torch.ones(3), torch.zeros(3))
    copied = _clone_outputs((stats, [torch.arange(2)], "tag"))
    assert isinstance(copied, tuple) and isinstance(copied[0], StepStats) and copied[2] == "tag"
    assert copied[0].per_step_loss is None
    assert torch.equal(copied[0].query_loss, stats.query_loss)
    assert copied[0].query_loss.data_ptr() != stats.query_loss.data_ptr()
    assert copied[1][0].data_ptr() != 0 and torch.equal(copied[1][0], torch.arange(2))


def test_capturable_optimisers_need_cuda_parameters():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="CUDA device, found cpu"):
        make_optimizers_capturable([optimizer])


def test_graphed_step_refuses_cpu_batches_and_bad_warmup():
    batch = SimpleNamespace(support_x=torch.zeros(1, 1, 1, 2, 2), support_y=torch.zeros(1, 1),
                            query_x=torch.zeros(1, 1, 1, 2, 2), query_y=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="need a CUDA device; the batch is on cpu"):
        GraphedStep(lambda b: b.support_x.sum())(batch)
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(lambda b: None, warmup=0)


def test_benchmark_refuses_cuda_graph_on_cpu(capsys):
    from script_loader import load_script

    bench = load_script("benchmarks/bench_meta_iter.py")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--cuda_graph", "on", "--tiny"])
    assert "--cuda_graph needs a CUDA device; --device cpu" in capsys.readouterr().err


def test_keyed_graphed_step_starts_a_new_graph_when_the_key_changes(monkeypatch):
    """One graph per run of equal keys; the old one is dropped (a stand-in records the calls)."""
    from tnas.meta import cuda_graph

    made = []

    class Recorder:
        def __init__(self, step, warmup, on_failure=None, capture_error_mode="global"):
            self.step, self.calls = step, []
            made.append(self)

        def __call__(self, batch):
            self.calls.append(batch)
            return self.step(batch)

    monkeypatch.setattr(cuda_graph, "GraphedStep", Recorder)
    settings = {"epoch": 0}
    keyed = cuda_graph.KeyedGraphedStep(lambda batch: batch * 10, key=lambda: settings["epoch"])
    outputs = []
    for epoch, batch in ((0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (0, 6)):
        settings["epoch"] = epoch
        outputs.append(keyed(batch))
    assert outputs == [10, 20, 30, 40, 50, 60]
    assert [r.calls for r in made] == [[1, 2], [3, 4, 5], [6]]
    assert keyed.graphs == 3 and keyed.current is made[-1]


def test_maml_plus_plus_settings_key_follows_the_schedules():
    from tnas.genotypes import PUBLISHED
    from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
    from tnas.models.network import Network

    model = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1)
    learner = MAMLPlusPlus(model, MAMLConfig(inner_steps=2, per_step_bn=True, multi_step_loss=True, msl_epochs=2,
                                             first_order_epochs=1, first_order=False, cosine_lr=True))
    keys = []
    for iteration in range(0, 16, 2):  # 4 epochs of 4 iterations, two samples per epoch
        learner.set_progress(iteration, 4, 4)
        keys.append(learner.settings_key())
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[6] == keys[7]
    assert len({keys[0], keys[2], keys[4], keys[6]}) == 4  # order, annealing weights, cosine lr: per epoch
    assert keys[0][0] is True and keys[2][0] is False and keys[2][1] == 1 and keys[4][1] is None


def test_graph_untracked_passes_the_key_on(monkeypatch):
    from tnas.meta import cuda_graph
    from tnas.stages.common import graph_untracked

    monkeypatch.setattr(cuda_graph, "GraphedStep", lambda step, warmup, on_failure=None, capture_error_mode=None: step)
    step = graph_untracked(lambda batch, track: (batch, track), True, key=lambda: 0)
    assert isinstance(step.graphed, cuda_graph.KeyedGraphedStep)
    assert step("b", False) == ("b", False) and step("b", True) == ("b", True)
    assert step.graphed.graphs == 1


# -- --cuda_graph auto|on|off ---------------------------------------------------------------------
CPU, GPU = torch.device("cpu"), torch.device("cuda:0")
COSINE = "--cosine_unit epoch (a graph freezes the learning rate), got --cosine_unit iteration"


@pytest.mark.parametrize("mode, device, splits, blocker, enabled, says", [
    ("auto", GPU, False, None, True, "cuda_graph auto: each untracked step replayed as one CUDA graph on cuda:0"),
    ("on", GPU, False, None, True, "cuda_graph on: each untracked step replayed"),
    ("auto", CPU, False, None, False, "cuda_graph auto: eager steps, not CUDA graphs: the device is cpu"),
    ("auto", GPU, True, None, True, "cuda_graph auto: the gradients of each untracked step replayed as one CUDA "
                                     "graph on cuda:0, summed across the torchrun processes and stepped eagerly"),
    ("on", GPU, True, None, True, "cuda_graph on: the gradients of each untracked step replayed"),
    ("auto", GPU, True, COSINE, False, "eager steps, not CUDA graphs: it needs --cosine_unit epoch"),
    ("auto", GPU, False, COSINE, False, "eager steps, not CUDA graphs: it needs --cosine_unit epoch"),
    ("auto", CPU, True, COSINE, False, "the device is cpu"),  # the first obstacle is the one named
    ("off", GPU, False, None, False, "cuda_graph off: eager steps (--cuda_graph off)"),
    ("off", CPU, True, COSINE, False, "cuda_graph off"),
    (True, GPU, False, None, True, "cuda_graph on"),  # the old switch in a saved config
    (False, GPU, False, None, False, "cuda_graph off"),
    ("False", GPU, False, None, False, "cuda_graph off"),  # ... as a config layer passes it on as text
], ids=["auto_gpu", "on_gpu", "auto_cpu", "auto_torchrun", "on_torchrun", "auto_torchrun_cosine", "auto_cosine", "auto_cpu_first", "off_gpu", "off_any",
        "old_true", "old_false", "old_false_text"])
def test_resolve_cuda_graph_decides_each_case(mode, device, splits, blocker, enabled, says):
    from tnas.meta.cuda_graph import resolve_cuda_graph

    decision = resolve_cuda_graph(mode, device, splits, blocker)
    assert decision.enabled is enabled
    assert says in decision.reason and "\n" not in decision.reason


@pytest.mark.parametrize("device, splits, blocker, message", [
    (CPU, False, None, "--cuda_graph needs a CUDA device; --device cpu is cpu"),
    (CPU, True, None, "--cuda_graph needs a CUDA device; --device cpu is cpu"),
    (GPU, False, COSINE, "--cuda_graph needs --cosine_unit epoch"),
    (GPU, True, COSINE, "--cuda_graph needs --cosine_unit epoch"),
], ids=["cpu", "torchrun_cpu", "cosine", "torchrun_cosine"])
def test_cuda_graph_on_where_impossible_is_an_error(device, splits, blocker, message):
    from tnas.meta.cuda_graph import resolve_cuda_graph

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve_cuda_graph("on", device, splits, blocker, device_flag="cpu")


def test_cuda_graph_flag_spellings():
    import argparse

    from tnas.meta.cuda_graph import cuda_graph_mode
    from tnas.stages.common import add_cuda_graph_arg

    parser = argparse.ArgumentParser()
    add_cuda_graph_arg(parser)
    parse = lambda *argv: parser.parse_args(list(argv)).cuda_graph  # noqa: E731
    assert parse() == "auto"
    assert parse("--cuda_graph") == "on"  # the old switch
    assert parse("--no-cuda_graph") == "off"
    assert [parse("--cuda_graph", m) for m in ("auto", "on", "off", "ON")] == ["auto", "on", "off", "on"]
    assert parse("--cuda_graph=false") == "off" and parse("--cuda_graph=True") == "on"
    with pytest.raises(ValueError, match="--cuda_graph must be one of auto, on, off, got 'sometimes'"):
        cuda_graph_mode("sometimes")


def test_cuda_graph_bad_value_is_a_one_line_error(capsys):
    import argparse

    from tnas.stages.common import add_cuda_graph_arg

    parser = argparse.ArgumentParser()
    add_cuda_graph_arg(parser)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--cuda_graph", "maybe"])
    assert exit_.value.code == 2
    assert "--cuda_graph must be one of auto, on, off, got 'maybe'" in capsys.readouterr().err


class _FakeDevice:
    type = "cuda"


def test_a_failed_capture_falls_back_to_eager_steps_with_one_log_line(monkeypatch):
    """A capture error (some driver or op) is one log line; this and every later step run eagerly."""
    from types import SimpleNamespace

    from tnas.meta import cuda_graph
    from tnas.stages.common import graph_untracked

    monkeypatch.setattr(cuda_graph.GraphedStep, "_eager_on_side_stream", lambda self, batch: self.step(batch))
    captures = []

    def failing_capture(self, batch):
        captures.append(batch)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture", failing_capture)
    lines, calls = [], []
    step = graph_untracked(lambda batch, track: calls.append((batch.n, track)) or batch.n, True, log=lines.append)
    batches = [SimpleNamespace(n=n, support_x=SimpleNamespace(device=_FakeDevice())) for n in range(6)]
    assert [step(batch, False) for batch in batches] == list(range(6))
    assert calls == [(n, False) for n in range(6)]  # every batch stepped once, none lost to the capture
    assert len(captures) == 1 and step.graphed.failed
    assert lines == ["cuda_graph: the capture failed (RuntimeError: operation not permitted when stream is "
                     "capturing); running eager steps instead"]
    keyed = graph_untracked(lambda batch, track: batch.n, True, key=lambda: 0, log=lines.append)
    assert [keyed(batch, False) for batch in batches] == list(range(6))
    assert len(captures) == 2 and len(lines) == 2  # keyed: one failed capture, not one per key
    with pytest.raises(RuntimeError, match="not permitted"):  # without on_failure the error propagates
        plain = cuda_graph.GraphedStep(lambda batch: batch.n, warmup=1)
        for batch in batches[:2]:
            plain(batch)


def test_a_cpu_run_logs_why_it_runs_eager(tmp_path, monkeypatch, capsys):
    """The default --cuda_graph auto on a CPU: one log line says the steps are eager and why."""
    import os
    import sys

    from script_loader import load_script
    from tnas.errors import cli_entry

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "train_from_scratch.py")
    out = tmp_path / "run"
    argv = ["--dataset", "glyphs", "--img_size", "16", "--C", "4", "--layers", "1", "--n_way", "3", "--q_query", "2",
            "--tasks_per_batch", "2", "--tasks_per_epoch", "2", "--val_episodes", "2", "--val_batch_size", "2",
            "--inner_steps", "1", "--inner_steps_test", "1", "--log_every", "0", "--epochs", "1", "--device", "cpu",
            "--threads", "1", "--genotype", "auto_maml_1shot", "--out", str(out)]
    if os.environ.get("TNAS_CACHE_DIR") is None:
        argv += ["--cache_dir", str(tmp_path / "cache")]
    monkeypatch.setattr(sys, "argv", [script] + argv)
    try:
        cli_entry(load_script(script).main)
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    log = (out / "log.txt").read_text()
    assert log.count("cuda_graph auto: eager steps, not CUDA graphs: the device is cpu") == 1, log
    assert "cuda_graph: auto" in (out / "config.yaml").read_text()  # the request is saved, not the outcome
