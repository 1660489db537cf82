"""Task folding (tnas/task_folding.py): T tasks as channel groups of one plain-autograd forward.

Checked in float64 against ``torch.func.vmap`` over tasks and the per-task reference: logits,
first- and second-order meta-gradients (supernet with normal and reduction cells, derived
network), MAML++ with every component, shared (non-adapted) parameters, and the helpers.
"""
import pytest
import torch
import torch.nn as nn

from tnas import task_folding
from tnas.genotypes import PUBLISHED
import reference
from tnas.meta.maml import batched_forward, expand_to_tasks, model_forward
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.models.network import Network

from test_maml import assert_close_relative, batched_meta_gradient, make_batch, tiny_supernet

TASKS = 2


@pytest.fixture(params=["conv", "matmul"])
def pointwise(request):
    """Run a test with folded 1x1 convolutions as grouped convs, then as batched matmuls: the test
    applies the mode to its models (``task_folding.use_pointwise_mode``)."""
    return request.param


def per_task_params(model, seed=1):
    """Every parameter as ``[T, *shape]``, each task's copy perturbed differently."""
    generator = torch.Generator().manual_seed(seed)
    params = expand_to_tasks(dict(model.named_parameters()), TASKS, meta_gradient=False)
    with torch.no_grad():
        for value in params.values():
            value.add_(0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype))
    return params


def tiny_network():
    torch.manual_seed(0)
    return Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=2, in_channels=1).double()


@pytest.mark.parametrize("make_model", [lambda: tiny_supernet(layers=2), tiny_network], ids=["supernet", "network"])
def test_folded_logits_equal_vmap_with_per_task_and_shared_parameters(make_model, pointwise):
    model = task_folding.use_pointwise_mode(make_model(), pointwise)
    x = make_batch().query_x
    every = per_task_params(model)
    names = list(every)
    half = {n: every[n] for n in names[::2]}  # half per task, half shared
    shared = {n: p.detach() for n, p in model.named_parameters() if n not in half}
    for task_params, shared_params in ((every, {}), (half, shared)):
        folded = batched_forward(model_forward(model, fold_tasks=True), task_params, shared_params, x)
        vmapped = batched_forward(model_forward(model, fold_tasks=False), task_params, shared_params, x)
        assert folded.shape == (TASKS, x.shape[1], 3)
        torch.testing.assert_close(folded, vmapped, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
def test_folded_meta_gradient_equals_vmap_and_reference(first_order, pointwise):
    model = task_folding.use_pointwise_mode(tiny_supernet(layers=2), pointwise)
    params = dict(model.named_parameters())
    rates = {n: 0.1 for n, _ in model.named_weights()}
    rates.update({n: 3.0 for n, _ in model.named_alphas()})
    batch = make_batch()
    got = {fold: batched_meta_gradient(model_forward(model, fold_tasks=fold), params, rates, batch, 2, first_order)
           for fold in (True, False)}
    want = reference.meta_gradient(model_forward(model), params, rates, batch.support_x, batch.support_y,
                                   batch.query_x, batch.query_y, steps=2, first_order=first_order)
    assert_close_relative(got[True], want)
    assert_close_relative(got[True], got[False], tol=1e-10)


@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
@pytest.mark.parametrize("edges", ["sources", "fused"])
def test_fast_edge_paths_meta_gradient_equals_reference_plan(first_order, edges):
    """The learner level: T-NAS's folded meta-gradient (inner steps on weights and alphas) with the
    supernet's edges source-folded or fused equals the per-task reference on a REFERENCE-plan model."""
    from tnas.models.fast_edges import REFERENCE, ExecutionPlan
    from tnas.models.supernet import Supernet

    fast = tiny_supernet(layers=2)
    plan = ExecutionPlan(fused_edges=True, fold_sources=edges == "sources")
    model = Supernet(**fast.config, plan=plan).double()
    model.load_state_dict(fast.state_dict())
    plain = Supernet(**fast.config, plan=REFERENCE).double()
    plain.load_state_dict(fast.state_dict())
    assert (model.cells[0].sources is not None) == (edges == "sources")
    rates = {n: 0.1 for n, _ in model.named_weights()}
    rates.update({n: 3.0 for n, _ in model.named_alphas()})
    batch = make_batch()
    got = batched_meta_gradient(model_forward(model, fold_tasks=True), dict(model.named_parameters()), rates, batch,
                                2, first_order)
    want = reference.meta_gradient(model_forward(plain), dict(plain.named_parameters()), rates, batch.support_x,
                                   batch.support_y, batch.query_x, batch.query_y, steps=2, first_order=first_order)
    # second order through batch-statistics BN of 3-image support sets amplifies round-off: measured
    # relative errors ~3e-11 (fused) and ~1.3e-10 (source folding, which sums the terms in another order)
    assert_close_relative(got, want, tol=1e-10 if first_order else 5e-10)


def test_maml_plus_plus_meta_step_is_the_same_folded_and_vmapped(pointwise):
    """Second order, per-step BN, learned per-step learning rates, multi-step loss: one meta-step."""
    config = MAMLConfig(inner_steps=2, inner_steps_test=3, first_order=False, per_step_bn=True, learn_inner_lr=True,
                        multi_step_loss=True, cosine_lr=True)
    learners = {}
    for fold in (True, False):
        model = task_folding.use_pointwise_mode(tiny_network(), pointwise)
        learner = MAMLPlusPlus(model, config)
        learner.forward = model_forward(model, fold_tasks=fold)
        learner.meta_step(make_batch())
        learners[fold] = learner
    folded, vmapped = (dict(learners[f].model.named_parameters()) for f in (True, False))
    assert_close_relative(folded, vmapped, tol=1e-10)
    for name, lr in learners[True].learned_lrs.items():
        assert_close_relative({name: lr}, {name: learners[False].learned_lrs[name]}, tol=1e-10)
    evaluated = [learners[f].evaluate(make_batch(seed=3)).query_loss for f in (True, False)]
    torch.testing.assert_close(evaluated[0], evaluated[1], rtol=1e-10, atol=1e-12)


def test_models_of_the_package_fold_and_others_fall_back_to_vmap():
    assert task_folding.supports_folding(tiny_supernet()) and task_folding.supports_folding(tiny_network())
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    assert not task_folding.supports_folding(plain)
    assert model_forward(plain).folds_tasks is False
    assert model_forward(tiny_network()).folds_tasks is True
    with pytest.raises(ValueError, match="Sequential is not built from task-folding layers"):
        model_forward(plain, fold_tasks=True)


def test_layers_behave_as_their_parents_on_unfolded_input():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    for ours, parent in ((task_folding.Conv2d(3, 5, 3, padding=1, groups=1), nn.Conv2d(3, 5, 3, padding=1)),
                         (task_folding.BatchNorm2d(3, affine=True), nn.BatchNorm2d(3, track_running_stats=False))):
        parent.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x), parent(x), rtol=0, atol=0)
    linear, reference_linear = task_folding.Linear(3, 2), nn.Linear(3, 2)
    reference_linear.load_state_dict(linear.state_dict())
    torch.testing.assert_close(linear(x[:, :, 0, 0]), reference_linear(x[:, :, 0, 0]), rtol=0, atol=0)


