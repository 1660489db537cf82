"""From-scratch training of G genotypes at once, each into its own run directory as a solo run writes it.

:func:`tnas.stages.train.train_genotypes` with ``genotypes_per_batch > 1`` calls :func:`train_group`
for each group of genotypes still to train. A group trains as one
:class:`~tnas.meta.genotype_batch.GenotypeBatchLearner` (see docs/genotype_batching.md), but every
genotype keeps a solo :class:`~tnas.engine.MetaTrainer` of its own, built exactly as the solo train
stage builds it (seeded run directory, network, episode sampler, validation episodes, summary). The
batch only replaces the meta-step: each iteration stacks the G samplers' meta-batches, steps the batch
once and hands each genotype's share of the statistics to its trainer. Before anything is written
(a periodic ``last.pt``, the end of an epoch, an interrupt) each genotype's rows are copied back into
its solo learner. At the end of an epoch the batch learner validates all genotypes at once on their
common validation episodes (:meth:`BatchedTrainer.validate`, each episode scored as the solo learner
scores it), and each genotype's own trainer takes its numbers, keeps ``best.pt`` by ITS validation
accuracy and writes ``last.pt`` / ``train.json`` / log lines. So the outputs are a solo run's: ``evaluate``,
``restore`` and ``--resume`` of one genotype work unchanged, and a group whose runs all stopped at the
same iteration resumes as a batch.

With the same seed each genotype gets its solo initial parameters and task stream, so its results
equal its solo run's up to float rounding (drop-path aside: other random masks, same distribution).
``--cuda_graph auto|on|off`` is resolved as for a solo run (auto: graphs on one CUDA device) and
the batch's untracked meta-steps replay one CUDA graph (:func:`batch_step`); a capture that fails
runs eager steps, said in each genotype's log. What the batch cannot take is said in the log:
genotypes of different shapes fall back to solo runs, runs in different states (new and interrupted,
or interrupted at different iterations) train as one batch per state, and a group that runs out of
CUDA memory is halved and retried (out of memory in validation: fewer episodes per call, at last each
genotype validated alone).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from tnas import distributed, guard
from tnas.engine import MetaTrainer, StopRequest, validation_record
from tnas.errors import TnasError
from tnas.evaluate import chunks, evaluate_together, percent
from tnas.genotypes import genotype_from_dict, resolve_genotype, save_genotype
from tnas.meta.cuda_graph import make_optimizers_capturable
from tnas.meta.genotype_batch import GenotypeBatchLearner, stack_batches
from tnas.meta.maml_pp import MAMLPlusPlus
from tnas.models.complexity import count_macs
from tnas.models.genotype_batch import GenotypeBatchNetwork
from tnas.progress import TrainingProgress, progress_bar
from tnas.checkpoints import load_checkpoint
from tnas.stages import common
from tnas.stages import train as train_stage

Log = Callable[[str], None]


class _ShapeMismatch(Exception):
    """Genotypes of different shapes (nodes per cell, concat length, ...): they cannot share a batch."""


def free_device_memory() -> None:
    """Give the CUDA memory of what is gone back to the device: collect reference cycles first (a
    failed step's frames, an optimiser's), then empty torch's cache. Nothing on a CPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory(error: BaseException) -> bool:
    """True for a CUDA out-of-memory error (``torch.OutOfMemoryError`` or its message)."""
    kind = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (kind is not None and isinstance(error, kind)) or "CUDA out of memory" in str(error)


def log_all(trainers: Sequence[MetaTrainer]) -> Log:
    """One line into the log of every trainer of a batch."""
    def log(line: str) -> None:
        for trainer in trainers:
            trainer.logger.log(line)
    return log


def common_validation(trainers: Sequence[MetaTrainer]) -> bool:
    """Whether every trainer validates on the same episodes (one FixedEpisodes, or equal ones of one split)
    with the same number of adaptation steps, as the trainers of one train setting do."""
    lead = trainers[0]
    first = lead.val_episodes

    def same(episodes) -> bool:
        return episodes is first or (
            getattr(episodes, "split", None) is getattr(first, "split", False)
            and (episodes.n_way, episodes.k_shot, episodes.q_query) == (first.n_way, first.k_shot, first.q_query)
            and np.array_equal(episodes.indices, first.indices))

    return all(same(trainer.val_episodes) and trainer.val_steps == lead.val_steps for trainer in trainers)


