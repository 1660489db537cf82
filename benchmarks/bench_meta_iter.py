#!/usr/bin/env python
"""Seconds per meta-iteration, tasks/s and peak GPU memory of T-NAS / auto-MAML search, meta-test
adaptation and from-scratch training of a derived network.

    python benchmarks/bench_meta_iter.py                                  # paper setting, every case
    python benchmarks/bench_meta_iter.py --cases tnas_1shot_T4 --amp      # bf16 autocast fast path
    python benchmarks/bench_meta_iter.py --cases tnas_1shot_T4 --tf32     # TF32 matmuls and convolutions
    python benchmarks/bench_meta_iter.py --cases tnas_1shot_T4 --compile  # torch.compile of the training forward
    python benchmarks/bench_meta_iter.py --cuda_graph off                 # eager (default auto: graphs on a GPU)
    python benchmarks/bench_meta_iter.py --batching vmap                  # tasks through torch.func.vmap
    python benchmarks/bench_meta_iter.py --tiny --device cpu              # a smoke run on a CPU

Paper setting: 5-way, 84x84 RGB, C 16, layers 2, 15 queries per class, 5 inner steps
(10 for meta-test adaptation), first order. Images are random tensors already on the
device, so this times the meta-learning only (the data pipeline has its own benchmark,
``bench_episodes.py``). Each case runs ``--warmup`` iterations, then ``--iterations``
timed ones, synchronising the device before reading the clock. Prints one JSON object, whose
``setting`` carries what ``--cuda_graph auto`` chose and why; a SIGTERM (a time limit such as
``gpu_check.sh``'s) still prints it, with the cases finished so far, an error for the case cut and
those not started, and ``cut_short`` (exit status 1). Each case also counts the FLOPs
of one meta-iteration (``gflop_per_iteration``; ``torch.utils.flop_counter``: convolutions and
matrix products, the folded 1x1 convolutions' batched matmuls included, forward and backward, with
our own formula for a convolution's backward, whose grouped weight gradient torch overcounts;
BatchNorm and elementwise work not counted) and, on a GPU of known peak, the fraction of it
achieved (``fraction_of_peak`` of ``peak_tflops``, dense, on the ``peak_basis`` the run asked
for: :func:`peak_tflops`), and the torch operators
it dispatches (``ops_per_iteration``: every aten op but views, forward and backward; on a GPU
about one kernel each), which is what bounds a meta-iteration of small kernels on a GPU.
``--edges`` picks the supernet's edge path (``sources``: source folding, ``fused``: edge by edge,
``reference``: the plain ``MixedOp`` sum).

``--tf32`` runs every case with TF32 on for CUDA matmuls and cuDNN convolutions
(:func:`tnas.precision.tf32`; without it the process keeps PyTorch's defaults: matmuls in float32,
cuDNN free to use TF32); the JSON's ``setting.tf32_state`` says what the cases ran with.
``--compile [inductor|aot_eager]`` gives the meta-learners ``compile_forward``: the forwards of the
meta-training steps run through ``torch.compile`` (first order only, so the MAML++ case reports an
error; adaptation cases stay eager). The warm-up then includes compiling (``warmup_seconds``), and
the FLOP counter, which sees only eager kernels, is skipped.

Reference, the original code on one H200 (docs/design.md section 3): T-NAS 3.68 s per meta-iteration of
4 tasks, 1-shot (1.09 tasks/s); auto-MAML 6.17 s per meta-iteration of 4 tasks; meta-test
adaptation 1.61 s per task.

The ``scratch_*`` cases time from-scratch MAML (first order) and MAML++ (second order, every
component on) of the published auto-MAML cell, and extrapolate t_g, the device-hours to train
one genotype at the paper schedule (15 epochs x 15,000 tasks = 56,250 meta-iterations of 4
tasks, validation not counted), and the T-NAS protocol's cost for 600 distinct genotypes, set
beside the original code's estimate of 6 h per genotype (3,600 GPU-hours for 600 tasks).

The ``genobatch_*`` cases train G genotypes at once as one network
(:mod:`tnas.meta.genotype_batch`), 4 tasks per genotype, first-order MAML or MAML++ as the
``scratch_*`` cases. The G genotypes are decoded from random alphas (every edge's choice drawn
anew: the least sharing of ops between genotypes, so the slowest case); ``genobatch_same_*``
batch the published 1-shot genotype G times (every choice shared: the fastest case). ``tasks_per_second``
counts the tasks of all genotypes; ``protocol_hours_600`` is the device-hours to train 600
genotypes at the paper schedule in batches of G. ``genobatch_demo_G8_vs_sequential`` (and its
``_distinct`` variant with 8 random genotypes) times, in one process, one batched meta-iteration
of 8 genotypes against 8 solo meta-iterations one after another, at the CPU demo's setting
(``configs/demo_scratch.yaml``: 28x28 grayscale, C 8, layers 2, 5 queries, 3 inner steps;
``--tiny`` shrinks it further), and reports the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import signal
import sys
import threading
import time
from types import SimpleNamespace
from typing import Dict, List

import torch

from tnas import precision
from tnas.genotypes import PRIMITIVES, PUBLISHED, decode_genotype, num_edges
from tnas.meta.cuda_graph import (GraphedStep, make_optimizers_capturable,
                                  resolve_cuda_graph)
from tnas.meta.genotype_batch import GenotypeBatchLearner
from tnas.meta.maml import COMPILE_BACKENDS, model_forward
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.fast_edges import ExecutionPlan
from tnas.models.genotype_batch import GenotypeBatchNetwork
from tnas.models.network import Network
from tnas.models.supernet import Supernet
from tnas.stages.common import add_cuda_graph_arg
from tnas.task_folding import POINTWISE_MODES, use_pointwise_mode
from torch.utils._python_dispatch import TorchDispatchMode

ORIGINAL_SECONDS = {"tnas": 3.68 / 4, "auto_maml": 6.17 / 4, "adapt": 1.61, "scratch": 6 * 3600 / 225_000,
                    "genobatch": 6 * 3600 / 225_000}
"""The original code's seconds per task (meta-training: per task of a 4-task meta-batch): search and
adaptation measured on one H200; from-scratch training from its README's 6 h per genotype (GTX 1080)
spread over the 225,000 tasks of the paper schedule."""
PAPER_SCHEDULE_TASKS = 15 * 15_000
"""Tasks seen while training one genotype from scratch at the paper schedule (15 epochs x 15,000)."""
PROTOCOL_GENOTYPES = 600
EDGE_PATHS = ("sources", "fused", "reference")
DEFAULT_EDGES = ("sources" if ExecutionPlan.fold_sources else "fused") if ExecutionPlan.fused_edges else "reference"
"""``--edges`` choices; the default is the default plan's path."""
GRAPH_WARMUP = 2
"""Eager calls of each step before its CUDA graph is captured (when graphed)."""
PEAK_TFLOPS = {"H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
               "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
               "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5},
               "H200": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}, "H100": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5},
               "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}
