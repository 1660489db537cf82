"""The T-NAS and T-NAS++ evaluation protocol: every test task gets its own architecture, trained from scratch.

Given a T-NAS search checkpoint (``--checkpoint``: a run directory or a ``.pt`` file):

a. **decode** -- on each of the fixed test episodes (``--episodes`` 600, ``--seed`` /
   ``--episodes_file``: the same tasks as the evaluate and decode stages), the meta-learned
   supernet adapts its weights and alphas on the support set for ``--update_step_test``
   steps (``--batch_size`` tasks at once) and the adapted alphas give that task's genotype
   (DARTS rule, :meth:`tnas.meta.tnas.TNAS.decode`);
b. **group** -- identical genotypes (canonical JSON) share an id, ``g0000``, ``g0001``, ...
   in order of first occurrence over the episodes;
c. **train** -- each distinct genotype is trained from scratch once by the train stage
   (:func:`tnas.stages.train.train_genotypes`): first-order MAML for ``--method tnas``, MAML++ for
   ``--method tnas++``, validation on the validation classes, ``best.pt`` by validation
   accuracy; run directory ``OUT/genotypes/<id>/``;
d. **evaluate** -- each episode is adapted on its support set and scored on its query set
   by its own genotype's ``best.pt`` (all episodes of a genotype batched);
e. **aggregate** -- mean and 95% CI into ``OUT/results.json`` (the evaluate stage's fields plus
   ``genotype_id`` per episode, ``genotypes`` {id: genotype}, ``distinct_genotypes``, the
   from-scratch ``schedule``, ``budget`` and a ``cost`` block: wall time and device-hours per
   stage, device name, world size).

Resumable: the per-episode genotypes are cached in ``OUT/episode_genotypes.jsonl`` (with
``OUT/decode_summary.json``, which records the checkpoint's and the episodes' SHA-256) and
reused when they match (:mod:`tnas.stages.protocol_decode`); a genotype whose ``train.json``
shows every epoch done with ``best.pt`` present is skipped; one whose run was interrupted is
continued with ``--resume``; a run directory trained with other settings (compared as
:class:`~tnas.stages.train.TrainSettings`, less the fields that change no result) is refused.
Cost accounting: :mod:`tnas.stages.cost`.

Under ``torchrun`` the decoding batches and the distinct genotypes are dealt round robin to
the ranks (:func:`tnas.distributed.shard`); each rank trains its genotypes as a process of
its own (:func:`tnas.distributed.local_process`), scores their episodes, and rank 0 gathers
the per-episode accuracies and writes the results. The outcome does not depend on the
number of processes: decoding batches are the same as in one process, and each genotype is
trained from the same seed wherever it runs. The process group is joined with a long collective
timeout (``--dist_timeout_hours``), since ranks that finish their genotypes early wait at the gather.
``--train_only`` stops after training (``OUT/genotypes.json`` indexes the runs, no results.json).
Since the ranks only exchange small Python objects, they talk over gloo and may outnumber the
GPUs: ``--nproc_per_node`` larger than the GPU count deals the processes to the GPUs round robin,
so several small genotype trainings share each GPU.
"""
from __future__ import annotations

import argparse
import os
import shlex
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch

from tnas import distributed
from tnas.config import load_config, parse_args, resolve_device, save_config, set_flag
from tnas.errors import TnasError
from tnas.evaluate import format_accuracy, results_record
from tnas.genotypes import canonical_key, group_genotypes
from tnas.runlog import RunLogger, atomic_write_json
from tnas.stages import cost as cost_stage
from tnas.stages import evaluate as evaluate_stage
from tnas.stages import common, restore, train
from tnas.stages.decode import check_tnas_search, episodes_seed
from tnas.stages.protocol_decode import GENOTYPES_FILE, decode_cache_key, decode_episodes, read_decode_cache, \
    write_decode_files

METHODS = {"tnas": "maml", "tnas++": "maml++"}  # protocol method -> from-scratch training method
BUDGET_SCHEDULE = {"epochs": 2, "tasks_per_epoch": 2000}  # --budget: instead of the paper's 15 x 15,000
GENOTYPES_DIR = "genotypes"
INDEX_FILE = "genotypes.json"
RESULTS_FILE = "results.json"

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