class _CallBar:
    """A progress bar advanced once per scoring call: :func:`evaluate_together`'s ``meter``, shown as the
    solo validation's bar is (a terminal only, no log lines)."""

    def __init__(self, total: int, desc: str):
        self.bar = progress_bar(total=total, desc=desc)

    def add(self, tasks: int, accuracy=None) -> None:
        self.bar.update(1)


class BatchedTrainer:
    """Steps G solo :class:`MetaTrainer` s (one per genotype, same schedule and position) through one
    :class:`GenotypeBatchLearner` and validates them together; each trainer still keeps the epoch
    records, checkpoints and logs of its genotype."""

    def __init__(self, learner: GenotypeBatchLearner, trainers: Sequence[MetaTrainer], log: Log,
                 step: Optional[Callable[[Any, bool], Any]] = None):
        """``step(batch, track)``: the batch's meta-step (:func:`batch_step`; default eager)."""
        self.learner = learner
        self.trainers = list(trainers)
        self.log = log
        self.step = step or batch_step(learner, False)
        lead = self.trainers[0]
        self.schedule, self.device = lead.schedule, lead.device
        if any((t.epoch, t.iteration) != (lead.epoch, lead.iteration) for t in self.trainers):
            raise ValueError("the trainers of a genotype batch must stand at the same iteration")
        # validation episodes of each genotype per call (--val_batch_size, as alone); 0: each trainer alone
        self.val_per_genotype = self.schedule.val_batch_size
        if len(self.trainers) > 1 and not common_validation(self.trainers):
            self.val_per_genotype = 0
            log_all(self.trainers)("the genotypes of this batch have different validation episodes or steps; "
                                   "each is validated alone")

    def sync(self) -> None:
        """Copy each genotype's rows (parameters, learned rates, Adam moments) into its solo learner and set
        that learner's schedules to the last iteration, as a solo run's learner stands after its step."""
        per_epoch = self.schedule.iterations_per_epoch
        for g, trainer in enumerate(self.trainers):
            trainer.learner.load_state_dict(self.learner.genotype_state_dict(g))
            trainer.learner.set_progress(max(trainer.iteration - 1, 0), per_epoch, self.schedule.epochs)

    def save_last(self) -> None:
        self.sync()
        for trainer in self.trainers:
            trainer.save_last()

    def validate(self) -> List[Optional[Dict[str, float]]]:
        """Each genotype's validation fields of the epoch record (``val_accuracy``, ``val_ci95``), all
        genotypes adapted and scored at once by the batch learner on their common validation episodes,
        ``--val_batch_size`` episodes of each per call. Every episode is scored as the genotype's solo
        learner scores it, so the numbers are its solo trainer's (up to float rounding). Out of CUDA
        memory: half as many episodes per call, said in every log; when even one episode each does not
        fit, None for every genotype (from then on): each trainer validates its genotype alone."""
        lead, rows = self.trainers[0], len(self.trainers)
        ids = list(range(len(lead.val_episodes)))
        while self.val_per_genotype > 0:
            tasks = self.val_per_genotype * rows  # per call, over all genotypes
            bar = _CallBar(len(chunks(len(ids), rows, tasks)), f"validate {rows} genotypes epoch {lead.epoch}")
            try:
                scored = evaluate_together(self.learner, [ids] * rows, lead.val_episodes, tasks, lead.val_steps,
                                           self.device, bar)
            except RuntimeError as error:
                if not out_of_memory(error):
                    raise
                scored = None
            finally:
                bar.bar.close()
            if scored is not None:
                return [validation_record(percent(accuracy)) for accuracy, _ in scored]
            free_device_memory()
            self.val_per_genotype //= 2
            log_all(self.trainers)(
                f"out of device memory validating {rows} genotypes at once; "
                + (f"retrying with {self.val_per_genotype} episodes of each per call" if self.val_per_genotype
                   else "validating each genotype alone"))
        return [None] * rows

    def run(self) -> None:
        """Train every genotype until ``schedule.epochs`` are done (the summaries: each trainer's)."""
        schedule, lead = self.schedule, self.trainers[0]
        per_epoch = schedule.iterations_per_epoch
        for trainer in self.trainers:  # the non-finite checks name iterations from here, as in MetaTrainer.run
            trainer._pending_first_iteration = trainer.iteration
        # each genotype's progress lines in its own log, as its solo run writes them (rate: its own tasks)
        meters = [TrainingProgress(trainer.stage, schedule.epochs, per_epoch, schedule.tasks_per_batch,
                                   schedule.log_every, trainer.logger if trainer.is_main else None)
                  for trainer in self.trainers]
        with StopRequest() as stop:
            while lead.epoch < schedule.epochs:
                first = lead.iteration - lead.epoch * per_epoch
                bar = progress_bar(range(first, per_epoch), total=per_epoch, initial=first,
                               desc=f"train {len(self.trainers)} genotypes epoch {lead.epoch + 1}/{schedule.epochs}")
                for meter in meters:
                    meter.start_epoch(lead.epoch, lead.iteration, bar)
                for _ in bar:
                    iteration = lead.iteration
                    track = schedule.log_every > 0 and iteration % schedule.log_every == 0
                    self.learner.set_progress(iteration, per_epoch, schedule.epochs)
                    batch = stack_batches([trainer.samplers["train"].sample() for trainer in self.trainers])
                    stats = self.step(batch, track)
                    grads_ok = guard.gradients_finite(self.learner, self.device)  # one flag for the batch
                    for trainer, meter, share in zip(self.trainers, meters, self.learner.split_stats(stats)):
                        trainer.record_step(share, grads_ok)
                        meter.add(share)
                        if track:
                            trainer.check_finite()
                            meter.report(trainer.iteration, trainer.elapsed())
                            trainer.log_step(share)
                    if stop.requested:
                        self.save_last()
                        for trainer in self.trainers:
                            trainer.log_interrupted()
                        raise KeyboardInterrupt
                    if lead.checkpoint_due():
                        self.save_last()
                self.sync()
                for trainer, validation in zip(self.trainers, self.validate()):
                    trainer.end_epoch(validation)


