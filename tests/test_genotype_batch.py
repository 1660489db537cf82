"""Genotype batching (tnas.models.genotype_batch, tnas.meta.genotype_batch): G genotypes trained as one
network give each genotype its solo result (float64, tiny networks)."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from tnas import task_folding
from tnas.data.episodes import EpisodeBatch
from tnas.genotypes import Genotype
from tnas.meta.genotype_batch import GenotypeBatchLearner, stack_batches
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.models.genotype_batch import GenotypeBatchNetwork
from tnas.models.network import Network
from tnas.ops import Identity

TASKS, N_WAY, K_SHOT, Q_QUERY, SIDE = 2, 3, 1, 2, 16
SHAPE = dict(n_way=N_WAY, C=4, layers=2, in_channels=1)

# Three genotypes of two nodes per cell that share some choices (the same op on the same input at
# the same edge), differ in others (op, input), use identities, a stride-2 skip (FactorizedReduce)
# and, in genotype 1, another normal concat.
GENOTYPES = [
    Genotype(normal=(("sep_conv_3x3", 0), ("skip_connect", 1), ("avg_pool_3x3", 2), ("dil_conv_3x3", 1)),
             reduce=(("dil_conv_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("avg_pool_3x3", 1)),
             normal_concat=(2, 3), reduce_concat=(2, 3)),
    Genotype(normal=(("sep_conv_3x3", 0), ("max_pool_3x3", 0), ("skip_connect", 0), ("sep_conv_5x5", 2)),
             reduce=(("skip_connect", 1), ("max_pool_3x3", 1), ("dil_conv_5x5", 2), ("sep_conv_3x3", 0)),
             normal_concat=(1, 3), reduce_concat=(2, 3)),
    Genotype(normal=(("dil_conv_3x3", 1), ("skip_connect", 1), ("avg_pool_3x3", 2), ("dil_conv_3x3", 1)),
             reduce=(("dil_conv_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("avg_pool_3x3", 0)),
             normal_concat=(2, 3), reduce_concat=(2, 3)),
]
TOLERANCE = 1e-10


def solo_network(g, seed=None, **shape):
    # Each genotype its own seed: the batch must keep each one's initial parameters.
    torch.manual_seed(g if seed is None else seed)
    return Network(GENOTYPES[g], **{**SHAPE, **shape}).double()


def make_batch(seed):
    generator = torch.Generator().manual_seed(seed)

    def images(n):
        return torch.randn(TASKS, n, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)

    def labels(per_class):
        return torch.stack([torch.randperm(N_WAY, generator=generator).repeat_interleave(per_class)
                            for _ in range(TASKS)])

    return EpisodeBatch(images(N_WAY * K_SHOT), labels(K_SHOT), images(N_WAY * Q_QUERY), labels(Q_QUERY))


def stream(g, iteration):
    """Genotype g's meta-batch at ``iteration``: each genotype its own task stream."""
    return make_batch(1000 * g + iteration)