"""Dense peak TFLOP/s by GPU name, from NVIDIA's datasheets: fp32 on the CUDA cores, tf32 and bf16 on the
tensor cores at half the datasheets' "with sparsity" figures (2:4 sparsity, which nothing here uses).
The first key found in ``torch.cuda.get_device_name`` wins, so the NVL and PCIe parts come before the
SXM parts that a bare "H200" / "H100" names (an A100's peaks are the same for both)."""

CASES: Dict[str, Dict[str, object]] = {
    "tnas_1shot_T4": dict(kind="tnas", k_shot=1, tasks=4),
    "tnas_1shot_T16": dict(kind="tnas", k_shot=1, tasks=16),
    "tnas_5shot_T4": dict(kind="tnas", k_shot=5, tasks=4),
    "tnas_5shot_T16": dict(kind="tnas", k_shot=5, tasks=16),
    "auto_maml_1shot_T4": dict(kind="auto_maml", k_shot=1, tasks=4),
    "auto_maml_1shot_T16": dict(kind="auto_maml", k_shot=1, tasks=16),
    "adapt_1shot_T100": dict(kind="adapt", k_shot=1, tasks=100),
    "scratch_1shot_T4": dict(kind="scratch", k_shot=1, tasks=4, genotype="auto_maml_1shot"),
    "scratch_5shot_T4": dict(kind="scratch", k_shot=5, tasks=4, genotype="auto_maml_5shot"),
    "scratch_pp_1shot_T4": dict(kind="scratch", k_shot=1, tasks=4, genotype="auto_maml_1shot", plus_plus=True),
}
for _shot in (1, 5):
    for _count in (1, 8, 32, 64):
        CASES[f"genobatch_{_shot}shot_G{_count}_T4"] = dict(kind="genobatch", k_shot=_shot, tasks=4, genotypes=_count)
        CASES[f"genobatch_pp_{_shot}shot_G{_count}_T4"] = dict(kind="genobatch", k_shot=_shot, tasks=4,
                                                            genotypes=_count, plus_plus=True)
