"""MAML++ components of tnas.meta.maml_pp, each shown to change what it should (float64, tiny network)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

from tnas.genotypes import Genotype
from tnas.meta.learner import MetaLearner
from tnas.meta.maml import inner_loop, model_forward, query_loss_and_accuracy
from tnas.meta.maml_pp import (MAMLConfig, MAMLPlusPlus, cosine_lr, extend_steps, first_order_at, msl_weights)
from tnas.models.network import Network
from tnas.models.per_step_bn import make_per_step_batch_norm, select_batch_norm_set

TASKS, N_WAY, K_SHOT, Q_QUERY, SIDE = 2, 3, 1, 2, 8
# A small genotype (two nodes) with a parametric op on each cell, so the float64 network stays fast.
GENOTYPE = Genotype(normal=(("sep_conv_3x3", 0), ("skip_connect", 1), ("avg_pool_3x3", 2), ("dil_conv_3x3", 1)),
                    reduce=(("dil_conv_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("avg_pool_3x3", 1)),
                    normal_concat=(2, 3), reduce_concat=(2, 3))


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randn(TASKS, n, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)

    def labels(per_class):
        return torch.arange(N_WAY).repeat_interleave(per_class).repeat(TASKS, 1)

    return SimpleNamespace(support_x=images(N_WAY * K_SHOT), support_y=labels(K_SHOT),
                           query_x=images(N_WAY * Q_QUERY), query_y=labels(Q_QUERY))


def make_network(seed=0):
    torch.manual_seed(seed)
    return Network(GENOTYPE, n_way=N_WAY, C=4, layers=1, in_channels=1).double()


def make_learner(seed=0, **settings):
    settings = {"inner_steps": 2, "inner_steps_test": 4, "inner_lr": 0.1, "meta_lr": 1e-2, **settings}
    return MAMLPlusPlus(make_network(seed), MAMLConfig(**settings))


def captured_gradients(learner, batch, **kwargs):
    """Run a meta-step and return the gradients the optimiser saw (before its step)."""
    seen = {}

    def hook(params):
        for param in params:
            seen[id(param)] = None if param.grad is None else param.grad.clone()

    learner.gradient_hook = hook
    learner.meta_step(batch, **kwargs)
    learner.gradient_hook = None
    return seen


# -- per-step BatchNorm ------------------------------------------------------------------------
def test_per_step_batch_norm_layout():
    model = make_network()
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = make_per_step_batch_norm(model, sets=3)
    assert names and all(n.endswith((".weight", ".bias")) for n in names)
    params = dict(model.named_parameters())
    for name in names:
        assert params[name].shape == (3,) + plain[name].shape
        assert torch.equal(params[name][2], plain[name])
    # at every set the converted network computes what the plain one did (same initial values)
    x = make_batch().query_x[0]
    from torch.func import functional_call
    reference = functional_call(make_network(), plain, (x,))
    for index in range(3):
        out = functional_call(model, select_batch_norm_set(params, names, index), (x,))
        assert torch.allclose(out, reference, atol=1e-12)


def test_per_step_bn_sets_are_used_at_their_step():
    learner = make_learner(per_step_bn=True, inner_steps=3)
    assert learner.batch_norm_names and all(learner.params()[n].shape[0] == 4 for n in learner.batch_norm_names)
    forward = learner.forward_for(3)
    x = make_batch().query_x[0]
    params = {n: p.detach().clone() for n, p in learner.params().items()}
    before = [forward(params, x, step) for step in range(4)]
    perturbed = dict(params)
    for name in learner.batch_norm_names:
        value = params[name].clone()
        value[1] += 0.5
        perturbed[name] = value
    after = [forward(perturbed, x, step) for step in range(4)]
    for step in range(4):
        changed = not torch.allclose(before[step], after[step])
        assert changed == (step == 1), f"step {step}"


def test_gradient_reaches_only_the_sets_used():
    learner = make_learner(per_step_bn=True, inner_steps=3)
    params = learner.params()
    forward = learner.forward_for(3)
    x, y = make_batch().query_x[0], make_batch().query_y[0]
    loss = torch.nn.functional.cross_entropy(forward(params, x, 2), y)
    names = learner.batch_norm_names
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    for grad in grads:
        assert grad[2].abs().sum() > 0
        assert grad[[0, 1, 3]].abs().sum() == 0

    # a meta-step: first order without the multi-step loss trains only the final set S (support forwards
    # reach the meta-gradient only through second-order terms); second order reaches every set
    batch = make_batch()
    first = make_learner(per_step_bn=True, inner_steps=2)
    seen = captured_gradients(first, batch)
    for name in first.batch_norm_names:
        grad = seen[id(first.params()[name])]
        assert grad[2].abs().sum() > 0 and grad[:2].abs().sum() == 0
    second = make_learner(per_step_bn=True, inner_steps=2, first_order=False)
    seen = captured_gradients(second, batch)
    assert all(bool((seen[id(second.params()[n])].abs().sum(dim=-1) > 0).all()) for n in second.batch_norm_names
               if n.endswith(".weight"))
    msl = make_learner(per_step_bn=True, inner_steps=2, multi_step_loss=True)
    seen = captured_gradients(msl, batch)
    for name in msl.batch_norm_names:  # query losses after steps 1 and 2 use sets 1 and 2
        grad = seen[id(msl.params()[name])]
        assert grad[1].abs().sum() > 0 and grad[2].abs().sum() > 0 and grad[0].abs().sum() == 0


def test_per_step_bn_is_not_adapted_and_test_steps_map_to_trained_sets():
    learner = make_learner(per_step_bn=True, inner_steps=2)
    assert not set(learner.batch_norm_names) & set(learner.learning_rates())
    assert [learner.batch_norm_set(s, 4) for s in range(5)] == [0, 1, 1, 1, 2]  # more steps than trained
    assert [learner.batch_norm_set(s, 2) for s in range(3)] == [0, 1, 2]
    assert [learner.batch_norm_set(s, 1) for s in range(2)] == [0, 2]
    stats = learner.evaluate(make_batch(), steps=4, track_steps=True)
    assert stats.per_step_accuracy.shape == (5, TASKS) and torch.isfinite(stats.query_loss).all()


# -- learned inner learning rates ------------------------------------------------------------------
@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
def test_learned_learning_rates_get_gradients_and_change(first_order):
    learner = make_learner(learn_inner_lr=True, first_order=first_order)
    assert set(learner.learned_lrs) == set(dict(learner.model.named_parameters()))
    initial = {n: lr.detach().clone() for n, lr in learner.learned_lrs.items()}
    assert all(torch.equal(lr, torch.full((2,), 0.1, dtype=torch.float64)) for lr in initial.values())
    seen = captured_gradients(learner, make_batch())
    for name, lr in learner.learned_lrs.items():
        grad = seen[id(lr)]
        assert grad is not None and bool((grad != 0).all()), name  # every step's rate
        assert not torch.equal(lr.detach(), initial[name])


def test_learned_rates_beyond_trained_steps_repeat_the_last():
    rates = torch.tensor([0.1, 0.2, 0.3])
    assert torch.equal(extend_steps(rates, 2), torch.tensor([0.1, 0.2]))
    assert torch.equal(extend_steps(rates, 5), torch.tensor([0.1, 0.2, 0.3, 0.3, 0.3]))
    learner = make_learner(learn_inner_lr=True)
    rates = learner.learning_rates(steps=4)
    assert all(r.shape == (4,) for r in rates.values())
    assert learner.evaluate(make_batch(), steps=4).query_accuracy.shape == (TASKS,)


def test_learned_rates_are_used_by_the_inner_loop():
    """With every rate zero nothing adapts: the evaluation equals the unadapted network's."""
    learner = make_learner(learn_inner_lr=True)
    with torch.no_grad():
        for lr in learner.learned_lrs.values():
            lr.zero_()
    batch = make_batch()
    stats = learner.evaluate(batch, steps=3, track_steps=True)
    assert torch.allclose(stats.per_step_loss[0], stats.per_step_loss[-1])


