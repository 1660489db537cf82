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
   (:func:`tnas.stages.train.run`): first-order MAML for ``--method tnas``, MAML++ for
   ``--method tnas++``, validation on the validation classes, ``best.pt`` by validation
   accuracy; run directory ``OUT/genotypes/<id>/``;
d. **evaluate** -- each episode is adapted on its support set and scored on its query set
   by its own genotype's ``best.pt`` (all episodes of a genotype batched);
e. **aggregate** -- mean and 95% CI into ``OUT/results.json`` (DESIGN.md section 4 fields plus
   ``genotype_id`` per episode, ``genotypes`` {id: genotype}, ``distinct_genotypes``, the
   from-scratch ``schedule``, ``budget`` and a ``cost`` block: wall time and device-hours per
   stage, device name, world size).

Resumable: the per-episode genotypes are cached in ``OUT/episode_genotypes.jsonl`` (with
``OUT/decode_summary.json``, which records the checkpoint's and the episodes' SHA-256) and
reused when they match (what the tasks chose -- ``op_frequency_{normal,reduce}.png``,
``genotype_diversity.json``, ``tb/`` -- is rewritten from them each time); a genotype whose ``train.json`` shows every epoch done with
``best.pt`` present is skipped; one whose run was interrupted is continued with ``--resume``.

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
import hashlib
import json
import os
import platform
import shlex
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tnas import distributed
from tnas.config import load_config, parse_args, resolve_device, save_config
from tnas.errors import TnasError
from tnas.stages import evaluate as evaluate_stage

METHODS = {"tnas": "maml", "tnas++": "maml++"}  # protocol method -> from-scratch training method
BUDGET_SCHEDULE = {"epochs": 2, "tasks_per_epoch": 2000}  # --budget: instead of the paper's 15 x 15,000
PAPER_TASKS_PER_GENOTYPE = 15 * 15000  # the original code's from-scratch schedule (DESIGN.md section 5)
GENOTYPES_DIR = "genotypes"
GENOTYPES_FILE = "episode_genotypes.jsonl"
DECODE_SUMMARY_FILE = "decode_summary.json"
INDEX_FILE = "genotypes.json"
RESULTS_FILE = "results.json"

# Protocol flags handed to the train stage under the same name (None: not given -> the train
# config's value or the train stage's default).
TRAIN_FLAGS = ("epochs", "tasks_per_epoch", "tasks_per_batch", "inner_steps", "inner_lr", "meta_lr",
               "val_episodes", "val_batch_size", "log_every", "checkpoint_every", "C", "layers", "second_order",
               "amp", "drop_path_prob")
# Train-stage settings that may differ between a finished or interrupted genotype run and the
# one asked for now (they change no result, or are checked separately).
RERUN_FREE_KEYS = {"out", "resume", "device", "config", "log_every", "checkpoint_every", "val_batch_size",
                   "cache_dir", "data_path", "genotype", "epochs", "amp", "threads", "help",
                   "cuda_graph"}  # graphed or eager: the same steps


