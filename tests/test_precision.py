"""Precision switches: ``--tf32`` (tnas.precision) and the learners' opt-in ``compile_forward``.

Stated tolerances (GPU tests, TF32 against float32 with TF32 off for matmuls and cuDNN):
meta-gradient cosine similarity >= TF32_MIN_COSINE and relative norm difference <=
TF32_MAX_RELATIVE for T-NAS search and from-scratch MAML; best validation accuracy of a short
from-scratch demo within TF32_MAX_ACCURACY_POINTS. CPU tests: the switches are restored after a
run or a ``with`` block, the flag parses and round-trips through config.yaml, and a compiled
first-order meta-step equals the eager one (float64).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tnas import precision
from tnas.config import load_config, parse_args
from tnas.genotypes import PUBLISHED
from tnas.meta.maml import query_loss_and_accuracy
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.network import Network
from tnas.models.supernet import Supernet

TF32_MIN_COSINE = 0.999
TF32_MAX_RELATIVE = 0.05
TF32_MAX_ACCURACY_POINTS = 3.0
"""Stated tolerance of TF32 against float32 (TF32 off): bf16 (8-bit mantissa) reaches a cosine of
0.95-0.99 on the same cases; TF32 keeps 10 bits and accumulates in float32."""


# -- the switches ----------------------------------------------------------------------------------------
def test_tf32_block_sets_both_switches_and_restores_them():
    before = precision.tf32_state()
    try:
        precision.set_tf32_state(precision.TF32State(matmul=False, cudnn=True))  # PyTorch's defaults
        with precision.tf32(True) as inside:
            assert inside == precision.tf32_state() == precision.TF32State(True, True)
            with precision.tf32(False):
                assert precision.tf32_state() == precision.TF32State(False, False)
            assert precision.tf32_state() == precision.TF32State(True, True)
        assert precision.tf32_state() == precision.TF32State(False, True)
        with pytest.raises(RuntimeError):
            with precision.tf32(True):
                raise RuntimeError("inside")
        assert precision.tf32_state() == precision.TF32State(False, True)
    finally:
        precision.set_tf32_state(before)


def test_run_holds_share_one_saved_state_released_in_any_order():
    """A genotype batch opens one run per genotype and closes them first-opened first."""
    before = precision.tf32_state()
    lines = []
    try:
        precision.set_tf32_state(precision.TF32State(matmul=False, cudnn=False))
        cuda = torch.device("cuda")  # only the switches are touched: no CUDA needed
        first = precision.hold_tf32(True, cuda, lines.append)
        second = precision.hold_tf32(True, cuda, lines.append)
        assert precision.tf32_state() == precision.TF32State(True, True)
        first()
        first()  # idempotent
        assert precision.tf32_state() == precision.TF32State(True, True)  # the second run still holds it
        second()
        assert precision.tf32_state() == precision.TF32State(False, False)
        assert len(lines) == 2 and all(line.startswith("--tf32: CUDA matmuls and cuDNN convolutions in TF32")
                                       for line in lines)
        precision.hold_tf32(False, cuda, lines.append)()
        assert len(lines) == 2 and precision.tf32_state() == precision.TF32State(False, False)
    finally:
        precision.set_tf32_state(before)


def test_each_epoch_names_the_precision_it_trained_in():
    """--amp and --tf32 change no run (a resume may switch them), so epoch records say which was used."""
    name, cuda, cpu = precision.precision_name, torch.device("cuda"), torch.device("cpu")
    assert name(torch.bfloat16, cuda) == "bf16" and name(torch.bfloat16, cpu) == "bf16"
    with precision.tf32(False):
        assert name(None, cuda) == "fp32"
    with precision.tf32(True):
        assert name(None, cuda) == "tf32" and name(None, cpu) == "fp32"  # no TF32 on a CPU


def test_tf32_on_cpu_changes_nothing_and_says_so():
    before, lines = precision.tf32_state(), []
    release = precision.hold_tf32(True, torch.device("cpu"), lines.append)
    assert precision.tf32_state() == before
    release()
    assert precision.tf32_state() == before
    assert lines == ["--tf32: no effect on cpu (TF32 is a CUDA tensor-core format); float32 as without it"]


def test_tf32_flag_parses_logs_and_round_trips_through_config(tmp_path):
    """A CPU from-scratch run with --tf32: one log line, the switches untouched, config.yaml keeps it."""
    from tnas.stages import protocol, search, train

    assert search.settings_from_args(search.build_parser().parse_args(["--tf32"])).run.tf32 is True
    assert search.settings_from_args(search.build_parser().parse_args([])).run.tf32 is False
    given = protocol.build_parser().parse_args(["--tf32"])
    assert protocol.settings_from_args(given).tf32 is True
    assert protocol.build_parser().parse_args([]).tf32 is None  # not given: the train config's choice
    from tnas.stages.protocol_train import _given_train_flags

    assert _given_train_flags(given, {}, {}) == {"tf32": True}  # handed to every from-scratch training

    before = precision.tf32_state()
    out = tmp_path / "run"
    argv = ["--model", "conv4", "--filters", "4", "--dataset", "glyphs", "--img_size", "16", "--n_way", "3",
            "--q_query", "2", "--tasks_per_batch", "2", "--tasks_per_epoch", "2", "--val_episodes", "2",
            "--val_batch_size", "2", "--inner_steps", "1", "--inner_steps_test", "1", "--epochs", "1",
            "--device", "cpu", "--threads", "1", "--tf32", "--out", str(out)]
    settings = train.settings_from_args(parse_args(train.build_parser(), argv))
    assert settings.run.tf32 is True
    train.run(settings)
    assert precision.tf32_state() == before
    log = (out / "log.txt").read_text()
    assert log.count("--tf32: no effect on cpu") == 1
    saved = load_config(str(out / "config.yaml"))
    assert saved["tf32"] is True
    assert train.TrainSettings.from_flags(saved) == settings.replace(out=str(out))


# -- TF32 tolerance on a GPU ------------------------------------------------------------------------------
def meta_gradient(learner, batch, steps: int) -> torch.Tensor:
    """The flat meta-gradient of the query loss after ``steps`` inner steps (first order)."""
    learner.model.zero_grad(set_to_none=True)
    result = learner.adapt(batch.support_x, batch.support_y, steps, meta_gradient=True)
    loss, _ = query_loss_and_accuracy(learner.forward, result.task_params, learner.shared_params(result.task_params),
                                      batch.query_x, batch.query_y, steps)
    loss.mean().backward()
    return torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])


def assert_tf32_close_to_fp32(make_learner, batch, steps: int = 2) -> None:
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs an Ampere or later GPU")
    with precision.tf32(False):
        exact = meta_gradient(make_learner(), batch, steps)
    with precision.tf32(True):
        fast = meta_gradient(make_learner(), batch, steps)
    cosine = float(torch.nn.functional.cosine_similarity(fast, exact, dim=0))
    relative = float((fast - exact).norm() / exact.norm())
    print(f"TF32 meta-gradient against fp32: cosine {cosine:.6f}, relative norm difference {relative:.4f}")
    assert relative > 0, "TF32 changed no value: the switch did not reach the matmuls or convolutions"
    assert cosine >= TF32_MIN_COSINE, f"TF32 meta-gradient cosine similarity to fp32 is {cosine:.6f}"
    assert relative <= TF32_MAX_RELATIVE, f"TF32 meta-gradient differs from fp32 by {relative:.4f} (relative norm)"


def cuda_batch(tasks=2, n_way=5, shots=5, channels=1, side=32):
    generator = torch.Generator().manual_seed(0)
    labels = lambda: torch.arange(n_way).repeat_interleave(shots).repeat(tasks, 1).cuda()  # noqa: E731
    images = lambda: torch.randn(tasks, n_way * shots, channels, side, side, generator=generator).cuda()  # noqa: E731
    return SimpleNamespace(support_x=images(), support_y=labels(), query_x=images(), query_y=labels())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tf32_tnas_search_meta_gradient_within_tolerance():
    """T-NAS on a supernet (C 8, one reduction cell of 2 nodes), 2 tasks 5-way 5-shot 32x32, 2 inner steps."""
    torch.manual_seed(0)
    model = Supernet(n_way=5, C=8, layers=1, steps=2, multiplier=2, in_channels=1).cuda()
    state = copy.deepcopy(model.state_dict())

    def make_learner():
        model.load_state_dict(state)
        return TNAS(model, TNASConfig(inner_steps=2, inner_lr_weights=0.1, inner_lr_alphas=3.0))

    assert_tf32_close_to_fp32(make_learner, cuda_batch())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tf32_from_scratch_maml_meta_gradient_within_tolerance():
    """First-order MAML of the published 1-shot cell (C 8, 2 cells), 2 tasks 5-way 5-shot 32x32 RGB."""
    torch.manual_seed(0)
    model = Network(PUBLISHED["auto_maml_1shot"], n_way=5, C=8, layers=2, in_channels=3).cuda()
    state = copy.deepcopy(model.state_dict())

    def make_learner():
        model.load_state_dict(state)
        return MAMLPlusPlus(model, MAMLConfig(inner_steps=2, inner_lr=0.1))

    assert_tf32_close_to_fp32(make_learner, cuda_batch(channels=3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tf32_demo_accuracy_within_tolerance(tmp_path):
    """A short from-scratch demo (glyphs 28x28, C 8, 2 cells, 5-way 1-shot, 2 epochs of 200 tasks, 100
    validation episodes) with and without --tf32: best validation accuracy within the stated points;
    each run leaves the process's switches as it found them."""
    from tnas.stages import train

    before = precision.tf32_state()
    accuracy = {}
    for tf32 in (False, True):
        argv = ["--genotype", "auto_maml_1shot", "--dataset", "glyphs", "--img_size", "28", "--C", "8",
                "--layers", "2", "--n_way", "5", "--q_query", "5", "--tasks_per_batch", "4", "--tasks_per_epoch",
                "200", "--epochs", "2", "--val_episodes", "100", "--inner_steps", "3", "--inner_steps_test", "5",
                "--log_every", "0", "--device", "cuda", "--out", str(tmp_path / f"tf32_{tf32}")]
        summary = train.run(train.settings_from_args(parse_args(train.build_parser(),
                                                                argv + (["--tf32"] if tf32 else []))))
        assert precision.tf32_state() == before
        accuracy[tf32] = float(summary["best_val_accuracy"])
    print(f"demo best validation accuracy: fp32 {accuracy[False]:.2f}%, TF32 {accuracy[True]:.2f}%")
    assert abs(accuracy[True] - accuracy[False]) <= TF32_MAX_ACCURACY_POINTS, accuracy