# -- multi-step loss ---------------------------------------------------------------------------
def test_msl_weights_schedule():
    steps, epochs = 5, 10
    for epoch in range(0, 14):
        weights = msl_weights(epoch, steps, epochs, dtype=torch.float64)
        assert weights.shape == (steps,) and abs(float(weights.sum()) - 1.0) < 1e-12
        assert bool((weights >= 0).all())
        if epoch > 0:
            previous = msl_weights(epoch - 1, steps, epochs, dtype=torch.float64)
            assert bool((weights[:-1] <= previous[:-1]).all()) and weights[-1] >= previous[-1]
    assert torch.allclose(msl_weights(0, steps, epochs, dtype=torch.float64), torch.full((steps,), 0.2,
                                                                                         dtype=torch.float64))
    for epoch in (epochs, epochs + 3):
        assert torch.equal(msl_weights(epoch, steps, epochs, dtype=torch.float64),
                           torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    half = msl_weights(5, steps, epochs, dtype=torch.float64)
    assert torch.allclose(half, torch.tensor([0.1, 0.1, 0.1, 0.1, 0.6], dtype=torch.float64))


def test_multi_step_loss_is_the_weighted_sum_of_per_step_query_losses():
    batch = make_batch()
    learner = make_learner(multi_step_loss=True, msl_epochs=4, inner_steps=2)
    learner.set_progress(iteration=2, iterations_per_epoch=2, epochs=10)  # epoch 1
    assert learner.epoch == 1 and learner.multi_step_loss_active()
    weights = msl_weights(1, 2, 4, dtype=torch.float64)
    # by hand: a plain MAML inner loop of 1 and of 2 steps on a copy of the same network
    reference_model = make_network()
    forward = model_forward(reference_model)
    params = dict(reference_model.named_parameters())
    rates = {n: 0.1 for n in params}
    total = 0
    for steps in (1, 2):
        result = inner_loop(forward, params, rates, batch.support_x, batch.support_y, steps, first_order=True)
        loss, _ = query_loss_and_accuracy(forward, result.task_params, {}, batch.query_x, batch.query_y, steps)
        total = total + weights[steps - 1] * loss.mean()
    expected = torch.autograd.grad(total, list(params.values()))
    seen = captured_gradients(learner, batch)
    for (name, param), want in zip(learner.model.named_parameters(), expected):
        got = seen[id(param)]
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), name
    # after msl_epochs only the final loss is computed: same gradient as plain MAML
    late = make_learner(multi_step_loss=True, msl_epochs=4, inner_steps=2)
    late.set_progress(iteration=8, iterations_per_epoch=2, epochs=10)
    assert not late.multi_step_loss_active()
    plain = make_learner(inner_steps=2)
    late_seen, plain_seen = captured_gradients(late, batch), captured_gradients(plain, batch)
    for a, b in zip(late.model.parameters(), plain.model.parameters()):
        assert torch.equal(late_seen[id(a)], plain_seen[id(b)])