# -- flags ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="The T-NAS / T-NAS++ protocol on fixed test episodes: decode one genotype per task from a "
                    "T-NAS search checkpoint, train each distinct genotype from scratch (MAML / MAML++), score "
                    "each task with its own genotype's network; mean and 95% CI in results.json. "
                    "Launch with torchrun to spread the genotypes over processes.")
    evaluate_stage.add_checkpoint_args(parser)
    evaluate_stage._set_flag(parser, "checkpoint", help="T-NAS search checkpoint: .pt file, or its run directory "
                                                        "(best.pt) (required)")
    evaluate_stage._set_flag(parser, "out", help="protocol directory (default: <checkpoint run dir>/"
                                                 "protocol_<method>[_budget])")
    evaluate_stage._set_flag(parser, "seed", help="seed of the fixed test episodes (default: 0); also the "
                                                  "from-scratch seed unless --train_seed")
    evaluate_stage._set_flag(parser, "batch_size", help="tasks decoded / adapted at once (default: 50)")
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
    for name, kind, text in (("epochs", int, "from-scratch epochs"),
                             ("tasks_per_epoch", int, "meta-training tasks per epoch"),
                             ("tasks_per_batch", int, "tasks per meta-batch"),
                             ("inner_steps", int, "inner SGD steps in meta-training"),
                             ("inner_lr", float, "inner SGD learning rate"),
                             ("meta_lr", float, "outer Adam learning rate"),
                             ("val_episodes", int, "validation episodes per epoch (validation classes)"),
                             ("val_batch_size", int, "validation episodes adapted at once"),
                             ("log_every", int, "meta-iterations between logged steps"),
                             ("checkpoint_every", int, "meta-iterations between last.pt saves"),
                             ("drop_path_prob", float, "drop-path probability"),
                             ("C", int, "channels of the derived network (default: the search checkpoint's)"),
                             ("layers", int, "cells of the derived network (default: the search checkpoint's)")):
        group.add_argument(f"--{name}", type=kind, default=None, help=text)
    group.add_argument("--second_order", action=argparse.BooleanOptionalAction, default=None,
                       help="exact (second-order) MAML in from-scratch training")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast in from-scratch training (GPU)")
    return parser


def default_out_dir(args, checkpoint: str) -> str:
    name = "protocol_" + args.method.replace("++", "_plusplus") + ("_budget" if args.budget else "")
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)


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


def train_argv(args, search_summary: Dict[str, Any], device: torch.device) -> List[str]:
    """The train-stage command line shared by every genotype (``--genotype`` and ``--out`` come later)."""
    argv: List[str] = []
    config_values: Dict[str, Any] = {}
    if args.train_config:
        path = _find_train_config(args.train_config)
        config_values = load_config(path)
        argv += ["--config", path]
    given = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    if args.budget:
        for name, value in BUDGET_SCHEDULE.items():
            given.setdefault(name, value)
    model = search_summary.get("model", {})
    for name in ("C", "layers"):  # the derived network defaults to the searched supernet's size
        if name not in given and name not in config_values and model.get(name) is not None:
            given[name] = int(model[name])
    for name, value in given.items():
        if name in ("second_order", "amp"):
            argv += [f"--{name}"] if value else []  # the train stage's switches are store_true
        else:
            argv += [f"--{name}", str(value)]
    if args.train_args:
        argv += shlex.split(args.train_args)
    # What the protocol fixes: the checkpoint's data and task shape, the method, the test-time steps.
    forced = {"dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query,
              "img_size": args.img_size, "method": METHODS[args.method], "inner_steps_test": args.update_step_test,
              "seed": args.train_seed if args.train_seed is not None else args.seed, "device": str(device),
              # the searched checkpoint's image loading (older runs: split statistics, Lanczos)
              "normalize": search_summary.get("normalize", "split"), "resize": search_summary.get("resize", "lanczos")}
    for name in ("data_path", "cache_dir", "threads"):
        if getattr(args, name, None):
            forced[name] = getattr(args, name)
    for name, value in forced.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def check_train_settings(train_args: argparse.Namespace) -> None:
    """What the from-scratch stage would refuse only after decoding (``--train_args=--cuda_graph``
    without a GPU, say), refused up front. Each genotype trains in a process
    of its own (``local_process``), so torchrun ranks may use CUDA graphs."""
    from tnas.stages import train

    try:
        with distributed.local_process():
            train.check_cuda_graph(train_args)
    except TnasError as error:
        raise TnasError(f"from-scratch settings: {error}") from None


def parse_train_args(argv: Sequence[str]) -> argparse.Namespace:
    from tnas.stages import train

    try:
        return parse_args(train.build_parser(), list(argv))
    except TnasError as error:
        raise TnasError(f"from-scratch settings: {error}") from None


