"""CUDA checks (marked gpu; skipped without a GPU): the batched engine (folded and vmap) on cuDNN, bf16, CUDA
graphs, GPU search runs."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import reference
from tnas.meta.maml import inner_loop, model_forward, query_loss_and_accuracy
from tnas.models.supernet import Supernet

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def batch_on(device, dtype, tasks=3, n_way=3, k_shot=1, q_query=2, side=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = lambda per_class: torch.arange(n_way).repeat_interleave(per_class).repeat(tasks, 1).to(device)
    images = lambda n: torch.randn(tasks, n, 1, side, side, generator=generator, dtype=dtype).to(device)
    return SimpleNamespace(support_x=images(n_way * k_shot), support_y=labels(k_shot),
                           query_x=images(n_way * q_query), query_y=labels(q_query))


@pytest.mark.parametrize("fold_tasks,pointwise", [(True, "matmul"), (True, "conv"), (True, "reference"),
                                                  (False, "matmul")],
                         ids=["folded", "folded_1x1_conv", "folded_reference_plan", "vmap"])
@pytest.mark.parametrize("first_order", [True, False])
def test_batched_engine_on_cudnn_matches_cpu_reference(first_order, fold_tasks, pointwise):
    from tnas.models.fast_edges import REFERENCE, ExecutionPlan

    torch.manual_seed(0)
    plan = REFERENCE if pointwise == "reference" else ExecutionPlan(pointwise=pointwise)
    model = Supernet(n_way=3, C=4, layers=2, in_channels=1, plan=plan).double()
    rates = {n: 0.1 for n, _ in model.named_weights()}
    rates.update({n: 3.0 for n, _ in model.named_alphas()})
    cpu_batch = batch_on("cpu", torch.float64)
    params = dict(model.named_parameters())
    want = reference.meta_gradient(model_forward(model), params, rates, cpu_batch.support_x, cpu_batch.support_y,
                                   cpu_batch.query_x, cpu_batch.query_y, 2, first_order)
    model = model.cuda()
    params = dict(model.named_parameters())
    batch = batch_on("cuda", torch.float64)
    forward = model_forward(model, fold_tasks=fold_tasks)
    result = inner_loop(forward, params, rates, batch.support_x, batch.support_y, 2, first_order=first_order)
    shared = {n: p for n, p in params.items() if n not in rates}
    loss, _ = query_loss_and_accuracy(forward, result.task_params, shared, batch.query_x, batch.query_y)
    names = list(params)
    grads = torch.autograd.grad(loss.mean(), [params[n] for n in names])
    for name, grad in zip(names, grads):
        scale = want[name].abs().max().clamp_min(1e-30)
        assert float((grad.cpu() - want[name]).abs().max() / scale) < 1e-8, name


def test_bf16_meta_gradient_close_to_fp32_on_cuda():
    """The stated tolerance of test_maml.test_bf16_autocast_meta_gradient_close_to_fp32, on cuDNN."""
    from test_maml import assert_bf16_meta_gradient_close_to_fp32, bf16_case

    assert_bf16_meta_gradient_close_to_fp32(*bf16_case("cuda"))


@pytest.mark.parametrize("extra", [
    ["--tasks_per_epoch", "8", "--amp"],
    # 10 meta-iterations: each graph (auto-MAML has two) warms up, is captured, then replayed
    ["--tasks_per_epoch", "40", "--cuda_graph", "--log_every", "3"],
    ["--tasks_per_epoch", "40", "--cuda_graph", "--log_every", "0", "--method", "auto_maml", "--amp"],
], ids=["amp", "cuda_graph", "auto_maml_cuda_graph_amp"])
def test_search_runs_on_cuda(tmp_path, extra):
    command = [sys.executable, os.path.join(REPO, "scripts", "search.py"), "--dataset", "glyphs", "--img_size", "16",
               "--device", "cuda", "--n_way", "3", "--q_query", "2", "--tasks_per_batch", "4", "--C", "4",
               "--layers", "1", "--inner_steps", "1", "--inner_steps_test", "2", "--val_episodes", "4",
               "--epochs", "1", *extra, "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "search.json").is_file()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["learner"]["model"].values())


def graphed_and_eager(make_learner, steps_per_call=lambda learner: (lambda b: learner.meta_step(b)), batches=6):
    """Run the same batches through an eager learner and a CUDA-graphed twin (float64).

    Both twins use capturable optimisers: capturable Adam computes its bias correction from a
    float32 step tensor where the plain form uses a Python float, which alone moves float64
    parameters by about 1e-7 relative per step (seen on an H200) and would hide what this checks,
    the graph replaying exactly what eager mode computes.
    """
    from tnas.meta.cuda_graph import GraphedStep, make_optimizers_capturable

    eager, graphed = make_learner(), make_learner()
    make_optimizers_capturable(eager.optimizers.values())
    make_optimizers_capturable(graphed.optimizers.values())
    step = GraphedStep(steps_per_call(graphed), warmup=2)
    for seed in range(batches):
        batch = batch_on("cuda", torch.float64, tasks=3, seed=seed)
        want, got = steps_per_call(eager)(batch), step(batch)
        torch.testing.assert_close(got.query_loss, want.query_loss, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.query_accuracy, want.query_accuracy)
    assert step.captured and step.calls == batches
    for (name, want), (_, got) in zip(eager.model.named_parameters(), graphed.model.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)
    return step


def test_cuda_graph_tnas_meta_steps_match_eager():
    from tnas.meta.tnas import TNAS, TNASConfig

    def make_learner():
        torch.manual_seed(0)
        return TNAS(Supernet(n_way=3, C=4, layers=2, in_channels=1).double().cuda(), TNASConfig(inner_steps=2))

    step = graphed_and_eager(make_learner)
    other = batch_on("cuda", torch.float64, tasks=2)  # another shape runs eagerly, no re-capture
    graph = step.graph
    assert step(other).query_loss.shape == (2,) and step.graph is graph


def test_cuda_graph_maml_plus_plus_second_order_matches_eager():
    from tnas.genotypes import PUBLISHED
    from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
    from tnas.models.network import Network

    def make_learner():
        torch.manual_seed(0)
        model = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=2, in_channels=1).double().cuda()
        return MAMLPlusPlus(model, MAMLConfig(inner_steps=2, first_order=False, per_step_bn=True,
                                              learn_inner_lr=True, multi_step_loss=True))

    graphed_and_eager(make_learner)


def test_cuda_graph_adaptation_matches_eager():
    from tnas.meta.tnas import TNAS, TNASConfig

    def make_learner():
        torch.manual_seed(0)
        return TNAS(Supernet(n_way=3, C=4, layers=1, in_channels=1).double().cuda(), TNASConfig(inner_steps_test=3))

    graphed_and_eager(make_learner, lambda learner: (lambda b: learner.evaluate(b)))


def test_cuda_graph_follows_maml_plus_plus_schedules_across_epochs():
    """Captured again per epoch (derivative order, annealed loss weights, cosine lr): equals eager (float64)."""
    from tnas.genotypes import PUBLISHED
    from tnas.meta.cuda_graph import make_optimizers_capturable
    from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
    from tnas.models.network import Network
    from tnas.stages.common import graph_untracked

    def make_learner():
        torch.manual_seed(0)
        model = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1).double().cuda()
        learner = MAMLPlusPlus(model, MAMLConfig(inner_steps=2, first_order=False, first_order_epochs=1,
                                                 per_step_bn=True, learn_inner_lr=True, multi_step_loss=True,
                                                 msl_epochs=2, cosine_lr=True))
        make_optimizers_capturable(learner.optimizers.values())  # same Adam arithmetic (see graphed_and_eager)
        return learner

    eager, graphed = make_learner(), make_learner()
    step = graph_untracked(lambda batch, track: graphed.meta_step(batch, track_steps=track), True,
                           key=graphed.settings_key)
    per_epoch, epochs = 5, 3
    for iteration in range(per_epoch * epochs):
        batch = batch_on("cuda", torch.float64, tasks=2, seed=iteration)
        for learner in (eager, graphed):
            learner.set_progress(iteration, per_epoch, epochs)
        want, got = eager.meta_step(batch), step(batch, iteration == 7)  # one tracked step runs eagerly
        torch.testing.assert_close(got.query_loss, want.query_loss, rtol=1e-9, atol=1e-12)
    assert step.graphed.graphs == epochs and step.graphed.current.captured
    for (name, want), (_, got) in zip(eager.model.named_parameters(), graphed.model.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=name)


def test_train_from_scratch_runs_with_cuda_graphs(tmp_path):
    """MAML++ over 3 epochs (order switch, annealing, cosine lr) with --cuda_graph, on glyphs."""
    command = [sys.executable, os.path.join(REPO, "scripts", "train_from_scratch.py"), "--genotype", "auto_maml_1shot",
               "--method", "maml++", "--dataset", "glyphs", "--img_size", "16", "--device", "cuda", "--n_way", "3",
               "--q_query", "2", "--tasks_per_batch", "2", "--tasks_per_epoch", "12", "--C", "4", "--layers", "1",
               "--inner_steps", "2", "--inner_steps_test", "2", "--val_episodes", "4", "--epochs", "3",
               "--msl_epochs", "2", "--log_every", "0", "--cuda_graph", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["epochs_done"] == 3
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["learner"]["model"].values())


def test_evaluation_with_cuda_graph_equals_eager():
    """15 episodes in batches of 4: warm-up, capture, replay, then a smaller batch eagerly (float64)."""
    from tnas.evaluate import evaluate_episodes
    from tnas.meta.tnas import TNAS, TNASConfig

    class Episodes:
        def __len__(self):
            return 15

        def batches(self, size, device):
            for start in range(0, 15, size):
                yield batch_on(device, torch.float64, tasks=min(size, 15 - start), seed=start)

    torch.manual_seed(0)
    learner = TNAS(Supernet(n_way=3, C=4, layers=1, in_channels=1).double().cuda(), TNASConfig(inner_steps_test=3))
    eager = evaluate_episodes(learner, Episodes(), 4, "cuda", steps=3, desc=None)
    graphed = evaluate_episodes(learner, Episodes(), 4, "cuda", steps=3, desc=None, cuda_graph=True)
    assert graphed["accuracy"].shape == (15,)
    for key in ("accuracy", "loss"):
        torch.testing.assert_close(torch.from_numpy(graphed[key]), torch.from_numpy(eager[key]), rtol=1e-9,
                                   atol=1e-12)
