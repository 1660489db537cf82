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
        bench.main(["--device", "cpu", "--cuda_graph", "--tiny"])
    assert "--cuda_graph needs --device cuda" in capsys.readouterr().err


def test_keyed_graphed_step_starts_a_new_graph_when_the_key_changes(monkeypatch):
    """One graph per run of equal keys; the old one is dropped (a stand-in records the calls)."""
    from tnas.meta import cuda_graph

    made = []

    class Recorder:
        def __init__(self, step, warmup):
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

    monkeypatch.setattr(cuda_graph, "GraphedStep", lambda step, warmup: step)
    step = graph_untracked(lambda batch, track: (batch, track), True, key=lambda: 0)
    assert isinstance(step.graphed, cuda_graph.KeyedGraphedStep)
    assert step("b", False) == ("b", False) and step("b", True) == ("b", True)
    assert step.graphed.graphs == 1