def batch_step(learner: GenotypeBatchLearner, cuda_graph: bool, log: Optional[Log] = None
               ) -> Callable[[Any, bool], Any]:
    """The batch's meta-step ``step(batch, track)``, as the solo train stage builds its own: with
    ``cuda_graph`` (a resolved ``--cuda_graph``) every untracked step replays one CUDA graph, captured
    again whenever the learner's per-epoch settings change (MAML++), its optimiser made capturable; a
    capture that fails is one line through ``log`` and eager steps from then on. Call it after any
    state (a resumed run's Adam moments) is loaded into ``learner``."""
    if cuda_graph:
        make_optimizers_capturable(learner.optimizers.values())
    return common.graph_meta_step(learner, cuda_graph, key=learner.settings_key, log=log)


def synthetic_batch(settings, image_shape: Sequence[int], genotypes: int,
                    tasks_per_genotype: Optional[int] = None) -> "EpisodeBatch":  # noqa: F821
    """A meta-batch of the run's shape for ``genotypes`` genotypes (random images, balanced labels, on
    the CPU): ``support_x [G*T, n_way*k_shot, *image_shape]``, ..., T = ``tasks_per_genotype``
    (default ``--tasks_per_batch``)."""
    from tnas.data.episodes import EpisodeBatch

    per_genotype = settings.schedule.tasks_per_batch if tasks_per_genotype is None else tasks_per_genotype
    data, tasks = settings.data, genotypes * per_genotype
    generator = torch.Generator().manual_seed(0)

    def part(per_class: int):
        images = torch.randn(tasks, data.n_way * per_class, *image_shape, generator=generator)
        labels = torch.arange(data.n_way).repeat_interleave(per_class).expand(tasks, -1).contiguous()
        return images, labels

    return EpisodeBatch(*part(data.k_shot), *part(data.q_query))


def training_peak(meta_step: int, validation: int, resident: int, graphed: bool) -> int:
    """The peak bytes of a batch's training from the peaks (all above the same baseline) of its
    meta-steps and of one validation call, ``resident`` of which are the learner and its batch. A CUDA
    graph's private memory pool keeps a meta-step's working memory (``meta_step - resident``) reserved
    while validation runs eagerly, so graphed the two add up; eagerly each frees its memory and the
    larger peak is the run's."""
    if graphed:
        return int(meta_step + validation - resident)
    return int(max(meta_step, validation))


