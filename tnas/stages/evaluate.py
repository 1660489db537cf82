"""The evaluation stage: score a checkpoint on fixed test episodes (mean accuracy and 95% CI).

The checkpoint is a derived network trained from scratch (``train`` stage: MAML / MAML++)
or a searched supernet (``search`` stage: T-NAS adapts weights and alphas, auto-MAML the
weights). ``--checkpoint`` is a ``.pt`` file or a run directory (its ``best.pt``).

Protocol: ``--episodes`` (600) fixed n-way k-shot tasks of the *test* classes, drawn from
``--seed`` (or read from ``--episodes_file``, which is written when it does not exist yet,
so every method is scored on the same tasks); each task adapted on its support set for
``--update_step_test`` (10) steps, ``--batch_size`` (50) tasks at once, and scored on its
query set. The dataset, n-way, k-shot, q-query and image size default to the checkpoint's;
an n-way, image size, channel count or ``--genotype`` that contradicts the checkpoint is a
one-line error naming both values.

Output: ``results.json`` in ``--out`` (default: the checkpoint's run directory), written
atomically and only after a successful evaluation, with docs/design.md section 4's fields (method,
dataset, n_way, k_shot, episodes, accuracy_mean, ci95, per_episode in percent, genotypes)
plus the checkpoint (path, SHA-256, epochs and iterations trained), the episodes' SHA-256,
update_step_test, seed, wall_time_s and the rest of the set-up.

Under torchrun the batches of episodes are dealt to the ranks and rank 0 writes the same record
as one process would (:func:`run`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import yaml

from tnas import distributed
from tnas.config import HelpFormatter, add_common_args, resolve_device, seed_everything, set_flag, set_threads
from tnas.data import FixedEpisodes, load_split
from tnas.errors import TnasError
from tnas.evaluate import batch_starts, evaluate_episodes, format_accuracy, merge_shares, results_record
from tnas.genotypes import genotype_from_dict, resolve_genotype
from tnas.progress import StdoutLog
from tnas.files import atomic_write_json
from tnas.stages import common, restore
from tnas.stages.settings import Settings

RESULTS_FILE = "results.json"


# -- flags ---------------------------------------------------------------------------------------
def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The common flags, with dataset defaulting to the checkpoint's, plus the test-episode flags."""
    add_common_args(parser)
    set_flag(parser, "dataset", default=None, help="dataset name (default: the checkpoint's)")
    set_flag(parser, "data_path", help="where the raw dataset lives (default: the checkpoint run's, if the "
                                       "dataset is the checkpoint's)")
    set_flag(parser, "seed", help="seed of the fixed test episodes")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="checkpoint .pt file, or a run directory (its best.pt) (required)")
    group = parser.add_argument_group("test episodes (default: the checkpoint's settings)")
    group.add_argument("--n_way", type=int, default=None, help="classes per task, N-way (must match the checkpoint)")
    group.add_argument("--k_shot", type=int, default=None, help="support images per class, K-shot")
    group.add_argument("--q_query", type=int, default=None, help="query images per class")
    group.add_argument("--img_size", type=int, default=None, help="image side in pixels (must match the checkpoint)")
    group.add_argument("--episodes", type=int, default=None,
                       help="fixed test episodes scored (default: 600, or the --episodes_file's); N episodes drawn "
                            "from --seed are a set of their own, not the first N of the 600")
    group.add_argument("--episodes_file", default=None, metavar="PATH",
                       help="episode index file (.npz or .json): read when it exists, else written, so "
                            "every method is scored on the same tasks")
    group.add_argument("--update_step_test", type=int, default=10, help="inner SGD steps adapting each test task")
    group.add_argument("--batch_size", type=int, default=50, help="test tasks adapted at once (memory, not results)")