# -- torch.compile of the first-order step -----------------------------------------------------------------
def tiny_batch(dtype=torch.float64, tasks=2, n_way=3, side=8):
    generator = torch.Generator().manual_seed(0)
    images = lambda n: torch.randn(tasks, n, 1, side, side, generator=generator, dtype=dtype)  # noqa: E731
    labels = lambda per_class: torch.arange(n_way).repeat_interleave(per_class).repeat(tasks, 1)  # noqa: E731
    return SimpleNamespace(support_x=images(n_way), support_y=labels(1), query_x=images(2 * n_way),
                           query_y=labels(2))


def tiny_supernet(dtype=torch.float64):
    torch.manual_seed(0)
    model = Supernet(n_way=3, C=4, layers=1, steps=2, multiplier=2, in_channels=1).to(dtype)
    with torch.no_grad():
        for alpha in model.alphas():
            alpha.normal_(0, 0.5)
    return model


def test_compile_forward_refused_with_second_order_and_unknown_backend():
    model = tiny_supernet()
    with pytest.raises(ValueError, match="compile_forward needs first-order MAML"):
        TNAS(model, TNASConfig(first_order=False), compile_forward=True)
    network = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1)
    with pytest.raises(ValueError, match="compile_forward needs first-order MAML"):
        MAMLPlusPlus(network, MAMLConfig(first_order_epochs=2), compile_forward=True)  # second order later
    with pytest.raises(ValueError, match="compile_forward must be"):
        TNAS(model, compile_forward="cudagraphs")