def schedule_record(train_args: argparse.Namespace, args) -> Dict[str, Any]:
    """What results.json says about the from-scratch training."""
    record = {"train_method": train_args.method, "budget": bool(args.budget),
              "train_config": os.path.abspath(train_args.config) if train_args.config else None}
    for name in ("epochs", "tasks_per_epoch", "tasks_per_batch", "q_query", "inner_steps", "inner_steps_test",
                 "inner_lr", "meta_lr", "second_order", "C", "layers", "val_episodes", "drop_path_prob", "seed"):
        record[name] = getattr(train_args, name)
    if train_args.method == "maml++":
        for name in ("msl_epochs", "first_order_epochs", "min_meta_lr"):
            record[name] = getattr(train_args, name)
    return record


# -- decoding --------------------------------------------------------------------------------------------
def canonical_key(genotype: Dict[str, Any]) -> str:
    return json.dumps(genotype, sort_keys=True, separators=(",", ":"))


def group_genotypes(genotypes: Sequence[Dict[str, Any]]) -> Tuple[List[str], Dict[str, Dict[str, Any]],
                                                                   Dict[str, List[int]]]:
    """``(id per episode, {id: genotype}, {id: episodes})``; ids ``g0000``, ``g0001``, ... by first occurrence."""
    ids: Dict[str, str] = {}
    per_episode: List[str] = []
    by_id: Dict[str, Dict[str, Any]] = {}
    episodes: Dict[str, List[int]] = {}
    for index, genotype in enumerate(genotypes):
        key = canonical_key(genotype)
        if key not in ids:
            ids[key] = f"g{len(ids):04d}"
            by_id[ids[key]] = genotype
            episodes[ids[key]] = []
        per_episode.append(ids[key])
        episodes[ids[key]].append(index)
    return per_episode, by_id, episodes


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_cache_key(prepared, args) -> Dict[str, Any]:
    """What the per-episode genotypes depend on: the checkpoint's bytes, the episodes, the adaptation."""
    episodes = prepared.episodes
    return {"checkpoint_sha256": _sha256_file(prepared.checkpoint),
            "episodes_sha256": hashlib.sha256(episodes.indices.astype("int64").tobytes()).hexdigest(),
            "episodes": len(episodes), "split": prepared.split.name, "dataset": args.dataset,
            "image_shape": list(prepared.split.image_shape), "n_way": args.n_way, "k_shot": args.k_shot,
            "q_query": args.q_query, "update_step_test": args.update_step_test,
            "inner_lrs": {name: float(value) for name, value in sorted(prepared.learner.inner_lrs.items())}}


