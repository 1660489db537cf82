"""Supernet and derived Network on CPU: shapes, gradients, alphas, BatchNorm, drop path, functional use."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from tnas.genotypes import PRIMITIVES, PUBLISHED, Genotype, decode_genotype, edge_inputs, num_edges
from tnas.models.network import Network
from tnas.models.skeleton import min_image_size, reduction_layout
from tnas.models.supernet import Supernet

N_WAY = 5
BATCH = 2
C_SMALL = 4

# Every primitive but `none` in both cells, with a stride-2 skip (FactorizedReduce) in the reduction cell.
ALL_OPS = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("max_pool_3x3", 1), ("avg_pool_3x3", 3), ("skip_connect", 0), ("skip_connect", 4)),
    reduce=(("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("dil_conv_3x3", 2),
            ("dil_conv_5x5", 1), ("max_pool_3x3", 3), ("avg_pool_3x3", 0), ("skip_connect", 4)),
)
GENOTYPES = {"all_ops": ALL_OPS, **PUBLISHED}

# (layers, in_channels, image size): mini-ImageNet 84 RGB, Omniglot 28 grayscale, CIFAR/FC100 32 RGB.
CONFIGS = [(layers, channels, size) for layers in (1, 2, 3) for channels, size in ((3, 84), (1, 28), (3, 32))]
CONFIG_IDS = [f"layers{layers}-{channels}x{size}" for layers, channels, size in CONFIGS]


def make_input(channels, size, batch=BATCH, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator, dtype=dtype)


def make_labels(batch=BATCH):
    return torch.arange(batch) % N_WAY


def assert_finite_grad(name, parameter):
    assert parameter.grad is not None, f"{name} got no gradient"
    assert torch.isfinite(parameter.grad).all(), f"{name} has a non-finite gradient"


# --------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("layers, channels, size", CONFIGS, ids=CONFIG_IDS)
def test_supernet_forward_backward(layers, channels, size):
    torch.manual_seed(0)
    model = Supernet(n_way=N_WAY, C=C_SMALL, layers=layers, in_channels=channels)
    logits = model(make_input(channels, size))
    assert logits.shape == (BATCH, N_WAY)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, make_labels()).backward()
    for name, parameter in model.named_weights():
        assert_finite_grad(name, parameter)
    has_normal_cell = not all(reduction_layout(layers))
    for name, parameter in model.named_alphas():
        if name == "alpha_normal" and not has_normal_cell:
            # layers=1 is a single reduction cell: alpha_normal takes no part in the forward.
            assert parameter.grad is None
            continue
        assert_finite_grad(name, parameter)
        # The `none` column too gets a gradient, through the softmax normaliser.
        assert (parameter.grad.abs().sum(dim=0) > 0).all(), f"{name}: some op column has zero gradient"


@pytest.mark.parametrize("genotype_name", sorted(GENOTYPES))
@pytest.mark.parametrize("layers, channels, size", CONFIGS, ids=CONFIG_IDS)
def test_network_forward_backward(layers, channels, size, genotype_name):
    torch.manual_seed(0)
    model = Network(GENOTYPES[genotype_name], n_way=N_WAY, C=C_SMALL, layers=layers, in_channels=channels)
    logits = model(make_input(channels, size))
    assert logits.shape == (BATCH, N_WAY)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, make_labels()).backward()
    for name, parameter in model.named_parameters():
        assert_finite_grad(name, parameter)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_smallest_image_size_runs(layers):
    size = min_image_size(layers)
    torch.manual_seed(0)
    x = make_input(1, size, batch=4)
    assert Supernet(n_way=N_WAY, C=C_SMALL, layers=layers, in_channels=1)(x).shape == (4, N_WAY)
    assert Network(ALL_OPS, n_way=N_WAY, C=C_SMALL, layers=layers, in_channels=1)(x).shape == (4, N_WAY)


def test_cell_channels_and_layout():
    model = Supernet(n_way=N_WAY, C=C_SMALL, layers=3)
    assert [cell.reduction for cell in model.cells] == [False, True, True]
    assert model.classifier.in_features == 4 * 4 * C_SMALL  # multiplier 4, C doubled twice
    assert all(len(cell.edges) == num_edges(4) for cell in model.cells)
    network = Network(PUBLISHED["auto_maml_5shot"], n_way=N_WAY, C=C_SMALL, layers=2)
    assert network.classifier.in_features == 4 * 2 * C_SMALL


# --------------------------------------------------------------------------- parameters

def test_weights_and_alphas_partition_parameters():
    model = Supernet(n_way=N_WAY, C=C_SMALL, layers=2)
    weights, alphas = list(model.weights()), list(model.alphas())
    all_ids = {id(p) for p in model.parameters()}
    weight_ids, alpha_ids = {id(p) for p in weights}, {id(p) for p in alphas}
    assert weight_ids.isdisjoint(alpha_ids)
    assert weight_ids | alpha_ids == all_ids
    assert len(weights) + len(alphas) == len(list(model.parameters()))
    assert [name for name, _ in model.named_alphas()] == ["alpha_normal", "alpha_reduce"]
    assert all(p.shape == (num_edges(4), 8) for p in alphas)
    assert dict(model.named_weights()).keys() == {name for name, _ in model.named_parameters()} - {
        "alpha_normal", "alpha_reduce"}


@pytest.mark.parametrize("name, expected", [("auto_maml_1shot", 23_213), ("auto_maml_5shot", 26_061)])
def test_published_parameter_counts(name, expected):
    # The paper's setting: 5-way, C 16, 2 layers, 84x84 RGB (23.2K and 26.1K in the paper).
    model = Network(PUBLISHED[name], n_way=5, C=16, layers=2, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == expected


# --------------------------------------------------------------------------- alphas as arguments

def small_supernet(dtype=torch.float32, layers=2, seed=0):
    torch.manual_seed(seed)
    return Supernet(n_way=N_WAY, C=C_SMALL, layers=layers, in_channels=3).to(dtype)


def test_forward_with_own_alphas_passed_explicitly_is_identical():
    model = small_supernet(torch.float64)
    with torch.no_grad():
        model.alpha_normal.normal_()
        model.alpha_reduce.normal_()
    x = make_input(3, 16, dtype=torch.float64)
    default = model(x)
    explicit = model(x, alpha_normal=model.alpha_normal, alpha_reduce=model.alpha_reduce)
    torch.testing.assert_close(explicit, default, rtol=0, atol=1e-12)
    other = model(x, alpha_normal=torch.randn_like(model.alpha_normal), alpha_reduce=model.alpha_reduce)
    assert (other - default).abs().max() > 1e-6
    other = model(x, alpha_normal=model.alpha_normal, alpha_reduce=torch.randn_like(model.alpha_reduce))
    assert (other - default).abs().max() > 1e-6


def test_gradient_flows_to_passed_alphas_only():
    model = small_supernet(torch.float64)
    alpha_normal = torch.randn_like(model.alpha_normal, requires_grad=True)
    alpha_reduce = torch.randn_like(model.alpha_reduce, requires_grad=True)
    logits = model(make_input(3, 16, dtype=torch.float64), alpha_normal=alpha_normal, alpha_reduce=alpha_reduce)
    F.cross_entropy(logits, make_labels()).backward()
    for tensor in (alpha_normal, alpha_reduce):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0
    assert model.alpha_normal.grad is None and model.alpha_reduce.grad is None
    assert all(p.grad is not None for p in model.weights())


def test_alpha_gradient_matches_finite_difference():
    model = small_supernet(torch.float64)
    x = make_input(3, 16, dtype=torch.float64)
    alpha_reduce = model.alpha_reduce.detach().clone()

    def loss(alpha_normal):
        return F.cross_entropy(model(x, alpha_normal=alpha_normal, alpha_reduce=alpha_reduce), make_labels())

    alpha = model.alpha_normal.detach().clone().requires_grad_(True)
    (analytic,) = torch.autograd.grad(loss(alpha), alpha)
    eps = 1e-6
    for row, column in [(0, 0), (3, 4), (13, 7)]:
        step = torch.zeros_like(alpha)
        step[row, column] = eps
        with torch.no_grad():
            numeric = (loss(alpha + step) - loss(alpha - step)) / (2 * eps)
        assert abs(numeric.item() - analytic[row, column].item()) < 1e-6


# --------------------------------------------------------------------------- genotype of the supernet

def test_supernet_genotype_matches_decode():
    model = small_supernet()
    with torch.no_grad():
        model.alpha_normal.normal_()
        model.alpha_reduce.normal_()
    assert model.genotype() == decode_genotype(model.alpha_normal, model.alpha_reduce)
    # Make sep_conv_5x5 on input 1 of node 0 a clear winner; the decoded genotype follows.
    with torch.no_grad():
        model.alpha_normal[edge_inputs(4).index((0, 1)), 5] = 100.0
    assert model.genotype().normal[0] == ("sep_conv_5x5", 1)
    other = {"alpha_normal": torch.randn(14, 8), "alpha_reduce": torch.randn(14, 8)}
    assert model.genotype(other) == decode_genotype(other["alpha_normal"], other["alpha_reduce"])


# --------------------------------------------------------------------------- BatchNorm and drop path

@pytest.mark.parametrize("kind", ["supernet", "network"])
def test_batchnorm_keeps_no_running_stats(kind):
    torch.manual_seed(0)
    model = (Supernet(n_way=N_WAY, C=C_SMALL, layers=2) if kind == "supernet"
             else Network(ALL_OPS, n_way=N_WAY, C=C_SMALL, layers=2))
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert norms
    for name, norm in norms.items():
        assert not norm.track_running_stats and norm.running_mean is None and norm.running_var is None
        # the supernet's ops and cell inputs use parameter-free BNs; its stem's are affine (the original's)
        assert norm.affine == (kind == "network" or name.startswith("stem."))
    assert not list(model.buffers())
    x = make_input(3, 28)
    model.train()
    train_out = model(x)
    model.eval()
    eval_out = model(x)
    torch.testing.assert_close(eval_out, train_out, rtol=0, atol=0)


def test_drop_path_only_in_train_mode_with_positive_prob():
    torch.manual_seed(0)
    model = Network(ALL_OPS, n_way=N_WAY, C=C_SMALL, layers=2, drop_path_prob=0.5)
    x = make_input(3, 28, batch=4)

    model.train()
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    second = model(x)
    torch.manual_seed(1)
    repeat = model(x)
    assert (first - second).abs().max() > 1e-6, "drop path should make training outputs random"
    torch.testing.assert_close(repeat, first, rtol=0, atol=0)

    model.eval()
    eval_out = model(x)
    model.drop_path_prob = 0.0
    torch.testing.assert_close(model(x), eval_out, rtol=0, atol=0)  # eval ignores the prob
    model.train()
    torch.manual_seed(3)
    no_drop_a = model(x)
    torch.manual_seed(4)
    no_drop_b = model(x)
    torch.testing.assert_close(no_drop_a, no_drop_b, rtol=0, atol=0)  # prob 0: deterministic
    torch.testing.assert_close(no_drop_a, eval_out, rtol=0, atol=0)


# --------------------------------------------------------------------------- functional use

TASKS = 3


def batched_parameters(model, tasks=TASKS, scale=0.05, seed=1):
    """Per-task copies of every parameter (alphas included), each perturbed differently: [T, ...]."""
    generator = torch.Generator().manual_seed(seed)
    return {name: p.detach().unsqueeze(0) + scale * torch.randn((tasks, *p.shape), generator=generator,
                                                                  dtype=p.dtype)
            for name, p in model.named_parameters()}


def make_functional_models():
    torch.manual_seed(0)
    supernet = Supernet(n_way=N_WAY, C=C_SMALL, layers=2, in_channels=3).double()
    with torch.no_grad():
        supernet.alpha_normal.normal_()
        supernet.alpha_reduce.normal_()
    network = Network(ALL_OPS, n_way=N_WAY, C=C_SMALL, layers=2, in_channels=3).double()
    return {"supernet": supernet, "network": network}


@pytest.fixture(scope="module")
def functional_models():
    return make_functional_models()


@pytest.mark.parametrize("kind", ["supernet", "network"])
def test_functional_call_equals_module(functional_models, kind):
    model = functional_models[kind]
    x = make_input(3, 16, dtype=torch.float64)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x), rtol=0, atol=1e-12)
    shifted = {name: p + 0.1 for name, p in params.items()}
    assert (functional_call(model, shifted, (x,)) - model(x)).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["supernet", "network"])
def test_vmap_over_tasks_equals_loop(functional_models, kind):
    model = functional_models[kind]
    params = batched_parameters(model)
    inputs = make_input(3, 16, batch=TASKS * BATCH, dtype=torch.float64).view(TASKS, BATCH, 3, 16, 16)

    def run(task_params, task_inputs):
        return functional_call(model, task_params, (task_inputs,))

    batched = vmap(run)(params, inputs)
    looped = torch.stack([run({name: p[t] for name, p in params.items()}, inputs[t]) for t in range(TASKS)])
    assert batched.shape == (TASKS, BATCH, N_WAY)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    assert (looped[0] - looped[1]).abs().max() > 1e-6  # the tasks really differ


@pytest.mark.parametrize("kind", ["supernet", "network"])
def test_vmap_of_grad_equals_loop_of_autograd(functional_models, kind):
    """The inner-loop building block: per-task gradients w.r.t. all parameters, batched over tasks."""
    model = functional_models[kind]
    tasks = 2
    params = batched_parameters(model, tasks=tasks, seed=2)
    inputs = make_input(3, 16, batch=tasks * BATCH, dtype=torch.float64, seed=3).view(tasks, BATCH, 3, 16, 16)
    labels = make_labels().expand(tasks, BATCH)

    def loss(task_params, task_inputs, task_labels):
        return F.cross_entropy(functional_call(model, task_params, (task_inputs,)), task_labels)

    batched = vmap(grad(loss))(params, inputs, labels)
    for t in range(tasks):
        task_params = {name: p[t].clone().requires_grad_(True) for name, p in params.items()}
        names = list(task_params)
        grads = torch.autograd.grad(loss(task_params, inputs[t], labels[t]), [task_params[n] for n in names])
        for name, expected in zip(names, grads):
            torch.testing.assert_close(batched[name][t], expected, rtol=1e-10, atol=1e-12, msg=name)


def test_vmap_with_passed_alphas(functional_models):
    """Shared weights, per-task alphas passed as forward arguments."""
    model = functional_models["supernet"]
    generator = torch.Generator().manual_seed(4)
    alpha_normal = torch.randn(TASKS, 14, 8, generator=generator, dtype=torch.float64)
    alpha_reduce = torch.randn(TASKS, 14, 8, generator=generator, dtype=torch.float64)
    inputs = make_input(3, 16, batch=TASKS * BATCH, dtype=torch.float64).view(TASKS, BATCH, 3, 16, 16)
    batched = vmap(lambda x, an, ar: model(x, alpha_normal=an, alpha_reduce=ar))(inputs, alpha_normal, alpha_reduce)
    looped = torch.stack([model(inputs[t], alpha_normal=alpha_normal[t], alpha_reduce=alpha_reduce[t])
                          for t in range(TASKS)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


def test_reference_mixed_op_is_the_softmax_weighted_sum_written_out():
    """MixedOp is the DARTS edge: sum_o softmax(alpha)_o * o(x), here spelled out op by op in float64
    with torch's own layers (max/avg pool + BN, identity, sep/dil convs), `none` contributing zero."""
    from tnas.models.supernet import MixedOp

    torch.manual_seed(0)
    edge = MixedOp(channels=4, stride=1).double()
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    alpha = torch.randn(8, dtype=torch.float64)
    w = torch.exp(alpha) / torch.exp(alpha).sum()  # softmax over the 8 primitives, `none` first
    bn = lambda t: (t - t.mean((0, 2, 3), keepdim=True)) / torch.sqrt(t.var((0, 2, 3), unbiased=False,
                                                                            keepdim=True) + 1e-5)
    conv = lambda t, module: torch.nn.functional.conv2d(t, module.weight, None, module.stride, module.padding,
                                                        module.dilation, module.groups)
    relu = torch.relu

    def dil(t, op):  # ReLU, depthwise, pointwise, BN
        return bn(conv(conv(relu(t), op[1]), op[2]))

    ops = dict(zip(PRIMITIVES, [None] + list(edge.ops)))
    want = (w[0] * torch.zeros_like(x)
            + w[1] * bn(torch.nn.functional.max_pool2d(x, 3, 1, 1))
            + w[2] * bn(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
            + w[3] * x
            + w[4] * dil(dil(x, ops["sep_conv_3x3"][0]), ops["sep_conv_3x3"][1])
            + w[5] * dil(dil(x, ops["sep_conv_5x5"][0]), ops["sep_conv_5x5"][1])
            + w[6] * dil(x, ops["dil_conv_3x3"])
            + w[7] * dil(x, ops["dil_conv_5x5"]))
    got = edge(x, torch.softmax(alpha, -1)[1:])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("tasks", [1, 3], ids=["plain", "folded"])
def test_fused_edges_equal_the_reference_mixed_ops(stride, tasks):
    """The fast path (one ReLU and one BN over the stacked ops per edge, weights gathered per cell)
    gives the reference MixedOp's sum of the ops as modules, each with its own BN, in value and
    gradient; folded with per-task weights too."""
    from tnas.models.fast_edges import FusedEdges
    from tnas.models.supernet import MixedOp

    torch.manual_seed(0)
    edges = torch.nn.ModuleList([MixedOp(channels=4, stride=stride), MixedOp(channels=4, stride=1)]).double()
    fused = FusedEdges(edges, branch_streams=3)
    assert len(fused.layouts[0].normalized) == (6 if stride == 1 else 7)  # all but the stride-1 identity
    assert fused.layouts[1].lanes == (0, 0, 0, 1, 2, 3, 3)  # ops with convolutions on side streams
    x = torch.randn(5, tasks * 4, 6, 6, dtype=torch.float64, requires_grad=True)
    op_weights = torch.softmax(torch.randn(tasks, 2, 7, dtype=torch.float64), -1).requires_grad_(True)
    weights = op_weights if tasks > 1 else op_weights[0]
    got = fused.mixer(edges, weights)(0, x)
    want = edges[0](x, weights[..., 0, :])
    if tasks > 1:  # and the folded reference is the per-task one
        per_task = torch.cat([edges[0](x[:, t * 4:(t + 1) * 4], op_weights[t, 0]) for t in range(tasks)], dim=1)
        torch.testing.assert_close(want, per_task, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    probe = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * probe).sum(), [x, op_weights])
    want_grads = torch.autograd.grad((want * probe).sum(), [x, op_weights])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tasks", [1, 3], ids=["plain", "folded"])
