"""The batched functional MAML engine against a plain per-task autograd reference (float64)."""
from types import SimpleNamespace

import pytest
import torch

from tnas.genotypes import PUBLISHED
import reference
from tnas.meta.maml import expand_to_tasks, inner_loop, model_forward, query_loss_and_accuracy
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.network import Network
from tnas.models.supernet import Supernet

TASKS, N_WAY, K_SHOT, Q_QUERY, SIDE = 2, 3, 1, 2, 8


def make_batch(channels=1, dtype=torch.float64, seed=0, tasks=TASKS):
    generator = torch.Generator().manual_seed(seed)
    def images(n):
        return torch.randn(tasks, n, channels, SIDE, SIDE, generator=generator, dtype=dtype)
    labels = lambda per_class: torch.arange(N_WAY).repeat_interleave(per_class).repeat(tasks, 1)
    return SimpleNamespace(support_x=images(N_WAY * K_SHOT), support_y=labels(K_SHOT),
                           query_x=images(N_WAY * Q_QUERY), query_y=labels(Q_QUERY))


def tiny_supernet(layers=1):
    torch.manual_seed(0)
    # steps=2 (5 edges per cell) keeps float64 CPU convolutions (no MKL-DNN path) fast
    model = Supernet(n_way=N_WAY, C=4, layers=layers, steps=2, multiplier=2, in_channels=1).double()
    with torch.no_grad():  # alphas far from uniform so the alpha gradient is not trivial
        for alpha in model.alphas():
            alpha.normal_(0, 0.5)
    return model


def batched_meta_gradient(forward, params, learning_rates, batch, steps, first_order):
    result = inner_loop(forward, params, learning_rates, batch.support_x, batch.support_y, steps,
                        first_order=first_order)
    shared = {n: p for n, p in params.items() if n not in learning_rates}
    loss, _ = query_loss_and_accuracy(forward, result.task_params, shared, batch.query_x, batch.query_y, steps)
    names = list(params)
    grads = torch.autograd.grad(loss.mean(), [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}


def assert_close_relative(actual, expected, tol=1e-8):
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-30)
        error = (actual[name] - expected[name]).abs().max() / scale
        assert error < tol, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
def test_supernet_meta_gradient_matches_reference(first_order):
    model = tiny_supernet(layers=2)
    forward = model_forward(model)
    params = dict(model.named_parameters())
    rates = {n: 0.1 for n, _ in model.named_weights()}
    rates.update({n: 3.0 for n, _ in model.named_alphas()})
    batch = make_batch()
    got = batched_meta_gradient(forward, params, rates, batch, steps=2, first_order=first_order)
    want = reference.meta_gradient(forward, params, rates, batch.support_x, batch.support_y, batch.query_x,
                                   batch.query_y, steps=2, first_order=first_order)
    assert_close_relative(got, want)
    for name in ("alpha_normal", "alpha_reduce"):
        assert want[name].abs().max() > 1e-6, f"{name} gradient is trivially zero"


def test_first_and_second_order_differ():
    model = tiny_supernet()
    forward = model_forward(model)
    params = dict(model.named_parameters())
    rates = {n: 0.1 for n in params}
    batch = make_batch()
    first = batched_meta_gradient(forward, params, rates, batch, 2, first_order=True)
    second = batched_meta_gradient(forward, params, rates, batch, 2, first_order=False)
    difference = max(float((first[n] - second[n]).abs().max()) for n in params)
    assert difference > 1e-6


def test_derived_network_weights_only_adaptation_matches_reference():
    torch.manual_seed(0)
    model = Network(PUBLISHED["auto_maml_5shot"], n_way=N_WAY, C=4, layers=1, in_channels=1).double()
    forward = model_forward(model)
    params = dict(model.named_parameters())
    # adapt only the classifier and the last cell, keep the stem shared
    rates = {n: 0.05 for n in params if not n.startswith("stem")}
    batch = make_batch()
    for first_order in (True, False):
        got = batched_meta_gradient(forward, params, rates, batch, 3, first_order)
        want = reference.meta_gradient(forward, params, rates, batch.support_x, batch.support_y, batch.query_x,
                                       batch.query_y, 3, first_order)
        assert_close_relative(got, want)