def read_decode_cache(out_dir: str, key: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """The cached per-episode genotypes when they were decoded with ``key``, else None."""
    from tnas.genotypes import genotype_from_dict

    summary_path, lines_path = os.path.join(out_dir, DECODE_SUMMARY_FILE), os.path.join(out_dir, GENOTYPES_FILE)
    try:
        with open(summary_path, encoding="utf-8") as handle:
            if json.load(handle).get("cache_key") != key:
                return None
        with open(lines_path, encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
        if [line.get("episode") for line in lines] != list(range(key["episodes"])):
            return None
        return [genotype_from_dict(line["genotype"], lines_path).to_dict() for line in lines]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TnasError):
        return None


def decode_episodes(prepared, args, info: distributed.DistInfo, log=None) -> List[Dict[str, Any]]:
    """Per-episode genotypes; decoding batches dealt round robin to the ranks (the same batches as one
    process uses, so the same genotypes), gathered on rank 0 and sent back to every rank. ``log`` gets
    progress lines (this rank's share)."""
    from tnas.progress import TaskProgress

    episodes, learner = prepared.episodes, prepared.learner
    starts = list(range(0, len(episodes), args.batch_size))
    local: Dict[int, List[Dict[str, Any]]] = {}
    mine = distributed.shard(starts, info)
    meter = TaskProgress("decode", sum(min(args.batch_size, len(episodes) - start) for start in mine), len(mine),
                         log=log)
    for start in meter.wrap(mine):
        batch = episodes.batch(slice(start, start + args.batch_size), prepared.device)
        local[start] = [genotype.to_dict() for genotype in learner.decode(batch, steps=args.update_step_test)]
        meter.add(len(local[start]))
    parts = distributed.gather_to_main(local, info)
    genotypes = None
    if info.is_main:
        merged = {start: value for part in parts for start, value in part.items()}
        genotypes = [genotype for start in starts for genotype in merged[start]]
    return distributed.broadcast_from_main(genotypes, info)


def write_decode_files(out_dir: str, genotypes: List[Dict[str, Any]], ids: List[str], key: Dict[str, Any],
                       prepared, args, meta_genotype: Dict[str, Any], wall_time_s: float) -> None:
    """``episode_genotypes.jsonl`` and ``decode_summary.json`` in the decode stage's format, plus the cache key."""
    from tnas.evaluate import genotype_counts
    from tnas.runlog import atomic_write_bytes, atomic_write_json

    lines_path = os.path.join(out_dir, GENOTYPES_FILE)
    lines = "".join(json.dumps({"episode": index, "genotype": genotype, "genotype_id": ids[index]}) + "\n"
                    for index, genotype in enumerate(genotypes))
    atomic_write_bytes(lines_path, lines.encode("utf-8"))
    counts = genotype_counts(genotypes)
    for group in counts:
        group["id"] = ids[group["episodes"][0]]
    atomic_write_json(os.path.join(out_dir, DECODE_SUMMARY_FILE), {
        "checkpoint": os.path.abspath(prepared.checkpoint), "method": prepared.summary.get("method"),
        "dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query,
        "episodes": len(genotypes), "distinct": len(counts), "update_step_test": args.update_step_test,
        "seed": _episodes_seed(prepared, args),
        "episodes_file": os.path.abspath(args.episodes_file) if args.episodes_file else None,
        "split": prepared.split.name, "genotypes_file": os.path.abspath(lines_path), "meta_genotype": meta_genotype,
        "episodes_with_meta_genotype": sum(g["count"] for g in counts if g["genotype"] == meta_genotype),
        "counts": counts, "wall_time_s": wall_time_s, "cache_key": key})


def _episodes_seed(prepared, args) -> int:
    return prepared.episodes.seed if prepared.episodes.seed is not None else args.seed


# -- training one genotype --------------------------------------------------------------------------------
def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _plain(value):
    from tnas.config import _to_plain

    return json.loads(json.dumps(_to_plain(value)))


def genotype_run_status(run_dir: str, genotype: Dict[str, Any], train_args: argparse.Namespace) -> str:
    """``"new"``, ``"done"`` (every epoch trained, best.pt there) or ``"resume"``; a one-line error when
    ``run_dir`` holds another genotype or a run with other settings."""
    from tnas.genotypes import genotype_from_dict

    saved = _read_json(os.path.join(run_dir, "genotype.json"))
    if saved is not None:
        try:
            same = canonical_key(genotype_from_dict(saved).to_dict()) == canonical_key(genotype)
        except TnasError:
            same = False
        if not same:
            raise TnasError(f"{run_dir} holds the run of another genotype (its genotype.json differs from the one "
                            f"decoded now: other checkpoint or episodes?); choose another --out")
    if not os.path.exists(os.path.join(run_dir, "last.pt")):
        return "new"
    try:
        import yaml

        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, ValueError):
        config = {}
    wanted = {key: _plain(value) for key, value in vars(train_args).items()}
    differ = [key for key in sorted(set(config) & set(wanted))
              if key not in RERUN_FREE_KEYS and config[key] != wanted[key]]
    if differ:
        detail = ", ".join(f"{key}: {config[key]} -> {wanted[key]}" for key in differ[:4])
        raise TnasError(f"{run_dir} was trained with other from-scratch settings ({detail}); use the same "
                        f"settings or another --out")
    if isinstance(config.get("epochs"), int) and config["epochs"] > train_args.epochs:
        raise TnasError(f"{run_dir} was trained for {config['epochs']} epochs, more than --epochs "
                        f"{train_args.epochs}; use the same settings or another --out")
    summary = _read_json(os.path.join(run_dir, "train.json")) or {}
    if int(summary.get("epochs_done") or 0) >= train_args.epochs and \
            os.path.exists(os.path.join(run_dir, "best.pt")):
        return "done"
    return "resume"


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