def test_helpers_keep_each_task_channels_together():
    tasks, count, channels = 3, 2, 4
    x = torch.arange(tasks * count * channels * 4, dtype=torch.float64).view(tasks, count, channels, 2, 2)
    folded = task_folding.fold_images(x)
    assert folded.shape == (count, tasks * channels, 2, 2)
    assert torch.equal(folded[:, channels:2 * channels], x[1])
    assert torch.equal(task_folding.unfold_logits(folded.flatten(1), tasks).reshape(x.shape), x)
    # the helpers that cannot see T from their input take it as an argument
    assert task_folding.groups_of(folded, channels) == tasks
    joined = task_folding.cat_channels([folded, 10 * folded], tasks)
    assert torch.equal(joined.view(count, tasks, 2 * channels, 2, 2)[:, 1],
                       torch.cat([x[1], 10 * x[1]], dim=1))
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)  # [T, K]
    mixed = task_folding.weighted_sum(torch.stack([folded, -folded], dim=1), weights)
    scaled = task_folding.scale_per_task(folded, weights[:, 1])
    for task in range(tasks):
        expected = (weights[task, 0] - weights[task, 1]) * x[task]
        assert torch.equal(mixed[:, task * channels:(task + 1) * channels], expected)
        assert torch.equal(scaled[:, task * channels:(task + 1) * channels], weights[task, 1] * x[task])
    with pytest.raises(ValueError, match="not a whole number of task groups of 5"):
        task_folding.groups_of(folded, 5)
    with pytest.raises(ValueError, match="does not match 3 folded tasks"):
        task_folding.fold_parameter(torch.zeros(2, 5, 4), tasks=3, dims=2)
    with pytest.raises(ValueError, match="need 3 folded task groups in 4 channels"):
        task_folding.weighted_sum(torch.zeros(1, 2, 4, 1, 1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="and 3 terms"):
        task_folding.weighted_sum(torch.zeros(1, 3, 6, 1, 1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="need 3 folded task groups in 4 channels"):
        task_folding.scale_per_task(torch.zeros(1, 4, 1, 1), torch.zeros(3))


def test_drop_path_masks_are_drawn_per_task_and_zero_whole_samples():
    torch.manual_seed(0)
    tasks, count, channels = 8, 16, 3
    x = torch.ones(count, tasks * channels, 2, 2)
    mask = task_folding.sample_mask(x, keep=0.5, tasks=tasks)
    per_sample = mask.view(count, tasks, channels * 4)
    assert ((per_sample == per_sample[..., :1]).all())  # one value per (sample, task)
    assert not (per_sample[:, :1, 0] == per_sample[:, :, 0]).all()  # tasks draw their own masks
    assert set(mask.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("parts", [((0, 2), (2, 3)), ((0, 1), (1, 2), (2, 3)), ((0, 3),)],
                         ids=["2+1", "1+1+1", "whole"])
def test_a_windowed_mask_is_its_slice_of_the_whole_batchs_draw(parts):
    """Each data-parallel process draws the mask for the whole meta-batch and keeps its window's tasks:
    together the windows are exactly the one-process draw, one task windows (unfolded) included."""
    tasks, count, channels = 3, 5, 2
    torch.manual_seed(0)
    whole = task_folding.sample_mask(torch.ones(count, tasks * channels, 2, 2, dtype=torch.float64), 0.5, tasks)
    for start, stop in parts:
        torch.manual_seed(0)  # every process's generator is where the one process's is
        window = task_folding.TaskWindow(start, stop, tasks)
        x = torch.ones(count, window.size * channels, 2, 2, dtype=torch.float64)
        assert torch.equal(task_folding.sample_mask(x, 0.5, window.size, window),
                           whole[:, start * channels:stop * channels])
    torch.manual_seed(0)
    task_folding.sample_mask(torch.ones(count, tasks * channels, 2, 2), 0.5, tasks)
    after_whole = torch.get_rng_state()
    torch.manual_seed(0)
    task_folding.sample_mask(torch.ones(count, channels, 2, 2), 0.5, 1, task_folding.TaskWindow(2, 3, tasks))
    assert torch.equal(torch.get_rng_state(), after_whole)  # the generator advances as the one process's


def test_a_task_window_refuses_other_task_counts_and_empty_windows():
    window = task_folding.TaskWindow.of(slice(1, 3), 4)
    assert (window.start, window.stop, window.total, window.size) == (1, 3, 4, 2)
    with pytest.raises(ValueError, match=r"3 folded task\(s\) under the task window 1:3 of 4 tasks"):
        task_folding.sample_mask(torch.ones(2, 3 * 4, 1, 1), 0.5, 3, window)
    for start, stop, total in ((1, 1, 4), (3, 5, 4), (-1, 1, 4)):
        with pytest.raises(ValueError, match="non-empty part"):
            task_folding.TaskWindow(start, stop, total)


def test_a_derived_network_under_a_task_window_gives_its_slice_of_the_whole_batch():
    """Drop-path on: the network on tasks 1..2 of 3 under their window gives those tasks' logits of the
    one forward on all 3 (same generator state); eval mode ignores the window (any task count)."""
    torch.manual_seed(0)
    model = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1, drop_path_prob=0.5).double()
    images = torch.randn(3, 4, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(1)
    whole = task_folding.unfold_logits(model(task_folding.fold_images(images)), 3)
    model.task_window = task_folding.TaskWindow(1, 3, 3)
    torch.manual_seed(1)
    part = task_folding.unfold_logits(model(task_folding.fold_images(images[1:])), 2)
    torch.testing.assert_close(part, whole[1:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="task window 1:3 of 3"):
        model(task_folding.fold_images(images[:1]))
    model.task_window = None
    torch.manual_seed(1)
    alone = task_folding.unfold_logits(model(task_folding.fold_images(images[1:])), 2)
    assert not torch.allclose(alone, whole[1:])  # without the window the slice draws other masks
    model.task_window = task_folding.TaskWindow(1, 3, 3)
    model.eval()
    model(task_folding.fold_images(images[:1]))  # no drop-path in eval mode, so no window either



@pytest.mark.parametrize("per_task", [True, False], ids=["per_task", "shared"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
def test_pointwise_matmul_equals_grouped_conv(monkeypatch, per_task, bias, stride):
    torch.manual_seed(0)
    conv = task_folding.Conv2d(3, 5, 1, stride=stride, bias=bias).double()
    weight = torch.randn(TASKS, 5, 3, 1, 1, dtype=torch.float64) if per_task else conv.weight
    bias_value = (torch.randn(TASKS, 5, dtype=torch.float64) if per_task else conv.bias) if bias else None
    x = torch.randn(4, TASKS * 3, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    want = nn.functional.conv2d(x, task_folding.fold_parameter(weight, TASKS, 4),
                                task_folding.fold_parameter(bias_value, TASKS, 1), stride=stride, groups=TASKS)
    got = task_folding._pointwise_matmul(x, weight, bias_value, TASKS, conv.stride)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    assert conv.pointwise_mode == "matmul"  # the default
    monkeypatch.setattr(task_folding.F, "conv2d", lambda *a, **k: pytest.fail("1x1 conv went to F.conv2d"))
    torch.testing.assert_close(conv(x), task_folding._pointwise_matmul(x, conv.weight, conv.bias, TASKS, conv.stride))
    other = task_folding.Conv2d(3, 5, 1, stride=stride, bias=bias).double()
    container = nn.Sequential(conv)
    assert task_folding.use_pointwise_mode(container, "conv") is container
    with pytest.raises(pytest.fail.Exception, match="went to F.conv2d"):
        conv(x)
    assert other.pointwise_mode == "matmul"  # the mode belongs to the model it was set on, nothing global
    with pytest.raises(ValueError, match="pointwise mode"):
        task_folding.use_pointwise_mode(container, "einsum")