# -- derivative-order annealing and cosine learning rate ------------------------------------------------
def test_derivative_order_annealing_switches_at_the_epoch():
    assert first_order_at(0, 3, default=True) and first_order_at(2, 3, default=True)
    assert not first_order_at(3, 3, default=True) and not first_order_at(7, 3, default=True)
    assert first_order_at(7, None, default=True) and not first_order_at(0, None, default=False)
    learner = make_learner(first_order_epochs=2)
    orders = []
    for iteration in range(0, 8):
        learner.set_progress(iteration, iterations_per_epoch=2, epochs=4)
        orders.append(learner.first_order)
    assert orders == [True] * 4 + [False] * 4
    # and the order changes the meta-gradient (second order differs from first order)
    batch = make_batch()
    first = make_learner(first_order_epochs=2)
    first.set_progress(0, 2, 4)
    second = make_learner(first_order_epochs=2)
    second.set_progress(4, 2, 4)
    first_seen, second_seen = captured_gradients(first, batch), captured_gradients(second, batch)
    difference = max(float((first_seen[id(a)] - second_seen[id(b)]).abs().max())
                     for a, b in zip(first.model.parameters(), second.model.parameters()))
    assert difference > 1e-8


def test_cosine_learning_rate_follows_maml_pp_schedule():
    # MAML++'s code: CosineAnnealingLR(T_max=epochs, eta_min) stepped with the epoch index
    for length in (2, 10, 15):
        weights = [torch.zeros(1, requires_grad=True)]
        optimizer = torch.optim.Adam(weights, lr=1e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=length, eta_min=1e-5)
        reference = []
        for _ in range(length):
            reference.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert [cosine_lr(i, length, 1e-3, 1e-5) for i in range(length)] == pytest.approx(reference, rel=1e-9)
    assert cosine_lr(0, 10, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert cosine_lr(14, 15, 1e-3, 1e-5) == pytest.approx(2.08e-5, rel=1e-2)  # above the minimum at the end
    values = [cosine_lr(i, 10, 1e-3, 1e-5) for i in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))
    per_epoch = make_learner(cosine_lr=True, meta_lr=1e-3, min_meta_lr=1e-5)
    per_iteration = make_learner(cosine_lr=True, meta_lr=1e-3, min_meta_lr=1e-5, cosine_unit="iteration")
    epoch_lrs, iteration_lrs = [], []
    for iteration in range(12):  # 3 epochs of 4 iterations
        per_epoch.set_progress(iteration, 4, 3)
        per_iteration.set_progress(iteration, 4, 3)
        epoch_lrs.append(per_epoch.optimizers["weights"].param_groups[0]["lr"])
        iteration_lrs.append(per_iteration.optimizers["weights"].param_groups[0]["lr"])
    last = cosine_lr(2, 3, 1e-3, 1e-5)
    assert epoch_lrs[:4] == [pytest.approx(1e-3)] * 4 and epoch_lrs[-4:] == [pytest.approx(last)] * 4
    assert epoch_lrs[4] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * 1.5)  # a third of the way: cos(pi/3) = 1/2
    assert iteration_lrs[0] == pytest.approx(1e-3) and iteration_lrs[-1] == pytest.approx(cosine_lr(11, 12, 1e-3, 1e-5))
    assert len(set(iteration_lrs)) == 12
    constant = make_learner(meta_lr=1e-3)
    constant.set_progress(11, 4, 3)
    assert constant.optimizers["weights"].param_groups[0]["lr"] == 1e-3