for _count in (8, 64):  # the best case: one genotype G times, every choice shared
    CASES[f"genobatch_same_1shot_G{_count}_T4"] = dict(kind="genobatch", k_shot=1, tasks=4, genotypes=_count,
                                                      same=True)
CASES["genobatch_demo_G8_vs_sequential"] = dict(kind="genobatch_vs_sequential", k_shot=1, tasks=4, genotypes=8,
                                                distinct=False)
CASES["genobatch_demo_G8_distinct_vs_sequential"] = dict(kind="genobatch_vs_sequential", k_shot=1, tasks=4,
                                                         genotypes=8, distinct=True)
DEMO_SETTING = dict(n_way=5, C=8, layers=2, img_size=28, channels=1, q_query=5, inner_steps=3, inner_steps_test=5)
"""configs/demo_scratch.yaml's network and episodes (glyphs: 28x28 grayscale)."""


def random_genotypes(count: int, seed: int = 0, steps: int = 4):
    """``count`` genotypes decoded from random alphas (each edge's op and inputs drawn anew)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (num_edges(steps), len(PRIMITIVES))
    return [decode_genotype(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), steps)
            for _ in range(count)]


def case_genotypes(spec: Dict[str, object]):
    """A genotype-batch case's genotypes: random decodes, or the published 1-shot one G times (``same``)."""
    count = int(spec["genotypes"])
    return [PUBLISHED["auto_maml_1shot"]] * count if spec.get("same") else random_genotypes(count)


def distinct_choices_per_edge(genotypes) -> float:
    """Mean over the edge positions of both cells of the distinct (op, input) choices the genotypes made
    there: the op modules a genotype batch runs per edge position (1 when all genotypes agree)."""
    counts = [len({getattr(g, cell)[edge] for g in genotypes})
              for cell in ("normal", "reduce") for edge in range(len(genotypes[0].normal))]
    return sum(counts) / len(counts)


def synthetic_batch(tasks: int, n_way: int, k_shot: int, q_query: int, channels: int, side: int, device):
    labels = lambda per_class: torch.arange(n_way, device=device).repeat_interleave(per_class).repeat(tasks, 1)
    return SimpleNamespace(
        support_x=torch.randn(tasks, n_way * k_shot, channels, side, side, device=device),
        support_y=labels(k_shot),
        query_x=torch.randn(tasks, n_way * q_query, channels, side, side, device=device),
        query_y=labels(q_query))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scratch_config(spec: Dict[str, object], args) -> MAMLConfig:
    """First-order MAML, or MAML++ (second order, every component on) for ``plus_plus`` cases."""
    plus_plus = bool(spec.get("plus_plus"))
    return MAMLConfig(inner_steps=args.inner_steps, inner_steps_test=args.inner_steps_test,
                      first_order=not plus_plus, per_step_bn=plus_plus, learn_inner_lr=plus_plus,
                      multi_step_loss=plus_plus, cosine_lr=plus_plus,
                      amp_dtype=torch.bfloat16 if getattr(args, "amp", False) else None)