def assert_compiled_steps_equal_eager(make_learner, batch, backend: str, steps: int = 2, tol: float = 1e-9):
    """Two meta-steps of an eager and a compiled learner from the same start: the same parameters
    after each (relative max error <= tol), and evaluation stays eager (nothing compiled for it)."""
    eager, compiled = make_learner(False), make_learner(backend)
    for _ in range(steps):
        eager.meta_step(batch)
        compiled.meta_step(batch)
        for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
            a, b = a.detach(), b.detach()
            error = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
            assert error <= tol, f"{name}: compiled differs from eager by {error:.2e} (relative)"
    assert compiled._compiled is not None
    forward = compiled._compiled
    compiled.evaluate(batch, steps=1)
    assert compiled._compiled is forward


@pytest.mark.slow
def test_compiled_tnas_first_order_step_equals_eager_aot_eager():
    """The traced graphs (dynamo + AOT autograd, eager kernels): T-NAS meta-steps equal eager in float64.
    Slow: tracing the supernet's graphs takes 2-3 minutes on a 2-core CPU."""
    model, batch = tiny_supernet(), tiny_batch()

    def make_learner(backend):
        config = TNASConfig(inner_steps=2, inner_lr_weights=0.1, inner_lr_alphas=3.0)
        return TNAS(copy.deepcopy(model), config, compile_forward=backend)

    assert_compiled_steps_equal_eager(make_learner, batch, "aot_eager")


def test_compiled_maml_per_step_bn_first_order_equals_eager_aot_eager():
    """From-scratch first-order MAML with per-step BatchNorm and learned rates: the BN set is chosen
    outside the compiled forward; meta-steps equal eager in float64."""
    torch.manual_seed(0)
    network = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1).double()

    def make_learner(backend):
        config = MAMLConfig(inner_steps=2, inner_lr=0.1, per_step_bn=True, learn_inner_lr=True)
        return MAMLPlusPlus(copy.deepcopy(network), config, compile_forward=backend)

    assert_compiled_steps_equal_eager(make_learner, tiny_batch(), "aot_eager")


@pytest.mark.slow
def test_compiled_tnas_first_order_step_equals_eager_inductor():
    """Inductor's generated kernels (C++ on the CPU): T-NAS meta-steps equal eager in float64. Slow:
    compiling the supernet's graphs takes minutes on a 2-core CPU."""
    model, batch = tiny_supernet(), tiny_batch()

    def make_learner(backend):
        config = TNASConfig(inner_steps=2, inner_lr_weights=0.1, inner_lr_alphas=3.0)
        return TNAS(copy.deepcopy(model), config, compile_forward=backend)

    assert_compiled_steps_equal_eager(make_learner, batch, "inductor", tol=1e-8)
