"""A meta-step in three phases (gradients, the hook that sums them across ranks, the optimisers' step) and
its CUDA-graphed form under torchrun data parallelism (tnas.meta.cuda_graph.DataParallelGraphedStep).

On a CPU, in float64: the phases run in turn equal ``meta_step`` exactly (T-NAS, auto-MAML's alternating
groups, MAML++ with its schedules), and the graphed wrapper driven through a stand-in for the CUDA graph
(:class:`FakeGraph`, which keeps a graph's gradient tensors and leaves stale ``.grad`` behind, as a real
replay does) equals the eager data-parallel step, in one process and over 2 gloo ranks. The real graphs
(marked gpu) run 2 gloo ranks on one GPU and the search stage end to end.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tnas import distributed
from tnas.data import EpisodeSampler, synthetic_split
from tnas.genotypes import PUBLISHED
from tnas.meta import cuda_graph
from tnas.meta.auto_maml import STEP_GROUPS, AutoMAML, AutoMAMLConfig
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.network import Network
from tnas.models.supernet import Supernet
from tnas.stages import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = 4
METHODS = ("tnas", "auto_maml", "maml_pp")
PER_EPOCH, EPOCHS = 6, 3  # MAML++'s settings change every epoch: a graph is captured again for each
ITERATIONS = PER_EPOCH * EPOCHS
TRACKED = (4, 11, 15)  # eager steps with per-step statistics between replays


def make_learner(method: str, device="cpu"):
    """A tiny float64 learner of ``method``; MAML++ with every per-epoch schedule (order, annealing, cosine lr)."""
    torch.manual_seed(0)
    if method == "maml_pp":
        network = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1).double().to(device)
        return MAMLPlusPlus(network, MAMLConfig(inner_steps=2, per_step_bn=True, learn_inner_lr=True,
                                                multi_step_loss=True, msl_epochs=2, first_order_epochs=1,
                                                first_order=False, cosine_lr=True))
    model = Supernet(n_way=3, C=4, layers=1, steps=2, multiplier=2, in_channels=1).double().to(device)
    if method == "tnas":
        return TNAS(model, TNASConfig(inner_steps=1, inner_lr_weights=0.1, inner_lr_alphas=3.0))
    return AutoMAML(model, AutoMAMLConfig(inner_steps=1, inner_lr_weights=0.1, alternate=True))


def make_sampler(task_slice=None, device="cpu"):
    split = synthetic_split(num_classes=6, images_per_class=6, img_size=8, channels=1)
    return EpisodeSampler(split, n_way=3, k_shot=1, q_query=2, tasks_per_batch=TASKS, seed=5, augment="flip",
                          task_slice=task_slice, device=device)


def double(batch):
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    return batch


def groups_of(method: str, iteration: int):
    """The meta_step groups of ``iteration``: auto-MAML alternates w and alpha steps."""
    return STEP_GROUPS[AutoMAML.step_kind(iteration)] if method == "auto_maml" else {}


def set_progress(learner, iteration: int) -> None:
    if isinstance(learner, MAMLPlusPlus):
        learner.set_progress(iteration, PER_EPOCH, EPOCHS)


def halve_gradients(params):
    """A stand-in for the all-reduce in one process: it changes every gradient, so a step that
    missed it, or ran before it, would differ."""
    for param in params:
        if param.grad is not None:
            param.grad.mul_(0.5)


def assert_same_stats(got, want, exact=True):
    for field in ("query_loss", "query_accuracy", "per_step_loss", "per_step_accuracy"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            if exact:
                assert torch.equal(a, b), field
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=field)


def assert_same_learners(got, want, exact=True):
    for (name, a), (_, b) in zip(want.model.named_parameters(), got.model.named_parameters()):
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)
    for name, a in getattr(want, "learned_lrs", {}).items():
        if exact:
            assert torch.equal(a, got.learned_lrs[name]), name
        else:
            torch.testing.assert_close(got.learned_lrs[name], a, rtol=1e-9, atol=1e-12, msg=name)


# -- the phases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_the_phases_in_turn_equal_meta_step(method):
    """meta_gradients, then the hook, then apply_gradients: the same numbers as meta_step with that hook."""
    whole, phased = make_learner(method), make_learner(method)
    whole.gradient_hook, whole.loss_scale, phased.loss_scale = halve_gradients, 0.75, 0.75
    sampler = make_sampler()
    for iteration in range(6):
        batch, groups, track = double(sampler.sample()), groups_of(method, iteration), iteration % 2 == 1
        for learner in (whole, phased):
            set_progress(learner, iteration)
        want = whole.meta_step(batch, track_steps=track, **groups)
        before = {name: p.detach().clone() for name, p in phased.model.named_parameters()}
        got = phased.meta_gradients(batch, track_steps=track, **groups)
        assert all(torch.equal(p, before[name]) for name, p in phased.model.named_parameters())  # nothing stepped
        halve_gradients(phased.stepped_params(groups.get("update_groups")))
        phased.apply_gradients(groups.get("update_groups"))
        assert_same_stats(got, want)
        assert_same_learners(phased, whole)


def test_stepped_params_are_what_the_optimisers_step():
    learner = make_learner("auto_maml")
    alphas = learner.stepped_params(["alphas"])
    assert [id(p) for p in alphas] == [id(p) for p in learner.model.alphas()]
    assert len(learner.stepped_params()) == len(alphas) + len(learner.stepped_params(["weights"]))
    maml_pp = make_learner("maml_pp")
    assert maml_pp.update_group_names(["anything"]) == ["weights"]
    assert len(maml_pp.stepped_params()) == len(list(maml_pp.model.parameters())) + len(maml_pp.learned_lrs)


# -- the graphed wrapper, through a stand-in graph --------------------------------------------------
class FakeGraph:
    """Plays :class:`GraphedStep` on a CPU, with what matters to the phases after it.

    ``warmup`` eager calls; then a capture (the step runs; the gradient tensors it leaves are the
    graph's); then replays: the step runs, its gradients are copied into the graph's tensors, as
    a replay writes them, and the parameters are left holding NaN ``.grad`` (a CUDA replay leaves
    the ``.grad`` attributes as the last eager step set them). Only a wrapper that points ``.grad``
    back at the graph's tensors steps right. ``FakeGraph.params``: the tensors to watch.
    """

    params: list = []
    replays = 0
    captures = 0
    mode = "thread_local"  # data parallel: the process group's threads may call CUDA meanwhile

    def __init__(self, step, warmup=3, on_failure=None, capture_error_mode="global"):
        assert capture_error_mode == FakeGraph.mode
        self.step, self.warmup, self.calls, self.failed, self.last_call = step, warmup, 0, False, "eager"
        self.graph_grads = None

    def __call__(self, batch):
        self.calls += 1
        before = [p.grad for p in FakeGraph.params]
        out = self.step(batch)
        written = [i for i, p in enumerate(FakeGraph.params) if p.grad is not before[i]]
        if self.calls <= self.warmup:
            self.last_call = "eager"
        elif self.graph_grads is None:
            self.graph_grads = {i: FakeGraph.params[i].grad for i in written}
            self.last_call, FakeGraph.captures = "captured", FakeGraph.captures + 1
        else:
            assert set(written) == set(self.graph_grads)
            for i in written:
                param = FakeGraph.params[i]
                self.graph_grads[i].copy_(param.grad)
                param.grad = torch.full_like(param.grad, float("nan"))
            self.last_call, FakeGraph.replays = "replayed", FakeGraph.replays + 1
        return out


def watch(monkeypatch, learner):
    monkeypatch.setattr(cuda_graph, "GraphedStep", FakeGraph)
    monkeypatch.setattr(common, "GraphedStep", FakeGraph)
    monkeypatch.setattr(FakeGraph, "params", [p for opt in learner.optimizers.values()
                                              for group in opt.param_groups for p in group["params"]])
    monkeypatch.setattr(FakeGraph, "replays", 0)
    monkeypatch.setattr(FakeGraph, "captures", 0)


def graphed_steps(learner, method: str, lines: list):
    """The stage's step functions for ``learner`` (one per auto-MAML kind), graphed."""
    key = learner.settings_key if method == "maml_pp" else None
    kinds = STEP_GROUPS if method == "auto_maml" else {"all": {}}
    return {kind: common.graph_meta_step(learner, True, key=key, log=lines.append, **groups)
            for kind, groups in kinds.items()}


def run_eager_and_graphed(method: str, eager, graphed, sampler, lines):
    """ITERATIONS steps of both learners on the same batches, tracked ones at TRACKED; their statistics."""
    steps = graphed_steps(graphed, method, lines)
    for iteration in range(ITERATIONS):
        batch, groups, track = double(sampler.sample()), groups_of(method, iteration), iteration in TRACKED
        for learner in (eager, graphed):
            set_progress(learner, iteration)
        want = eager.meta_step(batch, track_steps=track, **groups)
        kind = AutoMAML.step_kind(iteration) if method == "auto_maml" else "all"
        got = steps[kind](batch, track)
        yield got, want
    for step in steps.values():  # the last call of each was a replay
        assert isinstance(step.graphed, cuda_graph.DataParallelGraphedStep) and not step.graphed.failed
        assert isinstance(step.graphed.graphed, cuda_graph.GraphGradients)
        assert step.graphed.graphed.last_call == "replayed"


@pytest.mark.parametrize("method", METHODS)
def test_graphed_phases_equal_the_eager_step_in_one_process(method, monkeypatch):
    eager, graphed = make_learner(method), make_learner(method)
    for learner in (eager, graphed):
        learner.gradient_hook, learner.loss_scale = halve_gradients, 0.5
    watch(monkeypatch, graphed)
    lines = []
    for got, want in run_eager_and_graphed(method, eager, graphed, make_sampler(), lines):
        assert_same_stats(got, want)
        assert_same_learners(graphed, eager)
    assert FakeGraph.replays >= 3 and not lines  # MAML++: one per epoch, after a tracked step in two
    assert FakeGraph.captures == (3 if method == "maml_pp" else 2 if method == "auto_maml" else 1)


@pytest.mark.parametrize("method", METHODS)
def test_in_one_process_the_gradients_after_a_replay_are_that_steps(method, monkeypatch):
    """The whole step graphed (no data parallelism): after every call, replays after tracked eager steps
    among them, the stepped parameters' ``.grad`` are that step's (the finite-gradient guard reads them),
    not the NaN a stale ``.grad`` holds here."""
    from tnas import guard

    eager, graphed = make_learner(method), make_learner(method)
    watch(monkeypatch, graphed)
    monkeypatch.setattr(FakeGraph, "mode", "global")
    key = graphed.settings_key if method == "maml_pp" else None
    kinds = STEP_GROUPS if method == "auto_maml" else {"all": {}}
    steps = {kind: common.graph_meta_step(graphed, True, key=key, **groups) for kind, groups in kinds.items()}
    sampler = make_sampler()
    for iteration in range(ITERATIONS):
        batch, groups, track = double(sampler.sample()), groups_of(method, iteration), iteration in TRACKED
        for learner in (eager, graphed):
            set_progress(learner, iteration)
        want = eager.meta_step(batch, track_steps=track, **groups)
        got = steps[AutoMAML.step_kind(iteration) if method == "auto_maml" else "all"](batch, track)
        assert_same_stats(got, want)
        update = groups.get("update_groups")
        for a, b in zip(graphed.stepped_params(update), eager.stepped_params(update), strict=True):
            assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
        assert bool(guard.gradients_finite(graphed, torch.device("cpu")))
    assert_same_learners(graphed, eager)
    assert FakeGraph.replays >= 3 and all(step.graphed.last_call == "replayed" for step in steps.values())


def test_without_data_parallelism_the_whole_step_is_graphed():
    learner = make_learner("tnas")
    whole = common.graph_meta_step(learner, True).graphed
    assert type(whole) is cuda_graph.GraphGradients and type(whole.graphed) is cuda_graph.GraphedStep  # step included
    assert whole.params == learner.stepped_params()
    keyed = common.graph_meta_step(learner, True, key=lambda: 0).graphed
    assert type(keyed.graphed) is cuda_graph.KeyedGraphedStep
    learner.gradient_hook = halve_gradients
    assert type(common.graph_meta_step(learner, True).graphed) is cuda_graph.DataParallelGraphedStep
    eager = common.graph_meta_step(learner, False)
    assert not hasattr(eager, "graphed") and eager(double(make_sampler().sample()), False).query_loss.shape == (TASKS,)


def test_a_failed_capture_leaves_eager_phases_and_one_line(monkeypatch):
    """The capture of the gradients fails: one log line, then eager gradients, still all-reduced and stepped."""
    monkeypatch.setattr(cuda_graph.GraphedStep, "_eager_on_side_stream", lambda self, batch: self.step(batch))

    def failing_capture(self, batch):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph.GraphedStep, "_capture", failing_capture)
    eager, graphed = make_learner("tnas"), make_learner("tnas")
    for learner in (eager, graphed):
        learner.gradient_hook = halve_gradients
    lines = []
    step = common.graph_meta_step(graphed, True, log=lines.append)
    sampler = make_sampler()

    def on_cuda(batch):  # GraphedStep refuses CPU batches: a label that says CUDA, around the real batch
        return SimpleNamespace(support_x=SimpleNamespace(device=torch.device("cuda")), real=batch)

    monkeypatch.setattr(graphed, "meta_gradients",
                        lambda label, **groups: type(graphed).meta_gradients(graphed, label.real, **groups))
    for _ in range(5):
        batch = double(sampler.sample())
        assert_same_stats(step(on_cuda(batch), False), eager.meta_step(batch))
    assert_same_learners(graphed, eager)
    assert step.graphed.failed and lines == ["cuda_graph: the capture failed (RuntimeError: operation not permitted "
                                             "when stream is capturing); running eager steps instead"]