def assert_close(actual, expected, what):
    if isinstance(expected, dict):
        assert set(actual) == set(expected), what
        for key in expected:
            assert_close(actual[key], expected[key], f"{what}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{what}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        assert error <= TOLERANCE, f"{what}: max difference {error:.3g}"
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


# -- the network -----------------------------------------------------------------------------------
def test_choices_are_grouped_and_identities_have_no_op():
    model = GenotypeBatchNetwork.from_networks([solo_network(g) for g in range(3)])
    normal = model.cells[0]
    # Edge 0 of the normal cell: sep_conv_3x3 on input 0 (genotypes 0 and 1), dil_conv_3x3 on 1 (genotype 2).
    assert [(c.op, c.source, c.genotypes) for c in normal.choices[0]] == [
        ("sep_conv_3x3", 0, (0, 1)), ("dil_conv_3x3", 1, (2,))]
    assert model.rows("cells.0.edges.0.0.0.1.weight") == 2
    assert model.rows("cells.0.edges.0.1.1.weight") == 1
    # Edge 1: skip_connect on input 1 (genotypes 0, 2) is an identity: no parameters, no op.
    assert isinstance(normal.edges[1][0], Identity) and normal.choices[1][0].genotypes == (0, 2)
    assert not any(name.startswith("cells.0.edges.1.0.") for name, _ in model.named_parameters())
    assert model.rows("stem.0.weight") == 3
    # Every solo parameter has exactly one batched row, and the batch holds nothing else.
    solo_total = sum(p.numel() for g in range(3) for p in solo_network(g).parameters())
    assert sum(p.numel() for p in model.parameters()) == solo_total


def test_forward_matches_each_solo_network_per_task():
    """Per-(genotype, task) parameters on folded images give each genotype's solo folded forward."""
    networks = [solo_network(g) for g in range(3)]
    model = GenotypeBatchNetwork.from_networks(networks)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, TASKS, 5, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)
    rows, expected = {}, []
    for g, network in enumerate(networks):
        params = {n: v.detach() + 0.05 * torch.randn(TASKS, *v.shape, generator=generator, dtype=torch.float64)
                  for n, v in network.named_parameters()}
        logits = functional_call(network, params, (task_folding.fold_images(x[g]),))
        expected.append(task_folding.unfold_logits(logits, TASKS))
        for solo, (name, row) in model.genotype_names(g).items():
            rows.setdefault(name, {})[row] = params[solo]
    batched = {name: torch.cat([by_row[r] for r in range(len(by_row))]) for name, by_row in rows.items()}
    logits = model.functional_forward(batched, task_folding.fold_images(x.flatten(0, 1)))
    assert_close(task_folding.unfold_logits(logits, 3 * TASKS), torch.cat(expected), "logits")
    # One channel group per genotype: one task each, the batch's own parameters.
    plain = model(x[:, 0].transpose(0, 1).flatten(1, 2))
    assert_close(plain.view(5, 3, N_WAY).transpose(0, 1), torch.stack([n(x[g, 0]) for g, n in enumerate(networks)]),
                 "plain forward")


def test_genotypes_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="genotype 1 has C 8, genotype 0 has 4"):
        GenotypeBatchNetwork.from_networks([solo_network(0), solo_network(1, C=8)])
    with pytest.raises(ValueError, match="genotype 1 has layers 1, genotype 0 has 2"):
        GenotypeBatchNetwork.from_networks([solo_network(0), solo_network(1, layers=1)])
    three_nodes = Genotype(normal=GENOTYPES[0].normal + (("skip_connect", 3), ("skip_connect", 2)),
                           reduce=GENOTYPES[0].reduce + (("skip_connect", 3), ("skip_connect", 2)),
                           normal_concat=(2, 3), reduce_concat=(2, 3))
    with pytest.raises(ValueError, match="genotype 1 has normal cell nodes 3, genotype 0 has 2"):
        GenotypeBatchNetwork([GENOTYPES[0], three_nodes], **SHAPE)
    longer_concat = Genotype(normal=GENOTYPES[0].normal, reduce=GENOTYPES[0].reduce, normal_concat=(2, 3),
                             reduce_concat=(1, 2, 3))
    with pytest.raises(ValueError, match="reduce_concat length 3, genotype 0 has 2"):
        GenotypeBatchNetwork([GENOTYPES[0], longer_concat], **SHAPE)
    with pytest.raises(ValueError, match="at least one network"):
        GenotypeBatchNetwork.from_networks([])
    changed = MAMLPlusPlus(solo_network(1), MAMLConfig(inner_steps=2, per_step_bn=True)).model
    with pytest.raises(ValueError, match=r"genotype 1: parameter stem.1.weight has shape \(3, 6\), a Network"):
        GenotypeBatchNetwork.from_networks([solo_network(0), changed])


def test_meta_batches_of_other_shapes_are_refused():
    small = make_batch(0)[0:1]
    with pytest.raises(ValueError, match=r"batch 1 has support_x of shape \(1, 3, 1, 16, 16\), batch 0 has \(2, 3"):
        stack_batches([make_batch(0), small])
    learner = GenotypeBatchLearner(GenotypeBatchNetwork.from_networks([solo_network(g) for g in range(3)]),
                                   MAMLConfig(inner_steps=1))
    with pytest.raises(ValueError, match="a meta-batch of 4 tasks does not split over 3 genotypes"):
        learner.meta_step(stack_batches([make_batch(0), make_batch(1)]))


# -- training: batched equals alone ------------------------------------------------------------------
CONFIGS = {
    "first_order": dict(first_order=True),
    "second_order": dict(first_order=False),
    # Every MAML++ switch: per-step BN, learned per-step rates, multi-step loss (annealed), first order
    # for epoch 0 then second order, cosine outer LR.
    "maml_pp": dict(per_step_bn=True, learn_inner_lr=True, multi_step_loss=True, msl_epochs=2,
                    first_order_epochs=1, cosine_lr=True, min_meta_lr=1e-3),
    # MAML++'s gradient clamp, tight enough to cut most elements: elementwise, as each genotype's alone
    "maml_pp_clamped": dict(per_step_bn=True, learn_inner_lr=True, multi_step_loss=True, grad_clamp=1e-3),
}
ITERATIONS = 3


