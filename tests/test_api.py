"""The Python API as a researcher uses it from a notebook: package imports, a network from a genotype and
its size, cell diagrams, MAML / MAML++ by hand and scoring on fixed episodes, a stage as a library call
and its checkpoint back, the functional inner loop on a plain torch model, and clear errors for inputs
of the wrong shape, device or dtype. Tiny configs on the glyphs demo data (16x16, C=4, one cell)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tnas.data import EpisodeSampler, FixedEpisodes, load_split
from tnas.errors import TnasError
from tnas.genotypes import PUBLISHED, decode_genotype, load_genotype, resolve_genotype

SMALL = dict(n_way=5, C=4, layers=1, in_channels=1)


@pytest.fixture(scope="module")
def glyphs():
    return {split: load_split("glyphs", split, img_size=16) for split in ("train", "test")}


def sample(split, tasks=2, seed=0, q_query=3):
    return EpisodeSampler(split, n_way=5, k_shot=1, q_query=q_query, tasks_per_batch=tasks, seed=seed).sample()


# -- imports ----------------------------------------------------------------------------------------
def test_packages_export_their_entry_points():
    import tnas.meta
    import tnas.models
    from tnas.meta import maml, maml_pp
    from tnas.models import network

    for package in (tnas.meta, tnas.models):
        assert package.__all__ and all(hasattr(package, name) for name in package.__all__)
    assert tnas.meta.inner_loop is maml.inner_loop and tnas.meta.MAMLPlusPlus is maml_pp.MAMLPlusPlus
    assert tnas.models.Network is network.Network


def test_image_split_repr_is_one_short_line(glyphs):
    text = repr(glyphs["test"])
    assert "\n" not in text and len(text) < 120
    assert "glyphs/test" in text and "1x16x16" in text and f"{glyphs['test'].num_classes} classes" in text


# -- 1. a network of a genotype, its size, its picture ------------------------------------------------
def test_network_of_published_and_decoded_genotypes_and_their_size():
    from tnas.models import Network, Supernet, count_macs

    torch.manual_seed(0)
    supernet = Supernet(**SMALL)
    decoded = decode_genotype(*supernet.alphas())
    assert decoded == supernet.genotype()
    for genotype in (PUBLISHED["auto_maml_1shot"], decoded):
        net = Network(genotype, **SMALL)
        assert net(torch.randn(3, 1, 16, 16)).shape == (3, 5)
        counted = count_macs(net, (1, 16, 16))
        assert counted["macs"] >= counted["macs_conv_linear"] > 0
        # a float64 model is counted the same (on a float32 copy), and is left as it was
        assert count_macs(net.double(), (1, 16, 16)) == counted and next(net.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(channels, height, width\), got \(16, 16\)"):
        count_macs(Network(PUBLISHED["auto_maml_1shot"], **SMALL), (16, 16))


def test_plot_genotype_without_graphviz_draws_with_matplotlib_and_says_so_when_dot_is_required(tmp_path,
                                                                                              monkeypatch):
    from tnas import visualize

    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    assert visualize.dot_program() is None
    paths = visualize.plot_genotype(PUBLISHED["auto_maml_5shot"], str(tmp_path / "auto"))
    assert [os.path.basename(p) for p in paths] == ["normal.dot", "normal.png", "reduce.dot", "reduce.png"]
    with open(paths[1], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TnasError, match=r"`dot` program is not on PATH: install graphviz, or draw with "
                                        r"renderer='matplotlib'"):
        visualize.plot_genotype(PUBLISHED["auto_maml_5shot"], str(tmp_path / "dot"), renderer="dot")
    assert not (tmp_path / "dot").exists()
    with pytest.raises(ValueError, match="renderer must be one of auto, dot, matplotlib"):
        visualize.render_cell(PUBLISHED["auto_maml_5shot"], "normal", str(tmp_path / "x"), renderer="svg")


def test_render_cell_with_a_failing_dot_is_an_error_only_when_dot_is_required(tmp_path, monkeypatch):
    from tnas import visualize

    program = tmp_path / "dot"
    program.write_text("#!/bin/sh\necho 'syntax error in line 1' >&2\nexit 1\n")
    program.chmod(0o755)
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: str(program) if name == "dot" else None)
    genotype = PUBLISHED["auto_maml_1shot"]
    assert visualize.render_cell(genotype, "normal", str(tmp_path / "auto"))[1].endswith(".png")  # matplotlib
    with pytest.raises(TnasError, match="dot .* failed on .*normal.dot: syntax error in line 1"):
        visualize.render_cell(genotype, "normal", str(tmp_path / "normal"), renderer="dot")


# -- 2. MAML and MAML++ by hand, scored on fixed episodes ----------------------------------------------
@pytest.mark.parametrize("plus", [False, True], ids=["maml", "maml++"])
def test_maml_by_hand_then_fixed_episodes_mean_and_ci(glyphs, plus):
    from tnas.evaluate import evaluate_episodes, format_accuracy, mean_ci95, results_record
    from tnas.meta import MAMLConfig, MAMLPlusPlus
    from tnas.models import Network

    torch.manual_seed(0)
    switches = dict(per_step_bn=True, learn_inner_lr=True, multi_step_loss=True, first_order=False) if plus else {}
    learner = MAMLPlusPlus(Network(PUBLISHED["auto_maml_1shot"], **SMALL),
                           MAMLConfig(inner_steps=2, inner_steps_test=3, inner_lr=0.1, **switches))
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    sampler = EpisodeSampler(glyphs["train"], n_way=5, k_shot=1, q_query=3, tasks_per_batch=2, seed=0)
    for iteration in range(2):
        learner.set_progress(iteration, iterations_per_epoch=2, epochs=1)
        stats = learner.meta_step(sampler.sample())
        assert stats.query_accuracy.shape == (2,) and set(stats.summary()) >= {"loss", "accuracy"}
    trained = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    assert any(not torch.equal(before[n], trained[n]) for n in before)

    episodes = FixedEpisodes.generate(glyphs["test"], 5, 1, 3, episodes=5, seed=0)
    scores = evaluate_episodes(learner, episodes, batch_size=2, device="cpu", desc=None, track_steps=True)
    assert scores["accuracy"].shape == (5,) and scores["accuracy_per_step"].shape == (4, 5)
    again = evaluate_episodes(learner, episodes, batch_size=5, device="cpu", desc=None)
    np.testing.assert_allclose(again["accuracy"], scores["accuracy"])  # fixed episodes, batching does not matter
    assert all(torch.equal(p, trained[n]) for n, p in learner.model.named_parameters())  # scoring trains nothing
    summary = mean_ci95(scores["accuracy"])
    values = scores["accuracy"]
    assert summary["accuracy_mean"] == pytest.approx(values.mean())
    assert summary["ci95"] == pytest.approx(1.96 * values.std(ddof=1) / np.sqrt(5))
    line = format_accuracy(results_record("maml", "glyphs", 5, 1, values))
    assert line.startswith("5-way 1-shot glyphs: ") and line.endswith("(5 episodes)")


# -- 3. a stage as a library call, its checkpoint back ----------------------------------------------------
TINY_RUN = dict(img_size=16, C=4, layers=1, threads=1, epochs=1, tasks_per_epoch=4, tasks_per_batch=2,
                val_episodes=4, q_query=3, inner_steps=1, inner_steps_test=2, device="cpu")


def test_search_and_train_stages_as_library_calls_then_restore_and_continue(tmp_path, glyphs):
    from tnas.meta import TNAS, MAMLPlusPlus
    from tnas.stages import search, train
    from tnas.stages.restore import learner_from_checkpoint

    searched = search.run(search.SearchSettings().replace(out=str(tmp_path / "search"), **TINY_RUN))
    learner, summary = learner_from_checkpoint(str(tmp_path / "search"))
    assert isinstance(learner, TNAS) and summary["stage"] == "search" and searched["best_epoch"] == 1
    genotype = load_genotype(str(tmp_path / "search"))
    assert genotype == learner.genotype()

    settings = train.TrainSettings(genotype="auto_maml_1shot").replace(out=str(tmp_path / "train"), **TINY_RUN)
    trained = train.run(settings)
    with open(tmp_path / "train" / "train.json") as handle:
        assert json.load(handle)["best_val_accuracy"] == trained["best_val_accuracy"]
    learner, summary = learner_from_checkpoint(str(tmp_path / "train"))
    assert isinstance(learner, MAMLPlusPlus) and summary["parameters"] == sum(
        p.numel() for p in learner.model.parameters())
    saved = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    learner.meta_step(sample(glyphs["train"]))  # continue training the restored learner
    assert any(not torch.equal(saved[n], p) for n, p in learner.model.named_parameters())
    # a device by name, as the stages' --device takes it
    on_auto, _ = learner_from_checkpoint(str(tmp_path / "train"), device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(on_auto.model.parameters()).device.type == expected
    if not torch.cuda.is_available():
        with pytest.raises(TnasError, match="--device cuda requested but no CUDA GPU is available"):
            learner_from_checkpoint(str(tmp_path / "train"), device="cuda")

    dirs = [str(tmp_path / "g0"), str(tmp_path / "g1")]
    genotypes = [genotype.to_dict(), resolve_genotype("auto_maml_5shot").to_dict()]
    quiet = lambda line: None  # noqa: E731
    assert [r.status for r in train.train_genotypes(settings, genotypes, dirs, log=quiet)] == ["trained"] * 2
    assert [r.status for r in train.train_genotypes(settings, genotypes, dirs, log=quiet)] == ["skipped"] * 2


def test_settings_replace_and_partial_flags_keep_the_stage_defaults():
    from tnas.stages import search, train

    assert search.SearchSettings.from_flags({}) == search.SearchSettings()  # its own 10 epochs, not the part's 15
    assert search.SearchSettings.from_flags({}).schedule.epochs == 10
    changed = search.SearchSettings().replace(img_size=16, epochs=2, inner_lr_alphas=3.0)
    assert (changed.data.img_size, changed.schedule.epochs, changed.meta.inner_lr_alphas) == (16, 2, 3.0)
    assert changed.schedule.tasks_per_epoch == search.SearchSettings().schedule.tasks_per_epoch
    with pytest.raises(TypeError, match="SearchSettings has no flag epochz"):
        search.SearchSettings().replace(epochz=2)
    with pytest.raises(TypeError, match="TrainSettings has no flag inner_lr_weights"):
        train.TrainSettings().replace(inner_lr_weights=0.1)


# -- 4. the functional core on a plain torch model ----------------------------------------------------------
def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(12, 5))


def reference_meta_gradient(model, batch, lr, steps, first_order):
    """Plain autograd, one task at a time: the gradient of the mean query loss after adaptation."""
    params = dict(model.named_parameters())
    names = list(params)
    losses = []
    for t in range(batch.support_x.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(model, fast, (batch.support_x[t],)), batch.support_y[t])
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order)
            fast = {n: fast[n] - lr * (g.detach() if first_order else g) for n, g in zip(names, grads)}
        losses.append(F.cross_entropy(torch.func.functional_call(model, fast, (batch.query_x[t],)), batch.query_y[t]))
    return torch.autograd.grad(torch.stack(losses).mean(), [params[n] for n in names])


@pytest.mark.parametrize("first_order", [True, False], ids=["first_order", "second_order"])
def test_inner_loop_on_a_plain_sequential_matches_plain_autograd(glyphs, first_order):
    from tnas.meta import inner_loop, model_forward, query_loss_and_accuracy

    torch.manual_seed(0)
    model = tiny_cnn().double()
    batch = sample(glyphs["train"]).to(dtype=torch.float64)
    assert batch.support_x.dtype == torch.float64 and batch.support_y.dtype == torch.int64
    forward = model_forward(model)
    assert forward.folds_tasks is False  # not built from task-folding layers: vmap
    params = dict(model.named_parameters())
    result = inner_loop(forward, params, {n: 0.4 for n in params}, batch.support_x, batch.support_y, steps=2,
                        first_order=first_order)
    loss, accuracy = query_loss_and_accuracy(forward, result.task_params, {}, batch.query_x, batch.query_y)
    assert loss.shape == accuracy.shape == (2,) and result.support_loss.shape == (2, 2)
    got = torch.autograd.grad(loss.mean(), list(params.values()))
    expected = reference_meta_gradient(model, batch, 0.4, 2, first_order)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # one float for every parameter: the same adaptation as the mapping
    single = inner_loop(forward, params, 0.4, batch.support_x, batch.support_y, steps=2, first_order=first_order)
    assert set(single.task_params) == set(params)
    for name in params:
        assert torch.equal(single.task_params[name], result.task_params[name]), name
    as_numpy = inner_loop(forward, params, np.float32(0.4), batch.support_x, batch.support_y, steps=2,
                          first_order=first_order)
    for name in params:  # a numpy number is one number too (float32's 0.4 differs from 0.4 in the last bits)
        torch.testing.assert_close(as_numpy.task_params[name], result.task_params[name], rtol=1e-6, atol=1e-7)
    for wrong in (True, [0.4]):  # a flag or a list is no rate: a TypeError that says what is wanted
        with pytest.raises(TypeError, match="one number or a mapping name -> rate"):
            inner_loop(forward, params, wrong, batch.support_x, batch.support_y, steps=1)


def test_a_batch_norm_with_running_statistics_under_vmap_is_one_clear_error(glyphs):
    """vmap cannot update running statistics shared by the tasks: in training mode that is our error naming
    the module and the two ways out; in eval mode (running statistics read, not written), and with
    ``track_running_stats=False``, the inner loop runs."""
    from tnas.meta import inner_loop, model_forward

    def with_batch_norm(track_running_stats):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=track_running_stats),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 5))

    batch = sample(glyphs["train"])
    model = with_batch_norm(True)
    with pytest.raises(ValueError, match=r"BatchNorm2d '1' of Sequential keeps running statistics.*"
                                         r"track_running_stats=False.*model\.eval\(\)"):
        inner_loop(model_forward(model), dict(model.named_parameters()), 0.4, batch.support_x, batch.support_y, 1)
    model.eval()
    forward = model_forward(model)
    result = inner_loop(forward, dict(model.named_parameters()), 0.4, batch.support_x, batch.support_y, 1)
    assert torch.isfinite(result.support_loss).all()
    # the mode and track_running_stats are read at each call, not when the forward was built
    model.train()
    with pytest.raises(ValueError, match="BatchNorm2d '1' of Sequential keeps running statistics"):
        inner_loop(forward, dict(model.named_parameters()), 0.4, batch.support_x, batch.support_y, 1)
    model[1].track_running_stats = False  # buffers kept, no longer updated (torch's BatchNorm then ignores them)
    assert inner_loop(forward, dict(model.named_parameters()), 0.4, batch.support_x, batch.support_y, 1).support_loss.isfinite().all()
    model = with_batch_norm(False)
    result = inner_loop(model_forward(model), dict(model.named_parameters()), 0.4, batch.support_x, batch.support_y, 1)
    assert result.support_loss.shape == (1, 2)  # [steps, tasks]
    # every norm with running statistics, not only nn.BatchNorm1d/2d/3d: a lazy BatchNorm (the forward built
    # before its first call materialises it) and an InstanceNorm that tracks statistics
    lazy = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(12, 5))
    instance = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.InstanceNorm2d(3, track_running_stats=True), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 5))
    for model, kind in ((lazy, "BatchNorm2d"), (instance, "InstanceNorm2d")):
        forward = model_forward(model)
        model(batch.support_x[0])
        with pytest.raises(ValueError, match=f"{kind} '1' of Sequential keeps running statistics"):
            inner_loop(forward, dict(model.named_parameters()), 0.4, batch.support_x, batch.support_y, 1)


def test_a_meta_learner_over_a_plain_sequential(glyphs):
    from tnas.meta import MetaLearner

    torch.manual_seed(0)
    model = tiny_cnn()
    learner = MetaLearner(model, {"weights": [n for n, _ in model.named_parameters()]}, {"weights": 0.4},
                          {"weights": torch.optim.Adam(model.parameters(), 1e-2)}, inner_steps=1, inner_steps_test=2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = learner.meta_step(sample(glyphs["train"]))
    assert stats.query_loss.shape == (2,)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert learner.evaluate(sample(glyphs["test"], seed=1), track_steps=True).per_step_accuracy.shape == (3, 2)


def test_inner_loop_refuses_inputs_without_a_task_dimension_and_too_few_learned_rates(glyphs):
    from tnas.meta import inner_loop, model_forward

    model = tiny_cnn()
    forward, params = model_forward(model), dict(model.named_parameters())
    batch = sample(glyphs["train"])
    with pytest.raises(ValueError, match=r"support_x must be \[T, N, C, H, W\] and support_y \[T, N\] .*x\[None\].*"
                                         r"got \(5, 1, 16, 16\) and \(5,\)"):
        inner_loop(forward, params, {n: 0.1 for n in params}, batch.support_x[0], batch.support_y[0], 1)
    with pytest.raises(ValueError, match=r"query_x must be .* got \(2, 15, 1, 16, 16\) and \(2, 5\)"):
        inner_loop(forward, params, {n: 0.1 for n in params}, batch.support_x, batch.support_y, 1,
                   query_x=batch.query_x, query_y=batch.support_y)
    one = batch[0]
    result = inner_loop(forward, params, {n: 0.1 for n in params}, one.support_x, one.support_y, 1)
    assert result.support_loss.shape == (1, 1)
    with pytest.raises(ValueError, match=r"per-step learning rates of 0\.weight have 1 entries, fewer than the 2"):
        inner_loop(forward, params, {n: torch.full((1,), 0.1) for n in params}, batch.support_x, batch.support_y, 2)


# -- 5. devices and dtypes ------------------------------------------------------------------------------------
def test_a_float64_model_with_float32_images_is_one_clear_error_and_converting_the_batch_fixes_it(glyphs):
    from tnas.evaluate import evaluate_episodes
    from tnas.meta import MAMLConfig, MAMLPlusPlus, TNAS, TNASConfig
    from tnas.models import Network, Supernet

    batch = sample(glyphs["train"])
    message = (r"the images are float32 on cpu but the model's parameters are float64 on cpu; convert one side "
               r"\(batch.to\(device, dtype\) or model.to\(device, dtype\)\)")
    maml = MAMLPlusPlus(Network(PUBLISHED["auto_maml_1shot"], **SMALL).double(), MAMLConfig(inner_steps=1))
    search = TNAS(Supernet(**SMALL).double(), TNASConfig(inner_steps=1, inner_steps_test=1))
    for call in (lambda: maml.meta_step(batch), lambda: maml.evaluate(batch), lambda: search.meta_step(batch)):
        with pytest.raises(ValueError, match=message):
            call()
    episodes = FixedEpisodes.generate(glyphs["test"], 5, 1, 3, episodes=2, seed=0)
    with pytest.raises(ValueError, match=message):
        evaluate_episodes(maml, episodes, batch_size=2, device="cpu", desc=None)
    converted = batch.to(dtype=torch.float64)
    assert maml.meta_step(converted).query_loss.dtype == torch.float64  # statistics keep the run's precision
    assert search.evaluate(converted, steps=1).query_accuracy.shape == (2,)


def test_images_on_another_device_than_the_model_is_one_clear_error(glyphs):
    from tnas.meta import MAMLConfig, MAMLPlusPlus
    from tnas.models import Network

    learner = MAMLPlusPlus(Network(PUBLISHED["auto_maml_1shot"], **SMALL), MAMLConfig(inner_steps=1))
    elsewhere = sample(glyphs["train"]).to("meta")  # stands in for a GPU batch on a CPU model
    assert elsewhere.device.type == "meta" and elsewhere.support_x.dtype == torch.float32
    with pytest.raises(ValueError, match="the images are float32 on meta but the model's parameters are float32 on cpu"):
        learner.evaluate(elsewhere)


def test_images_with_other_channels_than_the_network_name_in_channels():
    from tnas.models import Network

    net = Network(PUBLISHED["auto_maml_1shot"], **{**SMALL, "in_channels": 3})
    with pytest.raises(ValueError, match=r"an input of 1 channels .*\(this layer takes 3 channels per task.*in_channels"):
        net(torch.zeros(2, 1, 16, 16))