def build_learner(spec: Dict[str, object], args, device: torch.device):
    """The learner a case times: T-NAS on the supernet, (MAML / MAML++) on a derived network, or on a
    batch of G derived networks."""
    amp_dtype = torch.bfloat16 if args.amp else None
    plan = ExecutionPlan(fused_edges=args.edges != "reference", fold_sources=args.edges == "sources",
                         branch_streams=args.branch_streams, pointwise=args.pointwise)
    compile_forward = getattr(args, "compile", None) or False
    if spec["kind"] == "genobatch":
        if compile_forward:
            raise ValueError("--compile: genotype batches have no compile_forward")
        model = GenotypeBatchNetwork.from_genotypes(case_genotypes(spec), seed=0,
                                                    n_way=args.n_way, C=args.C, layers=args.layers, in_channels=3)
        use_pointwise_mode(model, plan.pointwise)
        return GenotypeBatchLearner(model.to(device), scratch_config(spec, args))
    if spec["kind"] == "scratch":
        model = Network(PUBLISHED[str(spec["genotype"])], n_way=args.n_way, C=args.C, layers=args.layers,
                        in_channels=3, plan=plan)
        config = scratch_config(spec, args)
        learner_class = MAMLPlusPlus
    else:
        model = Supernet(n_way=args.n_way, C=args.C, layers=args.layers, in_channels=3, plan=plan)
        config = TNASConfig(inner_steps=args.inner_steps, inner_steps_test=args.inner_steps_test,
                            amp_dtype=amp_dtype)
        learner_class = TNAS
    model = model.to(device)
    if args.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    learner = learner_class(model, config, compile_forward=compile_forward)
    learner.forward = model_forward(model, fold_tasks=args.batching == "fold")
    return learner


def prepare_case(spec: Dict[str, object], args, device: torch.device):
    """Build a case's learner and batch: returns (one_iteration(i), warm-up iterations, tasks)."""
    torch.manual_seed(0)
    kind, tasks = spec["kind"], int(spec["tasks"]) * int(spec.get("genotypes", 1))
    learner = build_learner(spec, args, device)
    batch = synthetic_batch(tasks, args.n_way, int(spec["k_shot"]), args.q_query, 3, args.img_size, device)

    steps = {  # (kind, iteration parity) -> one call of the learner on a batch
        "tnas": lambda b: learner.meta_step(b),
        "scratch": lambda b: learner.meta_step(b),
        "genobatch": lambda b: learner.meta_step(b),
        # auto-MAML: the weights step and the alpha step alternate; both adapt w only
        "weights": lambda b: learner.meta_step(b, adapt_groups=["weights"], update_groups=["weights"]),
        "alphas": lambda b: learner.meta_step(b, adapt_groups=["weights"], update_groups=["alphas"]),
        "adapt": lambda b: learner.evaluate(b, steps=args.inner_steps_test),
    }
    warmup = max(args.warmup, 2 if kind == "auto_maml" else 1)  # the FLOP count reads the first warm-up step(s)
    failures: List[str] = []
    if args.graphed:
        make_optimizers_capturable(learner.optimizers.values())
        record_failure = lambda error: failures.append(f"{type(error).__name__}: {error}".splitlines()[0])  # noqa: E731
        steps = {key: GraphedStep(step, warmup=GRAPH_WARMUP, on_failure=record_failure) for key, step in steps.items()}
        warmup = max(warmup, (GRAPH_WARMUP + 1) * (2 if kind == "auto_maml" else 1))  # capture before timing

    def one_iteration(iteration: int) -> None:
        key = ("weights" if iteration % 2 == 0 else "alphas") if kind == "auto_maml" else kind
        steps[key](batch)

    one_iteration.capture_failures = failures
    return one_iteration, warmup, tasks


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, groups, output_mask, out_shape=None) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward's ``2 * out elements * (C_in/groups) * kh * kw``
    once per gradient asked for in ``output_mask`` (input, weight; the bias gradient is a sum, not
    counted). So a conv whose input needs no gradient (the stem's first, on the images) costs 1x its
    forward backward, every other 2x. torch's own formula counts the weight gradient of a grouped
    conv ``groups`` times over: C times for a depthwise conv, and T (tasks) x E (folded edges) times
    more for the folded convs here, 26x the true total at the paper setting of T-NAS."""
    from math import prod

    forward = 2 * prod(x_shape if transposed else grad_out_shape) * prod(w_shape[1:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched while active, views left out (they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_work(one_iteration, iterations: List[int]):
    """(FLOPs, aten ops) per call of ``one_iteration`` averaged over ``iterations`` (eager calls: run
    them before any capture): torch's FLOP counter (convolutions and matrix products, forward and
    backward; elementwise work not counted) and :class:`OpCounter`."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False,
                              custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})
    ops = OpCounter()
    with counter, ops:
        for iteration in iterations:
            one_iteration(iteration)
    return counter.get_total_flops() / len(iterations), ops.ops / len(iterations)


