"""The T-NAS protocol's from-scratch part: the training settings every genotype shares, the schedule
record of results.json, and the training of the distinct genotypes (train, resume or skip) one at a time
or as genotype batches; their scoring: :mod:`tnas.stages.protocol_score`.

The settings come from the train stage's own parser and config layer, by precedence: what the
protocol fixes (data, task shape, method, test-time steps, seed, device) > ``--train_args`` > the
protocol's own from-scratch flags > ``--budget`` > ``--train_config`` > the train stage's defaults.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

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
                  ("amp", "bf16 autocast in from-scratch training (GPU)"))


# -- the from-scratch settings ------------------------------------------------------------------------
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


def train_settings(args, search_summary: Dict[str, Any], device) -> train.TrainSettings:
    """The from-scratch settings every genotype shares, by precedence: what the protocol fixes (data,
    task shape, method, test-time steps, seed, device) > ``--train_args`` > the protocol's own flags >
    ``--budget`` > ``--train_config`` > the train stage's defaults. ``genotype`` and ``out`` are set per run."""
    parser, path = train.build_parser(), _find_train_config(args.train_config) if args.train_config else None
    try:
        flags = parse_args(parser, ["--config", path] if path else [])
        for name, value in _given_train_flags(args, load_config(path) if path else {}, search_summary).items():
            setattr(flags, name, value)
        if args.train_args:
            flags = parse_args(parser, shlex.split(args.train_args), namespace=flags)
    except TnasError as error:
        raise TnasError(f"from-scratch settings: {error}") from None
    forced = {"dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query,
              "img_size": args.img_size, "method": METHODS[args.method], "inner_steps_test": args.update_step_test,
              "seed": args.train_seed if args.train_seed is not None else args.seed, "device": str(device),
              **evaluate_stage.checkpoint_data_settings(search_summary)}  # images as the search saw them
    forced.update({name: getattr(args, name) for name in ("data_path", "cache_dir", "threads")
                   if getattr(args, name, None)})
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
        names += ["msl_epochs", "first_order_epochs", "min_meta_lr"]
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
GENOTYPE_MEMORY_GIB = 1.0
"""Device memory one genotype of a batch is assumed to need when ``--genotypes_per_batch`` is chosen
automatically: an estimate (a derived network's activations over a meta-batch at the paper's setting),
not a measurement; a batch that does not fit is halved and retried anyway."""
MAX_AUTO_GENOTYPES_PER_BATCH = 64


def genotypes_per_batch(requested, device: torch.device, log) -> int:
    """``--genotypes_per_batch``: as given (a one-line error below 1); by default 1 on a CPU and on CUDA
    half the free device memory, shared by the processes on that GPU, over :data:`GENOTYPE_MEMORY_GIB`
    per genotype (1 to :data:`MAX_AUTO_GENOTYPES_PER_BATCH`); the choice is logged."""
    if requested is not None:
        train.check_genotypes_per_batch(requested)
        return int(requested)
    if device.type != "cuda":
        return 1
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError):  # no reading: a middle size; an out-of-memory batch is halved
        log("--genotypes_per_batch: free device memory unknown, training 8 genotypes per batch")
        return 8
    sharing = max(1, -(-int(os.environ.get("LOCAL_WORLD_SIZE", "1")) // max(1, torch.cuda.device_count())))
    chosen = int(min(MAX_AUTO_GENOTYPES_PER_BATCH, max(1, 0.5 * free / sharing // (GENOTYPE_MEMORY_GIB * GIB))))
    log(f"--genotypes_per_batch {chosen}: half of {free / GIB:.1f} GiB free device memory"
        f"{f' shared by {sharing} processes' if sharing > 1 else ''} at ~{GENOTYPE_MEMORY_GIB:g} GiB per genotype")
    return chosen


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