def train_genotype(run: GenotypeRun, base_argv: Sequence[str], logger) -> None:
    """Train (or resume, or skip) one genotype's from-scratch run, as a process of its own."""
    from tnas.genotypes import genotype_from_dict, save_genotype
    from tnas.stages import train

    genotype_path = os.path.join(run.run_dir, "genotype.json")
    train_args = parse_train_args(list(base_argv) + ["--genotype", genotype_path, "--out", run.run_dir])
    status = genotype_run_status(run.run_dir, run.genotype, train_args)
    label = f"genotype {run.id} ({len(run.episodes)} episode(s))"
    if status == "done":
        run.status = "skipped"
        run.summary = _read_json(os.path.join(run.run_dir, "train.json")) or {}
        logger.log(f"{label}: already trained ({run.summary.get('epochs_done')} epoch(s), best epoch "
                   f"{run.summary.get('best_epoch')}), skipped")
        return
    os.makedirs(run.run_dir, exist_ok=True)
    if not os.path.exists(genotype_path):
        save_genotype(genotype_from_dict(run.genotype), genotype_path)
    train_args.resume = status == "resume"
    logger.log(f"{label}: {'resuming the interrupted' if train_args.resume else 'starting the'} from-scratch "
               f"{train_args.method} run in {run.run_dir}")
    started = time.perf_counter()
    try:
        with distributed.local_process():
            run.summary = train.run(train_args)
    except TnasError as error:
        raise TnasError(f"{label} in {run.run_dir}: {error}") from None
    run.wall_time_s = time.perf_counter() - started
    run.status = "resumed" if train_args.resume else "trained"
    logger.log(f"{label}: {run.status} in {run.wall_time_s:.1f} s, best epoch {run.summary.get('best_epoch')} "
               f"(validation {run.summary.get('best_val_accuracy') or 0.0:.2f}%)")


def score_genotype(run: GenotypeRun, episodes, args, device: torch.device, meter=None) -> Dict[int, float]:
    """Episode index -> accuracy (percent) of the genotype's best.pt, adapted on each episode's support set.
    ``meter`` (a :class:`tnas.progress.TaskProgress`), when given, counts the scored batches."""
    from tnas.stages import restore

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
        if meter is not None:
            meter.add(len(chosen), stats.query_accuracy)
    return accuracies