def learner_settings(name):
    return MAMLConfig(**{"inner_steps": 2, "inner_steps_test": 3, "inner_lr": 0.1, "meta_lr": 1e-2,
                         **CONFIGS[name]})


def train_alone(g, name):
    learner = MAMLPlusPlus(solo_network(g), learner_settings(name))
    stats = []
    for iteration in range(ITERATIONS):
        learner.set_progress(iteration, 1, ITERATIONS)
        stats.append(learner.meta_step(stream(g, iteration), track_steps=True))
    return learner, stats


def train_batched(name, genotypes=(0, 1, 2)):
    model = GenotypeBatchNetwork.from_networks([solo_network(g) for g in genotypes])
    learner = GenotypeBatchLearner(model, learner_settings(name))
    stats = []
    for iteration in range(ITERATIONS):
        learner.set_progress(iteration, 1, ITERATIONS)
        batch = stack_batches([stream(g, iteration) for g in genotypes])
        stats.append(learner.split_stats(learner.meta_step(batch, track_steps=True)))
    return learner, stats


def stats_fields(stats):
    return [stats.query_loss, stats.query_accuracy, stats.per_step_loss, stats.per_step_accuracy]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_training_equals_training_alone(name):
    batched, batched_stats = train_batched(name)
    for g in range(3):
        alone, alone_stats = train_alone(g, name)
        # Parameters, learned rates and Adam moments: the solo learner's checkpoint, to 1e-10.
        assert_close(batched.genotype_state_dict(g), alone.state_dict(), f"{name} genotype {g}")
        for iteration in range(ITERATIONS):
            assert_close(stats_fields(batched_stats[iteration][g]), stats_fields(alone_stats[iteration]),
                         f"{name} genotype {g} iteration {iteration} stats")
        # Meta-test adaptation (more steps than trained) scores each genotype as alone.
        test_batch = make_batch(777 + g)
        expected = alone.evaluate(test_batch, track_steps=True)
        others = [make_batch(777 + other) for other in range(3)]
        actual = batched.split_stats(batched.evaluate(stack_batches(others), track_steps=True))[g]
        assert_close(stats_fields(actual), stats_fields(expected), f"{name} genotype {g} evaluation")


def test_solo_checkpoints_load_into_a_batch_and_training_continues_as_alone():
    """A batch resumed from its genotypes' solo checkpoints (optimiser moments included) keeps training
    each genotype as its solo run would."""
    name = "maml_pp"
    solo = [MAMLPlusPlus(solo_network(g), learner_settings(name)) for g in range(3)]
    for g, learner in enumerate(solo):
        learner.set_progress(0, 1, ITERATIONS)
        learner.meta_step(stream(g, 0))
    fresh = GenotypeBatchNetwork.from_networks([solo_network(g, seed=g + 10) for g in range(3)])
    batched = GenotypeBatchLearner(fresh, learner_settings(name))
    for g, learner in enumerate(solo):
        batched.load_genotype_state_dict(g, learner.state_dict())
    for iteration in (1, 2):
        batched.set_progress(iteration, 1, ITERATIONS)
        batched.meta_step(stack_batches([stream(g, iteration) for g in range(3)]))
        for g, learner in enumerate(solo):
            learner.set_progress(iteration, 1, ITERATIONS)
            learner.meta_step(stream(g, iteration))
    for g, learner in enumerate(solo):
        assert_close(batched.genotype_state_dict(g), learner.state_dict(), f"resumed genotype {g}")
    # Network and learned rates alone (scoring a trained genotype) load too.
    scoring = GenotypeBatchLearner(GenotypeBatchNetwork.from_networks([solo_network(g, seed=g + 20) for g in range(3)]),
                                   learner_settings(name))
    for g, learner in enumerate(solo):
        state = learner.state_dict()
        scoring.load_genotype_state_dict(g, {"model": state["model"], "inner_lrs": state["inner_lrs"]})
        assert_close(scoring.genotype_state_dict(g)["model"], state["model"], f"scoring genotype {g}")
    # And the extracted state loads into a solo learner of that genotype.
    restored = MAMLPlusPlus(solo_network(0), learner_settings(name))
    restored.load_state_dict(batched.genotype_state_dict(0))
    # a learner keeps its own optimiser settings on load; the schedule (cosine LR) sets the
    # current rate from the position, as the engine does before every step
    restored.set_progress(ITERATIONS - 1, 1, ITERATIONS)
    assert_close(restored.state_dict(), solo[0].state_dict(), "restored solo learner")