def peak_tflops(args, device: torch.device) -> Dict[str, object]:
    """The peak ``fraction_of_peak`` is taken of: ``{"peak_tflops", "peak_basis"}`` from ``--peak_tflops``
    (basis ``given``) or :data:`PEAK_TFLOPS` by the device's name; ``{}`` when unknown (a CPU, another GPU).

    The basis is the arithmetic the run asks for: ``bf16`` under ``--amp``, ``tf32`` when both TF32
    switches are on (``--tf32``), else ``fp32``. PyTorch's default lets cuDNN run float32
    convolutions in TF32 while matmuls stay float32, so the ceiling of a default run lies between
    the two peaks: on an ``fp32`` basis with cuDNN TF32 allowed, ``tf32_peak_tflops`` comes too
    (and :func:`run_case` adds ``fraction_of_tf32_peak``)."""
    if args.peak_tflops is not None:
        return {"peak_tflops": args.peak_tflops, "peak_basis": "given"}
    if device.type != "cuda":
        return {}
    state = precision.tf32_state()
    basis = "bf16" if args.amp else "tf32" if state.matmul and state.cudnn else "fp32"
    name = torch.cuda.get_device_name(device)
    peaks = next((peaks for key, peaks in PEAK_TFLOPS.items() if key in name), None)
    if peaks is None:
        return {}
    found = {"peak_tflops": peaks[basis], "peak_basis": basis}
    if basis == "fp32" and state.cudnn:
        found["tf32_peak_tflops"] = peaks["tf32"]
    return found