def test_every_execution_plan_gives_the_reference_supernet(tasks):
    """The plan chooses how, never what: logits and gradients of the fast paths (the default, edge by
    edge, source-folded) equal REFERENCE's."""
    from tnas.models.fast_edges import REFERENCE, ExecutionPlan
    from tnas.task_folding import fold_images

    models = {}
    plans = (("reference", REFERENCE), ("default", ExecutionPlan()), ("fused", ExecutionPlan(fold_sources=False)),
             ("sources", ExecutionPlan(fold_sources=True)))
    for name, plan in plans:
        torch.manual_seed(0)
        models[name] = Supernet(n_way=3, C=4, layers=2, in_channels=1, plan=plan).double()
    assert models["reference"].cells[0].fused is None and models["reference"].cells[0].sources is None
    assert models["fused"].cells[0].fused is not None and models["sources"].cells[0].sources is not None
    x = fold_images(torch.randn(tasks, 4, 1, 16, 16, dtype=torch.float64))
    alphas = torch.randn(tasks, 14, 8, dtype=torch.float64, requires_grad=True)
    results = {}
    for name, model in models.items():
        model.load_state_dict(models["reference"].state_dict())
        logits = model(x, alphas, alphas) if tasks > 1 else model(x, alphas[0], alphas[0])
        weights = list(model.weights()) + [alphas]  # the alphas passed in are the ones used
        results[name] = [logits.detach()] + list(torch.autograd.grad(logits.square().sum(), weights))
    for name in ("default", "fused", "sources"):
        for want, got in zip(results["reference"], results[name]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------- source folding

SOURCE_CASES = {  # name: (tasks, which weights are per task, alphas per task)
    "plain": (1, "none", False),
    "folded_per_task": (3, "all", True),
    "folded_shared_alphas": (3, "all", False),
    "folded_half_shared_weights": (3, "half", True),
}


def reference_and_source_folded(layers):
    """The same float64 supernet (alphas far from uniform) under REFERENCE and with source folding."""
    from tnas.models.fast_edges import REFERENCE, ExecutionPlan

    models = {}
    for name, plan in (("reference", REFERENCE), ("sources", ExecutionPlan(fold_sources=True, branch_streams=2))):
        torch.manual_seed(0)
        models[name] = Supernet(n_way=3, C=C_SMALL, layers=layers, in_channels=1, plan=plan).double()
    with torch.no_grad():
        for alpha in models["reference"].alphas():
            alpha.normal_(0, 0.7)
    models["sources"].load_state_dict(models["reference"].state_dict())
    assert models["sources"].cells[0].sources is not None and models["sources"].cells[0].fused is None
    assert models["reference"].cells[0].sources is None and models["reference"].cells[0].fused is None
    return models


def source_case_params(model, tasks, weights, alphas_per_task):
    """The parameters a folded forward gets: ``[T, ...]`` per task (perturbed per task) or shared."""
    per_task = batched_parameters(model, tasks=tasks, scale=0.1, seed=5)
    names = [name for name, _ in model.named_weights()]
    chosen = {"none": [], "all": names, "half": names[::2]}[weights] + (
        [name for name, _ in model.named_alphas()] if alphas_per_task else [])
    return {name: (per_task[name] if name in chosen else p.detach().clone()).requires_grad_(True)
            for name, p in model.named_parameters()}


@pytest.mark.parametrize("layers, size", [(1, 16), (2, 20)], ids=["reduction_cell", "normal_and_odd_reduction"])
@pytest.mark.parametrize("case", list(SOURCE_CASES))
def test_source_folded_supernet_equals_reference_in_value_and_gradient(layers, size, case):
    """All edges from a state at once (pools and identity once per state, the convs of its edges as
    one grouped conv per layer, one BN) gives REFERENCE's logits and gradients of every weight and
    alpha: unfolded, and T folded tasks with per-task or shared weights and alphas. Layers 2 at 20x20
    puts the reduction cell on a 5x5 map (FactorizedReduce pads)."""
    from torch.func import functional_call

    from tnas.task_folding import fold_images

    tasks, weights, alphas_per_task = SOURCE_CASES[case]
    models = reference_and_source_folded(layers)
    params = source_case_params(models["reference"], tasks, weights, alphas_per_task)
    x = fold_images(torch.randn(tasks, 4, 1, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    probe = torch.randn(4, tasks * 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, model in models.items():
        logits = functional_call(model, params, (x,))
        grads = torch.autograd.grad((logits * probe).sum(), list(params.values()), allow_unused=True)
        results[name] = [logits] + [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
    for label, got, want in zip(["logits", *params], results["sources"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=label)
    assert results["reference"][list(params).index("alpha_reduce") + 1].abs().max() > 1e-6  # a real gradient


def test_source_folded_second_order_gradient_equals_reference():
    """Gradient of a gradient (one inner SGD step with create_graph, then a query loss), per-task
    weights and alphas of 2 folded tasks: the second-order meta-gradient, w.r.t. weights and alphas."""
    from torch.func import functional_call

    from tnas.task_folding import fold_images, unfold_logits

    tasks = 2
    models = reference_and_source_folded(layers=2)
    params = source_case_params(models["reference"], tasks, "all", alphas_per_task=True)
    generator = torch.Generator().manual_seed(3)
    support, query = (fold_images(torch.randn(tasks, 3, 1, 16, 16, dtype=torch.float64, generator=generator))
                      for _ in range(2))
    labels = torch.arange(3).repeat(tasks)

    def loss(model, values, x):
        return F.cross_entropy(unfold_logits(functional_call(model, values, (x,)), tasks).flatten(0, 1), labels)

    results = {}
    for name, model in models.items():
        inner = torch.autograd.grad(loss(model, params, support), list(params.values()), create_graph=True)
        fast = {n: p - 0.1 * g for (n, p), g in zip(params.items(), inner)}
        results[name] = torch.autograd.grad(loss(model, fast, query), list(params.values()))
    for label, got, want in zip(params, results["sources"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=label)


def test_source_folding_needs_the_fused_edge_path_and_same_ops_per_state():
    from tnas.models.fast_edges import ExecutionPlan
    from tnas.models.source_folding import SourceFolding

    with pytest.raises(ValueError, match="fold_sources needs fused_edges"):
        ExecutionPlan(fused_edges=False, fold_sources=True)
    cell = Supernet(n_way=3, C=C_SMALL, layers=1, in_channels=1, plan=ExecutionPlan(fold_sources=True)).cells[0]
    # the edges from each state, their first node, and which op columns are computed once per state
    assert [(s.edges, s.first_node) for s in cell.sources.sources] == [
        ((0, 2, 5, 9), 0), ((1, 3, 6, 10), 0), ((4, 7, 11), 1), ((8, 12), 2), ((13,), 3)]
    inputs, nodes = cell.sources.sources[0], cell.sources.sources[2]  # reduction cell: stride 2, then 1
    assert (inputs.pools, inputs.identity, inputs.per_edge) == ((0, 1), None, (2, 3, 4, 5, 6))
    assert (nodes.pools, nodes.identity, nodes.per_edge) == ((0, 1), 2, (3, 4, 5, 6))
    edges = list(cell.edges)
    edges[2] = edges[4]  # a stride-1 edge (from node 0) among the stride-2 edges from state 0
    with pytest.raises(ValueError, match="edges from state 0 do not have the same ops"):
        SourceFolding(edges, steps=4, channels=C_SMALL, branch_streams=0)
