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
   by its own genotype's ``best.pt``, for ``--inner_steps_test`` steps (default: ``--update_step_test``;
   the same steps as the from-scratch runs' validation, which picked ``best.pt``: their ``inner_steps_test``;
   :func:`~tnas.stages.protocol_train.scratch_steps_test`) (all episodes of a genotype batched; with ``--genotypes_per_batch``
   the genotypes of a batch with equal episode counts adapt in one forward, :mod:`tnas.stages.protocol_score`);
e. **aggregate** -- mean and 95% CI into ``OUT/results.json`` (the evaluate stage's fields, with
   ``update_step_test`` the decoding steps and ``inner_steps_test`` the scoring steps, plus
   ``genotype_id`` per episode, ``genotypes`` {id: genotype}, ``distinct_genotypes``, the
   from-scratch ``schedule``, ``budget`` and a ``cost`` block: wall time and device-hours per
   stage, device name, world size).

One protocol at a time holds ``OUT`` (:func:`tnas.run_dir.claim_run_dir`; a second is refused in one
line naming the first's pid). Resumable: the per-episode genotypes are cached in ``OUT/episode_genotypes.jsonl`` (with
``OUT/decode_summary.json``, which records the checkpoint's and the episodes' SHA-256) and
reused when they match (:mod:`tnas.stages.protocol_decode`; what the tasks chose --
``op_frequency_{normal,reduce}.png``, ``genotype_diversity.json``, ``tb/`` -- is rewritten from
them each time); a genotype whose ``train.json``
shows every epoch done with ``best.pt`` present is skipped; one whose run was interrupted is
continued with ``--resume``; a run directory trained with other settings (compared as
:class:`~tnas.stages.train.TrainSettings`, less the fields that change no result) is refused.
The from-scratch settings and one genotype's run: :mod:`tnas.stages.protocol_train`; cost
accounting: :mod:`tnas.stages.cost`.

``--genotypes_per_batch G`` trains the distinct genotypes G at a time as one genotype batch
(:mod:`tnas.stages.batched_train`): each genotype still gets its own run directory and its solo
result. Under ``torchrun`` the decoding batches and the batches of distinct genotypes (of one
genotype each at G = 1) are dealt round robin to the ranks (:func:`tnas.distributed.shard`); each
rank trains its genotypes as a process of its own (:func:`tnas.distributed.local_process`), scores their episodes, and rank 0 gathers
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
import functools
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch

from tnas import distributed, run_dir
from tnas.config import HelpFormatter, resolve_device, save_config, set_flag
from tnas.diversity import diversity_line, write_task_choices
from tnas.errors import TnasError
from tnas.evaluate import format_accuracy, results_record
from tnas.genotypes import group_genotypes
from tnas.files import atomic_write_json
from tnas.runlog import RunLogger
from tnas.stages import common, train
from tnas.stages import cost as cost_stage
from tnas.stages import evaluate as evaluate_stage
from tnas.stages.decode import check_tnas_search
from tnas.stages.settings import free
from tnas.stages.protocol_decode import GENOTYPES_FILE, decode_cache_key, decode_episodes, read_decode_cache, \
    write_decode_files
from tnas.stages.protocol_score import score_batch, scoring_progress
from tnas.stages.protocol_train import (BUDGET_SCHEDULE, METHODS, TRAIN_FLAGS, TRAIN_SWITCHES, GenotypeRun,
                                        genotypes_per_batch, memory_probe, schedule_record, scratch_steps_test,
                                        train_genotype_batch, train_settings)

GENOTYPES_DIR = "genotypes"
INDEX_FILE = "genotypes.json"
RESULTS_FILE = "results.json"


# -- flags and settings -------------------------------------------------------------------------------
@dataclass
class ProtocolSettings(evaluate_stage.CheckpointSettings):
    """The protocol's settings: the checkpoint and test episodes, decoding, and the from-scratch flags
    (None: not given, see :func:`train_settings`)."""

    method: str = "tnas"
    train_only: bool = False
    dist_timeout_hours: float = 48.0
    decode_lr_alphas: Optional[float] = None
    decode_lr_weights: Optional[float] = None
    train_config: Optional[str] = None
    budget: bool = False
    train_seed: Optional[int] = None
    train_args: Optional[str] = None
    inner_steps_test: Optional[int] = None
    epochs: Optional[int] = None
    tasks_per_epoch: Optional[int] = None
    tasks_per_batch: Optional[int] = None
    inner_steps: Optional[int] = None
    inner_lr: Optional[float] = None
    meta_lr: Optional[float] = None
    val_episodes: Optional[int] = None
    val_batch_size: Optional[int] = None
    log_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    drop_path_prob: Optional[float] = None
    C: Optional[int] = None
    layers: Optional[int] = None
    second_order: Optional[bool] = None
    amp: Optional[bool] = None
    tf32: Optional[bool] = None
    genotypes_per_batch: Optional[int] = free()


