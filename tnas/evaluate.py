"""Scoring on fixed episodes: per-episode accuracy after adaptation, mean and 95% CI.

The protocol: the same fixed test episodes (default 600, from a seed) for every method,
each episode adapted on its support set (``steps`` inner steps, default 10) and scored on
its query set; accuracy mean and ``1.96 * std(ddof=1) / sqrt(n)``, in percent.
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from tnas.meta.cuda_graph import GraphedStep, capture_failure_logger
from tnas.meta.genotype_batch import stack_batches
from tnas.progress import TaskProgress
from tnas.runlog import progress


def mean_ci95(accuracies: Sequence[float]) -> Dict[str, float]:
    """Mean and 95% confidence half-width ``1.96 * std(ddof=1) / sqrt(n)`` of per-episode accuracies."""
    values = np.asarray(accuracies, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no accuracies to summarise")
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"accuracy_mean": float(values.mean()), "ci95": 1.96 * std / math.sqrt(values.size),
            "episodes": int(values.size)}


def percent(accuracy: torch.Tensor) -> np.ndarray:
    """Per-episode accuracies ``[E]`` (fractions, any float dtype) as float64 percent on the host."""
    return 100.0 * accuracy.detach().double().cpu().numpy()


def batch_starts(count: int, batch_size: int) -> List[int]:
    """The first episode of each batch when ``count`` episodes are scored ``batch_size`` at a time."""
    return list(range(0, int(count), int(batch_size)))


def evaluate_episodes(learner, episodes, batch_size: int, device, steps: Optional[int] = None,
                      desc: Optional[str] = "evaluate", track_steps: bool = False,
                      cuda_graph: bool = False, log=None, starts: Optional[Sequence[int]] = None
                      ) -> Dict[str, np.ndarray]:
    """Adapt and score every fixed episode, ``batch_size`` tasks per batched call.

    Returns ``{"accuracy": [E] percent, "loss": [E]}`` and, with ``track_steps``,
    ``"accuracy_per_step": [S+1, E]`` percent (step 0 = before adaptation). ``starts``: only the
    batches beginning at these episodes (a share of :func:`batch_starts`, as a torchrun rank of the
    evaluate stage scores), E their episodes in that order; default all of them. ``cuda_graph``
    (CUDA only) records the adaptation of the first full batch as a CUDA graph and replays
    it for the next ones (a last, smaller batch runs eagerly); the results are the same.
    ``log`` (a RunLogger or :class:`tnas.progress.StdoutLog`), when given, gets about ten
    progress lines (tasks done, running accuracy, tasks/s, ETA); validation passes none. A
    capture that fails is one line (through ``log``, else stderr), and eager adaptation from then on.
    """
    evaluate = lambda batch: learner.evaluate(batch, steps=steps, track_steps=track_steps)  # noqa: E731
    if cuda_graph:
        if torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        failure_line = log.log if log is not None else (lambda line: print(line, file=sys.stderr))
        evaluate = GraphedStep(evaluate, warmup=1, on_failure=capture_failure_logger(failure_line))
    accuracies, losses, per_step = [], [], []
    if starts is None:
        batches, total, tasks = episodes.batches(batch_size, device), math.ceil(len(episodes) / batch_size), len(episodes)
    else:
        batches = (episodes.batch(slice(start, start + batch_size), device) for start in starts)
        total, tasks = len(starts), sum(min(batch_size, len(episodes) - start) for start in starts)
    meter = TaskProgress(desc or "evaluate", tasks, total, log=log) if log is not None else None
    for batch in meter.wrap(batches) if meter else progress(batches, total=total, desc=desc):
        stats = evaluate(batch)
        if meter:
            meter.add(stats.query_accuracy.shape[0], stats.query_accuracy)
        accuracies.append(stats.query_accuracy.detach())
        losses.append(stats.query_loss.detach())
        if track_steps and stats.per_step_accuracy is not None:
            per_step.append(stats.per_step_accuracy.detach())
    if not accuracies:  # a torchrun rank left without a batch (fewer batches than ranks)
        return {"accuracy": np.zeros(0), "loss": np.zeros(0)}
    out = {"accuracy": percent(torch.cat(accuracies)),
           "loss": torch.cat(losses).double().cpu().numpy()}
    if per_step:
        out["accuracy_per_step"] = 100.0 * torch.cat(per_step, dim=1).double().cpu().numpy()
    return out


def merge_shares(parts: Sequence[Dict[str, object]], count: int, batch_size: int) -> Dict[str, np.ndarray]:
    """The per-episode results of all ``count`` episodes, in episode order, from the shares of the ranks
    that scored them: each part ``{"starts": [...], "accuracy": [E_r], "loss": [E_r]}``, as
    :func:`evaluate_episodes` returns for those ``starts``. A ValueError when an episode was scored
    twice or by nobody (every episode is averaged exactly once, whatever the world size)."""
    merged = {key: np.full(int(count), np.nan) for key in ("accuracy", "loss")}
    seen = np.zeros(int(count), dtype=bool)
    for part in parts:
        offset = 0
        for start in part["starts"]:
            size = min(batch_size, count - start)
            if size <= 0 or start % batch_size or seen[start:start + size].any():
                raise ValueError(f"the batch of episodes from {start} is not a batch of {count} episodes "
                                 f"at {batch_size} per batch, or was scored twice")
            seen[start:start + size] = True
            for key in merged:
                merged[key][start:start + size] = np.asarray(part[key])[offset:offset + size]
            offset += size
        if offset != len(part["accuracy"]):
            raise ValueError(f"a share holds {len(part['accuracy'])} accuracies for {offset} episodes")
    if not seen.all():
        raise ValueError(f"no result for episode(s) {np.flatnonzero(~seen)[:5].tolist()}")
    return merged


def chunks(count: int, genotypes: int, batch_size: int) -> List[Tuple[int, int]]:
    """``(start, size)`` of the calls scoring ``count`` episodes of each of ``genotypes`` genotypes at once:
    ``max(1, batch_size // genotypes)`` episodes of each per call, the last call the rest."""
    per_call = max(1, batch_size // genotypes)
    return [(start, min(per_call, count - start)) for start in range(0, count, per_call)]


def evaluate_together(learner, episode_ids: Sequence[Sequence[int]], episodes, batch_size: int, steps: Optional[int],
                      device, meter=None) -> List[List[torch.Tensor]]:
    """Adapt and score the genotypes of ``learner`` (a
    :class:`~tnas.meta.genotype_batch.GenotypeBatchLearner`), each on its own episodes of ``episodes``
    (``episodes.batch(ids, device)``, as :class:`~tnas.data.episodes.FixedEpisodes`), all with the same
    number E of episodes, ``batch_size`` tasks per call in all (:func:`chunks`). Returns, per genotype,
    its ``[accuracy [E], loss [E]]`` tensors in its episode order, each episode as the genotype's solo
    learner scores it (per-task fast weights and batch statistics; up to rounding). ``meter``: anything
    with ``add(tasks, accuracy)`` (a :class:`tnas.progress.TaskProgress`), told after every call. Used
    by the protocol's scoring and by the validation of a genotype batch in training."""
    count, rows = len(episode_ids[0]), learner.genotype_count
    if len(episode_ids) != rows or any(len(ids) != count for ids in episode_ids):
        raise ValueError("evaluate_together needs one list of episodes per genotype, all of one length")
    accuracy, loss = [], []
    for start, size in chunks(count, rows, batch_size):
        keys = [tuple(int(i) for i in ids[start:start + size]) for ids in episode_ids]
        loaded = {key: episodes.batch(list(key), device) for key in dict.fromkeys(keys)}  # shared ones once
        batch = stack_batches([loaded[key] for key in keys])
        stats = learner.evaluate(batch, steps=steps)
        accuracy.append(stats.query_accuracy.detach().view(rows, size))
        loss.append(stats.query_loss.detach().view(rows, size))
        if meter is not None:
            meter.add(rows * size, stats.query_accuracy)
    accuracy, loss = torch.cat(accuracy, 1), torch.cat(loss, 1)
    return [[accuracy[g], loss[g]] for g in range(rows)]


def results_record(method: str, dataset: str, n_way: int, k_shot: int, accuracies: Sequence[float],
                   genotypes=None, **extra) -> Dict[str, object]:
    """The ``results.json`` record of an evaluation (docs/design.md section 4), accuracies in percent.

    ``accuracies``: per-episode query accuracy in percent, in episode order. ``genotypes``:
    the evaluated architecture (a genotype dict, or a list of them). ``extra`` fields
    (checkpoint, seed, wall time, ...) follow the standard ones.
    """
    values = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    stats = mean_ci95(values)
    record: Dict[str, object] = {
        "method": method, "dataset": dataset, "n_way": int(n_way), "k_shot": int(k_shot),
        "episodes": stats["episodes"], "accuracy_mean": stats["accuracy_mean"], "ci95": stats["ci95"],
        "per_episode": [float(v) for v in values], "genotypes": genotypes,
    }
    record.update(extra)
    return record


def format_accuracy(record: Dict[str, object]) -> str:
    """One line such as ``5-way 1-shot glyphs: 63.42 ± 1.21% (600 episodes)``."""
    return (f"{record['n_way']}-way {record['k_shot']}-shot {record['dataset']}: "
            f"{record['accuracy_mean']:.2f} \u00b1 {record['ci95']:.2f}% ({record['episodes']} episodes)")
