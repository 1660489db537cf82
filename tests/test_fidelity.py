"""Fidelity to the original T-NAS code (docs/fidelity.md), fixed without its code.

- FactorizedReduce reads the pixels implied by the original's padding: one zero row/column at
  the top/left of an odd-sized map, then ``x`` and ``x[:, :, 1:, 1:]`` at stride 2 (float64,
  built by hand from pixel indices), folded tasks included;
- the supernet at the paper setting has the original's 201,181 weights, its stem BNs affine,
  adapted in the inner loop and meta-learned; derived networks keep 23,213 / 26,061;
- auto-MAML takes an alpha-step and a weight-step every iteration (alternation is a flag);
- ``--weight_decay`` reaches the from-scratch Adam; the presets carry the original's settings;
- ``--task_pool N`` serves the same N episodes every pass, reshuffled, and resumes exactly;
- ``--normalize`` / ``--resize`` choose the statistics and the cache entry.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tnas import task_folding
from tnas.config import parse_args
from tnas.data import EpisodeSampler, load_split, synthetic_split
from tnas.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from tnas.errors import TnasError
from tnas.genotypes import PUBLISHED
from tnas.meta.auto_maml import ALPHA_STEP, WEIGHT_STEP, AutoMAML, AutoMAMLConfig
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.network import Network
from tnas.models.supernet import Supernet
from tnas.ops import FactorizedReduce, factorized_reduce_inputs
from tnas.stages import search, train
from tnas.stages.search import build_auto_maml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEM_BN = ("stem.1.weight", "stem.1.bias", "stem.5.weight", "stem.5.bias")


# --------------------------------------------------------------------------- FactorizedReduce
def pixels(x: torch.Tensor, rows, cols) -> torch.Tensor:
    """``x[:, :, rows][:, :, :, cols]`` with index -1 meaning a zero (the padding), built pixel by pixel."""
    out = torch.zeros(*x.shape[:2], len(rows), len(cols), dtype=x.dtype)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            if row >= 0 and col >= 0:
                out[:, :, i, j] = x[:, :, row, col]
    return out


def one_by_one(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv by hand: ``weight`` [O, I, 1, 1], ``x`` [B, I, H, W]."""
    return torch.einsum("oi,bihw->bohw", weight[:, :, 0, 0], x)