# -- the learner as a whole -----------------------------------------------------------------------
def test_all_switches_off_is_plain_maml():
    batch = make_batch()
    learner = make_learner()
    model = make_network()
    plain = MetaLearner(model, {"weights": [n for n, _ in model.named_parameters()]}, {"weights": 0.1},
                        {"weights": torch.optim.Adam(model.parameters(), lr=1e-2)}, inner_steps=2, inner_steps_test=4)
    learner.meta_step(batch)
    plain.meta_step(batch)
    for (name, a), b in zip(learner.model.named_parameters(), plain.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-13), name
    mine, theirs = learner.evaluate(batch, steps=3), plain.evaluate(batch, steps=3)
    assert torch.allclose(mine.query_loss, theirs.query_loss, atol=1e-6)


def test_state_dict_round_trip_with_every_component():
    settings = dict(per_step_bn=True, learn_inner_lr=True, multi_step_loss=True, cosine_lr=True,
                    first_order_epochs=1)
    batch = make_batch()
    learner = make_learner(**settings)
    learner.set_progress(0, 2, 2)
    learner.meta_step(batch)
    state = learner.state_dict()
    again = make_learner(seed=1, **settings)
    again.load_state_dict(state)
    for name, lr in learner.learned_lrs.items():
        assert torch.equal(lr, again.learned_lrs[name])
    one, two = learner.evaluate(batch, steps=4), again.evaluate(batch, steps=4)
    assert torch.equal(one.query_loss, two.query_loss)
    assert MAMLConfig.from_dict(learner.config.to_dict()) == learner.config


def test_drop_path_only_in_meta_training():
    model = Network(GENOTYPE, n_way=N_WAY, C=4, layers=1, in_channels=1, drop_path_prob=0.5).double()
    learner = MAMLPlusPlus(model, MAMLConfig(inner_steps=1, inner_steps_test=2))
    batch = make_batch()
    first, second = learner.evaluate(batch), learner.evaluate(batch)
    assert torch.equal(first.query_loss, second.query_loss)  # deterministic: no drop-path at evaluation
    assert learner.model.training


