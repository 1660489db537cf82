"""Flags and set-up shared by the stages: episodes, schedule, run directory, data splits, and the
``--cuda_graph`` flag, its decision and the graphed meta-step (:func:`graph_meta_step`)."""
from __future__ import annotations

import argparse
import functools
import os
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch

from tnas import distributed, precision, run_dir
from tnas.config import resolve_device, save_config, seed_everything, set_threads
from tnas.data import check_episode_shape, get_dataset, load_split
from tnas.engine import Schedule
from tnas.errors import TnasError
from tnas.hparams import log_hparams
from tnas.meta.cuda_graph import (DataParallelGraphedStep, GraphDecision, GraphedStep, GraphGradients,  # noqa: F401
                                  KeyedGraphedStep, capture_failure_logger, cuda_graph_mode, resolve_cuda_graph)
from tnas.runlog import RunLogger, remove_event_files
from tnas.stages.settings import rerun_free_flags
from tnas.task_folding import TaskWindow


def add_episode_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("episodes")
    group.add_argument("--n_way", type=int, default=5, help="classes per task (N-way)")
    group.add_argument("--k_shot", type=int, default=1, help="support images per class (K-shot)")
    group.add_argument("--q_query", type=int, default=15, help="query images per class")
    group.add_argument("--tasks_per_batch", type=int, default=4, help="tasks per meta-batch")
    group.add_argument("--img_size", type=int, default=None, help="image side in pixels (default: the dataset's)")
    group.add_argument("--augment", action="store_true", help="random flips/shifts of meta-training images")
    group.add_argument("--normalize", choices=("split", "imagenet"), default="split",
                       help="pixel mean/std: the train split's or ImageNet's (the original code's, "
                            "mini-ImageNet presets; RGB only)")
    group.add_argument("--resize", choices=("lanczos", "bilinear"), default="lanczos",
                       help="how images are resized to --img_size when cached: Lanczos or bilinear "
                            "(the original code's, mini-ImageNet presets); each has its own cache entry")
    group.add_argument("--rotations", action=argparse.BooleanOptionalAction, default=False,
                       help="Omniglot: each character also rotated by 90, 180 and 270 degrees as three new "
                            "classes, in every split (x4 classes; the usual Omniglot protocol, its presets)")


def add_schedule_args(parser: argparse.ArgumentParser, epochs: int, tasks_per_epoch: int) -> None:
    group = parser.add_argument_group("schedule")
    group.add_argument("--epochs", type=int, default=epochs, help="epochs of meta-training (each ends with a validation)")
    group.add_argument("--tasks_per_epoch", type=int, default=tasks_per_epoch,
                       help="meta-training tasks (episodes) per epoch; --tasks_per_batch of them per meta-iteration")
    group.add_argument("--task_pool", type=int, default=0, metavar="N",
                       help="meta-train on a fixed pool of N episodes drawn once and reshuffled at every pass, "
                            "as the original code (5,000 search, 15,000 from scratch); 0: fresh episodes for "
                            "every meta-batch")
    group.add_argument("--val_episodes", type=int, default=200,
                       help="fixed validation episodes scored after each epoch")
    group.add_argument("--val_batch_size", type=int, default=50, help="validation episodes adapted at once (memory, not results)")
    group.add_argument("--log_every", type=int, default=50, help="meta-iterations between logged steps")
    group.add_argument("--checkpoint_every", type=int, default=200, help="meta-iterations between last.pt saves")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    group.add_argument("--resume_override", action="store_true",
                       help="with --resume: accept changed hyper-parameters (recorded per epoch in overrides.json)")
    group.add_argument("--amp", action="store_true",
                       help="bf16 autocast (meta-gradients within a cosine of 0.94-0.99 of fp32; see README)")
    group.add_argument("--tf32", action="store_true",
                       help="TF32 tensor cores for CUDA matmuls and cuDNN convolutions during the run (GPU; "
                            "restored when the run ends; stated tolerance in tests/test_precision.py)")


def add_network_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("network")
    group.add_argument("--C", type=int, default=16, help="channels of the first cell (doubled at each reduction)")
    group.add_argument("--layers", type=int, default=2, help="number of cells (2: normal + reduction, the paper)")


def add_meta_learning_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "meta-learning" flag group with the inner-step counts every meta-training stage takes;
    returns the group so a stage adds its own learning rates to it."""
    group = parser.add_argument_group("meta-learning")
    group.add_argument("--inner_steps", type=int, default=5, help="inner SGD steps per task in meta-training")
    group.add_argument("--inner_steps_test", type=int, default=10, help="inner SGD steps per task at validation")
    add_cuda_graph_arg(group)
    return group


class _CudaGraphAction(argparse.Action):
    """``--cuda_graph [auto|on|off]``: a mode through :func:`cuda_graph_mode` (bare: on, the old switch)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, cuda_graph_mode(values))
        except ValueError as error:
            parser.error(str(error))