def test_tracked_query_statistics_shapes_and_step_zero():
    model = tiny_supernet()
    forward = model_forward(model)
    params = dict(model.named_parameters())
    batch = make_batch()
    result = inner_loop(forward, params, {n: 0.1 for n in params}, batch.support_x, batch.support_y, 3,
                        query_x=batch.query_x, query_y=batch.query_y, track_query=True)
    assert result.query_loss.shape == (4, TASKS) and result.query_accuracy.shape == (4, TASKS)
    assert result.support_loss.shape == (3, TASKS)
    # step 0 is the query loss of the unadapted model
    logits = torch.stack([model(batch.query_x[t]) for t in range(TASKS)])
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(),
                                                 reduction="none").view(TASKS, -1).mean(1)
    torch.testing.assert_close(result.query_loss[0], expected)
    # adaptation on the support set lowers the support loss
    assert bool((result.support_loss[-1] < result.support_loss[0]).all())


def test_meta_test_adaptation_is_cut_from_the_parameters():
    model = tiny_supernet()
    params = dict(model.named_parameters())
    batch = make_batch()
    result = inner_loop(model_forward(model), params, {n: 0.1 for n in params}, batch.support_x, batch.support_y,
                        2, meta_gradient=False)
    assert all(not p.requires_grad and p.grad_fn is None for p in result.task_params.values())
    expanded = expand_to_tasks(params, 2, meta_gradient=True)
    assert expanded["alpha_normal"].shape == (2, *params["alpha_normal"].shape)


@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
def test_learned_per_step_learning_rates_gradient_matches_reference(first_order):
    """MAML++'s learned per-parameter, per-step rates: their meta-gradient through the batched inner loop equals
    plain per-task autograd's (float64), each rate tensor its own (a mix-up of rates between parameters or
    steps would show here)."""
    model = tiny_supernet()
    params = dict(model.named_parameters())
    batch = make_batch()
    rates = {n: torch.tensor([0.1 + 0.01 * i, 0.05 + 0.01 * i], dtype=torch.float64, requires_grad=True)
             for i, (n, _) in enumerate(model.named_weights())}
    forward = model_forward(model)
    result = inner_loop(forward, params, rates, batch.support_x, batch.support_y, 2, first_order=first_order)
    shared = {n: p for n, p in params.items() if n not in rates}
    loss, _ = query_loss_and_accuracy(forward, result.task_params, shared, batch.query_x, batch.query_y, 2)
    names = list(rates)
    got = dict(zip(names, torch.autograd.grad(loss.mean(), [rates[n] for n in names])))
    total = 0.0
    for task in range(TASKS):
        fast = reference.adapt_one_task(forward, params, rates, batch.support_x[task], batch.support_y[task], 2,
                                        first_order)
        total = total + torch.nn.functional.cross_entropy(forward(fast, batch.query_x[task], 2),
                                                          batch.query_y[task]) / TASKS
    want = dict(zip(names, torch.autograd.grad(total, [rates[n] for n in names])))
    assert all(bool((want[n] != 0).all()) for n in names)  # every parameter's every step matters here
    assert_close_relative(got, want, tol=1e-10)


def plain_scores(forward, params, rates, batch, steps):
    """Each task adapted alone by plain autograd SGD (``steps`` first-order steps), then its query set scored:
    per-task loss and fraction correct, as the evaluation reports them."""
    losses, accuracies = [], []
    for task in range(batch.support_x.shape[0]):
        fast = reference.adapt_one_task(forward, params, rates, batch.support_x[task], batch.support_y[task], steps,
                                        first_order=True)
        logits = forward(fast, batch.query_x[task], steps).detach()
        losses.append(torch.nn.functional.cross_entropy(logits, batch.query_y[task]))
        accuracies.append((logits.argmax(-1) == batch.query_y[task]).double().mean())
    return torch.stack(losses), torch.stack(accuracies)