# -- 2 gloo ranks -------------------------------------------------------------------------------------
def rank_main(rank, world_size, init_file, device, fake):
    """Each method's eager data-parallel step against the graphed one (fake: the stand-in graph on a CPU)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))  # a stuck collective fails instead of hanging
    try:
        if fake:
            cuda_graph.GraphedStep = FakeGraph
        for method in METHODS:
            eager, graphed = make_learner(method, device), make_learner(method, device)
            if not fake:
                cuda_graph.make_optimizers_capturable(eager.optimizers.values())
                cuda_graph.make_optimizers_capturable(graphed.optimizers.values())
            task_slice = common.data_parallel(eager, TASKS)
            assert common.data_parallel(graphed, TASKS) == task_slice
            FakeGraph.params = [p for opt in graphed.optimizers.values() for group in opt.param_groups
                                for p in group["params"]]
            lines = []
            for got, want in run_eager_and_graphed(method, eager, graphed, make_sampler(task_slice, device), lines):
                assert_same_stats(got, want, exact=fake)
            assert_same_learners(graphed, eager, exact=fake)
            assert not lines, lines
        dist.barrier()  # neither rank leaves the gloo group while the other still talks in it
    finally:
        distributed.destroy_process_group()  # torch 2.4's own can deadlock


def test_two_gloo_ranks_graphed_phases_equal_the_eager_step(tmp_path):
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), "cpu", True), nprocs=2, join=True)


# -- on a GPU -----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_two_gloo_ranks_on_one_gpu_replay_the_eager_step(tmp_path):
    """Real CUDA graphs of the gradients, the all-reduce (gloo, CUDA tensors) and Adam between replays:
    T-NAS, auto-MAML and MAML++ (captured again per epoch) equal their eager data-parallel steps."""
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), "cuda:0", False), nprocs=2, join=True)


SEARCH = ["--dataset", "glyphs", "--img_size", "16", "--n_way", "3", "--q_query", "2", "--tasks_per_batch", "4",
          "--C", "4", "--layers", "1", "--inner_steps", "1", "--inner_steps_test", "1", "--val_episodes", "4",
          "--epochs", "1", "--tasks_per_epoch", "40", "--log_every", "4", "--seed", "1", "--device", "cuda"]


def search_rank(rank, world_size, init_file, argv):
    """scripts/search.py as torchrun's rank ``rank`` would run it, the group joined over gloo (both ranks on
    cuda:0; NCCL needs a GPU per process)."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK="0", TNAS_PROGRESS="0")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from tnas.config import parse_args
        from tnas.stages import search

        search.run(search.settings_from_args(parse_args(search.build_parser(), argv)))
    finally:
        if dist.is_initialized():
            distributed.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_search_under_data_parallelism_graphs_its_steps(tmp_path, method="tnas"):
    """The search stage on 2 ranks with --cuda_graph auto: it says it graphs, captures without failing, and
    ends where --cuda_graph off does (the equality of the phases themselves is the test above)."""
    runs = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        argv = [*SEARCH, "--method", method, "--cuda_graph", mode, "--out", str(out)]
        mp.spawn(search_rank, args=(2, str(tmp_path / f"init_{mode}"), argv), nprocs=2, join=True)
        runs[mode] = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["learner"]["model"]
        log = (out / "log.txt").read_text()
        if mode == "auto":
            assert "cuda_graph auto: the gradients of each untracked step replayed as one CUDA graph on cuda" in log, log
            assert "capture failed" not in log and "capture failed" not in (out / "rank1" / "log.txt").read_text()
    for name, value in runs["off"].items():  # float32; capturable Adam differs from the plain form in rounding
        torch.testing.assert_close(runs["auto"][name], value, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torchrun with NCCL needs 2 GPUs")
def test_torchrun_search_on_two_gpus_graphs_its_steps(tmp_path):
    import subprocess

    env = dict(os.environ, TNAS_PROGRESS="0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "scripts", "search.py"), *SEARCH, "--cuda_graph", "on", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "cuda_graph on: the gradients of each untracked step replayed" in log and "capture failed" not in log