def add_cuda_graph_arg(group) -> None:
    """The one definition of ``--cuda_graph auto|on|off`` (every stage that can replay CUDA graphs), and
    ``--no-cuda_graph``, a flag of its own that takes no value and means off (the old switch's spelling).
    A config file sets ``cuda_graph: auto|on|off`` (or true/false) through ``--cuda_graph``, its first flag."""
    group.add_argument("--cuda_graph", action=_CudaGraphAction, nargs="?", const="on", default="auto",
                       metavar="auto|on|off",
                       help="replay each untracked step as one CUDA graph. auto: on a CUDA device (under torchrun "
                            "that splits meta-batches, each step's gradients, summed and stepped eagerly) unless a "
                            "setting changes inside a graph; eager on a CPU or then, with a log line saying why; on "
                            "(also the bare flag): an error where impossible; off: eager")
    group.add_argument("--no-cuda_graph", dest="cuda_graph", action="store_const", const="off",
                       default=argparse.SUPPRESS, help="the same as --cuda_graph off")


def check_cuda_graph(args, blocker: Optional[str] = None) -> GraphDecision:
    """Resolve ``--cuda_graph`` for this run (:func:`tnas.meta.cuda_graph.resolve_cuda_graph`): graphs
    need a CUDA device and no ``blocker`` (a setting that would change inside a graph); under
    torchrun data parallelism the gradients are graphed (:func:`graph_meta_step`). ``on`` where
    impossible is a one-line error. Call before :func:`prepare_run`, so nothing is written; log the
    decision's ``reason`` once the log is open."""
    try:
        return resolve_cuda_graph(getattr(args, "cuda_graph", "off"), resolve_device(args.device),
                                  distributed.splits_meta_batches(), blocker, device_flag=args.device)
    except ValueError as error:
        raise TnasError(str(error)) from None


def graph_untracked(call: Callable[[Any, bool], Any], enabled: bool,
                    key: Optional[Callable[[], Hashable]] = None,
                    log: Optional[Callable[[str], None]] = None,
                    params: Sequence[torch.Tensor] = ()) -> Callable[[Any, bool], Any]:
    """``call(batch, track)`` with its untracked calls replayed as a CUDA graph when ``enabled``.

    Tracked calls (per-step statistics at ``--log_every``) take extra forwards, so they run
    eagerly; they update the same parameter and optimiser tensors that the graph reads.
    ``key()``, if given, returns the Python-side settings the call reads (a schedule's
    learning rate, say); the graph is captured again whenever they change. A capture that fails
    is one line through ``log`` and eager steps from then on. ``params``: the tensors whose ``.grad``
    the call sets; after a replay they are the graph's, as the call wrote them
    (:class:`~tnas.meta.cuda_graph.GraphGradients`).
    """
    if not enabled:
        return call
    untracked = lambda batch: call(batch, False)  # noqa: E731
    on_failure = capture_failure_logger(log or print)
    graphed = (GraphedStep(untracked, on_failure=on_failure) if key is None
               else KeyedGraphedStep(untracked, key, on_failure=on_failure))
    if params:
        graphed = GraphGradients(graphed, params)

    def step(batch, track: bool):
        return call(batch, True) if track else graphed(batch)

    step.graphed = graphed
    return step


def graph_meta_step(learner, enabled: bool, key: Optional[Callable[[], Hashable]] = None,
                    log: Optional[Callable[[str], None]] = None, **groups) -> Callable[[Any, bool], Any]:
    """``step(batch, track)``: ``learner.meta_step(batch, track_steps=track, **groups)`` (``groups``:
    ``adapt_groups`` / ``update_groups``), its untracked calls replayed as CUDA graphs when ``enabled``.

    In one process the whole step is one graph (:func:`graph_untracked`). Under data
    parallelism (``learner.gradient_hook`` set, :func:`data_parallel`) only the gradients are:
    :class:`~tnas.meta.cuda_graph.DataParallelGraphedStep` replays ``learner.meta_gradients`` and
    runs the hook (the all-reduce) and ``learner.apply_gradients`` eagerly after it, the phases
    ``meta_step`` runs in turn. ``key`` and ``log`` as for :func:`graph_untracked`.
    """
    def call(batch, track: bool):
        return learner.meta_step(batch, track_steps=track, **groups)

    update_groups = groups.get("update_groups")
    if not enabled or learner.gradient_hook is None:
        return graph_untracked(call, enabled, key=key, log=log, params=learner.stepped_params(update_groups))
    graphed = DataParallelGraphedStep(lambda batch: learner.meta_gradients(batch, **groups),
                                      learner.stepped_params(update_groups), learner.gradient_hook,
                                      lambda: learner.apply_gradients(update_groups), key=key,
                                      on_failure=capture_failure_logger(log or print))

    def step(batch, track: bool):
        return call(batch, True) if track else graphed(batch)

    step.graphed = graphed
    return step