@pytest.mark.parametrize("size, first, second", [
    (21, [-1] + list(range(1, 21, 2)), list(range(0, 21, 2))),  # odd (84x84 -> 21): zero row/col at top/left
    (20, list(range(0, 20, 2)), list(range(1, 20, 2))),         # even: x and x shifted by one
])
def test_factorized_reduce_reads_the_pixels_of_the_original_padding(size, first, second):
    torch.manual_seed(0)
    op = FactorizedReduce(3, 4, affine=False).double()
    x = torch.rand(2, 3, size, size, dtype=torch.float64)  # >= 0: the op's ReLU keeps it
    expected = torch.cat([one_by_one(op.conv_even.weight, pixels(x, first, first)),
                          one_by_one(op.conv_odd.weight, pixels(x, second, second))], dim=1)
    out = op.convolve(torch.relu(x))
    assert out.shape == (2, 4, (size + 1) // 2, (size + 1) // 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
    normed = op(x)
    mean = expected.mean(dim=(0, 2, 3), keepdim=True)
    var = expected.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(normed, (expected - mean) / torch.sqrt(var + op.bn.eps), rtol=0, atol=1e-12)


def test_factorized_reduce_inputs_pad_each_odd_side_only():
    x = torch.arange(2 * 21 * 20, dtype=torch.float64).view(1, 2, 21, 20)
    first, second = factorized_reduce_inputs(x)
    assert first.shape == (1, 2, 22, 20) and second.shape == (1, 2, 21, 19)
    assert torch.all(first[:, :, 0] == 0) and torch.equal(first[:, :, 1:], x)
    assert torch.equal(second, x[:, :, :, 1:])


def test_factorized_reduce_folded_tasks_equal_each_task_alone():
    torch.manual_seed(1)
    tasks = 3
    op = FactorizedReduce(2, 4, affine=True).double()
    params = {name: torch.randn(tasks, *p.shape, dtype=torch.float64) for name, p in op.named_parameters()}
    x = torch.randn(tasks, 5, 2, 21, 21, dtype=torch.float64)
    out = torch.func.functional_call(op, params, (task_folding.fold_images(x),))
    out = out.view(5, tasks, 4, 11, 11).transpose(0, 1)
    for t in range(tasks):
        alone = torch.func.functional_call(op, {n: p[t] for n, p in params.items()}, (x[t],))
        torch.testing.assert_close(out[t], alone, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- parameter counts and groups
def test_supernet_at_the_paper_setting_has_the_original_weight_count():
    model = Supernet(n_way=5, C=16, layers=2, in_channels=3)
    weights = dict(model.named_weights())
    assert sum(p.numel() for p in weights.values()) == 201_181
    assert sum(weights[name].numel() for name in STEM_BN) == 144  # 2 x 24 + 2 x 48
    assert sum(p.numel() for _, p in model.named_alphas()) == 2 * 14 * 8


@pytest.mark.parametrize("name, count", [("auto_maml_1shot", 23_213), ("auto_maml_5shot", 26_061)])
def test_derived_networks_keep_their_parameter_counts(name, count):
    model = Network(PUBLISHED[name], n_way=5, C=16, layers=2, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == count


def tiny_batch(tasks=2, n_way=3, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    images = lambda n: torch.randn(tasks, n, 1, 8, 8, generator=generator, dtype=dtype)  # noqa: E731
    labels = lambda k: torch.arange(n_way).repeat_interleave(k).repeat(tasks, 1)  # noqa: E731
    return SimpleNamespace(support_x=images(n_way), support_y=labels(1), query_x=images(2 * n_way),
                           query_y=labels(2))


@pytest.mark.parametrize("method", ["tnas", "auto_maml"])
def test_stem_batch_norms_are_adapted_and_meta_learned(method):
    torch.manual_seed(0)
    model = Supernet(n_way=3, C=4, layers=2, steps=2, multiplier=2, in_channels=1).double()
    learner = (TNAS(model, TNASConfig(inner_steps=1)) if method == "tnas"
               else AutoMAML(model, AutoMAMLConfig(inner_steps=1)))
    assert set(STEM_BN) <= set(learner.groups["weights"])
    assert set(STEM_BN) <= set(learner.learning_rates())  # adapted in the inner loop
    stepped = {id(p) for group in learner.optimizers["weights"].param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert all(id(params[name]) in stepped for name in STEM_BN)  # meta-learned by the outer Adam
    batch = tiny_batch()
    result = learner.adapt(batch.support_x, batch.support_y, steps=1)
    for name in STEM_BN:
        assert not torch.allclose(result.task_params[name], params[name].detach().expand_as(result.task_params[name]))
    before = {name: params[name].detach().clone() for name in STEM_BN}
    if method == "tnas":
        learner.meta_step(batch)
    else:
        learner.weight_step(batch)
    assert all(not torch.equal(params[name], before[name]) for name in STEM_BN)


# --------------------------------------------------------------------------- auto-MAML and from scratch
def test_auto_maml_takes_an_alpha_step_and_a_weight_step_every_iteration():
    split = synthetic_split(num_classes=6, images_per_class=8, img_size=8, seed=1)
    torch.manual_seed(0)
    model = Supernet(n_way=3, C=4, layers=2, steps=2, multiplier=2, in_channels=1)
    args = search.SearchSettings.from_flags(dict(
        inner_steps=1, inner_steps_test=2, inner_lr_weights=0.1, meta_lr_weights=1e-2, meta_lr_alphas=None,
        alpha_weight_decay=1e-3, second_order=False, tasks_per_batch=2, n_way=3, k_shot=1, q_query=2, seed=0,
        augment=False, amp=False, method="auto_maml"))
    learner, samplers, step = build_auto_maml(args, model, split, torch.device("cpu"))
    assert learner.config.alternate is False and learner.step_kinds(0) == learner.step_kinds(1) == (ALPHA_STEP,
                                                                                                    WEIGHT_STEP)
    assert learner.optimizers["alphas"].param_groups[0]["lr"] == 3e-4  # the original auto_maml.py's default
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for iteration in range(2):
        step(iteration, False)
    assert samplers[WEIGHT_STEP].batches_drawn == samplers[ALPHA_STEP].batches_drawn == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"alpha_normal", "alpha_reduce"} <= changed and set(STEM_BN) <= changed
    alternating = AutoMAML(model, AutoMAMLConfig(alternate=True))
    assert [alternating.step_kinds(i) for i in range(3)] == [(WEIGHT_STEP,), (ALPHA_STEP,), (WEIGHT_STEP,)]


def test_search_alpha_rate_defaults_per_method():
    for method, rate in (("tnas", 1e-3), ("auto_maml", 3e-4)):
        args = parse_args(search.build_parser(), ["--method", method])
        assert search.meta_lr_alphas(args) == rate
    args = parse_args(search.build_parser(), ["--method", "auto_maml", "--meta_lr_alphas", "0.01"])
    assert search.meta_lr_alphas(args) == 0.01


def test_weight_decay_flag_reaches_the_outer_adam():
    args = parse_args(train.build_parser(), ["--weight_decay", "3e-4", "--method", "maml++"])
    config = train.maml_config(train.settings_from_args(args))
    assert config.weight_decay == 3e-4
    torch.manual_seed(0)
    network = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1)
    learner = MAMLPlusPlus(network, config)
    groups = learner.optimizers["weights"].param_groups
    assert groups[0]["weight_decay"] == 3e-4 and {id(p) for p in groups[0]["params"]} == {
        id(p) for p in network.parameters()}
    assert all(group["weight_decay"] == 0.0 for group in groups[1:])  # learned inner rates: no decay
    plain = MAMLPlusPlus(Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1),
                         MAMLConfig(learn_inner_lr=True)).optimizers["weights"].param_groups
    assert len(plain) == 1 and plain[0]["weight_decay"] == 0.0  # without decay: one group, as before


def preset(parser, name):
    return parse_args(parser, ["--config", os.path.join(REPO, "configs", f"{name}.yaml")])


@pytest.mark.parametrize("shot", [1, 5])
def test_presets_carry_the_original_settings(shot):
    tnas = preset(search.build_parser(), f"tnas_miniimagenet_5w{shot}s")
    auto = preset(search.build_parser(), f"auto_maml_miniimagenet_5w{shot}s")
    scratch = preset(train.build_parser(), f"scratch_miniimagenet_5w{shot}s")
    scratch_tnas = preset(train.build_parser(), f"scratch_tnas_miniimagenet_5w{shot}s")
    for args in (tnas, auto, scratch, scratch_tnas):
        assert (args.k_shot, args.normalize, args.resize) == (shot, "imagenet", "bilinear")
    assert (tnas.task_pool, auto.task_pool, scratch.task_pool) == (5000, 5000, 15000)
    assert search.meta_lr_alphas(tnas) == 1e-3 and search.meta_lr_alphas(auto) == 3e-4
    assert not auto.alternate_steps
    assert (scratch.weight_decay, scratch_tnas.weight_decay) == (3e-4, 0.0)
    plusplus = preset(train.build_parser(), f"scratch_plusplus_miniimagenet_5w{shot}s")
    assert (plusplus.weight_decay, plusplus.grad_clamp, scratch.grad_clamp) == (0.0, 10.0, None)  # MAML++'s clamp
    for name in ("omniglot", "fc100"):
        other = preset(search.build_parser(), f"tnas_{name}_5w{shot}s")
        assert (other.dataset, other.normalize, other.k_shot) == (name, "split", shot)


# --------------------------------------------------------------------------- task pool
def episodes_of(indices: np.ndarray):
    """Each task as its classes' image tuples in label order (the label of a class is its position)."""
    return [tuple(tuple(images) for images in task.tolist()) for task in indices]


def test_task_pool_serves_the_same_episodes_every_pass_reshuffled_and_relabelled():
    split = synthetic_split(num_classes=8, images_per_class=6, img_size=4, seed=0)
    sampler = EpisodeSampler(split, n_way=3, k_shot=1, q_query=2, tasks_per_batch=4, seed=3, task_pool=8)
    passes = [[e for _ in range(2) for e in episodes_of(sampler.sample_indices())] for _ in range(6)]
    as_sets = [[frozenset(e) for e in p] for p in passes]  # an episode whatever labels its classes got
    pool = set(as_sets[0])
    assert len(pool) == 8 and all(set(p) == pool and len(p) == 8 for p in as_sets)  # each episode once per pass
    assert as_sets[0] != as_sets[1] or as_sets[1] != as_sets[2]  # reshuffled
    # As in the original, labels are assigned afresh each time an episode is served: across six passes
    # most episodes show their classes in more than one label order, and the images of a class stay together.
    orders = {episode: {e for p in passes for e in p if frozenset(e) == episode} for episode in pool}
    assert sum(len(seen) > 1 for seen in orders.values()) >= 6
    assert all(len(e) == 3 and len(set(e)) == 3 for p in passes for e in p)
    fresh = EpisodeSampler(split, n_way=3, k_shot=1, q_query=2, tasks_per_batch=4, seed=3)
    drawn = {e for _ in range(6) for e in episodes_of(fresh.sample_indices())}
    assert len(drawn) > 8  # without a pool: new episodes


def test_task_pool_resumes_exactly_and_checks_its_settings():
    split = synthetic_split(num_classes=8, images_per_class=6, img_size=4, seed=0)
    make = lambda **kw: EpisodeSampler(split, n_way=3, k_shot=1, q_query=2, tasks_per_batch=4,  # noqa: E731
                                       **{"seed": 3, "task_pool": 10, **kw})
    sampler = make()
    for _ in range(3):  # mid-pass (10 is not a multiple of 4: a batch straddles two passes)
        sampler.sample_indices()
    state = sampler.state_dict()
    expected = [sampler.sample_indices() for _ in range(5)]
    resumed = make()
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, (resumed.sample_indices() for _ in range(5))))
    with pytest.raises(TnasError, match="task_pool=10, this sampler has task_pool=12"):
        make(task_pool=12).load_state_dict(state)
    with pytest.raises(TnasError, match="seed"):
        make(seed=4).load_state_dict(state)
    with pytest.raises(TnasError, match="task_pool"):
        make(task_pool=0).load_state_dict(state)
    with pytest.raises(TnasError, match="--task_pool must be 0"):
        make(task_pool=2)