# -- flags ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The T-NAS / T-NAS++ protocol on fixed test episodes: decode one genotype per task from a "
                    "T-NAS search checkpoint, train each distinct genotype from scratch (MAML / MAML++), score "
                    "each task with its own genotype's network; mean and 95% CI in results.json. "
                    "Launch with torchrun to spread the genotypes over processes.")
    evaluate_stage.add_checkpoint_args(parser)
    set_flag(parser, "checkpoint", help="T-NAS search checkpoint: .pt file, or its run directory (best.pt) (required)")
    set_flag(parser, "out", help="protocol directory (default: <checkpoint run dir>/protocol_<method>[_budget])")
    set_flag(parser, "seed", help="seed of the fixed test episodes (default: 0); also the from-scratch seed unless "
                                  "--train_seed")
    set_flag(parser, "batch_size", help="tasks decoded / adapted at once (default: 50)")
    parser.add_argument("--method", choices=tuple(METHODS), default="tnas",
                        help="tnas: from-scratch first-order MAML; tnas++: MAML++ (default: tnas)")
    parser.add_argument("--train_only", action="store_true",
                        help="decode and train every distinct genotype, but do not score (no results.json)")
    parser.add_argument("--dist_timeout_hours", type=float, default=48.0,
                        help="under torchrun: how long a rank that has finished its genotypes waits for the "
                             "others at the final gather (default: 48)")
    group = parser.add_argument_group("decoding (per-task architectures)")
    group.add_argument("--decode_lr_alphas", type=float, default=None,
                       help="inner learning rate of the alphas when decoding (default: the checkpoint's)")
    group.add_argument("--decode_lr_weights", type=float, default=None,
                       help="inner learning rate of the weights when decoding (default: the checkpoint's)")
    _add_training_flags(parser)
    return parser


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "from-scratch training (given flags win over --budget, which wins over --train_config, which wins over "
        "the train stage's defaults: the paper's 15 epochs of 15,000 tasks)")
    group.add_argument("--train_config", default=None, metavar="YAML",
                       help="a train-stage config (e.g. configs/scratch_miniimagenet_5w1s.yaml); its dataset, task "
                            "shape, genotype and method are replaced by the protocol's")
    group.add_argument("--budget", action="store_true",
                       help=f"short from-scratch schedule: {BUDGET_SCHEDULE['epochs']} epochs of "
                            f"{BUDGET_SCHEDULE['tasks_per_epoch']:,} tasks (labelled \"budget\" in results.json)")
    group.add_argument("--train_seed", type=int, default=None, help="seed of every from-scratch run (default: --seed)")
    group.add_argument("--train_args", default=None, metavar="'FLAGS'",
                       help="more train-stage flags, quoted, e.g. '--msl_epochs 3 --no-cosine_lr' "
                            "(one flag alone with '=': --train_args=--cuda_graph)")
    for name, kind, text in TRAIN_FLAGS:
        group.add_argument(f"--{name}", type=kind, default=None, help=text)
    for name, text in TRAIN_SWITCHES:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=text)


def default_out_dir(args, checkpoint: str) -> str:
    name = "protocol_" + args.method.replace("++", "_plusplus") + ("_budget" if args.budget else "")
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)


def check_flags(args) -> None:
    """One-line errors for protocol flags out of range (before anything is loaded)."""
    common.check_positive(args, "epochs", "tasks_per_epoch", "tasks_per_batch", "inner_steps", "val_episodes",
                          "val_batch_size", "C", "layers", "dist_timeout_hours")
    common.check_non_negative(args, "inner_lr", "meta_lr", "decode_lr_alphas", "decode_lr_weights")
    if not args.checkpoint:
        raise TnasError("--checkpoint PATH is required (a T-NAS search run directory or its .pt file)")


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
    for name, value in BUDGET_SCHEDULE.items():
        if args.budget:
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
              "seed": args.train_seed if args.train_seed is not None else args.seed, "device": str(device)}
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