def schedule_from_args(args) -> Schedule:
    """The trainer's :class:`~tnas.engine.Schedule` of the schedule flags (or ``ScheduleSettings``)."""
    return Schedule(epochs=args.epochs, tasks_per_epoch=args.tasks_per_epoch, tasks_per_batch=args.tasks_per_batch,
                    log_every=args.log_every, checkpoint_every=args.checkpoint_every,
                    val_batch_size=args.val_batch_size)


def default_run_dir(args, stage: str) -> str:
    return os.path.join("runs", f"{stage}_{args.dataset}_{args.n_way}w{args.k_shot}s")


def check_positive(args, *names: str, minimum: Optional[int] = None) -> None:
    """One-line error unless each flag is > 0 (or, with ``minimum``, >= minimum); None passes."""
    for name in names:
        value = getattr(args, name, None)
        if value is None:
            continue
        if (value <= 0) if minimum is None else (value < minimum):
            raise TnasError(f"--{name} must be {'positive' if minimum is None else f'>= {minimum}'}, got {value}")


def prepare_run(args, stage: str) -> Tuple[str, RunLogger, torch.device]:
    """Resolve the device, join torchrun's process group, seed, make the run directory, save
    ``config.yaml``, open the log; on a GPU, turn on cuDNN's algorithm search, and TF32 with
    ``--tf32`` until the log closes (:func:`tnas.precision.hold_tf32`).

    A directory that already holds a run is only reused with ``--resume``, so nothing is
    overwritten by accident. Under torchrun only rank 0 writes files and logs; each rank
    gets its own device (``cuda:LOCAL_RANK``).
    """
    set_threads(getattr(args, "threads", None))
    device = resolve_device(args.device)
    info = distributed.init_distributed(device)
    device = distributed.local_device(device, info)
    # Every meta-batch has the same shapes, so cuDNN's one-off algorithm search pays for
    # itself (3% of a graphed T-NAS meta-iteration on an H200); eager warm-ups precede any
    # CUDA graph capture, so the search never runs inside one.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    seed_everything(args.seed)
    args.out = args.out or default_run_dir(args, stage)
    resume = getattr(args, "resume", False)
    notes = []
    changes = _claim_and_check(args, stage, info, resume, device, notes)
    release_dir = functools.partial(run_dir.release_run_dir, args.out)  # the run owns --out until its log closes
    release_tf32 = precision.hold_tf32(getattr(args, "tf32", False), device, notes.append)  # until the log closes

    def release() -> None:
        release_tf32()
        release_dir()

    try:
        if info.is_main:
            saved = {key: old for key, (old, new) in changes.items()}  # config.yaml keeps how the run started
            save_config(dict(vars(args), **saved), os.path.join(args.out, "config.yaml"))
            if not resume:  # no last.pt here (checked above): an attempt killed before it, whose points go
                dropped = remove_event_files(os.path.join(args.out, "tb"))
                if dropped:
                    notes.append(f"tensorboard: removed {dropped} event file(s) of an earlier attempt that was "
                                 f"stopped before its first checkpoint")
        distributed.barrier(info)
        log_dir = args.out if info.is_main else os.path.join(args.out, f"rank{info.rank}")
        logger = RunLogger(log_dir, use_tensorboard=info.is_main, quiet=not info.is_main, append=resume,
                           on_close=release)
    except BaseException:
        release()
        raise
    for note in notes:
        logger.log(note)
    if changes:
        logger.log(f"resuming with --resume_override: {', '.join(f'{k}: {o!r} -> {n!r}' for k, (o, n) in changes.items())} "
                   f"(recorded in {os.path.join(args.out, run_dir.OVERRIDES_FILE)})")
    return args.out, logger, device