def test_evaluate_equals_plain_per_task_adaptation_then_scoring():
    """What every reported accuracy comes from, learner.evaluate: T-NAS (weights and alphas adapted, each at its
    own rate) and MAML on a derived network, for more test steps than trained, against a plain loop (float64)."""
    from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus

    supernet = tiny_supernet(layers=2)
    network = Network(PUBLISHED["auto_maml_1shot"], n_way=N_WAY, C=4, layers=1, in_channels=1).double()
    rates = {n: 0.1 for n, _ in supernet.named_weights()}
    rates.update({n: 3.0 for n, _ in supernet.named_alphas()})
    cases = [(TNAS(supernet, TNASConfig(inner_steps=1, inner_steps_test=3, inner_lr_weights=0.1, inner_lr_alphas=3.0)),
              rates),
             (MAMLPlusPlus(network, MAMLConfig(inner_steps=1, inner_steps_test=3, inner_lr=0.2)),
              {n: 0.2 for n, _ in network.named_parameters()})]
    for learner, rates in cases:
        batch = make_batch(seed=5)
        stats = learner.evaluate(batch)
        loss, accuracy = plain_scores(model_forward(learner.model), dict(learner.model.named_parameters()), rates,
                                      batch, 3)
        assert stats.query_loss.dtype == torch.float64  # the run's precision, not float32
        torch.testing.assert_close(stats.query_loss, loss, rtol=0, atol=1e-10)
        torch.testing.assert_close(stats.query_accuracy.double(), accuracy, rtol=0, atol=1e-6)  # k/6, as float32
        unadapted, _ = plain_scores(model_forward(learner.model), dict(learner.model.named_parameters()), rates,
                                    batch, 0)
        assert (loss - unadapted).abs().max() > 1e-3  # the three steps moved the scores: adaptation is checked


@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
def test_learner_meta_gradients_are_exact_in_float64_for_any_task_count(first_order):
    """The learners' own meta-gradients (T-NAS: weights and alphas; MAML++ with the multi-step loss on)
    against the plain reference with 3 tasks, to 1e-10: the mean over tasks stays in float64 (a cast to
    float32 rounded its 1/3 and left only ~3e-8 relative agreement), and so do the reported losses."""
    from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus, msl_weights

    batch = make_batch(seed=2, tasks=3)
    supernet = tiny_supernet()
    search = TNAS(supernet, TNASConfig(inner_steps=1, inner_lr_weights=0.1, inner_lr_alphas=3.0,
                                       first_order=first_order))
    stats = search.meta_gradients(batch)
    assert stats.query_loss.dtype == torch.float64
    rates = {n: 0.1 for n, _ in supernet.named_weights()}
    rates.update({n: 3.0 for n, _ in supernet.named_alphas()})
    expected = reference.meta_gradient(model_forward(supernet), dict(supernet.named_parameters()), rates,
                                       batch.support_x, batch.support_y, batch.query_x, batch.query_y, 1, first_order)
    del expected["alpha_normal"]  # unused with layers=1
    assert_close_relative({n: p.grad for n, p in supernet.named_parameters() if n in expected}, expected, tol=1e-10)

    torch.manual_seed(0)
    network = Network(PUBLISHED["auto_maml_1shot"], n_way=N_WAY, C=4, layers=1, in_channels=1).double()
    maml = MAMLPlusPlus(network, MAMLConfig(inner_steps=2, inner_lr=0.1, multi_step_loss=True, msl_epochs=4,
                                            first_order=first_order))
    maml.set_progress(iteration=2, iterations_per_epoch=2, epochs=10)  # epoch 1: every step's loss weighs
    assert maml.multi_step_loss_active()
    maml.meta_gradients(batch)
    params = dict(network.named_parameters())
    weights = msl_weights(1, 2, 4, dtype=torch.float64)
    rates = {n: 0.1 for n in params}
    gradients = [reference.meta_gradient(model_forward(network), params, rates, batch.support_x, batch.support_y,
                                         batch.query_x, batch.query_y, steps, first_order) for steps in (1, 2)]
    assert_close_relative({n: p.grad for n, p in network.named_parameters()},
                          {n: weights[0] * gradients[0][n] + weights[1] * gradients[1][n] for n in params}, tol=1e-10)