def train_genotype(run: GenotypeRun, settings: train.TrainSettings, logger) -> None:
    """Train (or resume, or skip) one genotype's from-scratch run through the train stage."""
    label = f"genotype {run.id} ({len(run.episodes)} episode(s))"
    try:
        result, = train.train_genotypes(settings, [run.genotype], [run.run_dir],
                                        log=lambda message: logger.log(f"{label}: {message}"))
    except TnasError as error:
        raise TnasError(f"{label} in {run.run_dir}: {error}") from None
    run.status, run.summary, run.wall_time_s = result.status, result.summary, result.wall_time_s
    if run.status != "skipped":
        logger.log(f"{label}: {run.status} in {run.wall_time_s:.1f} s, best epoch {run.summary.get('best_epoch')} "
                   f"(validation {run.summary.get('best_val_accuracy') or 0.0:.2f}%)")


def score_genotype(run: GenotypeRun, episodes, args, device: torch.device) -> Dict[int, float]:
    """Episode index -> accuracy (percent) of the genotype's best.pt, adapted on each episode's support set."""
    checkpoint = os.path.join(run.run_dir, "best.pt")
    learner, summary = restore.learner_from_checkpoint(checkpoint, device)
    actual = restore.checkpoint_genotype(learner, summary).to_dict()
    if canonical_key(actual) != canonical_key(run.genotype):
        raise TnasError(f"{checkpoint} is a network of another genotype than {run.id}; choose another --out")
    accuracies: Dict[int, float] = {}
    for start in range(0, len(run.episodes), args.batch_size):
        chosen = run.episodes[start:start + args.batch_size]
        stats = learner.evaluate(episodes.batch(chosen, device), steps=args.update_step_test)
        values = 100.0 * stats.query_accuracy.detach().double().cpu()
        # float32 fractions: round away their last-bit noise, as the evaluate stage does
        accuracies.update({episode: round(float(value), 4) for episode, value in zip(chosen, values)})
    return accuracies


# -- the protocol, step by step ----------------------------------------------------------------------------
@dataclass
class Protocol:
    """What the steps share: flags, rank, device, the restored checkpoint, settings, output, log, timings."""

    args: Any
    info: distributed.DistInfo
    device: torch.device
    prepared: Any
    out_dir: str
    settings: train.TrainSettings
    schedule: Dict[str, Any]
    logger: Any = None
    started: float = field(default_factory=time.perf_counter)
    seconds: Dict[str, float] = field(default_factory=dict)  # per step, this rank
    accuracies: Dict[int, float] = field(default_factory=dict)  # per episode, this rank's genotypes
    decode_inner_lrs: Dict[str, float] = field(default_factory=dict)


def _check_checkpoint(summary: Dict[str, Any], checkpoint: str) -> None:
    try:
        check_tnas_search(summary, checkpoint, user="the T-NAS protocol")
    except TnasError as error:
        raise TnasError(f"--checkpoint: {error}") from None


def set_up(args) -> Protocol:
    """Join the ranks, restore the checkpoint and test episodes, settle the from-scratch settings, write
    config.yaml and open the log."""
    started = time.perf_counter()
    check_flags(args)
    device = resolve_device(args.device)
    info = distributed.init_distributed(device, timeout=timedelta(hours=args.dist_timeout_hours), share_gpus=True)
    device = distributed.local_device(device, info)
    args.device = str(device)
    if not info.is_main:  # rank 0 first: it writes --episodes_file when it does not exist yet
        distributed.barrier(info)
    prepared = evaluate_stage.prepare(args, check_summary=_check_checkpoint)
    if info.is_main:
        distributed.barrier(info)
    for group, value in (("alphas", args.decode_lr_alphas), ("weights", args.decode_lr_weights)):
        if value is not None:
            prepared.learner.inner_lrs[group] = value
    out_dir = args.out = args.out or default_out_dir(args, prepared.checkpoint)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TnasError(f"--out {out_dir} is a file, not a directory")
    settings = train_settings(args, prepared.summary, device)
    if info.is_main:
        os.makedirs(os.path.join(out_dir, GENOTYPES_DIR), exist_ok=True)
        save_config({k: v for k, v in vars(args).items() if k != "episodes_given"},
                    os.path.join(out_dir, "config.yaml"))
    distributed.barrier(info)
    log_dir = out_dir if info.is_main else os.path.join(out_dir, f"rank{info.rank}")
    logger = RunLogger(log_dir, use_tensorboard=False, quiet=not info.is_main, append=True)
    return Protocol(args, info, device, prepared, out_dir, settings, schedule_record(settings, args), logger,
                    started=started)