def measure_peak_memory(settings, genotypes: Sequence[Dict[str, Any]], image_shape: Sequence[int],
                        device: torch.device) -> int:
    """Peak CUDA memory (bytes, above what was allocated before) of training ``genotypes`` as one batch: a
    fresh batch learner of the run's settings, one meta-step on a synthetic meta-batch of the run's shape
    at the first and one at the last position of the schedule (MAML++ may switch to second order or
    drop the multi-step loss later), then one validation call (``--val_batch_size`` synthetic episodes of
    each genotype, adapted ``--inner_steps_test`` steps and scored), combined by :func:`training_peak`
    for the run's resolved ``--cuda_graph``; then everything freed. Draws nothing from the global
    generators."""
    device = torch.device(device)
    graphed = train_stage.check_settings(settings).enabled
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    schedule = common.schedule_from_args(settings.schedule)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]):
        networks = [train_stage._build_network(settings, genotype_from_dict(g), tuple(image_shape), device)
                    for g in genotypes]
        learner = GenotypeBatchLearner(GenotypeBatchNetwork.from_networks(networks),
                                       train_stage.maml_config(settings, device))
        batch = synthetic_batch(settings, image_shape, len(genotypes)).to(device)
        last = schedule.epochs * schedule.iterations_per_epoch - 1
        for iteration in sorted({0, max(last, 0)}):
            learner.set_progress(iteration, schedule.iterations_per_epoch, schedule.epochs)
            learner.meta_step(batch)
        torch.cuda.synchronize(device)
        meta_step = torch.cuda.max_memory_allocated(device) - before
        del batch
        resident = torch.cuda.memory_allocated(device) - before
        torch.cuda.reset_peak_memory_stats(device)
        episodes = synthetic_batch(settings, image_shape, len(genotypes), settings.schedule.val_batch_size)
        learner.evaluate(episodes.to(device), steps=settings.maml.inner_steps_test)
        torch.cuda.synchronize(device)
        validation = torch.cuda.max_memory_allocated(device) - before
    del learner, networks, episodes
    free_device_memory()
    return training_peak(meta_step, validation, resident, graphed)


def _last_iteration(run_dir: str) -> Optional[int]:
    """The iteration of ``run_dir``'s ``last.pt`` (None when it cannot be read)."""
    try:
        return int(load_checkpoint(os.path.join(run_dir, "last.pt"))["iteration"])
    except (TnasError, KeyError, TypeError, ValueError, OSError):
        return None


def _solo_trainer(settings, genotype: Dict[str, Any], run_dir: str, resume: bool, splits, log: Log,
                  graph: common.GraphDecision):
    """One genotype's solo trainer, set up exactly as :func:`tnas.stages.train.run` sets it up
    (seeded before its network is built; ``graph``: the batch's resolved ``--cuda_graph``, logged);
    returns (trainer, an unwrapped copy of its network, splits)."""
    genotype_path = os.path.join(run_dir, "genotype.json")
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(genotype_path):
        save_genotype(genotype_from_dict(genotype), genotype_path)
    wanted = settings.replace(genotype=genotype_path, out=run_dir, resume=resume)
    log(f"{'resuming the interrupted' if resume else 'starting the'} from-scratch {settings.maml.method} "
        f"run in {run_dir}")
    train_stage.check_settings(wanted)
    flags = argparse.Namespace(**wanted.to_flags())
    run_dir, logger, device = common.prepare_run(flags, "train")
    logger.log(graph.reason)
    try:
        if splits is None:
            splits = common.load_splits(flags, ("train", "val"), logger)
        image_shape = tuple(splits["train"].image_shape)
        solved = resolve_genotype(genotype_path)
        model = train_stage._build_network(wanted, solved, image_shape, device)
        counted = {**count_macs(model, image_shape), "parameters": sum(p.numel() for p in model.parameters())}
        source = copy.deepcopy(model)  # MAMLPlusPlus may rebuild BatchNorms; the batch takes the plain network
        config = train_stage.maml_config(wanted, device)
        learner = MAMLPlusPlus(model, config)
        summary = train_stage._summary(wanted, model, learner, image_shape, counted)
        if resume:
            train_stage.check_resumable(run_dir, summary, logger)
        save_genotype(solved, os.path.join(run_dir, "genotype.json"))
        trainer = train_stage._trainer(wanted, learner, splits, run_dir, logger, device, summary, True, False)
        if resume:
            trainer.resume()
        logger.log(train_stage._describe(wanted, config, summary, device, run_dir, graph.enabled))
    except BaseException:
        logger.close()
        raise
    return trainer, source, splits