def test_tnas_meta_step_updates_weights_and_alphas_with_adam():
    model = tiny_supernet()
    learner = TNAS(model, TNASConfig(inner_steps=1, inner_steps_test=2, inner_lr_weights=0.1, inner_lr_alphas=3.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = make_batch()
    stats = learner.meta_step(batch, track_steps=True)
    assert stats.query_loss.shape == (TASKS,) and stats.per_step_accuracy.shape == (2, TASKS)
    for name, param in model.named_parameters():
        if name == "alpha_normal":  # unused with layers=1
            continue
        assert not torch.equal(before[name], param.detach()), f"{name} was not updated"
    group = learner.optimizers["alphas"].param_groups[0]
    assert (tuple(group["betas"]), group["weight_decay"]) == ((0.5, 0.999), 1e-3)
    # decode: each task's alphas adapted alone (plain autograd SGD, inner_steps_test steps), then decoded
    from tnas.genotypes import decode_genotype

    rates = {n: 0.1 for n, _ in model.named_weights()}
    rates.update({n: 3.0 for n, _ in model.named_alphas()})
    params = dict(model.named_parameters())
    expected = []
    for task in range(TASKS):
        fast = reference.adapt_one_task(model_forward(model), params, rates, batch.support_x[task],
                                        batch.support_y[task], 2, first_order=True)
        expected.append(decode_genotype(fast["alpha_normal"].detach(), fast["alpha_reduce"].detach(), model.steps,
                                        model.multiplier))
    assert learner.decode(batch) == expected
    assert any(genotype != learner.genotype() for genotype in expected)  # the adaptation changed the choice


BF16_MIN_COSINE = 0.95
BF16_MAX_RELATIVE = 0.3
"""Stated tolerance of bf16 autocast meta-gradients against fp32 on :func:`bf16_case`."""


def bf16_case(device):
    """Supernet (C 8, one reduction cell of 2 nodes, grayscale) and 2 tasks, 5-way 5-shot, 32x32."""
    torch.manual_seed(0)
    model = Supernet(n_way=5, C=8, layers=1, steps=2, multiplier=2, in_channels=1).to(device)
    generator = torch.Generator().manual_seed(0)
    labels = lambda per_class: torch.arange(5).repeat_interleave(per_class).repeat(2, 1).to(device)
    images = lambda: torch.randn(2, 25, 1, 32, 32, generator=generator).to(device)
    return model, SimpleNamespace(support_x=images(), support_y=labels(5), query_x=images(), query_y=labels(5))


def assert_bf16_meta_gradient_close_to_fp32(model, batch):
    """Meta-gradients (2 inner steps) under bf16 autocast against fp32 (TF32 off), at the stated
    tolerance: cosine similarity >= BF16_MIN_COSINE, relative norm difference <= BF16_MAX_RELATIVE."""
    grads = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dtype in (None, torch.bfloat16):
            learner = TNAS(model, TNASConfig(inner_steps=2, inner_lr_weights=0.1, inner_lr_alphas=3.0,
                                             amp_dtype=dtype))
            model.zero_grad(set_to_none=True)
            result = learner.adapt(batch.support_x, batch.support_y, 2, meta_gradient=True)
            with learner._autocast(batch.query_x.device):
                loss, _ = query_loss_and_accuracy(learner.forward, result.task_params,
                                                  learner.shared_params(result.task_params), batch.query_x,
                                                  batch.query_y)
            loss.float().mean().backward()
            grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    fast, exact = grads[torch.bfloat16], grads[None]
    cosine = torch.nn.functional.cosine_similarity(fast, exact, dim=0)
    relative = (fast - exact).norm() / exact.norm()
    assert cosine >= BF16_MIN_COSINE, f"bf16 meta-gradient cosine similarity to fp32 is {cosine:.4f}"
    assert relative <= BF16_MAX_RELATIVE, f"bf16 meta-gradient differs from fp32 by {relative:.3f} (relative norm)"


def test_bf16_autocast_meta_gradient_close_to_fp32():
    """The mixed-precision option: bf16 meta-gradients agree with fp32 ones.

    Stated tolerance on :func:`bf16_case` (2 inner steps, inner lr 0.1 for w and 3.0 for
    alpha): cosine similarity >= 0.95 and relative norm difference <= 0.3. Measured on CPU:
    0.986 and 0.17; float16 gives 0.996 and 0.09 on the same case, and at 16x16 bf16 gives
    0.966 and 0.26. The meta-gradient amplifies rounding (BatchNorm over a few support images,
    inner steps on alpha), so bf16 cannot agree more closely; it is an option, not the default
    (docs/design.md section 3). Every convolution really runs in bf16 here: tasks are folded into
    channel groups, and autocast reaches the convolutions (under ``vmap`` it does not).
    """
    assert_bf16_meta_gradient_close_to_fp32(*bf16_case("cpu"))