def test_loss_scale_and_gradient_hook_for_data_parallelism():
    """A data-parallel rank scales its loss by its share of the batch (MetaLearner.loss_scale)."""
    batch = make_batch()
    settings = dict(per_step_bn=True, learn_inner_lr=True, multi_step_loss=True)
    full, half = make_learner(**settings), make_learner(**settings)
    half.loss_scale = 0.5
    full_seen, half_seen = captured_gradients(full, batch), captured_gradients(half, batch)
    stepped = list(full.model.parameters()) + list(full.learned_lrs.values())
    assert len(full_seen) == len(stepped)  # the hook sees every meta-learned tensor
    for a, b in zip(stepped, list(half.model.parameters()) + list(half.learned_lrs.values())):
        assert torch.allclose(half_seen[id(b)], 0.5 * full_seen[id(a)], rtol=1e-12, atol=1e-15)


# -- gradient clamp ----------------------------------------------------------------------------
def test_grad_clamp_clamps_network_meta_gradients_not_learned_rates():
    settings = dict(per_step_bn=True, learn_inner_lr=True, multi_step_loss=True)
    batch = make_batch()
    free = make_learner(**settings)
    seen = captured_gradients(free, make_batch())  # the unclamped meta-gradients of the same first step
    network = [p for p in free.model.parameters()]
    rates = list(free.learned_lrs.values())
    # a bound that cuts some network elements and lies below some learned-rate gradients
    largest = torch.cat([seen[id(p)].abs().flatten() for p in network if seen[id(p)] is not None])
    clamp = float(largest.quantile(0.9))
    assert any(float(seen[id(r)].abs().max()) > clamp for r in rates if seen[id(r)] is not None)

    # Adam's first step is nearly sign(g) whatever the magnitude: three steps let the moments show the clamp
    batches = [batch, make_batch(1), make_batch(2)]
    clamped, reference, unclamped = (make_learner(grad_clamp=clamp, **settings), make_learner(**settings),
                                     make_learner(**settings))
    for step_batch in batches:
        clamped.meta_step(step_batch)
        unclamped.meta_step(step_batch)
        reference.meta_gradients(step_batch)
        with torch.no_grad():
            for param in reference.model.parameters():
                if param.grad is not None:
                    param.grad.clamp_(-clamp, clamp)
        reference.optimizers["weights"].step()
    for (name, a), b in zip(clamped.model.named_parameters(), reference.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
    for name in clamped.learned_lrs:
        assert torch.allclose(clamped.learned_lrs[name], reference.learned_lrs[name], rtol=0, atol=1e-12), name
    difference = max(float((a - b).detach().abs().max()) for a, b in zip(clamped.model.parameters(),
                                                                 unclamped.model.parameters()))
    assert difference > 1e-6
    with pytest.raises(ValueError, match="grad_clamp must be > 0"):
        MAMLConfig(grad_clamp=0.0)


# -- meta-test adaptation against a plain per-task loop -------------------------------------------------
def per_step_bn_names(model):
    """The affine BatchNorm weights and biases of ``model``, found from its modules (not the learner's list)."""
    return {f"{name}.{attribute}" for name, module in model.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.affine
            for attribute in ("weight", "bias")}


def plain_per_step_adaptation(learner, batch, steps):
    """MAML++ meta-test adaptation by hand, one task at a time: ``torch.func.functional_call`` of the
    learner's network on one task's images ``[N, C, H, W]``, ``torch.autograd.grad`` of its mean support
    cross-entropy, ``w - lr * g`` with the learned rate of the step.

    The mapping written out (``S`` = trained inner steps): inner step ``s`` (0-based, the network adapted
    ``s`` times) runs its support forward with BN set ``min(s, S-1)`` and updates every non-BN tensor with
    its learned rate ``lr[min(s, S-1)]``; the network after the final update runs the query with set ``S``,
    whatever ``steps`` is. The query before step ``s`` (tracked diagnostics) uses the support's set ``min(s, S-1)``.

    Returns, per task, the adapted tensors (name -> tensor) and the query logits ``[steps + 1]`` of
    ``[N, n_way]`` (before each step, then after the last).
    """
    model = learner.model
    trained = learner.config.inner_steps
    batch_norm = per_step_bn_names(model)
    meta = {name: param.detach() for name, param in model.named_parameters()}
    rates = {name: rate.detach() for name, rate in learner.learned_lrs.items()}

    def forward(fast, bn_set, images):
        params = {name: meta[name][bn_set] if name in batch_norm else fast[name] for name in meta}
        return functional_call(model, params, (images,))

    tasks = []
    for task in range(batch.support_x.shape[0]):
        fast = {name: value.clone().requires_grad_(True) for name, value in meta.items() if name not in batch_norm}
        query_logits = []
        for step in range(steps):
            trained_step = min(step, trained - 1)
            with torch.no_grad():
                query_logits.append(forward(fast, trained_step, batch.query_x[task]))
            loss = torch.nn.functional.cross_entropy(forward(fast, trained_step, batch.support_x[task]),
                                                     batch.support_y[task])
            grads = torch.autograd.grad(loss, list(fast.values()))
            fast = {name: (value - rates[name][trained_step] * grad).detach().requires_grad_(True)
                    for (name, value), grad in zip(fast.items(), grads)}
        with torch.no_grad():
            query_logits.append(forward(fast, trained, batch.query_x[task]))
        tasks.append(({name: value.detach() for name, value in fast.items()}, query_logits))
    return tasks


@pytest.mark.parametrize("test_steps", [4, 2, 1], ids=["more_than_trained", "as_trained", "fewer_than_trained"])
def test_evaluation_with_per_step_bn_and_learned_rates_matches_a_plain_loop(test_steps):
    """Trained with 2 inner steps, adapted with ``test_steps`` at meta-test: ``evaluate`` (query loss and
    accuracy, the tracked per-step ones) and ``adapt`` (the fast weights) against
    :func:`plain_per_step_adaptation`, to 1e-10 in float64. Every learned rate differs per tensor and
    step and every BN set differs from the others, so a wrong rate or set beyond the trained steps
    (or a wrong final set) changes the numbers."""
    learner = make_learner(per_step_bn=True, learn_inner_lr=True, inner_steps=2, inner_steps_test=test_steps)
    assert per_step_bn_names(learner.model) == set(learner.batch_norm_names)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for rate in learner.learned_lrs.values():
            rate.copy_(0.05 + 0.25 * torch.rand(rate.shape, generator=generator, dtype=rate.dtype))
        for name, param in learner.model.named_parameters():
            if name in learner.batch_norm_names:
                param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    batch = make_batch()
    reference = plain_per_step_adaptation(learner, batch, test_steps)
    labels = batch.query_y

    stats = learner.evaluate(batch, track_steps=True)  # default steps: inner_steps_test
    want_loss = torch.stack([torch.stack([torch.nn.functional.cross_entropy(logits, labels[task])
                                          for logits in reference[task][1]]) for task in range(TASKS)], dim=1)
    want_accuracy = torch.stack([torch.stack([(logits.argmax(-1) == labels[task]).float().mean()
                                              for logits in reference[task][1]]) for task in range(TASKS)], dim=1)
    assert stats.per_step_loss.dtype == torch.float64 and stats.per_step_loss.shape == (test_steps + 1, TASKS)
    assert torch.allclose(stats.per_step_loss, want_loss, rtol=0, atol=1e-10)
    assert torch.equal(stats.per_step_accuracy, want_accuracy)
    # the final query loss keeps the run's float64
    assert stats.query_loss.dtype == torch.float64
    assert torch.allclose(stats.query_loss, want_loss[-1], rtol=0, atol=1e-10)
    assert torch.equal(stats.query_accuracy, want_accuracy[-1])

    adapted = learner.adapt(batch.support_x, batch.support_y).task_params
    assert set(adapted) == set(reference[0][0])
    for task in range(TASKS):
        for name, value in reference[task][0].items():
            assert torch.allclose(adapted[name][task], value, rtol=0, atol=1e-10), (task, name)
    # the adaptation moved the query loss, so the comparison covers the updates
    assert float((want_loss[-1] - want_loss[0]).abs().min()) > 1e-4