def _claim_and_check(args, stage: str, info, resume: bool, device: torch.device, notes: list) -> dict:
    """Rank 0 claims ``--out`` (exclusive lock) and checks a resume before anything is written; a
    failure there stops every rank with the same one-line error. Returns the accepted overrides;
    ``notes`` gets a line for flags the run's config.yaml predates that the resume turns on."""
    check_positive(args, "log_every", "checkpoint_every", minimum=0)
    last = os.path.join(args.out, "last.pt")
    changes, problem = {}, None
    if info.is_main:
        try:
            if resume and not os.path.exists(last):
                raise TnasError(f"--resume: no checkpoint to resume in {args.out} (expected {last})")
            if not resume and os.path.exists(last):
                raise TnasError(f"{args.out} already holds a run ({last}); pass --resume to continue it "
                                f"or choose another --out")
            run_dir.claim_run_dir(args.out)
            if resume:
                free = run_dir.FREE_KEYS | rerun_free_flags()
                changes, epoch, iteration = run_dir.check_resume(args, args.out, stage, free)
                new = run_dir.flags_new_since_start(args, args.out, free)
                if new:
                    notes.append(f"resuming with flags this run's config.yaml predates (its epochs so far ran "
                                 f"without them): {', '.join(f'--{k} {v!r}' for k, v in new.items())}")
                if changes or run_dir.read_overrides(args.out):  # also none, once some were: they end here
                    run_dir.record_overrides(args.out, changes, epoch, iteration)
        except TnasError as error:
            problem = error
    if not distributed.all_ranks_true(problem is None, device):
        raise problem or TnasError(f"rank 0 could not set up the run directory {args.out} (see its error)")
    if problem is not None:
        raise problem
    return changes


def data_parallel(learner, tasks_per_batch: int) -> slice:
    """Set ``learner`` up for torchrun data parallelism; returns this rank's slice of each meta-batch.

    Each rank computes ``tasks_per_batch / world_size`` tasks of every meta-batch (the same
    draws on all ranks), scales its loss by its share, and sums gradients over ranks before
    the optimisers step: the result equals one process on the whole meta-batch. A model that
    draws random numbers per task (the derived network's drop-path) gets the rank's
    :class:`~tnas.task_folding.TaskWindow` as its ``task_window``: it draws for the whole
    meta-batch and keeps its slice, so its masks too are the one process's.
    """
    info = distributed.current_info()
    part = distributed.task_slice(tasks_per_batch, info)
    if info.enabled:
        learner.loss_scale = distributed.loss_scale(tasks_per_batch, info)
        learner.gradient_hook = distributed.sum_gradients
        if hasattr(learner.model, "task_window"):
            learner.model.task_window = TaskWindow.of(part, tasks_per_batch)
    return part


def load_splits(args, names=("train", "val"), logger: Optional[RunLogger] = None) -> Dict[str, object]:
    """The dataset's splits at ``--img_size``, from the uint8 cache; checks each can supply the episodes.
    When the data chose the image size or channels (``folder``), ``logger`` gets a line saying why."""
    splits = {name: load_split(args.dataset, name, data_path=args.data_path, img_size=args.img_size,
                               cache_dir=args.cache_dir, **data_settings(args)) for name in names}
    for split in splits.values():
        check_episode_shape(split, args.n_way, args.k_shot, args.q_query)
    notes = {getattr(split, "shape_note", None) for split in splits.values()} - {None}
    if logger is not None:
        for note in sorted(notes):
            logger.log(note)
    return splits


def data_settings(args) -> Dict[str, Any]:
    """``{"normalize", "resize"}`` of the flags (defaults where a stage has none), and ``"rotations":
    True`` with ``--rotations``; a run's summary records them so that evaluation loads its images
    (and classes) the same way. They are :func:`tnas.data.load_split`'s keyword arguments."""
    settings: Dict[str, Any] = {"normalize": getattr(args, "normalize", None) or "split",
                                "resize": getattr(args, "resize", None) or "lanczos"}
    if getattr(args, "rotations", False):
        settings["rotations"] = True
    return settings


def check_data_options(data) -> None:
    """A one-line error for a dataset option its dataset does not have (``--rotations`` is Omniglot's)."""
    if getattr(data, "rotations", False) and "rotations" not in get_dataset(data.dataset).options:
        raise TnasError(f"--rotations: dataset '{data.dataset}' has no rotated classes (only omniglot has)")


def image_channels(split) -> int:
    return int(split.image_shape[0])


def amp_dtype(settings) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp`` (bf16), None without it."""
    return torch.bfloat16 if getattr(settings, "amp", False) else None


def run_trainer(trainer, logger: RunLogger, summary_file: str) -> Dict[str, object]:
    """Run ``trainer`` to the end, log the best epoch, always close the log; returns the summary."""
    try:
        result = trainer.run()
        if trainer.is_main:
            log_hparams(logger, trainer.run_dir, result)
        if result["best"] is not None:
            logger.log(f"best epoch {result['best_epoch']}: validation {result['best_val_accuracy']:.2f}% "
                       f"(summary in {os.path.join(trainer.run_dir, summary_file)}, checkpoint {trainer.best_path})")
    finally:
        logger.close()
    return result