def scoring_progress(runs: Sequence[GenotypeRun], batch_size: int, logger):
    """Progress lines over this rank's scoring: every episode of every genotype in ``runs``."""
    from tnas.progress import TaskProgress

    batches = sum(-(-len(run.episodes) // batch_size) for run in runs)
    meter = TaskProgress("score", sum(len(run.episodes) for run in runs), batches, log=logger)
    meter.wrap(None)  # a bar that meter.add advances: the loop runs over genotypes, then their batches
    return meter


# -- cost ---------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine() or 'unknown'}, {torch.get_num_threads()} thread(s))"


def device_id(device: torch.device) -> str:
    """Which physical device this process computes on: ``host:cuda:N``, or ``host:cpu:RANK`` (CPU
    processes are counted as one device each)."""
    where = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}" \
        if device.type == "cuda" else f"{device.type}:{distributed.current_info().rank}"
    return f"{socket.gethostname()}:{where}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_record(parts: List[Dict[str, Any]], runs: Dict[str, Dict[str, Any]], wall_time_s: float,
                schedule: Dict[str, Any], decode_cached: bool) -> Dict[str, Any]:
    """Wall time (slowest rank) and device-hours (sum over ranks) of each stage, per genotype for training.

    Where processes share a GPU (``devices`` < ``world_size``), the summed device-hours are
    process-hours; ``allocated_device_hours`` (wall time x devices) is what the GPUs were held.
    """
    world = len(parts)
    devices = len({part.get("device_id", part["rank"]) for part in parts})
    stages: Dict[str, Dict[str, Any]] = {}
    for stage in ("decode", "train", "evaluate"):
        times = [part["seconds"].get(stage, 0.0) for part in parts]
        stages[stage] = {"wall_time_s": max(times), "device_hours": sum(times) / 3600.0}
    stages["decode"]["cached"] = decode_cached
    train = stages["train"]
    train["per_genotype"] = {gid: {"rank": run["rank"], "status": run["status"], "wall_time_s": run["wall_time_s"],
                                   "device_hours": run["wall_time_s"] / 3600.0,
                                   "total_train_wall_time_s": run["total_train_wall_time_s"]}
                             for gid, run in runs.items()}
    for status in ("trained", "resumed", "skipped"):
        train[status] = sum(1 for run in runs.values() if run["status"] == status)
    totals = [run["total_train_wall_time_s"] for run in runs.values() if run["total_train_wall_time_s"]]
    # The whole from-scratch cost, over every invocation that trained these genotypes.
    train["total_train_device_hours"] = sum(totals) / 3600.0
    mean_genotype_s = sum(totals) / len(totals) if totals else None
    train["mean_genotype_train_s"] = mean_genotype_s
    tasks = schedule["epochs"] * schedule["tasks_per_epoch"]
    seconds_per_task = mean_genotype_s / tasks if mean_genotype_s else None
    per_genotype_hours = PAPER_TASKS_PER_GENOTYPE * seconds_per_task / 3600.0 if seconds_per_task else None
    names = sorted({part["device"] for part in parts})
    return {
        "device": names[0] if len(names) == 1 else names, "device_type": parts[0]["device_type"],
        "world_size": world, "devices": devices, "processes_per_device": world / devices,
        "wall_time_s": wall_time_s,
        "device_hours": sum(stage["device_hours"] for stage in stages.values()),
        "allocated_device_hours": wall_time_s * devices / 3600.0,
        "stages": stages,
        "extrapolation": {
            "distinct_genotypes": len(runs), "tasks_per_genotype": tasks, "seconds_per_task": seconds_per_task,
            "paper_tasks_per_genotype": PAPER_TASKS_PER_GENOTYPE,
            "paper_schedule_device_hours_per_genotype": per_genotype_hours,
            "paper_schedule_train_device_hours": len(runs) * per_genotype_hours if per_genotype_hours else None,
            "formula": "distinct genotypes x paper_tasks_per_genotype x seconds_per_task / 3600 (seconds_per_task: "
                       "from-scratch trainer time, validation included, per meta-training task on this device and "
                       "network size)"},
    }


# -- the protocol -------------------------------------------------------------------------------------------
def _check_tnas_checkpoint(summary: Dict[str, Any], checkpoint: str) -> None:
    from tnas.stages import decode

    try:
        decode._check_tnas_search(summary, checkpoint)
    except TnasError as error:
        message = str(error)
        message = message[len("decode "):] if message.startswith("decode ") else message
        raise TnasError(f"--checkpoint: the T-NAS protocol {message}") from None