def settings_from_args(args: argparse.Namespace) -> ProtocolSettings:
    """The typed settings of the parsed flags (the CLI layer's only conversion)."""
    return ProtocolSettings.from_flags(vars(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The T-NAS / T-NAS++ protocol on fixed test episodes: decode one genotype per task from a "
                    "T-NAS search checkpoint, train each distinct genotype from scratch (MAML / MAML++), score "
                    "each task with its own genotype's network; mean and 95% CI in results.json. "
                    "Launch with torchrun to spread the genotypes over processes.",
        formatter_class=HelpFormatter)
    evaluate_stage.add_checkpoint_args(parser)
    set_flag(parser, "checkpoint", help="T-NAS search checkpoint: .pt file, or its run directory (best.pt) (required)")
    set_flag(parser, "out", help="protocol directory (default: <checkpoint run dir>/protocol_<method>[_budget])")
    set_flag(parser, "seed", help="seed of the fixed test episodes; also the from-scratch seed unless "
                                  "--train_seed")
    set_flag(parser, "batch_size", help="test tasks decoded / adapted at once (memory, not results)")
    parser.add_argument("--method", choices=tuple(METHODS), default="tnas",
                        help="tnas: from-scratch first-order MAML; tnas++: MAML++")
    parser.add_argument("--train_only", action="store_true",
                        help="decode and train every distinct genotype, but do not score (no results.json)")
    parser.add_argument("--dist_timeout_hours", type=float, default=48.0,
                        help="under torchrun: how long a rank that has finished its genotypes waits for the "
                             "others at the final gather")
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
                            f"{BUDGET_SCHEDULE['tasks_per_epoch']:,} tasks (labelled \"budget\" in results.json); MAML++'s "
                            f"--msl_epochs and --first_order_epochs shrink in proportion unless given")
    group.add_argument("--train_seed", type=int, default=None, help="seed of every from-scratch run (default: --seed)")
    group.add_argument("--inner_steps_test", type=int, default=None,
                       help="adaptation steps of the from-scratch networks at test time: in their validation, "
                            "which picks best.pt, and on each test episode when scoring (default: "
                            "--update_step_test; MAML++ itself adapts with its training's 5)")
    group.add_argument("--train_args", default=None, metavar="'FLAGS'",
                       help="more train-stage flags, quoted, e.g. '--msl_epochs 3 --no-cosine_lr' "
                            "(one flag alone with '=': --train_args=--cuda_graph); not those the protocol sets "
                            "itself (task shape, data, method, --inner_steps_test, seed, device)")
    for name, kind, text in TRAIN_FLAGS:
        group.add_argument(f"--{name}", type=kind, default=None, help=text)
    for name, text in TRAIN_SWITCHES:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=text)
    group.add_argument("--genotypes_per_batch", type=int, default=None, metavar="G",
                       help="train G genotypes at once as one genotype batch, each with its solo result and its "
                            "own run directory (default: 1 on a CPU; on CUDA the most that fit in the free device "
                            "memory, measured for a batch's training (meta-steps and validation) at G = 1 and 2; logged)")


def default_out_dir(args, checkpoint: str) -> str:
    name = "protocol_" + args.method.replace("++", "_plusplus") + ("_budget" if args.budget else "")
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)


def check_flags(args) -> None:
    """One-line errors for protocol flags out of range (before anything is loaded)."""
    common.check_positive(args, "epochs", "tasks_per_epoch", "tasks_per_batch", "inner_steps", "inner_steps_test",
                          "val_episodes", "val_batch_size", "C", "layers", "dist_timeout_hours")
    common.check_positive(args, "inner_lr", "meta_lr", "decode_lr_alphas", "decode_lr_weights", minimum=0)
    if args.genotypes_per_batch is not None:
        train.check_genotypes_per_batch(args.genotypes_per_batch)
    if not args.checkpoint:
        raise TnasError("--checkpoint PATH is required (a T-NAS search run directory or its .pt file)")


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
    _claim_out(out_dir, info, device)
    release = functools.partial(run_dir.release_run_dir, out_dir)  # held until the log closes (a no-op off rank 0)
    try:
        if info.is_main:
            os.makedirs(os.path.join(out_dir, GENOTYPES_DIR), exist_ok=True)
            save_config(args.to_flags(), os.path.join(out_dir, "config.yaml"))
        distributed.barrier(info)
        log_dir = out_dir if info.is_main else os.path.join(out_dir, f"rank{info.rank}")
        logger = RunLogger(log_dir, use_tensorboard=False, quiet=not info.is_main, append=True, on_close=release)
    except BaseException:
        release()
        raise
    return Protocol(args, info, device, prepared, out_dir, settings, schedule_record(settings, args), logger,
                    started=started)


def _claim_out(out_dir: str, info, device) -> None:
    """Rank 0 holds ``out_dir`` (:func:`tnas.run_dir.claim_run_dir`) before anything is written there: a
    second protocol into the same directory would rewrite its config.yaml and decoding cache under it.
    A refusal stops every rank with the same one-line error."""
    problem = None
    if info.is_main:
        try:
            run_dir.claim_run_dir(out_dir)
        except TnasError as error:
            problem = error
    if not distributed.all_ranks_true(problem is None, device):
        raise problem or TnasError(f"rank 0 could not claim --out {out_dir} (see its error)")