@dataclass
class CheckpointSettings(Settings):
    """The flags of the stages that score a checkpoint on fixed test episodes (evaluate, decode, and
    the protocol's first part). Mutable: the dataset, task shape and data location not given are
    filled in from the checkpoint (:func:`fill_from_checkpoint`)."""

    checkpoint: Optional[str] = None
    dataset: Optional[str] = None
    data_path: Optional[str] = None
    cache_dir: Optional[str] = None
    out: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    threads: Optional[int] = None
    n_way: Optional[int] = None
    k_shot: Optional[int] = None
    q_query: Optional[int] = None
    img_size: Optional[int] = None
    episodes: Optional[int] = None
    episodes_file: Optional[str] = None
    update_step_test: int = 10
    batch_size: int = 50


@dataclass
class EvaluateSettings(CheckpointSettings):
    """The evaluate stage's settings: a checkpoint's, plus an expected genotype and CUDA graphs."""

    genotype: Optional[str] = None
    cuda_graph: str = "auto"  # auto | on | off (tnas.meta.cuda_graph.cuda_graph_mode)


def settings_from_args(args: argparse.Namespace) -> EvaluateSettings:
    """The typed settings of the parsed flags (the CLI layer's only conversion)."""
    return EvaluateSettings.from_flags(vars(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Score a checkpoint (derived network or supernet) on fixed test episodes: "
                    "accuracy mean and 95% confidence interval, written to results.json.",
        formatter_class=HelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--genotype", default=None, metavar="NAME|JSON|RUN_DIR",
                        help="check that the checkpoint's architecture is this genotype (published name, JSON "
                             "file, run directory (its best_genotype.json, else genotype.json), or an inline JSON object)")
    set_flag(parser, "out", help="directory for results.json (default: the checkpoint's run directory)")
    common.add_cuda_graph_arg(parser)  # graphs replay the adaptation of each batch of episodes
    return parser


# -- set-up shared with the decode stage ------------------------------------------------------------
@dataclass
class Prepared:
    """What a checkpoint evaluation needs: the restored learner and the fixed test episodes."""

    checkpoint: str
    learner: Any
    summary: Dict[str, Any]
    device: torch.device
    episodes: Any  # FixedEpisodes
    split: Any
    provenance: Dict[str, Any] = field(default_factory=dict)  # results.json's record of them (:func:`provenance`)


def provenance(checkpoint: str, checkpoint_sha256: str, state: Dict[str, Any], episodes) -> Dict[str, Any]:
    """The results.json fields that tie a score to what was scored: the checkpoint's path and the SHA-256 of
    the bytes its weights were read from (:func:`~tnas.stages.restore.load_state_and_sha256`), the epochs
    and meta-iterations it had trained (None where it does not say), and the SHA-256 of the test episodes'
    image indices (:meth:`~tnas.data.episodes.FixedEpisodes.indices_sha256`: equal in two records exactly
    when both scored the same tasks in the same order)."""
    trained = {key: state[key] if isinstance(state.get(key), int) else None for key in ("epoch", "iteration")}
    return {"checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": checkpoint_sha256,
            "checkpoint_epoch": trained["epoch"], "checkpoint_iteration": trained["iteration"],
            "episodes_sha256": episodes.indices_sha256()}


def _run_config(checkpoint: str) -> Dict[str, Any]:
    """The resolved flags of the run that wrote the checkpoint (its config.yaml), or {}."""
    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
        return data if isinstance(data, dict) else {}
    except Exception:  # no or unreadable config: just no defaults from it
        return {}


def check_against_checkpoint(args, summary: Dict[str, Any], checkpoint: str) -> None:
    """One-line errors for flags that contradict the checkpoint (n-way, image size)."""
    model = summary.get("model", {})
    n_way = summary.get("n_way", model.get("n_way"))
    if args.n_way is not None and n_way is not None and args.n_way != n_way:
        raise TnasError(f"--n_way {args.n_way} does not match the checkpoint {checkpoint}, which is {n_way}-way "
                        f"(its classifier has {n_way} outputs)")
    shape = summary.get("image_shape")
    if args.img_size is not None and shape and tuple(shape[1:]) != (args.img_size, args.img_size):
        raise TnasError(f"--img_size {args.img_size} does not match the checkpoint {checkpoint}, trained on "
                        f"{shape[1]}x{shape[2]} images (image_shape {list(shape)})")


def fill_from_checkpoint(args, summary: Dict[str, Any], checkpoint: str) -> None:
    """Flags not given take the checkpoint's values (dataset, n-way, k-shot, q-query, image size, data path)."""
    model = summary.get("model", {})
    if args.dataset is None:
        args.dataset = summary.get("dataset")
        if args.dataset is None:
            raise TnasError(f"the checkpoint {checkpoint} does not name its dataset; pass --dataset")
    for flag in ("n_way", "k_shot", "q_query"):
        if getattr(args, flag) is None:
            value = summary.get(flag, model.get(flag))
            if value is None:
                raise TnasError(f"the checkpoint {checkpoint} does not record {flag}; pass --{flag}")
            setattr(args, flag, int(value))
    shape = summary.get("image_shape")
    if args.img_size is None and shape:
        args.img_size = int(shape[1])
    if args.episodes is None:
        args.episodes = 600
    if args.dataset == summary.get("dataset"):
        run_config = _run_config(checkpoint)
        for flag in ("data_path", "cache_dir"):
            if getattr(args, flag) is None and isinstance(run_config.get(flag), str):
                setattr(args, flag, run_config[flag])


def checkpoint_data_settings(summary: Dict[str, Any]) -> Dict[str, Any]:
    """How the checkpoint's run loaded its images, so the test split is loaded the same way (runs made
    before the choice existed: split statistics, Lanczos, no rotated classes). The summary holds what
    :func:`tnas.stages.common.data_settings` gave the run, read back the same way."""
    return common.data_settings(argparse.Namespace(**summary))


def check_genotype(args, learner, summary: Dict[str, Any], checkpoint: str) -> None:
    """``--genotype``, when given, must be the checkpoint's architecture."""
    if not getattr(args, "genotype", None):
        return
    text = args.genotype
    if text.lstrip().startswith("{") and not os.path.exists(text):
        try:
            wanted = genotype_from_dict(json.loads(text), source="--genotype")
        except json.JSONDecodeError as error:
            raise TnasError(f"--genotype: invalid JSON at column {error.colno}: {error.msg}") from None
    else:
        wanted = resolve_genotype(text)
    actual = restore.checkpoint_genotype(learner, summary)
    if actual is None:
        raise TnasError(f"--genotype: the checkpoint {checkpoint} is a network without a genotype "
                        f"({summary['model'].get('kind')}); drop --genotype")
    if wanted != actual:
        label = "" if text.lstrip().startswith("{") else f"{text} "
        raise TnasError(f"--genotype {label}({wanted}) differs from the genotype of the checkpoint {checkpoint} "
                        f"({actual})")


def load_test_episodes(args, split, episodes_given: bool):
    """The fixed test episodes: read from ``--episodes_file`` when it exists, else generated from
    ``--seed`` (and saved to ``--episodes_file`` when one is named)."""
    path = args.episodes_file
    if path and os.path.exists(path):
        episodes = FixedEpisodes.load(path, split, n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query)
        if episodes_given and args.episodes != len(episodes):
            raise TnasError(f"--episodes {args.episodes} does not match the {len(episodes)} episodes of "
                            f"--episodes_file {path}")
        args.episodes = len(episodes)
        return episodes
    episodes = FixedEpisodes.generate(split, args.n_way, args.k_shot, args.q_query, episodes=args.episodes,
                                      seed=args.seed)
    if path:
        episodes.save(path)
    return episodes


def prepare(args, check_summary: Optional[Callable[[Dict[str, Any], str], None]] = None) -> Prepared:
    """Restore the checkpoint's learner, check the flags against it and load the test episodes.

    ``check_summary(summary, checkpoint)``, when given, runs right after the checkpoint is read
    (before anything is built or loaded), e.g. to refuse a kind of checkpoint.
    """
    if not args.checkpoint:
        raise TnasError("--checkpoint PATH is required (a .pt file or a run directory holding best.pt)")
    common.check_positive(args, "n_way", "k_shot", "q_query", "img_size", "episodes", "batch_size")
    common.check_positive(args, "update_step_test", minimum=0)
    episodes_given = args.episodes is not None
    set_threads(getattr(args, "threads", None))
    device = resolve_device(args.device)
    seed_everything(args.seed)
    checkpoint = restore.resolve_checkpoint(args.checkpoint)
    state, checkpoint_sha256 = restore.load_state_and_sha256(checkpoint)
    summary = dict(state["summary"])
    summary["stage"] = state["stage"]
    if check_summary is not None:
        check_summary(summary, checkpoint)
    check_against_checkpoint(args, summary, checkpoint)
    fill_from_checkpoint(args, summary, checkpoint)
    learner = restore.learner_from_state(state, device, source=checkpoint)
    trained = {key: state.get(key) for key in ("epoch", "iteration")}
    del state
    check_genotype(args, learner, summary, checkpoint)
    split = load_split(args.dataset, "test", data_path=args.data_path, img_size=args.img_size,
                       cache_dir=args.cache_dir, **checkpoint_data_settings(summary))
    shape = summary.get("image_shape") or [summary.get("model", {}).get("in_channels")] + list(split.image_shape[1:])
    if shape[0] is not None and int(split.image_shape[0]) != int(shape[0]):
        raise TnasError(f"dataset {args.dataset} gives {split.image_shape[0]}-channel images, but the checkpoint "
                        f"{checkpoint} was trained on {shape[0]}-channel images (image_shape {list(shape)})")
    if tuple(split.image_shape[1:]) != tuple(shape[1:]):
        raise TnasError(f"dataset {args.dataset} gives {split.image_shape[1]}x{split.image_shape[2]} images, but the "
                        f"checkpoint {checkpoint} was trained on {shape[1]}x{shape[2]} images")
    episodes = load_test_episodes(args, split, episodes_given)
    return Prepared(checkpoint, learner, summary, device, episodes, split,
                    provenance(checkpoint, checkpoint_sha256, trained, episodes))


def episodes_seed(prepared: Prepared, args) -> int:
    """The seed the test episodes were drawn from (an episodes file's own, else ``--seed``)."""
    return prepared.episodes.seed if prepared.episodes.seed is not None else args.seed


def default_out_dir(args, checkpoint: str) -> str:
    return args.out or os.path.dirname(os.path.abspath(checkpoint))


# -- the stage -----------------------------------------------------------------------------------
def run(args: EvaluateSettings) -> Optional[Dict[str, object]]:
    """Evaluate the checkpoint described by the settings; returns the record written to ``results.json``
    (None on the other ranks under torchrun).

    Under torchrun the batches of ``--batch_size`` episodes (the same batches as one process cuts) are
    dealt round robin to the ranks, each on its own device (``cuda:LOCAL_RANK`` mod the GPUs; the ranks
    talk over gloo, only the per-episode results travel), and rank 0 gathers every episode's result
    once (:func:`tnas.evaluate.merge_shares`) and writes results.json: the same record as one process.
    """
    started = time.time()
    with distributed.local_process():  # one evaluation graph per rank: nothing is summed across ranks
        graph = common.check_cuda_graph(args)
    with prepared_on_ranks(args) as (info, prepared):
        if info.is_main:
            print(graph.reason, file=sys.stderr)  # stdout carries the results
        return _evaluate(args, prepared, graph.enabled, info, started)


# How long the other ranks may wait for rank 0 (torch's default is 30 minutes): rank 0 prepares first, and a first
# read of a large folder dataset builds its cache. A rank that fails closes its connections, so the others
# stop within seconds then, not at this timeout.
RANKS_WAIT = timedelta(hours=12)


@contextlib.contextmanager
def prepared_on_ranks(args, check_summary: Optional[Callable[[Dict[str, Any], str], None]] = None
                      ) -> Iterator[Tuple[distributed.DistInfo, Prepared]]:
    """``(info, prepared)`` of this process for a stage that deals its batches of test episodes to the
    torchrun ranks (evaluate, decode; a single process alone): joins the process group (gloo: only small
    results travel, so the ranks may outnumber the GPUs) with ``args.device`` this rank's own
    (``cuda:LOCAL_RANK`` mod the GPUs), runs :func:`prepare` on rank 0 first (it writes
    ``--episodes_file`` when it does not exist yet) and then on the others; after the block every
    rank waits for the others and all leave the group together (also after an error)."""
    device = resolve_device(args.device)
    info = distributed.init_distributed(device, timeout=RANKS_WAIT, share_gpus=True)
    try:
        args.device = str(distributed.local_device(device, info))
        if not info.is_main:  # rank 0 first
            distributed.barrier(info)
        prepared = prepare(args, check_summary)
        if info.is_main:
            distributed.barrier(info)
        yield info, prepared
        distributed.barrier(info)  # every rank leaves the process group together
    finally:
        distributed.shutdown(info)


def _evaluate(args: EvaluateSettings, prepared: Prepared, cuda_graph: bool, info: distributed.DistInfo,
              started: float) -> Optional[Dict[str, object]]:
    """Score this rank's share of the batches, gather them on rank 0, write and print the record there."""
    summary, learner, episodes = prepared.summary, prepared.learner, prepared.episodes
    out_dir = default_out_dir(args, prepared.checkpoint)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TnasError(f"--out {out_dir} is a file, not a directory")
    mine = distributed.shard(batch_starts(len(episodes), args.batch_size), info)
    result = evaluate_episodes(learner, episodes, args.batch_size, prepared.device, steps=args.update_step_test,
                               desc="evaluate", cuda_graph=cuda_graph, log=StdoutLog() if info.is_main else None,
                               starts=mine)
    parts = distributed.gather_to_main({"starts": mine, "accuracy": result["accuracy"], "loss": result["loss"]}, info)
    if not info.is_main:
        return None
    result = merge_shares(parts, len(episodes), args.batch_size)
    genotype = restore.checkpoint_genotype(learner, summary)
    genotype = genotype.to_dict() if genotype is not None else None  # None: Conv-4, no genotype
    extra = {
        "q_query": args.q_query,
        "stage": summary["stage"],
        **prepared.provenance,
        "update_step_test": args.update_step_test,
        "seed": episodes_seed(prepared, args),
        "episodes_file": os.path.abspath(args.episodes_file) if args.episodes_file else None,
        "split": prepared.split.name,
        "image_shape": list(prepared.split.image_shape),
        "loss_mean": float(result["loss"].mean()),
        "batch_size": args.batch_size,
        "device": str(prepared.device),
        "world_size": info.world_size,
    }
    for key in ("genotype_source", "parameters", "macs"):
        if key in summary:
            extra[key] = summary[key]
    extra["wall_time_s"] = time.time() - started
    # Per-task accuracies are float32 fractions: round away their last-bit noise (30.0000011 -> 30.0).
    accuracies = [round(float(value), 4) for value in result["accuracy"]]
    record = results_record(summary.get("method", summary["stage"]), args.dataset, args.n_way, args.k_shot,
                            accuracies, genotype, **extra)
    path = os.path.join(out_dir, RESULTS_FILE)
    atomic_write_json(path, record)
    print(format_accuracy(record))
    print(f"results: {path}")
    return record
