"""MAML's Conv-4 baseline (tnas/models/conv4.py): shapes, parameter count, folding over tasks in float64,
and the from-scratch stage (``--model conv4``) end to end with evaluation of its checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from tnas.config import parse_args
import reference
from tnas.meta.maml import batched_forward, model_forward
from tnas.models.conv4 import Conv4, conv4_parameter_count, pooled_side
from tnas.models.factory import network_from_config
from tnas.task_folding import supports_folding

from test_maml import TASKS, assert_close_relative, batched_meta_gradient, make_batch
from test_task_folding import per_task_params


def tiny_conv4(seed=0):
    torch.manual_seed(seed)
    return Conv4(n_way=3, filters=4, in_channels=1, image_size=16).double()


@pytest.mark.parametrize("size, side", [(84, 5), (28, 1), (32, 2), (16, 1), (21, 1)])
def test_shapes_and_feature_side(size, side):
    model = Conv4(n_way=5, filters=8, in_channels=3, image_size=size)
    assert pooled_side(size) == side
    assert model.classifier.in_features == 8 * side * side
    assert model(torch.randn(6, 3, size, size)).shape == (6, 5)
    assert supports_folding(model)


def test_images_smaller_than_sixteen_are_refused():
    with pytest.raises(ValueError, match="at least 16x16"):
        Conv4(image_size=15)


@pytest.mark.parametrize("n_way, filters, channels, size", [(5, 32, 3, 84), (5, 64, 1, 28), (3, 4, 1, 16),
                                                            (20, 64, 1, 28)])
def test_parameter_count_formula(n_way, filters, channels, size):
    model = Conv4(n_way=n_way, filters=filters, in_channels=channels, image_size=size)
    assert sum(p.numel() for p in model.parameters()) == conv4_parameter_count(n_way, filters, channels, size)


def test_paper_setting_parameter_count():
    """5-way 84x84 RGB with 32 filters: 4 x (conv + bias + BN) and an 800 -> 5 classifier, 32.9K (the README)."""
    assert conv4_parameter_count(5, 32, 3, 84) == 32901


def test_rebuilt_from_its_config():
    model = tiny_conv4()
    rebuilt = network_from_config(json.loads(json.dumps(model.config)))
    assert isinstance(rebuilt, Conv4) and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())


def test_folded_logits_and_gradients_equal_per_task_networks():
    """Two tasks with their own parameters, folded into one forward, against each task's own plain forward."""
    model = tiny_conv4()
    params = per_task_params(model)
    batch = make_batch(seed=3)
    x, y = batch.query_x.repeat(1, 1, 1, 2, 2), batch.query_y  # [T, N, 1, 16, 16]
    folded = batched_forward(model_forward(model, fold_tasks=True), params, {}, x)
    assert folded.shape == (TASKS, x.shape[1], 3)
    names = list(params)
    folded_loss = sum(F.cross_entropy(folded[t], y[t]) for t in range(TASKS))
    folded_grads = torch.autograd.grad(folded_loss, [params[n] for n in names])
    for task in range(TASKS):
        own = {name: params[name][task] for name in names}
        logits = functional_call(model, own, (x[task],))
        torch.testing.assert_close(folded[task], logits, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(F.cross_entropy(logits, y[task]), [own[n] for n in names])
        for name, folded_grad, grad in zip(names, folded_grads, grads):
            torch.testing.assert_close(folded_grad[task], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
def test_folded_meta_gradient_matches_per_task_reference(first_order):
    model = tiny_conv4()
    params = dict(model.named_parameters())
    rates = {name: 0.1 for name in params}
    batch = make_batch(seed=4)
    for key in ("support_x", "query_x"):
        setattr(batch, key, getattr(batch, key).repeat(1, 1, 1, 2, 2))  # 8x8 -> 16x16
    forward = model_forward(model)
    assert forward.folds_tasks
    got = batched_meta_gradient(forward, params, rates, batch, steps=2, first_order=first_order)
    want = reference.meta_gradient(model_forward(model, fold_tasks=False), params, rates, batch.support_x,
                                   batch.support_y, batch.query_x, batch.query_y, steps=2, first_order=first_order)
    # A conv bias right before a batch-statistics BN cancels out: its gradient is zero up to rounding.
    biases = [f"features.{4 * block}.bias" for block in range(4)]  # [conv, BN, ReLU, pool] per block
    for name in biases:
        assert got[name].abs().max() < 1e-12 and want[name].abs().max() < 1e-12, name
    assert_close_relative({n: g for n, g in got.items() if n not in biases}, {n: g for n, g in want.items()
                                                                              if n not in biases})


# -- the from-scratch stage and the evaluation of its checkpoint -----------------------------------------
TINY = ["--dataset", "glyphs", "--img_size", "16", "--n_way", "3", "--q_query", "2", "--tasks_per_batch", "2",
        "--tasks_per_epoch", "4", "--val_episodes", "4", "--val_batch_size", "4", "--inner_steps", "2",
        "--inner_steps_test", "3", "--inner_lr", "0.1", "--log_every", "1", "--checkpoint_every", "1",
        "--device", "cpu", "--threads", "1"]


def test_from_scratch_conv4_end_to_end_and_evaluated(tmp_path, capsys):
    from tnas.stages import evaluate, train

    out = tmp_path / "conv4"
    summary = train.run(parse_args(train.build_parser(),
                                   TINY + ["--model", "conv4", "--filters", "6", "--epochs", "1", "--out", str(out)]))
    assert summary["model"] == {"kind": "conv4", "n_way": 3, "filters": 6, "in_channels": 1, "image_size": 16}
    assert summary["parameters"] == conv4_parameter_count(3, 6, 1, 16) and summary["macs"] > 0
    assert summary["genotype_source"] is None and not (out / "genotype.json").exists()
    assert (out / "best.pt").is_file() and summary["epochs_done"] == 1

    # resumed for a second epoch; another --filters is refused as another network
    summary = train.run(parse_args(train.build_parser(), TINY + ["--model", "conv4", "--filters", "6", "--epochs",
                                                                 "2", "--out", str(out), "--resume"]))
    assert summary["epochs_done"] == 2
    from tnas.errors import TnasError

    with pytest.raises(TnasError, match="filters: 6 -> 8"):
        train.run(parse_args(train.build_parser(), TINY + ["--model", "conv4", "--filters", "8", "--epochs", "3",
                                                           "--out", str(out), "--resume"]))

    # the evaluate stage rebuilds Conv-4 from the checkpoint alone
    record = evaluate.run(parse_args(evaluate.build_parser(), ["--checkpoint", str(out), "--episodes", "6",
                                                               "--batch_size", "3", "--update_step_test", "2",
                                                               "--device", "cpu"]))
    assert record["episodes"] == 6 and record["genotypes"] is None and record["stage"] == "train"
    assert 0.0 <= record["accuracy_mean"] <= 100.0
    with open(os.path.join(out, "results.json")) as handle:
        assert json.load(handle)["parameters"] == conv4_parameter_count(3, 6, 1, 16)
    with pytest.raises(TnasError, match="without a genotype"):
        evaluate.run(parse_args(evaluate.build_parser(), ["--checkpoint", str(out), "--episodes", "6",
                                                          "--genotype", "auto_maml_1shot", "--device", "cpu"]))
