"""The meta-training loop shared by every stage: epochs, validation, checkpoints, logs, resume.

A stage (search, from-scratch training) gives a :class:`MetaTrainer` a learner, its
episode samplers and a ``step`` function that takes one meta-iteration; the trainer runs
epochs of ``tasks_per_epoch`` tasks, validates on fixed episodes of the validation
classes after each epoch, keeps ``best.pt`` by validation accuracy and ``last.pt`` for
resuming (both written atomically), logs to ``log.txt`` and tensorboard, and writes the
stage's JSON summary. A resumed run continues exactly: optimiser, sampler and RNG states
(the torch ones of every data-parallel rank) are in ``last.pt``, and the tensorboard events
logged after it are dropped. A non-finite loss or gradient (or parameter, before a save) stops
the run naming the iteration, keeping the last good checkpoint untouched; Ctrl-C (SIGINT) or
SIGTERM saves ``last.pt`` and stops.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np
import torch

from tnas import distributed, guard, run_dir
from tnas.errors import TnasError
from tnas.evaluate import evaluate_episodes, mean_ci95
from tnas.meta.learner import StepStats
from tnas.precision import precision_name
from tnas.progress import TrainingProgress, progress_bar
from tnas.checkpoints import load_checkpoint, save_checkpoint
from tnas.files import atomic_write_json
from tnas.runlog import RunLogger

StepFn = Callable[[int, bool], StepStats]
"""``step(iteration, track_steps) -> StepStats``: one meta-iteration (samples its own batch)."""
EpochHook = Callable[[int, Dict[str, object]], Optional[Dict[str, object]]]
"""``hook(epoch, record) -> extra fields for the epoch record`` (e.g. the decoded genotype)."""


class NonFiniteLoss(TnasError):
    """The meta-training loss, a gradient or a parameter became NaN or infinite."""


@dataclass
class Schedule:
    """How long to train and how often to log, validate and checkpoint."""

    epochs: int = 10
    tasks_per_epoch: int = 5000
    tasks_per_batch: int = 4
    log_every: int = 50
    checkpoint_every: int = 200
    val_batch_size: int = 50

    @property
    def iterations_per_epoch(self) -> int:
        return max(1, math.ceil(self.tasks_per_epoch / self.tasks_per_batch))


def validation_record(accuracies) -> Dict[str, float]:
    """The validation fields of an epoch record from per-episode accuracies (percent, ``[E]``):
    ``val_accuracy`` (mean) and ``val_ci95`` (:func:`tnas.evaluate.mean_ci95`)."""
    stats = mean_ci95(accuracies)
    return {"val_accuracy": stats["accuracy_mean"], "val_ci95": stats["ci95"]}


def rng_state() -> Dict[str, object]:
    """Python, numpy and torch RNG states (CUDA too when present), as tensors and plain data only
    (numpy's key as a list of ints), so checkpoints load with ``weights_only=True``."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": [int(k) for k in numpy_state["state"]["key"]],
                            "pos": int(numpy_state["state"]["pos"])}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, object]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # plain form (see rng_state); older checkpoints hold numpy's tuple
        numpy_state = dict(numpy_state, state=dict(numpy_state["state"],
                                                   key=np.asarray(numpy_state["state"]["key"], dtype=np.uint32)))
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw; a run resumed on fewer (or more) GPUs sets those it has
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def checkpoint_rng_states() -> List[Dict[str, object]]:
    """Every data-parallel rank's :func:`rng_state`, in rank order, on rank 0 (``[]`` on the others; one
    entry for a single process). A collective: every rank calls it at the same checkpoint.

    The ranks' torch generators (CPU, and each rank's own GPU) can drift apart during training: a
    rank's CUDA generator is only ever advanced by that rank, and any draw a rank makes for its own
    work alone sets its generators apart (drop-path masks, ``--drop_path_prob``, do not: every rank
    draws them for the whole meta-batch and keeps its slice's, :class:`tnas.task_folding.TaskWindow`).
    So a checkpoint holds all of them, and each rank of a resume gets its own back
    (:func:`rng_state_for_this_rank`). Python's and numpy's generators and the episode samplers
    advance alike on every rank (same seed, same draws), so rank 0's stand for all.
    """
    gathered = distributed.gather_to_main_on_host(rng_state(), distributed.current_info())
    return gathered if gathered is not None else []


