"""tnas.models.branches: which ops go to which stream, and that branching changes no result."""
import pytest
import torch

from tnas.models import branches
from tnas.models.fast_edges import ExecutionPlan
from tnas.models.supernet import Supernet


def test_lanes_keep_free_ops_on_the_current_stream_and_balance_the_rest():
    # pools, skip (identity), sep 3x3, sep 5x5, dil 3x3, dil 5x5: convolutions per op
    assert branches.assign_lanes([0, 0, 0, 4, 4, 2, 2], streams=3) == [0, 0, 0, 1, 2, 3, 3]
    assert branches.assign_lanes([0, 0, 2, 4, 4, 2, 2], streams=3) == [0, 0, 3, 1, 2, 3, 1]
    assert branches.assign_lanes([0, 3, 1], streams=0) == [0, 0, 0]
    fused = Supernet(n_way=3, C=4, layers=1, plan=ExecutionPlan(fold_sources=False)).cells[0].fused
    assert fused.layouts[4].lanes == (0, 0, 0, 1, 2, 3, 3)
    # source-folded, from a node: the two pools (computed once), then sep 3x3, sep 5x5, dil 3x3, dil 5x5
    folded = Supernet(n_way=3, C=4, layers=1, plan=ExecutionPlan(fold_sources=True)).cells[0].sources
    assert folded.sources[2].lanes == (0, 0, 1, 2, 3, 3)


def test_branches_run_in_order_off_the_gpu():
    calls = []
    outputs = branches.run_branches([lambda: calls.append("a") or torch.ones(1),
                                     lambda: calls.append("b") or torch.zeros(1)], [1, 0], [torch.ones(1)], 3)
    assert calls == ["a", "b"] and [float(o) for o in outputs] == [1.0, 0.0]
    with pytest.raises(ValueError, match=">= 0"):
        branches.run_branches([], [], [torch.ones(1)], -1)
    with pytest.raises(ValueError, match=">= 0"):
        ExecutionPlan(branch_streams=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fold_sources", [True, False], ids=["source_folded", "edge_by_edge"])
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "plain"])
def test_branch_streams_change_no_value_or_gradient_on_cuda(fold, fold_sources):
    tasks = 3 if fold else 1
    x = torch.randn(4, tasks, 16, 16, dtype=torch.float64, device="cuda")
    alphas = torch.randn(tasks, 14, 8, dtype=torch.float64, device="cuda", requires_grad=True)

    def run(streams):
        torch.manual_seed(0)
        model = Supernet(n_way=3, C=4, layers=2, in_channels=1,
                         plan=ExecutionPlan(branch_streams=streams, fold_sources=fold_sources)).double().cuda()
        weights = (alphas, alphas) if fold else (alphas[0], alphas[0])
        logits = model(x if fold else x[:, :1], *weights)
        params = [alphas] + list(model.parameters())
        grads = torch.autograd.grad(logits.square().sum(), params, allow_unused=True)
        return [logits.detach()] + list(grads)  # no graph outlives its run (nor its streams)

    one_stream, branched = run(0), run(3)
    for want, got in zip(one_stream, branched):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
