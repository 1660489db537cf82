"""auto-MAML (tnas.meta.auto_maml): halves, w / alpha updates (alternating with --alternate_steps), and the search
stage end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tnas.data import synthetic_split
from tnas.meta.auto_maml import AutoMAML, AutoMAMLConfig, build_auto_maml_learner
from tnas.stages.search import SearchSettings, build_auto_maml
from tnas.meta.maml import inner_loop, model_forward, query_loss_and_accuracy
from tnas.models.supernet import Supernet
from tnas.checkpoints import load_checkpoint
from script_loader import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "search.py")
TINY = ["--method", "auto_maml", "--dataset", "glyphs", "--img_size", "16", "--C", "4", "--layers", "1",
        "--n_way", "3", "--q_query", "2", "--tasks_per_batch", "2", "--tasks_per_epoch", "4", "--val_episodes", "4",
        "--val_batch_size", "4", "--inner_steps", "1", "--inner_steps_test", "2", "--inner_lr_weights", "0.1",
        "--log_every", "1", "--checkpoint_every", "1", "--device", "cpu", "--threads", "1"]


def search_args(**overrides):
    values = dict(inner_steps=1, inner_steps_test=2, inner_lr_weights=0.1, inner_lr_alphas=30.0,
                  meta_lr_weights=1e-2, meta_lr_alphas=1e-2, alpha_weight_decay=1e-3, second_order=False,
                  tasks_per_batch=2, n_way=3, k_shot=1, q_query=2, seed=0, augment=False, amp=False)
    values.update(overrides)
    return SearchSettings.from_flags(values)


def tiny_supernet(dtype=torch.float32, layers=1):
    torch.manual_seed(0)
    model = Supernet(n_way=3, C=4, layers=layers, steps=2, multiplier=2, in_channels=1).to(dtype)
    with torch.no_grad():
        for alpha in model.alphas():
            alpha.normal_(0, 0.5)
    return model


def image_keys(split):
    return {bytes(image) for image in np.asarray(split.images)}


def test_halves_are_disjoint_and_hold_every_class():
    split = synthetic_split(num_classes=6, images_per_class=9, img_size=8, seed=3)
    _, samplers, _ = build_auto_maml(search_args(), tiny_supernet(), split, torch.device("cpu"))
    first, second = samplers["weights"].split, samplers["alphas"].split
    assert first.class_names == split.class_names and second.class_names == split.class_names
    assert np.all(first.class_counts() == 5) and np.all(second.class_counts() == 4)
    keys_first, keys_second = image_keys(first), image_keys(second)
    assert len(keys_first) == len(first) and len(keys_second) == len(second)  # the images are distinct
    assert not keys_first & keys_second
    assert keys_first | keys_second == image_keys(split)


def test_weight_steps_change_only_weights_and_alpha_steps_only_alphas():
    split = synthetic_split(num_classes=6, images_per_class=8, img_size=8, seed=1)
    model = tiny_supernet()
    learner, samplers, step = build_auto_maml(search_args(alternate_steps=True), model, split, torch.device("cpu"))
    assert isinstance(learner, AutoMAML) and set(learner.learning_rates()) == {n for n, _ in model.named_weights()}

    def snapshot():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    for iteration in range(4):
        before = snapshot()
        drawn = {name: sampler.batches_drawn for name, sampler in samplers.items()}
        stats = step(iteration, iteration == 0)
        after = snapshot()
        expected = "weights" if iteration % 2 == 0 else "alphas"
        assert learner.step_kind(iteration) == expected
        other = "alphas" if expected == "weights" else "weights"
        assert samplers[expected].batches_drawn == drawn[expected] + 1  # tasks from the right half
        assert samplers[other].batches_drawn == drawn[other]
        changed = {n for n in after if not torch.equal(after[n], before[n])}
        alphas = {n for n, _ in model.named_alphas()}
        if expected == "weights":
            assert changed and not changed & alphas
        else:
            assert changed == {"alpha_reduce"}  # layers=1: one reduction cell, alpha_normal is unused
        assert stats.query_accuracy.shape == (2,)
    group = learner.optimizers["alphas"].param_groups[0]
    assert tuple(group["betas"]) == (0.5, 0.999) and group["weight_decay"] == 1e-3
    assert learner.optimizers["weights"].param_groups[0]["lr"] == 1e-2


def test_alpha_gradient_is_the_query_gradient_at_the_adapted_weights():
    """First order: the alpha gradient is d L_query(w', alpha) / d alpha with w' = w adapted on the support set."""
    model = tiny_supernet(torch.float64, layers=2)  # a normal and a reduction cell: both alphas in use
    learner = AutoMAML(model, AutoMAMLConfig(inner_steps=2, inner_lr_weights=0.1))
    generator = torch.Generator().manual_seed(0)
    images = lambda n: torch.randn(2, n, 1, 8, 8, generator=generator, dtype=torch.float64)  # noqa: E731
    labels = lambda k: torch.arange(3).repeat_interleave(k).repeat(2, 1)  # noqa: E731
    batch = SimpleNamespace(support_x=images(3), support_y=labels(1), query_x=images(6), query_y=labels(2))
    forward = model_forward(model)
    params = dict(model.named_parameters())
    rates = {n: 0.1 for n, _ in model.named_weights()}
    adapted = inner_loop(forward, params, rates, batch.support_x, batch.support_y, 2, meta_gradient=False)
    alphas = {n: p for n, p in model.named_alphas()}
    loss, _ = query_loss_and_accuracy(forward, adapted.task_params, alphas, batch.query_x, batch.query_y, 2)
    expected = torch.autograd.grad(loss.mean(), list(alphas.values()))
    seen = {}
    learner.gradient_hook = lambda stepped: seen.update({id(p): p.grad.clone() for p in stepped})
    learner.alpha_step(batch)
    assert set(seen) == {id(p) for p in alphas.values()}
    for param, want in zip(alphas.values(), expected):
        assert want.abs().max() > 1e-8
        assert torch.allclose(seen[id(param)], want, rtol=1e-10, atol=1e-14)
    # the outer backward computed no weight gradients (they would only be thrown away)
    assert all(p.grad is None for _, p in model.named_weights())


def test_config_round_trip_and_rebuild():
    config = AutoMAMLConfig(inner_steps=3, split_seed=4, first_order=False)
    values = json.loads(json.dumps(config.to_dict()))
    assert AutoMAMLConfig.from_dict(values) == config
    summary = {"model": tiny_supernet().config, "learner": values}
    learner = build_auto_maml_learner(summary, "cpu")
    assert learner.inner_steps == 3 and learner.first_order is False


def test_halves_too_small_is_one_error():
    from tnas.errors import TnasError

    split = synthetic_split(num_classes=5, images_per_class=6, img_size=8)
    with pytest.raises(TnasError, match="auto-MAML halves"):
        build_auto_maml(search_args(q_query=3), tiny_supernet(), split, torch.device("cpu"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get("TNAS_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))


def test_search_auto_maml_end_to_end_and_resume(tmp_path, cache_dir, monkeypatch, capsys):
    out = str(tmp_path / "auto_maml")
    env = dict(os.environ, TNAS_CACHE_DIR=cache_dir, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, SCRIPT] + TINY + ["--epochs", "1", "--out", out, "--cache_dir", cache_dir],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("search.json", "genotype.json", "last.pt", "best.pt", "config.yaml", "log.txt"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.path.isdir(os.path.join(out, "cells"))
    with open(os.path.join(out, "search.json")) as handle:
        summary = json.load(handle)
    assert summary["method"] == "auto_maml" and summary["epochs_done"] == 1
    assert summary["learner"]["inner_steps"] == 1 and summary["learner"]["alpha_betas"] == [0.5, 0.999]
    assert "genotype" in summary["history"][0]
    state = load_checkpoint(os.path.join(out, "last.pt"))
    assert set(state["samplers"]) == {"weights", "alphas"}
    # 2 meta-iterations, each an alpha-step and a weight-step (the original's schedule)
    assert state["samplers"]["weights"]["batches_drawn"] == 2 and state["samplers"]["alphas"]["batches_drawn"] == 2

    # --resume continues for a second epoch, in this process through the script's main
    from tnas.errors import cli_entry

    script = load_script(SCRIPT)
    monkeypatch.setattr(sys, "argv", [SCRIPT] + TINY + ["--epochs", "2", "--out", out, "--cache_dir", cache_dir,
                                                        "--resume"])
    try:
        cli_entry(script.main)
    except SystemExit as exit_:
        assert exit_.code == 0, capsys.readouterr().err
    with open(os.path.join(out, "search.json")) as handle:
        summary = json.load(handle)
    assert summary["epochs_done"] == 2 and summary["history"][1]["iteration"] == 4
    state = load_checkpoint(os.path.join(out, "last.pt"))
    learner = build_auto_maml_learner(state["summary"], "cpu")
    learner.load_state_dict(state["learner"])
    with open(os.path.join(out, "genotype.json")) as handle:
        assert learner.genotype().to_dict() == json.load(handle)