def _check_flags(args) -> None:
    evaluate_stage.check_positive(args, "epochs", "tasks_per_epoch", "tasks_per_batch", "inner_steps",
                                  "val_episodes", "val_batch_size", "C", "layers")
    if args.dist_timeout_hours <= 0:
        raise TnasError(f"--dist_timeout_hours must be positive, got {args.dist_timeout_hours}")
    for name in ("inner_lr", "meta_lr", "decode_lr_alphas", "decode_lr_weights"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise TnasError(f"--{name} must be >= 0, got {value}")


def run(args) -> Optional[Dict[str, object]]:
    """Run the protocol described by ``args`` (the parsed flags). Returns the results.json record on
    rank 0 (with ``--train_only``: the genotypes index), None on the other ranks."""
    from tnas.diversity import diversity_line, write_task_choices
    from tnas.evaluate import format_accuracy, results_record
    from tnas.runlog import RunLogger, atomic_write_json

    started = time.perf_counter()
    _check_flags(args)
    if not args.checkpoint:
        raise TnasError("--checkpoint PATH is required (a T-NAS search run directory or its .pt file)")
    device = resolve_device(args.device)
    info = distributed.init_distributed(device, timeout=timedelta(hours=args.dist_timeout_hours), share_gpus=True)
    device = distributed.local_device(device, info)
    args.device = str(device)
    seconds: Dict[str, float] = {}

    # Rank 0 first: it writes --episodes_file when it does not exist yet; the others then read it.
    if not info.is_main:
        distributed.barrier(info)
    prepared = evaluate_stage.prepare(args, check_summary=_check_tnas_checkpoint)
    if info.is_main:
        distributed.barrier(info)
    learner, episodes = prepared.learner, prepared.episodes
    for group, value in (("alphas", args.decode_lr_alphas), ("weights", args.decode_lr_weights)):
        if value is not None:
            learner.inner_lrs[group] = value
    out_dir = args.out = args.out or default_out_dir(args, prepared.checkpoint)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TnasError(f"--out {out_dir} is a file, not a directory")
    base_argv = train_argv(args, prepared.summary, device)
    probe = parse_train_args(base_argv + ["--genotype", "auto_maml_1shot"])
    check_train_settings(probe)
    schedule = schedule_record(probe, args)
    if info.is_main:
        os.makedirs(os.path.join(out_dir, GENOTYPES_DIR), exist_ok=True)
        save_config({k: v for k, v in vars(args).items() if k != "episodes_given"},
                    os.path.join(out_dir, "config.yaml"))
    distributed.barrier(info)
    log_dir = out_dir if info.is_main else os.path.join(out_dir, f"rank{info.rank}")
    logger = RunLogger(log_dir, use_tensorboard=False, quiet=not info.is_main, append=True)
    try:
        logger.log(f"T-NAS protocol ({args.method}: from-scratch {schedule['train_method']}"
                   f"{', budget' if args.budget else ''}, {schedule['epochs']} epoch(s) of "
                   f"{schedule['tasks_per_epoch']:,} tasks) of {prepared.checkpoint} on {len(episodes)} "
                   f"{args.dataset} {args.n_way}-way {args.k_shot}-shot test episodes; {info.world_size} "
                   f"process(es), device {device}; output in {out_dir}")

        # a. decode (or reuse the cached decoding), b. group
        begin = time.perf_counter()
        key = decode_cache_key(prepared, args) if info.is_main else None
        cached = read_decode_cache(out_dir, key) if info.is_main else None
        cached = distributed.broadcast_from_main(cached, info)
        genotypes = cached if cached is not None else decode_episodes(prepared, args, info, logger)
        _synchronize(device)
        seconds["decode"] = time.perf_counter() - begin
        ids, by_id, episodes_of = group_genotypes(genotypes)
        if info.is_main:
            write_decode_files(out_dir, genotypes, ids, key, prepared, args, learner.genotype().to_dict(),
                               seconds["decode"])
            logger.log(f"what the tasks chose: "
                       f"{diversity_line(write_task_choices(out_dir, genotypes, learner.genotype()))}")
            logger.log(f"decode: {len(genotypes)} episodes -> {len(by_id)} distinct genotype(s)"
                       f"{' (cached decoding reused)' if cached is not None else ''}; "
                       f"{os.path.join(out_dir, GENOTYPES_FILE)}")
        del learner, prepared.learner
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # c. train this rank's share of the distinct genotypes
        mine = [GenotypeRun(gid, by_id[gid], episodes_of[gid], os.path.join(out_dir, GENOTYPES_DIR, gid))
                for gid in distributed.shard(list(by_id), info)]
        begin = time.perf_counter()
        for position, genotype_run in enumerate(mine, 1):
            logger.log(f"[{position}/{len(mine)} on rank {info.rank}] genotype {genotype_run.id}")
            train_genotype(genotype_run, base_argv, logger)
        seconds["train"] = time.perf_counter() - begin

        # d. score each episode with its own genotype's network
        begin = time.perf_counter()
        accuracies: Dict[int, float] = {}
        if not args.train_only:
            meter = scoring_progress(mine, args.batch_size, logger)
            for genotype_run in mine:
                accuracies.update(score_genotype(genotype_run, episodes, args, device, meter))
            _synchronize(device)
        seconds["evaluate"] = time.perf_counter() - begin

        # e. gather on rank 0 and aggregate
        part = {"rank": info.rank, "seconds": seconds, "accuracies": accuracies, "device": device_name(device),
                "device_type": device.type, "device_id": device_id(device),
                "runs": {r.id: r.record(info.rank) for r in mine}}
        parts = distributed.gather_to_main(part, info)
        if not info.is_main:
            return None
        runs = {gid: run for part in parts for gid, run in part["runs"].items()}
        runs = {gid: runs[gid] for gid in by_id}
        skipped = [gid for gid, run in runs.items() if run["status"] == "skipped"]
        if skipped:
            logger.log(f"skipped {len(skipped)} already trained genotype(s): {', '.join(skipped)}")
        cost = cost_record(parts, runs, time.perf_counter() - started, schedule, cached is not None)
        index = {"checkpoint": os.path.abspath(prepared.checkpoint), "method": args.method,
                 "distinct_genotypes": len(by_id), "schedule": schedule, "budget": bool(args.budget),
                 "genotypes": runs, "cost": cost}
        atomic_write_json(os.path.join(out_dir, INDEX_FILE), index)
        if args.train_only:
            logger.log(f"trained {len(by_id)} distinct genotype(s) ({cost['stages']['train']['trained']} trained, "
                       f"{cost['stages']['train']['resumed']} resumed, {len(skipped)} skipped); index: "
                       f"{os.path.join(out_dir, INDEX_FILE)}")
            return index
        merged = {episode: value for part in parts for episode, value in part["accuracies"].items()}
        missing = [episode for episode in range(len(genotypes)) if episode not in merged]
        if missing:  # cannot happen unless a rank lost work: refuse to average a partial set
            raise TnasError(f"no accuracy for episode(s) {missing[:5]}; rerun to complete the protocol")
        per_episode = [merged[episode] for episode in range(len(genotypes))]
        per_genotype = {gid: {"count": len(episodes_of[gid]),
                              "accuracy_mean": sum(merged[e] for e in episodes_of[gid]) / len(episodes_of[gid]),
                              "best_val_accuracy": run["best_val_accuracy"], "best_epoch": run["best_epoch"],
                              "parameters": run["parameters"], "status": run["status"],
                              "run_dir": run["run_dir"]}
                        for gid, run in runs.items()}
        record = results_record(args.method, args.dataset, args.n_way, args.k_shot, per_episode, by_id,
                                genotype_id=ids, distinct_genotypes=len(by_id), budget=bool(args.budget),
                                schedule=schedule, checkpoint=os.path.abspath(prepared.checkpoint),
                                seed=_episodes_seed(prepared, args),
                                episodes_file=os.path.abspath(args.episodes_file) if args.episodes_file else None,
                                q_query=args.q_query, update_step_test=args.update_step_test,
                                batch_size=args.batch_size, split=prepared.split.name,
                                image_shape=list(prepared.split.image_shape),
                                decode_inner_lrs=key["inner_lrs"], per_genotype=per_genotype,
                                skipped_genotypes=skipped, world_size=info.world_size, cost=cost,
                                wall_time_s=cost["wall_time_s"])
        path = os.path.join(out_dir, RESULTS_FILE)
        atomic_write_json(path, record)
        label = "T-NAS++" if args.method == "tnas++" else "T-NAS"
        line = (f"{label}{' (budget)' if args.budget else ''} {format_accuracy(record)}, "
                f"{len(by_id)} distinct genotype(s)")
        logger.quiet = True  # the line goes to log.txt here and to stdout once, below
        logger.log(line)
        print(line)
        print(f"results: {path}")
        return record
    finally:
        logger.close()
        distributed.shutdown(info)