def decode_step(p: Protocol):
    """a. decode (or reuse the cached decoding), b. group; returns ``(genotypes, ids, by_id, episodes_of, cached)``."""
    begin, info, args = time.perf_counter(), p.info, p.args
    key = decode_cache_key(p.prepared, args) if info.is_main else None
    cached = read_decode_cache(p.out_dir, key) if info.is_main else None
    cached = distributed.broadcast_from_main(cached, info)
    genotypes = cached if cached is not None else decode_episodes(p.prepared, args, info)
    cost_stage.synchronize(p.device)
    p.seconds["decode"] = time.perf_counter() - begin
    ids, by_id, episodes_of = group_genotypes(genotypes)
    if info.is_main:
        write_decode_files(p.out_dir, genotypes, ids, key, p.prepared, args, p.prepared.learner.genotype().to_dict(),
                           p.seconds["decode"])
        p.logger.log(f"decode: {len(genotypes)} episodes -> {len(by_id)} distinct genotype(s)"
                     f"{' (cached decoding reused)' if cached is not None else ''}; "
                     f"{os.path.join(p.out_dir, GENOTYPES_FILE)}")
    p.decode_inner_lrs = {name: float(value) for name, value in sorted(p.prepared.learner.inner_lrs.items())}
    p.prepared.learner = None  # the supernet is not needed any more
    if p.device.type == "cuda":
        torch.cuda.empty_cache()
    return genotypes, ids, by_id, episodes_of, cached is not None


def train_and_score(p: Protocol, by_id, episodes_of) -> List[GenotypeRun]:
    """c. train this rank's share of the distinct genotypes, d. score each episode with its own genotype."""
    mine = [GenotypeRun(gid, by_id[gid], episodes_of[gid], os.path.join(p.out_dir, GENOTYPES_DIR, gid))
            for gid in distributed.shard(list(by_id), p.info)]
    begin = time.perf_counter()
    for position, genotype_run in enumerate(mine, 1):
        p.logger.log(f"[{position}/{len(mine)} on rank {p.info.rank}] genotype {genotype_run.id}")
        train_genotype(genotype_run, p.settings, p.logger)
    p.seconds["train"] = time.perf_counter() - begin
    begin = time.perf_counter()
    if not p.args.train_only:
        for genotype_run in mine:
            p.accuracies.update(score_genotype(genotype_run, p.prepared.episodes, p.args, p.device))
        cost_stage.synchronize(p.device)
    p.seconds["evaluate"] = time.perf_counter() - begin
    return mine


def results(p: Protocol, parts, genotypes, ids, by_id, episodes_of, runs, cost) -> Dict[str, Any]:
    """e. the results.json record of the gathered per-episode accuracies."""
    args, prepared = p.args, p.prepared
    merged = {episode: value for part in parts for episode, value in part["accuracies"].items()}
    missing = [episode for episode in range(len(genotypes)) if episode not in merged]
    if missing:  # cannot happen unless a rank lost work: refuse to average a partial set
        raise TnasError(f"no accuracy for episode(s) {missing[:5]}; rerun to complete the protocol")
    per_genotype = {gid: {"count": len(episodes_of[gid]),
                          "accuracy_mean": sum(merged[e] for e in episodes_of[gid]) / len(episodes_of[gid]),
                          "best_val_accuracy": run["best_val_accuracy"], "best_epoch": run["best_epoch"],
                          "parameters": run["parameters"], "status": run["status"], "run_dir": run["run_dir"]}
                    for gid, run in runs.items()}
    return results_record(args.method, args.dataset, args.n_way, args.k_shot,
                          [merged[episode] for episode in range(len(genotypes))], by_id,
                          genotype_id=ids, distinct_genotypes=len(by_id), budget=bool(args.budget),
                          schedule=p.schedule, checkpoint=os.path.abspath(prepared.checkpoint),
                          seed=episodes_seed(prepared, args),
                          episodes_file=os.path.abspath(args.episodes_file) if args.episodes_file else None,
                          q_query=args.q_query, update_step_test=args.update_step_test, batch_size=args.batch_size,
                          split=prepared.split.name, image_shape=list(prepared.split.image_shape),
                          decode_inner_lrs=p.decode_inner_lrs, per_genotype=per_genotype,
                          skipped_genotypes=[gid for gid, run in runs.items() if run["status"] == "skipped"],
                          world_size=p.info.world_size, cost=cost, wall_time_s=cost["wall_time_s"])