# --------------------------------------------------------------------------- normalisation and resize
def write_folder_dataset(root, size=(30, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in range(3):
            for index in range(2):
                path = os.path.join(root, split, f"c{label}", f"{index}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_normalize_and_resize_choices(tmp_path):
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    write_folder_dataset(root)
    load = lambda split, **kw: load_split("folder", split, data_path=root, img_size=12, cache_dir=cache,  # noqa: E731
                                          num_workers=1, progress=False, **kw)
    lanczos, bilinear = load("val"), load("val", resize="bilinear")
    assert lanczos.cache_path != bilinear.cache_path  # one cache entry per method
    assert not np.array_equal(np.asarray(lanczos.images), np.asarray(bilinear.images))
    source = Image.open(os.path.join(root, "val", "c0", "0.png")).convert("RGB")
    by_hand = np.asarray(source.resize((12, 12), Image.Resampling.BILINEAR))
    first = [i for i, name in enumerate(bilinear.class_names) if name == "c0"][0]
    assert any(np.array_equal(np.asarray(image), by_hand)
               for image, label in zip(bilinear.images, bilinear.labels) if label == first)
    assert lanczos.mean == load("train").mean  # split: the train split's statistics
    imagenet = load("val", normalize="imagenet")
    assert (imagenet.mean, imagenet.std) == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(TnasError, match="--normalize imagenet needs RGB"):
        load("val", normalize="imagenet", channels=1)
    with pytest.raises(TnasError, match="--resize must be one of"):
        load("val", resize="nearest")


@pytest.mark.parametrize("normalize, resize", [("imagenet", "bilinear"), (None, None)])
def test_protocol_trains_genotypes_with_the_search_data_settings_and_no_weight_decay(normalize, resize):
    from tnas.stages import protocol

    config = os.path.join(REPO, "configs", "protocol_miniimagenet_5w1s.yaml")
    args = protocol.settings_from_args(parse_args(protocol.build_parser(), ["--config", config, "--checkpoint", "x"]))
    args.dataset, args.n_way, args.k_shot, args.q_query, args.img_size = "miniimagenet", 5, 1, 15, 84
    summary = {"model": {"C": 16, "layers": 2}}
    if normalize:
        summary.update(normalize=normalize, resize=resize)
    trained = SimpleNamespace(**protocol.train_settings(args, summary, "cpu").to_flags())
    assert trained.weight_decay == 0.0 and trained.task_pool == 15000
    # the genotypes see images as the search did (a run from before the choice: split statistics, Lanczos)
    assert (trained.normalize, trained.resize) == ((normalize, resize) if normalize else ("split", "lanczos"))