def decode_step(p: Protocol):
    """a. decode (or reuse the cached decoding), b. group; returns ``(genotypes, ids, by_id, episodes_of, cached)``."""
    begin, info, args = time.perf_counter(), p.info, p.args
    key = decode_cache_key(p.prepared, args) if info.is_main else None
    cached = read_decode_cache(p.out_dir, key) if info.is_main else None
    cached = distributed.broadcast_from_main(cached, info)
    genotypes = cached if cached is not None else decode_episodes(p.prepared, args, info, p.logger)
    cost_stage.synchronize(p.device)
    p.seconds["decode"] = time.perf_counter() - begin
    ids, by_id, episodes_of = group_genotypes(genotypes)
    if info.is_main:
        meta_genotype = p.prepared.learner.genotype().to_dict()
        write_decode_files(p.out_dir, genotypes, ids, key, p.prepared, args, meta_genotype, p.seconds["decode"])
        p.logger.log(f"what the tasks chose: {diversity_line(write_task_choices(p.out_dir, genotypes, meta_genotype))}")
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
    ids = list(by_id)
    probe = memory_probe(p.settings, [by_id[gid] for gid in ids[:2]], p.prepared.split.image_shape, p.device)
    per_process = -(-len(ids) // p.info.world_size)  # a larger batch would leave other ranks without genotypes
    chosen = genotypes_per_batch(p.args.genotypes_per_batch, p.device, p.logger.log, per_process, probe)
    per_batch = distributed.min_across_ranks(chosen, p.info)  # every rank must cut the same batches
    if per_batch != chosen:
        p.logger.log(f"--genotypes_per_batch {per_batch}: the smallest that a rank chose (this one: {chosen}), so "
                     f"that all ranks cut the genotypes into the same batches")
    batches = [[GenotypeRun(gid, by_id[gid], episodes_of[gid], os.path.join(p.out_dir, GENOTYPES_DIR, gid))
                for gid in ids[start:start + per_batch]] for start in range(0, len(ids), per_batch)]
    batches = distributed.shard(batches, p.info)  # batches of genotypes dealt round robin
    mine = [run for batch in batches for run in batch]
    begin = time.perf_counter()
    for position, batch in enumerate(batches, 1):
        if per_batch == 1:
            p.logger.log(f"[{position}/{len(batches)} on rank {p.info.rank}] genotype {batch[0].id}")
        else:
            p.logger.log(f"[batch {position}/{len(batches)} on rank {p.info.rank}] genotypes "
                         f"{', '.join(run.id for run in batch)}")
        train_genotype_batch(batch, p.settings, p.logger, per_batch)
    p.seconds["train"] = time.perf_counter() - begin
    begin = time.perf_counter()
    if not p.args.train_only:
        meter = scoring_progress(batches, p.args.batch_size, p.logger)
        for batch in batches:  # a genotype batch is scored together too (tnas.stages.protocol_score)
            p.accuracies.update(score_batch(batch, p.prepared.episodes, p.args, p.device, meter, p.logger.log))
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
                          schedule=p.schedule, **prepared.provenance,
                          seed=evaluate_stage.episodes_seed(prepared, args),
                          episodes_file=os.path.abspath(args.episodes_file) if args.episodes_file else None,
                          q_query=args.q_query, update_step_test=args.update_step_test,
                          inner_steps_test=scratch_steps_test(args), batch_size=args.batch_size,
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


def run(args: ProtocolSettings) -> Optional[Dict[str, object]]:
    """Run the protocol the settings describe. Returns the results.json record on rank 0 (with
    ``--train_only``: the genotypes index), None on the other ranks."""
    p = set_up(args)
    try:
        info, schedule = p.info, p.schedule
        p.logger.log(f"T-NAS protocol ({args.method}: from-scratch {schedule['train_method']}"
                     f"{', budget' if args.budget else ''}, {schedule['epochs']} epoch(s) of "
                     f"{schedule['tasks_per_epoch']:,} tasks; {args.update_step_test} decoding step(s), "
                     f"{schedule['inner_steps_test']} test step(s) from scratch) of {p.prepared.checkpoint} on "
                     f"{len(p.prepared.episodes)} {args.dataset} {args.n_way}-way {args.k_shot}-shot test episodes; "
                     f"{info.world_size} process(es), device {p.device}; output in {p.out_dir}")
        genotypes, ids, by_id, episodes_of, cached = decode_step(p)
        mine = train_and_score(p, by_id, episodes_of)
        record = gather_and_write(p, mine, genotypes, ids, by_id, episodes_of, cached)
        # every rank leaves the gloo group together: a rank that tore it down while rank 0 still
        # wrote the results could abort at exit ("terminate called without an active exception")
        distributed.barrier(p.info)
        return record
    finally:
        p.logger.close()
        distributed.shutdown(p.info)