def run_case(name: str, spec: Dict[str, object], args, device: torch.device) -> Dict[str, object]:
    kind = spec["kind"]
    one_iteration, warmup, tasks = prepare_case(spec, args, device)
    counted = 2 if kind == "auto_maml" else 1  # auto-MAML alternates a weight step and an alpha step
    compiled = bool(getattr(args, "compile", None))
    started = time.perf_counter()
    # compiled kernels go uncounted
    flops, ops = (None, None) if compiled else count_work(one_iteration, list(range(counted)))
    for iteration in range(0 if compiled else counted, warmup):
        one_iteration(iteration)
    synchronize(device)
    warmup_seconds = time.perf_counter() - started
    if args.start_at is not None:  # line up the timed loops of processes sharing one GPU
        time.sleep(max(0.0, args.start_at - time.time()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for iteration in range(args.iterations):
        one_iteration(iteration)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.iterations
    tasks_per_second = tasks / seconds
    record = {"case": name, "kind": kind, "k_shot": spec["k_shot"], "tasks": tasks,
              "first_order": not spec.get("plus_plus", False),
              "seconds_per_iteration": seconds, "tasks_per_second": tasks_per_second,
              "speedup_vs_original": tasks_per_second * ORIGINAL_SECONDS[kind],
              "warmup_seconds": warmup_seconds, "ops_per_iteration": ops,
              "cuda_graph": "eager" if not args.graphed else (
                  f"eager after a failed capture ({one_iteration.capture_failures[0]})"
                  if one_iteration.capture_failures else "graphed")}
    if flops is not None:
        record["gflop_per_iteration"], record["achieved_tflops"] = flops / 1e9, flops / seconds / 1e12
    peak = peak_tflops(args, device)
    if peak and flops is not None:
        record.update(peak)
        record["fraction_of_peak"] = record["achieved_tflops"] / peak["peak_tflops"]
        if "tf32_peak_tflops" in peak:
            record["fraction_of_tf32_peak"] = record["achieved_tflops"] / peak["tf32_peak_tflops"]
    if kind == "scratch":
        record["genotype"] = spec["genotype"]
        record["method"] = "maml++ (second order)" if spec.get("plus_plus") else "maml (first order)"
        genotype_hours = PAPER_SCHEDULE_TASKS / tasks_per_second / 3600
        record["genotype_hours_paper_schedule"] = genotype_hours
        record[f"protocol_device_hours_{PROTOCOL_GENOTYPES}_genotypes"] = genotype_hours * PROTOCOL_GENOTYPES
    if kind == "genobatch":
        record["genotypes"] = int(spec["genotypes"])
        record["tasks_per_genotype"] = int(spec["tasks"])
        record["method"] = "maml++ (second order)" if spec.get("plus_plus") else "maml (first order)"
        record["distinct_choices_per_edge"] = distinct_choices_per_edge(case_genotypes(spec))
        record["genotype_hours_paper_schedule"] = PAPER_SCHEDULE_TASKS / tasks_per_second / 3600  # amortised
        record[f"protocol_hours_{PROTOCOL_GENOTYPES}"] = (
            PROTOCOL_GENOTYPES * PAPER_SCHEDULE_TASKS / tasks_per_second / 3600)
    if device.type == "cuda":
        record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return record


def run_comparison(name: str, spec: Dict[str, object], args, device: torch.device) -> Dict[str, object]:
    """G genotypes batched against G solo learners stepped one after another, same process, same data."""
    count, tasks = int(spec["genotypes"]), int(spec["tasks"])
    setting = dict(DEMO_SETTING)
    if args.tiny:
        setting.update(C=4, layers=1, img_size=16, q_query=2, inner_steps=1, inner_steps_test=2)
    settings = SimpleNamespace(**setting)
    genotypes = random_genotypes(count) if spec["distinct"] else [PUBLISHED["auto_maml_1shot"]] * count
    shape = dict(n_way=settings.n_way, C=settings.C, layers=settings.layers, in_channels=settings.channels)
    torch.manual_seed(0)
    batches = [synthetic_batch(tasks, settings.n_way, int(spec["k_shot"]), settings.q_query, settings.channels,
                               settings.img_size, device) for _ in range(count)]
    solo = []
    for genotype in genotypes:
        torch.manual_seed(0)
        solo.append(MAMLPlusPlus(Network(genotype, **shape).to(device), scratch_config(spec, settings)))
    batched = GenotypeBatchLearner(GenotypeBatchNetwork.from_genotypes(genotypes, seed=0, **shape).to(device),
                                   scratch_config(spec, settings))
    stacked = SimpleNamespace(**{field: torch.cat([getattr(b, field) for b in batches])
                                 for field in ("support_x", "support_y", "query_x", "query_y")})

    def sequential() -> None:
        for learner, batch in zip(solo, batches):
            learner.meta_step(batch)

    def together() -> None:
        batched.meta_step(stacked)

    runs = {"sequential": sequential, "batched": together}
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    timings = dict.fromkeys(runs, 0.0)
    for _ in range(args.iterations):  # interleaved, so that a change of machine load hits both alike
        for label, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            timings[label] += (time.perf_counter() - start) / args.iterations
    return {"case": name, "kind": spec["kind"], "genotypes": count, "tasks_per_genotype": tasks,
            "distinct_genotypes": bool(spec["distinct"]), "setting": setting,
            "seconds_per_iteration_sequential": timings["sequential"],
            "seconds_per_iteration_batched": timings["batched"],
            "speedup_batched_vs_sequential": timings["sequential"] / timings["batched"]}


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    """The command line, with the paper setting (or ``--tiny``) filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the device to time on (default: %(default)s)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                        help="the cases to run (default: all), of: " + ", ".join(CASES))
    parser.add_argument("--iterations", type=int, default=10, help="timed meta-iterations per case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-iterations before them (default: %(default)s)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 for CUDA matmuls and cuDNN convolutions (default: PyTorch's: matmuls float32)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, choices=COMPILE_BACKENDS,
                        help="torch.compile the forwards of the meta-training steps (the learners' compile_forward; "
                             "bare: inductor)")
    add_cuda_graph_arg(parser)  # auto (default): each meta-iteration one CUDA graph on a GPU, eager on a CPU
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for fraction_of_peak (default: known GPUs' dense peak)")
    parser.add_argument("--batching", choices=("fold", "vmap"), default="fold",
                        help="tasks folded into channel groups (the default everywhere) or torch.func.vmap")
    parser.add_argument("--pointwise", choices=POINTWISE_MODES, default=ExecutionPlan.pointwise,
                        help="folded 1x1 convolutions as batched matmuls or grouped convs (ExecutionPlan.pointwise)")
    parser.add_argument("--edges", choices=EDGE_PATHS, default=DEFAULT_EDGES,
                        help="the supernet's edges: all edges from a state at once (sources: "
                             "ExecutionPlan.fold_sources, tnas.models.source_folding), edge by edge (fused: "
                             "tnas.models.fast_edges) or the reference MixedOp's sum (ExecutionPlan.fused_edges off)")
    parser.add_argument("--cudnn_benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="let cuDNN time its algorithms for each new shape (torch.backends.cudnn.benchmark; "
                             "on by default, as in the stage scripts)")
    parser.add_argument("--branch_streams", type=int, default=ExecutionPlan.branch_streams,
                        help="side CUDA streams for the ops of a fused supernet edge (tnas.models.branches; "
                             "0: one stream)")
    parser.add_argument("--tiny", action="store_true", help="C 4, layers 1, 16x16, 2 queries: a CPU smoke run")
    parser.add_argument("--start_at", type=float, default=None,
                        help="Unix time to start the timed iterations at (after warm-up), so that several "
                             "processes sharing one GPU are timed over the same interval")
    args = parser.parse_args(argv)
    args.n_way, args.C, args.layers, args.img_size, args.q_query = 5, 16, 2, 84, 15
    args.inner_steps, args.inner_steps_test = 5, 10
    if args.tiny:
        args.C, args.layers, args.img_size, args.q_query = 4, 1, 16, 2
        args.inner_steps, args.inner_steps_test = 1, 2
    device = torch.device(args.device)
    try:
        decision = resolve_cuda_graph(args.cuda_graph, device, device_flag=args.device)
    except ValueError as error:
        parser.error(str(error))
    args.graphed, args.cuda_graph_reason = decision.enabled, decision.reason
    print(decision.reason, file=sys.stderr, flush=True)
    if args.branch_streams < 0:
        parser.error(f"--branch_streams must be >= 0, got {args.branch_streams}")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return args


class CutShort(BaseException):
    """Raised in the main thread by SIGTERM (``timeout`` in ``benchmarks/gpu_check.sh`` ending a step):
    a BaseException, so that :func:`run_one`'s per-case ``except Exception`` lets it through and
    :func:`main` prints the cases finished so far instead of dying with nothing on stdout."""


def _cut_short(signum, _frame) -> None:
    raise CutShort(f"cut short by {signal.Signals(signum).name} (the step's time limit)")


@contextlib.contextmanager
def sigterm_cuts_short():
    """SIGTERM raises :class:`CutShort` while active (main thread only); the previous handler comes back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _cut_short)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_one(name: str, args, device: torch.device, results: List[Dict[str, object]]) -> None:
    """Run case ``name`` and append its record (or its error: one failing case, e.g. out of memory,
    must not hide the others)."""
    try:
        run = run_comparison if CASES[name]["kind"] == "genobatch_vs_sequential" else run_case
        results.append(run(name, CASES[name], args, device))
    except Exception as error:
        results.append({"case": name, "error": f"{type(error).__name__}: {error}"})
    print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # each case as it ends, for cut runs
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: List[str] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = torch.device(args.device)
    results: List[Dict[str, object]] = []
    cut_short, tf32_state, case_started = None, None, time.perf_counter()
    with sigterm_cuts_short():
        try:
            with precision.tf32(True) if args.tf32 else contextlib.nullcontext():  # the switches come back
                tf32_state = dataclasses.asdict(precision.tf32_state())
                for name in args.cases:
                    case_started = time.perf_counter()
                    run_one(name, args, device, results)
        except CutShort as error:  # keep what finished; name the case cut (and how long it ran) and those not run
            cut_short, cut = str(error), len(results)  # one record per case, in order
            seconds = time.perf_counter() - case_started
            results.extend({"case": name, "error": f"CutShort: {error}, {seconds:.0f} s into this case"
                            if index == cut else "not run: an earlier case was cut short"}
                           for index, name in enumerate(args.cases) if index >= cut)
    report = {
        "benchmark": "meta_iteration",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "setting": {**{k: getattr(args, k) for k in ("n_way", "C", "layers", "img_size", "q_query", "inner_steps",
                                                     "inner_steps_test", "amp", "tf32", "compile", "channels_last",
                                                     "cuda_graph", "graphed", "cuda_graph_reason",
                                                     "batching", "pointwise", "edges", "cudnn_benchmark",
                                                     "branch_streams", "tiny")},
                    "tf32_state": tf32_state},
        "results": results,
    }
    if cut_short:
        report["cut_short"] = cut_short
    print(json.dumps(report, indent=1), flush=True)
    return report


if __name__ == "__main__":
    sys.exit(1 if "cut_short" in main() else 0)
