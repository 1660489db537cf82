"""The T-NAS protocol's from-scratch part: the training settings every genotype shares, the schedule
record of results.json, and the training of the distinct genotypes (train, resume or skip) one at a time
or as genotype batches; their scoring: :mod:`tnas.stages.protocol_score`.

The settings come from the train stage's own parser and config layer, by precedence: what the
protocol fixes (data, task shape, method, test-time steps, seed, device) > ``--train_args`` > the
protocol's own from-scratch flags > ``--budget`` > ``--train_config`` > the train stage's defaults.
The test-time steps (the train stage's ``inner_steps_test``: validation, and the scoring of the test
episodes) are the protocol's ``--inner_steps_test``, by default its ``--update_step_test``
(:func:`scratch_steps_test`).
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from tnas import distributed
from tnas.config import load_config, parse_args
from tnas.errors import TnasError
from tnas.stages import evaluate as evaluate_stage
from tnas.stages import train

METHODS = {"tnas": "maml", "tnas++": "maml++"}  # protocol method -> from-scratch training method
BUDGET_SCHEDULE = {"epochs": 2, "tasks_per_epoch": 2000}  # --budget: instead of the paper's 15 x 15,000

# Protocol flags handed to the train stage under the same name (None: not given -> the train
# config's value or the train stage's default).
TRAIN_FLAGS = (("epochs", int, "from-scratch epochs"), ("tasks_per_epoch", int, "meta-training tasks per epoch"),
               ("tasks_per_batch", int, "tasks per meta-batch"),
               ("inner_steps", int, "inner SGD steps in meta-training"),
               ("inner_lr", float, "inner SGD learning rate"), ("meta_lr", float, "outer Adam learning rate"),
               ("val_episodes", int, "validation episodes per epoch (validation classes)"),
               ("val_batch_size", int, "validation episodes adapted at once"),
               ("log_every", int, "meta-iterations between logged steps"),
               ("checkpoint_every", int, "meta-iterations between last.pt saves"),
               ("drop_path_prob", float, "drop-path probability"),
               ("C", int, "channels of the derived network (default: the search checkpoint's)"),
               ("layers", int, "cells of the derived network (default: the search checkpoint's)"))
TRAIN_SWITCHES = (("second_order", "exact (second-order) MAML in from-scratch training"),
                  ("amp", "bf16 autocast in from-scratch training (GPU)"),
                  ("tf32", "TF32 matmuls and convolutions in from-scratch training (GPU)"))


# -- the from-scratch settings ------------------------------------------------------------------------
def scratch_steps_test(args) -> int:
    """The adaptation steps of the from-scratch networks at test time: in their validation (which picks
    each run's ``best.pt``) and on each test episode when the protocol scores it. ``--inner_steps_test``
    when given, else ``--update_step_test`` (the steps that decode each task's genotype; an ``args``
    without the field, as from before the flag, is tied to them too)."""
    steps = getattr(args, "inner_steps_test", None)
    return args.update_step_test if steps is None else steps


def _find_train_config(path: str) -> str:
    """``--train_config`` as given, else relative to the repository (so ``configs/...`` works anywhere)."""
    if os.path.isfile(path):
        return path
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidate = os.path.join(repo, path)
    if not os.path.isabs(path) and os.path.isfile(candidate):
        return candidate
    raise TnasError(f"--train_config {path}: file not found")


def _given_train_flags(args, configured, search_summary: Dict[str, Any]) -> Dict[str, Any]:
    """The protocol's own from-scratch flags: given ones, then --budget, then the supernet's size
    (unless ``configured``, the --train_config's keys, set it)."""
    given = {name: getattr(args, name) for name, _, _ in TRAIN_FLAGS if getattr(args, name) is not None}
    given.update({name: getattr(args, name) for name, _ in TRAIN_SWITCHES if getattr(args, name) is not None})
    if args.budget:
        for name, value in BUDGET_SCHEDULE.items():
            given.setdefault(name, value)
    model = search_summary.get("model", {})
    for name in ("C", "layers"):  # the derived network defaults to the searched supernet's size, unless configured
        if name not in given and name not in configured and model.get(name) is not None:
            given[name] = int(model[name])
    return given


def _shorten_epoch_schedules(flags, configured_epochs: int, given: Dict[str, Any]) -> None:
    """Under ``--budget``, MAML++'s schedules counted in epochs (``--msl_epochs``, ``--first_order_epochs``)
    keep their share of the shorter training: 10 and 5 of the presets' 15 epochs become 1 and 1 of 2, so a
    budget T-NAS++ run still anneals its multi-step loss and turns to second order. A value given to the
    protocol (or later in ``--train_args``) is kept as given."""
    if not configured_epochs or flags.epochs >= configured_epochs:
        return
    for name in ("msl_epochs", "first_order_epochs"):
        value = getattr(flags, name, None)
        if value and name not in given:
            setattr(flags, name, max(1, round(value * flags.epochs / configured_epochs)))


def _refuse_fixed_flags(parser, tokens: List[str], fixed: set) -> None:
    """A ``--train_args`` flag the protocol sets itself for every run would be overridden without a word:
    refuse it, naming the flag (the protocol's own flag of that name, where it has one, is the way)."""
    dests = {option: action.dest for action in parser._actions for option in action.option_strings}
    for token in tokens:
        dest = dests.get(token.split("=", 1)[0])
        if dest in fixed:
            raise TnasError(f"--train_args {token.split('=', 1)[0]}: the protocol sets {dest} for every "
                            f"from-scratch run itself (from its own flags, the search checkpoint or per genotype); "
                            f"give the protocol's flag instead where it has one (python scripts/evaluate_tnas.py "
                            f"--help)")


def train_settings(args, search_summary: Dict[str, Any], device) -> train.TrainSettings:
    """The from-scratch settings every genotype shares, by precedence: what the protocol fixes (data,
    task shape, method, test-time steps, seed, device) > ``--train_args`` > the protocol's own flags >
    ``--budget`` > ``--train_config`` > the train stage's defaults. ``genotype`` and ``out`` are set per run."""
    parser, path = train.build_parser(), _find_train_config(args.train_config) if args.train_config else None
    try:
        flags = parse_args(parser, ["--config", path] if path else [])
        configured_epochs = flags.epochs
        given = _given_train_flags(args, load_config(path) if path else {}, search_summary)
        for name, value in given.items():
            setattr(flags, name, value)
        if args.budget:
            _shorten_epoch_schedules(flags, configured_epochs, given)
        if args.train_args:
            tokens = shlex.split(args.train_args)
            flags = parse_args(parser, tokens, namespace=flags)
    except TnasError as error:
        raise TnasError(f"from-scratch settings: {error}") from None
    forced = {"dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query,
              "img_size": args.img_size, "method": METHODS[args.method], "inner_steps_test": scratch_steps_test(args),
              "seed": args.train_seed if args.train_seed is not None else args.seed, "device": str(device),
              **evaluate_stage.checkpoint_data_settings(search_summary)}  # images as the search saw them
    forced.update({name: getattr(args, name) for name in ("data_path", "cache_dir", "threads")
                   if getattr(args, name, None)})
    if args.train_args:
        _refuse_fixed_flags(parser, tokens, {name for name, value in forced.items() if value is not None}
                            | {"genotype", "out", "resume"})
    settings = train.settings_from_args(flags).replace(**{k: v for k, v in forced.items() if v is not None})
    try:
        with distributed.local_process():  # each genotype trains alone, so torchrun ranks may use CUDA graphs
            train.check_settings(settings)
    except TnasError as error:
        raise TnasError(f"from-scratch settings: {error}") from None
    return settings


def schedule_record(settings: train.TrainSettings, args) -> Dict[str, Any]:
    """What results.json says about the from-scratch training."""
    flags = settings.to_flags()
    record = {"train_method": flags["method"], "budget": bool(args.budget),
              "train_config": os.path.abspath(_find_train_config(args.train_config)) if args.train_config else None}
    names = ["epochs", "tasks_per_epoch", "tasks_per_batch", "q_query", "inner_steps", "inner_steps_test",
             "inner_lr", "meta_lr", "second_order", "C", "layers", "val_episodes", "drop_path_prob", "seed"]
    if flags["method"] == "maml++":
        names += ["msl_epochs", "first_order_epochs", "min_meta_lr", "grad_clamp"]
    record.update({name: flags[name] for name in names})
    return record


# -- one distinct genotype ------------------------------------------------------------------------------
@dataclass
class GenotypeRun:
    """One distinct genotype: where it trains, which episodes it scores, what it cost."""

    id: str
    genotype: Dict[str, Any]
    episodes: List[int]
    run_dir: str
    status: str = "new"  # new -> trained | resumed | skipped
    wall_time_s: float = 0.0  # training time in this invocation
    summary: Dict[str, Any] = field(default_factory=dict)

    def record(self, rank: int) -> Dict[str, Any]:
        summary = self.summary
        return {"genotype": self.genotype, "episodes": self.episodes, "count": len(self.episodes),
                "run_dir": os.path.abspath(self.run_dir), "status": self.status, "rank": rank,
                "best_epoch": summary.get("best_epoch"), "best_val_accuracy": summary.get("best_val_accuracy"),
                "epochs_done": summary.get("epochs_done"), "parameters": summary.get("parameters"),
                "macs": summary.get("macs"), "wall_time_s": self.wall_time_s,
                "total_train_wall_time_s": summary.get("wall_time_s")}


GIB = 1024 ** 3
MEMORY_FRACTION = 0.8
"""Share of the free device memory (per process sharing the GPU) the automatic ``--genotypes_per_batch``
plans to fill with a batch's measured training peak (meta-steps and validation); the rest is headroom for
scoring and the allocator's fragmentation."""
MAX_AUTO_GENOTYPES_PER_BATCH = 64
UNKNOWN_GENOTYPES_PER_BATCH = 8
"""The automatic ``--genotypes_per_batch`` when memory cannot be read or measured (a batch that does not
fit is halved and retried anyway)."""


@dataclass(frozen=True)
class MemoryFit:
    """``bytes = base + G * per_genotype``, fitted to measured training peaks at G = 1 and G = 2, and the G chosen."""

    chosen: int
    base: float
    per_genotype: float
    budget: float  # bytes the batch may fill


def fit_genotypes_per_batch(peak_1: int, peak_2: int, free: int, sharing: int = 1, count: Optional[int] = None,
                            fraction: float = MEMORY_FRACTION, cap: int = MAX_AUTO_GENOTYPES_PER_BATCH) -> MemoryFit:
    """The largest G whose fitted peak ``base + G * per_genotype`` (through the training peaks of a batch
    at G = 1 and 2) fits in ``fraction`` of ``free`` bytes over ``sharing`` processes;
    1 to ``cap`` and at most ``count`` (the genotypes to train). A G = 2 peak not above the G = 1 one
    (measurement noise) counts the whole G = 1 peak per genotype."""
    per_genotype = float(peak_2 - peak_1) if peak_2 > peak_1 else float(max(peak_1, 1))
    base = max(float(peak_1) - per_genotype, 0.0)
    budget = fraction * free / max(1, sharing)
    chosen = int((budget - base) // per_genotype) if budget > base else 1
    chosen = max(1, min(chosen, cap, count if count is not None else cap))
    return MemoryFit(chosen, base, per_genotype, budget)


def _sharing() -> int:
    """Protocol processes per GPU (torchrun may start more processes than there are GPUs)."""
    return max(1, -(-int(os.environ.get("LOCAL_WORLD_SIZE", "1")) // max(1, torch.cuda.device_count())))


def genotypes_per_batch(requested, device: torch.device, log, count: Optional[int] = None,
                        measure: Optional[Callable[[int], int]] = None) -> int:
    """``--genotypes_per_batch``: as given (a one-line error below 1); by default 1 on a CPU or with at most
    one genotype to train (``count``: the genotypes per process, also a cap), and on CUDA the largest G that fits :data:`MEMORY_FRACTION` of the
    free device memory, shared by the processes on that GPU, by ``measure(G)``: the peak bytes of training
    G genotypes as one batch, meta-steps and validation (:func:`tnas.stages.batched_train.measure_peak_memory`),
    measured at G = 1 and 2 and fitted linearly (:func:`fit_genotypes_per_batch`); 1 to
    :data:`MAX_AUTO_GENOTYPES_PER_BATCH`. The choice and the measured figures are one log line."""
    if requested is not None:
        train.check_genotypes_per_batch(requested)
        return int(requested)
    if device.type != "cuda" or (count is not None and count <= 1):
        return 1
    unknown = min(UNKNOWN_GENOTYPES_PER_BATCH, count or UNKNOWN_GENOTYPES_PER_BATCH)
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):  # no reading: a middle size; an out-of-memory batch is halved
        log(f"--genotypes_per_batch: free device memory unknown, training {unknown} genotypes per batch")
        return unknown
    if measure is None:
        log(f"--genotypes_per_batch: memory per genotype not measured, training {unknown} genotypes per batch")
        return unknown
    from tnas.stages.batched_train import free_device_memory, out_of_memory

    failure = None  # (out of memory?, the error's first line): kept, not the error, whose frames hold memory
    try:
        peak_1, peak_2 = measure(1), measure(2)
    except RuntimeError as error:  # torch.OutOfMemoryError among them
        failure = (out_of_memory(error), f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")
    if failure is not None:
        free_device_memory()
        if failure[0]:
            log("--genotypes_per_batch 1: two genotypes of one batch do not fit in the free device memory")
            return 1
        log(f"--genotypes_per_batch: measuring the memory failed ({failure[1]}); training {unknown} genotypes "
            f"per batch")
        return unknown
    sharing = _sharing()
    fit = fit_genotypes_per_batch(peak_1, peak_2, free, sharing, count)
    log(f"--genotypes_per_batch {fit.chosen}: a batch's training (meta-steps, validation) measured at "
        f"{peak_1 / GIB:.3f} GiB for 1 genotype and {peak_2 / GIB:.3f} GiB for 2 (base {fit.base / GIB:.3f} + {fit.per_genotype / GIB:.3f} GiB "
        f"per genotype); {MEMORY_FRACTION:.0%} of {free / GIB:.1f} GiB free device memory"
        f"{f' shared by {sharing} processes' if sharing > 1 else ''} fits {fit.chosen}"
        f"{'' if count is None else f', at most {count} (the genotypes per process)'}")
    return fit.chosen


def memory_probe(settings: train.TrainSettings, genotypes: Sequence[Dict[str, Any]], image_shape: Sequence[int],
                 device: torch.device) -> Callable[[int], int]:
    """``measure(G)`` for :func:`genotypes_per_batch`: the peak memory of training as one batch the
    first G of ``genotypes`` (repeated when there are fewer) at the run's settings and image shape."""
    from tnas.stages.batched_train import measure_peak_memory

    def measure(count: int) -> int:
        chosen = [genotypes[i % len(genotypes)] for i in range(count)]
        return measure_peak_memory(settings, chosen, image_shape, device)

    return measure


def train_genotype_batch(runs: Sequence[GenotypeRun], settings: train.TrainSettings, logger, per_batch: int) -> None:
    """Train (or resume, or skip) the from-scratch runs of ``runs`` through the train stage: one genotype
    alone (``per_batch`` 1 or one run), else as one genotype batch."""
    labels = [f"genotype {run.id} ({len(run.episodes)} episode(s))" for run in runs]
    logs = [lambda message, label=label: logger.log(f"{label}: {message}") for label in labels]
    try:
        results = train.train_genotypes(settings, [run.genotype for run in runs], [run.run_dir for run in runs],
                                        log=logger.log, genotypes_per_batch=per_batch, genotype_logs=logs)
    except TnasError as error:
        where = labels[0] + f" in {runs[0].run_dir}" if len(runs) == 1 else \
            "genotypes " + ", ".join(run.id for run in runs) + f" in {os.path.dirname(runs[0].run_dir)}"
        raise TnasError(f"{where}: {error}") from None
    for run, label, result in zip(runs, labels, results):
        run.status, run.summary, run.wall_time_s = result.status, result.summary, result.wall_time_s
        if run.status != "skipped":
            logger.log(f"{label}: {run.status} in {run.wall_time_s:.1f} s, best epoch "
                       f"{run.summary.get('best_epoch')} (validation {run.summary.get('best_val_accuracy') or 0.0:.2f}%)")