def gather_and_write(p: Protocol, mine, genotypes, ids, by_id, episodes_of, cached: bool) -> Optional[Dict]:
    """e. gather on rank 0: the genotypes index, then (unless --train_only) results.json."""
    device, args = p.device, p.args
    part = {"rank": p.info.rank, "seconds": p.seconds, "accuracies": p.accuracies,
            "device": cost_stage.device_name(device), "device_type": device.type,
            "device_id": cost_stage.device_id(device), "runs": {r.id: r.record(p.info.rank) for r in mine}}
    parts = distributed.gather_to_main(part, p.info)
    if not p.info.is_main:
        return None
    runs = {gid: run for part in parts for gid, run in part["runs"].items()}
    runs = {gid: runs[gid] for gid in by_id}
    skipped = [gid for gid, run in runs.items() if run["status"] == "skipped"]
    if skipped:
        p.logger.log(f"skipped {len(skipped)} already trained genotype(s): {', '.join(skipped)}")
    cost = cost_stage.cost_record(parts, runs, time.perf_counter() - p.started, p.schedule, cached)
    index = {"checkpoint": os.path.abspath(p.prepared.checkpoint), "method": args.method,
             "distinct_genotypes": len(by_id), "schedule": p.schedule, "budget": bool(args.budget),
             "genotypes": runs, "cost": cost}
    atomic_write_json(os.path.join(p.out_dir, INDEX_FILE), index)
    if args.train_only:
        trained = cost["stages"]["train"]
        p.logger.log(f"trained {len(by_id)} distinct genotype(s) ({trained['trained']} trained, "
                     f"{trained['resumed']} resumed, {len(skipped)} skipped); index: "
                     f"{os.path.join(p.out_dir, INDEX_FILE)}")
        return index
    record = results(p, parts, genotypes, ids, by_id, episodes_of, runs, cost)
    path = os.path.join(p.out_dir, RESULTS_FILE)
    atomic_write_json(path, record)
    line = (f"{'T-NAS++' if args.method == 'tnas++' else 'T-NAS'}{' (budget)' if args.budget else ''} "
            f"{format_accuracy(record)}, {len(by_id)} distinct genotype(s)")
    p.logger.quiet = True  # the line goes to log.txt here and to stdout once, below
    p.logger.log(line)
    print(line)
    print(f"results: {path}")
    return record


def run(args) -> Optional[Dict[str, object]]:
    """Run the protocol described by ``args`` (the parsed flags). Returns the results.json record on
    rank 0 (with ``--train_only``: the genotypes index), None on the other ranks."""
    p = set_up(args)
    try:
        info, schedule = p.info, p.schedule
        p.logger.log(f"T-NAS protocol ({args.method}: from-scratch {schedule['train_method']}"
                     f"{', budget' if args.budget else ''}, {schedule['epochs']} epoch(s) of "
                     f"{schedule['tasks_per_epoch']:,} tasks) of {p.prepared.checkpoint} on "
                     f"{len(p.prepared.episodes)} {args.dataset} {args.n_way}-way {args.k_shot}-shot test episodes; "
                     f"{info.world_size} process(es), device {p.device}; output in {p.out_dir}")
        genotypes, ids, by_id, episodes_of, cached = decode_step(p)
        mine = train_and_score(p, by_id, episodes_of)
        return gather_and_write(p, mine, genotypes, ids, by_id, episodes_of, cached)
    finally:
        p.logger.close()
        distributed.shutdown(p.info)