def _train_batch(settings, items, log: Log) -> List[train_stage.GenotypeResult]:
    """Train ``items`` ((genotype, run_dir, resume, log) each, all new or all at one iteration) as one batch."""
    trainers: List[MetaTrainer] = []
    started = time.perf_counter()
    try:
        with distributed.local_process():
            graph = train_stage.check_settings(settings)  # --cuda_graph, as a solo run resolves it
            sources, splits = [], None
            for genotype, run_dir, resume, genotype_log in items:
                trainer, source, splits = _solo_trainer(settings, genotype, run_dir, resume, splits, genotype_log,
                                                        graph)
                trainers.append(trainer)
                sources.append(source)
            try:
                batch = GenotypeBatchNetwork.from_networks(sources)
            except ValueError as error:
                raise _ShapeMismatch(" ".join(str(error).split())) from None
            learner = GenotypeBatchLearner(batch, trainers[0].learner.config)
            for g, trainer in enumerate(trainers):
                learner.load_genotype_state_dict(g, trainer.learner.state_dict())
            dirs = ", ".join(trainer.run_dir for trainer in trainers)
            log_all(trainers)(f"trained in a batch of {len(trainers)} genotypes ({dirs}), "
                              f"{'replayed as CUDA graphs' if graph.enabled else 'eagerly'}; validated together; "
                              f"each genotype gets its solo run's result")
            begun = time.time()
            for trainer in trainers:
                trainer.share_clock(begun, 1.0 / len(trainers))
            # a capture failure: one line in every genotype's log
            BatchedTrainer(learner, trainers, log, batch_step(learner, graph.enabled, log_all(trainers))).run()
            summaries = [common.run_trainer(trainer, trainer.logger, "train.json") for trainer in trainers]
    finally:
        for trainer in trainers:
            trainer.logger.close()
    share = (time.perf_counter() - started) / len(items)  # the batch's time, split evenly over its genotypes
    return [train_stage.GenotypeResult("resumed" if resume else "trained", summary, share)
            for (_, _, resume, _), summary in zip(items, summaries)]


def train_group(settings, genotypes: Sequence[Dict[str, Any]], out_dirs: Sequence[str], logs: Sequence[Log],
                log: Log) -> List[train_stage.GenotypeResult]:
    """Train one group of genotypes (at most ``--genotypes_per_batch``) as a batch where it can; solo runs
    where it cannot (said in ``log``); a CUDA out-of-memory error halves the group and retries."""
    def solo(indices):
        return [(i, train_stage.train_one_genotype(settings, genotypes[i], out_dirs[i], logs[i])) for i in indices]

    def attempt(indices) -> List:
        if len(indices) == 1:
            return solo(indices)
        statuses = {i: train_stage.genotype_run_status(out_dirs[i], genotypes[i], settings) for i in indices}
        done = [i for i in indices if statuses[i] == "done"]
        left = [i for i in indices if statuses[i] != "done"]
        if len(left) < 2:
            return solo(done + left)
        states = {i: (statuses[i], _last_iteration(out_dirs[i]) if statuses[i] == "resume" else None) for i in left}
        unreadable = [i for i in left if states[i] == ("resume", None)]
        groups: Dict[Any, List[int]] = {}
        for i in left:
            if i not in unreadable:
                groups.setdefault(states[i], []).append(i)
        if unreadable or len(groups) > 1:  # a batch steps all its runs at once: one state per batch
            log(f"genotypes {', '.join(out_dirs[i] for i in left)}: runs in different states (new, or interrupted "
                f"at different iterations); training the runs of each state together, as "
                f"{len(groups)} batch(es){f' and {len(unreadable)} alone' if unreadable else ''}")
            return solo(done + unreadable) + [pair for group in groups.values() for pair in attempt(group)]
        items = [(genotypes[i], out_dirs[i], statuses[i] == "resume", logs[i]) for i in left]
        try:
            results = _train_batch(settings, items, log)
        except _ShapeMismatch as error:
            log(f"cannot batch {len(left)} genotypes ({error}); training them one at a time")
            return solo(done + left)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not out_of_memory(error):
                raise
            results = None
        if results is None:  # retried outside the handler: its traceback held the failed batch's memory
            free_device_memory()
            half = (len(left) + 1) // 2
            log(f"out of device memory with a batch of {len(left)} genotypes; retrying with batches of {half}")
            return solo(done) + attempt(left[:half]) + attempt(left[half:])
        return solo(done) + list(zip(left, results))

    by_index = dict(attempt(list(range(len(genotypes)))))
    return [by_index[i] for i in range(len(genotypes))]