def rng_state_for_this_rank(state: Mapping[str, object]) -> tuple:
    """``(rng state, note)``: this rank's entry of a checkpoint's ``rank_rngs`` when it was saved by
    as many processes as this run has, else the saving rank 0's ``rng`` with a one-line note saying
    why (None when nothing changed: a single process resuming a single process's checkpoint)."""
    info = distributed.current_info()
    ranks = state.get("rank_rngs") or []
    saved_by = max(len(ranks), 1)
    if saved_by == info.world_size:
        return (ranks[info.rank] if ranks else state["rng"]), None
    return state["rng"], (f"the checkpoint holds the random states of {saved_by} process(es), this run has "
                          f"{info.world_size}: every process continues from rank 0's (on GPUs, drop-path "
                          f"masks may differ from an uninterrupted run's)")


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetaTrainer:
    """Epochs of meta-iterations with validation, checkpoints and logs.

    Args:
        learner: a :class:`~tnas.meta.learner.MetaLearner` (its state is checkpointed).
        samplers: name -> EpisodeSampler used by ``step`` (their states are checkpointed).
        step: one meta-iteration (see :data:`StepFn`).
        val_episodes: fixed validation episodes (FixedEpisodes of the validation classes).
        run_dir, logger: where outputs go.
        schedule: epochs, tasks per epoch, intervals.
        stage: names the summary file ``{stage}.json`` and the log tags.
        summary: fixed fields copied into the summary (method, dataset, n_way, ...).
        epoch_hook: called after validation each epoch; its dict joins the epoch record.
        best_hook: called on the main process with the epoch's record whenever ``best.pt`` is written
            (the search writes the best epoch's genotype then).
        is_main: only the main process writes files (data-parallel runs).
    """

    def __init__(self, learner, samplers: Mapping[str, object], step: StepFn, val_episodes, run_dir: str,
                 logger: RunLogger, schedule: Schedule, device: torch.device, stage: str = "search",
                 summary: Optional[Mapping[str, object]] = None, epoch_hook: Optional[EpochHook] = None,
                 val_steps: Optional[int] = None, is_main: bool = True,
                 best_hook: Optional[Callable[[Dict[str, object]], None]] = None):
        self.learner = learner
        self.samplers = dict(samplers)
        self.step = step
        self.val_episodes = val_episodes
        self.run_dir = run_dir
        self.logger = logger
        self.schedule = schedule
        self.device = device
        self.stage = stage
        self.summary = dict(summary or {})
        self.epoch_hook = epoch_hook
        self.best_hook = best_hook
        self.val_steps = val_steps
        self.is_main = is_main
        self.epoch = 0
        self.iteration = 0  # global meta-iteration count
        self.history: List[Dict[str, object]] = []
        self.best: Optional[Dict[str, object]] = None
        self._epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
        self._epoch_accuracy = torch.zeros((), dtype=torch.float64, device=device)
        self._epoch_tasks = 0
        self._pending_losses: List[torch.Tensor] = []
        self._pending_grads: List[torch.Tensor] = []  # per iteration: its gradients were finite
        self.overrides: Dict[str, object] = {}  # settings a --resume_override changed (each epoch records them)
        self._pending_first_iteration = 0
        self._started = time.time()
        self._elapsed_before = 0.0
        self._time_share = 1.0  # of the wall time since _started that is this run's (see share_clock)

    # -- paths ----------------------------------------------------------------------------
    @property
    def last_path(self) -> str:
        return os.path.join(self.run_dir, "last.pt")

    @property
    def best_path(self) -> str:
        return os.path.join(self.run_dir, "best.pt")

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self, rank_rngs: Optional[List[Dict[str, object]]] = None,
                   tensorboard: Optional[Mapping[str, object]] = None) -> Dict[str, object]:
        """The checkpoint. ``rank_rngs``: every data-parallel rank's RNG state
        (:func:`checkpoint_rng_states`, gathered at the same point by all ranks); rank 0's is also
        ``rng``. Without it (a single process) ``rng`` is this process's. ``tensorboard``: the
        checkpoint's mark in the event files (:meth:`tnas.runlog.RunLogger.mark_checkpoint`), to
        which a resume cuts them back."""
        state = {
            "stage": self.stage,
            "summary": self.summary,
            "learner": self.learner.state_dict(),
            "samplers": {name: sampler.state_dict() for name, sampler in self.samplers.items()},
            "epoch": self.epoch,
            "iteration": self.iteration,
            "history": self.history,
            "best": self.best,
            "epoch_sums": {"loss": self._epoch_loss.cpu(), "accuracy": self._epoch_accuracy.cpu(),
                           "tasks": self._epoch_tasks},
            "rng": rank_rngs[0] if rank_rngs else rng_state(),
            "elapsed_s": self.elapsed(),
            "tensorboard": dict(tensorboard) if tensorboard else None,
        }
        if rank_rngs and len(rank_rngs) > 1:
            state["rank_rngs"] = list(rank_rngs)
        return state

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.learner.load_state_dict(state["learner"])
        for name, sampler in self.samplers.items():
            sampler.load_state_dict(state["samplers"][name])
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.best = state["best"]
        sums = state["epoch_sums"]
        self._epoch_loss = sums["loss"].to(self.device)
        self._epoch_accuracy = sums["accuracy"].to(self.device)
        self._epoch_tasks = int(sums["tasks"])
        rng, note = rng_state_for_this_rank(state)
        set_rng_state(rng)
        if note is not None:
            self.logger.log(note)
        self._elapsed_before = float(state.get("elapsed_s", 0.0))

    def resume(self, path: Optional[str] = None) -> None:
        """Continue from ``last.pt`` (or ``path``)."""
        path = path or self.last_path
        state = load_checkpoint(path)
        if state.get("stage") != self.stage:
            raise TnasError(f"{path} is a '{state.get('stage')}' checkpoint, not '{self.stage}'")
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            reason = " ".join(str(error).split())[:300]
            raise TnasError(f"--resume: {path} does not fit this run's model or samplers: {reason}") from None
        self.overrides = run_dir.active_overrides(self.run_dir)
        if self.is_main:  # the points the killed run logged after the checkpoint would show twice
            note = self.logger.rewind_tensorboard(state.get("tensorboard"))
            if note is not None:
                self.logger.log(note)
        self.logger.log(f"resumed from {path}: epoch {self.epoch}, iteration {self.iteration}")

    def check_finite(self, parameters: bool = False) -> None:
        """Raise :class:`NonFiniteLoss` naming the first iteration since the last check whose loss or
        gradients were not finite (with ``parameters``, before a save: also the parameters). The flags
        are stacked and read in one host sync."""
        if not self._pending_losses and not parameters:
            return
        count = len(self._pending_losses)
        flags = [torch.isfinite(loss.mean()) for loss in self._pending_losses] + \
                [flag.to(self.device) for flag in self._pending_grads]
        if parameters:
            flags.append(guard.parameters_finite(self.learner, self.device))
        finite = torch.stack(flags)
        if not distributed.all_ranks_true(bool(finite.all()), self.device):
            kept = self.last_path if os.path.exists(self.last_path) else "none yet"
            if bool(finite.all()):  # another rank saw it
                raise NonFiniteLoss(f"non-finite meta-training loss or gradient on another process before iteration "
                                    f"{self.iteration} (epoch {self.epoch}); stopped; last good checkpoint: {kept}")
            losses, grads = finite[:count], finite[count:2 * count]
            per_iteration = losses & grads
            if bool(per_iteration.all()):
                raise NonFiniteLoss(f"non-finite parameters after iteration {self.iteration - 1} "
                                    f"(epoch {self.epoch}); stopped; last good checkpoint: {kept}")
            index = int((~per_iteration).nonzero()[0, 0])
            what = "meta-training loss" if not bool(losses[index]) else "gradient (under a finite loss)"
            raise NonFiniteLoss(f"non-finite {what} at iteration {self._pending_first_iteration + index} "
                                f"(epoch {self.epoch}); stopped; last good checkpoint: {kept}")
        self._pending_losses = []
        self._pending_grads = []
        self._pending_first_iteration = self.iteration

    def save_last(self) -> None:
        """Write ``last.pt`` (rank 0); every rank calls it at the same iteration (its finite check and
        RNG gather are collectives)."""
        self.check_finite(parameters=True)
        rank_rngs = checkpoint_rng_states()
        if self.is_main:
            save_checkpoint(self.state_dict(rank_rngs, self.logger.mark_checkpoint(self.iteration)), self.last_path)

    def checkpoint_due(self) -> bool:
        """Whether ``last.pt`` is due after the current iteration (``--checkpoint_every``)."""
        every = self.schedule.checkpoint_every
        return every > 0 and self.iteration % every == 0

    def log_interrupted(self) -> None:
        """The log line of a run stopped by Ctrl-C / SIGTERM after its ``last.pt`` was saved."""
        self.logger.log(f"interrupted at iteration {self.iteration}; saved {self.last_path}; "
                        f"rerun with --resume to continue")

    def elapsed(self) -> float:
        """This run's wall time so far (over all its invocations; see :meth:`share_clock`)."""
        return self._elapsed_before + self._time_share * (time.time() - self._started)

    def share_clock(self, started: float, share: float) -> None:
        """Count as this run's time ``share`` of the wall time since ``started`` (``time.time()``): a
        genotype batch trains G runs in one process, so each run's ``wall_time_s`` (and the protocol's
        cost, which sums them) is the batch's time split evenly, 1/G of it, not all of it."""
        self._started, self._time_share = started, share

    # -- the loop ----------------------------------------------------------------------------
    def validate(self) -> Dict[str, float]:
        """This learner's validation fields of the epoch record (:func:`validation_record`)."""
        result = evaluate_episodes(self.learner, self.val_episodes, self.schedule.val_batch_size, self.device,
                                   steps=self.val_steps, desc=f"validate epoch {self.epoch}")
        return validation_record(result["accuracy"])

    def log_step(self, stats: StepStats) -> None:
        summary = stats.summary()
        self.logger.scalars({k: v for k, v in summary.items()}, self.iteration, prefix="meta_train/")
        if stats.per_step_loss is not None:
            for step, value in enumerate(stats.per_step_loss.float().mean(dim=1).tolist()):
                self.logger.scalar(f"meta_train/loss_step{step}", value, self.iteration)

    def record_step(self, stats: StepStats, grads_ok: Optional[torch.Tensor]) -> None:
        """Account one meta-iteration's statistics (``[T]`` tensors) and its gradient finiteness flag
        (None: no gradients to check) in the epoch sums and the pending non-finite checks; advance the
        iteration. A genotype-batched trainer (:mod:`tnas.stages.batched_train`) calls it per genotype."""
        self._pending_losses.append(stats.query_loss.detach())
        self._pending_grads.append(grads_ok if grads_ok is not None else
                                   torch.ones((), dtype=torch.bool, device=self.device))
        self._epoch_loss += stats.query_loss.detach().double().sum()
        self._epoch_accuracy += stats.query_accuracy.detach().double().sum()
        self._epoch_tasks += int(stats.query_accuracy.shape[0])
        self.iteration += 1

    def run(self) -> Dict[str, object]:
        """Train until ``schedule.epochs`` are done; returns the summary written to ``{stage}.json``."""
        schedule = self.schedule
        per_epoch = schedule.iterations_per_epoch
        self._pending_first_iteration = self.iteration
        meter = TrainingProgress(self.stage, schedule.epochs, per_epoch, schedule.tasks_per_batch,
                                 schedule.log_every, self.logger if self.is_main else None)
        with StopRequest() as stop:
            while self.epoch < schedule.epochs:
                first = self.iteration - self.epoch * per_epoch
                bar = progress_bar(range(first, per_epoch), total=per_epoch, initial=first,
                               desc=f"{self.stage} epoch {self.epoch + 1}/{schedule.epochs}")
                meter.start_epoch(self.epoch, self.iteration, bar)
                for _ in bar:
                    track = schedule.log_every > 0 and self.iteration % schedule.log_every == 0
                    stats = self.step(self.iteration, track)
                    self.record_step(stats, guard.gradients_finite(self.learner, self.device))
                    meter.add(stats)
                    if track:
                        self.check_finite()
                        meter.report(self.iteration, self.elapsed())
                        if self.is_main:
                            self.log_step(stats)
                    if distributed.any_rank_stopping(stop.requested):  # all ranks stop at one iteration
                        self.save_last()
                        self.log_interrupted()
                        raise KeyboardInterrupt
                    if self.checkpoint_due():
                        self.save_last()
                self.end_epoch()
        return self.write_summary()

    def end_epoch(self, validation: Optional[Mapping[str, float]] = None) -> None:
        """Close an epoch: finiteness check, validation, the epoch record, best.pt / last.pt / summary.
        ``validation``: this epoch's validation fields when they were computed elsewhere (a genotype
        batch validates all its genotypes at once, :mod:`tnas.stages.batched_train`); else :meth:`validate`."""
        self.check_finite(parameters=True)
        sums = distributed.sum_across_ranks(torch.stack([
            self._epoch_loss, self._epoch_accuracy,
            torch.tensor(float(self._epoch_tasks), dtype=torch.float64, device=self.device)]))
        tasks = max(float(sums[2]), 1.0)
        record: Dict[str, object] = {
            "epoch": self.epoch + 1,
            "iteration": self.iteration,
            "train_loss": float(sums[0]) / tasks,
            "train_accuracy": 100.0 * float(sums[1]) / tasks,
        }
        record.update(self.validate() if validation is None else validation)
        if self.epoch_hook is not None:
            record.update(self.epoch_hook(self.epoch + 1, record) or {})
        if self.overrides:
            record["overrides"] = dict(self.overrides)
        record["elapsed_s"] = self.elapsed()
        record["precision"] = precision_name(getattr(self.learner, "amp_dtype", None), torch.device(self.device))
        self.history.append(record)
        if self.is_main:
            self.logger.scalars({"train_accuracy": record["train_accuracy"], "train_loss": record["train_loss"],
                                 "val_accuracy": record["val_accuracy"]}, self.epoch + 1, prefix="epoch/")
            self.logger.log(f"epoch {record['epoch']}: meta-train {record['train_accuracy']:.2f}%, "
                            f"validation {record['val_accuracy']:.2f} +- {record['val_ci95']:.2f}%")
        improved = self.best is None or record["val_accuracy"] > self.best["val_accuracy"]
        self.epoch += 1
        self._epoch_loss.zero_()
        self._epoch_accuracy.zero_()
        self._epoch_tasks = 0
        if improved:
            self.best = record
        rank_rngs = checkpoint_rng_states()  # every rank: a collective
        if self.is_main:
            state = self.state_dict(rank_rngs, self.logger.mark_checkpoint(self.iteration))  # after this epoch's points
            if improved:
                save_checkpoint(state, self.best_path)
                if self.best_hook is not None:
                    self.best_hook(record)
            save_checkpoint(state, self.last_path)
            self.write_summary()

    def write_summary(self) -> Dict[str, object]:
        summary = dict(self.summary)
        summary.update({
            "stage": self.stage,
            "epochs_done": self.epoch,
            "epochs": self.schedule.epochs,
            "history": self.history,
            "best_epoch": self.best["epoch"] if self.best else None,
            "best_val_accuracy": self.best["val_accuracy"] if self.best else None,
            "best": self.best,
            "wall_time_s": self.elapsed(),
        })
        if self.is_main:
            atomic_write_json(os.path.join(self.run_dir, f"{self.stage}.json"), summary)
        return summary
