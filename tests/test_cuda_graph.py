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