def test_drop_path_draws_per_genotype_and_task_in_training_only():
    networks = [solo_network(g, layers=1) for g in range(3)]
    for network in networks:
        network.drop_path_prob = 0.5
    model = GenotypeBatchNetwork.from_networks(networks)
    x = torch.randn(4, 1, SIDE, SIDE, dtype=torch.float64)
    model.eval()
    for network in networks:
        network.eval()
    expected = torch.stack([network(x) for network in networks], 1).flatten(1)
    assert_close(model(x.repeat(1, 3, 1, 1)), expected, "eval mode: no drop-path")
    model.train()
    torch.manual_seed(0)
    first = model(x.repeat(1, 3, 1, 1))
    second = model(x.repeat(1, 3, 1, 1))
    assert torch.isfinite(first).all() and not torch.allclose(first, second)
    # Three copies of one network on one input: equal without drop-path, and each genotype draws
    # its own masks with it.
    copies = [solo_network(0, seed=0, layers=1) for _ in range(3)]
    for network in copies:
        network.drop_path_prob = 0.5
    twins = GenotypeBatchNetwork.from_networks(copies)
    twins.eval()
    out = twins(x.repeat(1, 3, 1, 1)).view(4, 3, N_WAY)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    twins.train()
    out = twins(x.repeat(1, 3, 1, 1)).view(4, 3, N_WAY)
    assert not torch.allclose(out[:, 0], out[:, 1]) and not torch.allclose(out[:, 1], out[:, 2])


# -- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_batched_equals_alone_also_replayed_as_a_cuda_graph():
    from tnas.meta.cuda_graph import GraphedStep, make_optimizers_capturable

    name, iterations = "maml_pp", 4
    settings = learner_settings(name)
    settings.cosine_lr = False  # a graph freezes the outer learning rate between captures

    def batch_at(iteration):
        return stack_batches([stream(g, iteration) for g in range(3)]).to("cuda")

    def batched_learner():
        model = GenotypeBatchNetwork.from_networks([solo_network(g).cuda() for g in range(3)])
        return GenotypeBatchLearner(model, settings)

    eager, graphed = batched_learner(), batched_learner()
    # all capturable: plain Adam's bias correction (a Python float) differs from capturable Adam's (a float32
    # step tensor) by ~1e-7 relative per step, which would hide what this checks (test_gpu.graphed_and_eager)
    make_optimizers_capturable([*eager.optimizers.values(), *graphed.optimizers.values()])
    step = GraphedStep(lambda batch: graphed.meta_step(batch), warmup=2)
    for iteration in range(iterations):
        want, got = eager.meta_step(batch_at(iteration)), step(batch_at(iteration))
        torch.testing.assert_close(got.query_loss, want.query_loss, rtol=1e-9, atol=1e-12)
    assert step.captured
    for g in range(3):
        alone = MAMLPlusPlus(solo_network(g).cuda(), settings)
        make_optimizers_capturable(alone.optimizers.values())
        for iteration in range(iterations):
            alone.meta_step(stream(g, iteration).to("cuda"))
        expected = alone.state_dict()["model"]
        for learner in (eager, graphed):
            actual = learner.genotype_state_dict(g)["model"]
            for key, value in expected.items():
                torch.testing.assert_close(actual[key], value, rtol=1e-9, atol=1e-11, msg=f"genotype {g} {key}")


def test_building_a_batch_draws_nothing_from_the_global_generator():
    networks = [solo_network(g) for g in range(3)]
    torch.manual_seed(5)
    GenotypeBatchNetwork.from_networks(networks)
    after_build = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_build, torch.rand(3))


def test_unused_solo_parameters_are_found():
    """Genotype 2's normal cell never reads input 0: alone, that preprocessing gets no gradient."""
    model = GenotypeBatchNetwork.from_networks([solo_network(g) for g in range(3)])
    assert {name for name in model.unused[2] if name.startswith("cells.0.")} == {
        "cells.0.preprocess0.1.weight", "cells.0.preprocess0.2.weight", "cells.0.preprocess0.2.bias"}
    assert not any(name.startswith("cells.0.") for name in model.unused[0])
