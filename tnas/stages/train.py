"""The from-scratch training stage: MAML (T-NAS, auto-MAML, the MAML baseline) or MAML++ (T-NAS++) of a network.

The derived :class:`~tnas.models.network.Network` of ``--genotype`` (a published name, a
genotype JSON file or a search run directory), or with ``--model conv4`` MAML's Conv-4
baseline (``--filters`` channels, no genotype), is meta-trained on the meta-train classes;
after each epoch it is adapted on fixed episodes of the *validation* classes, and
``best.pt`` keeps the epoch with the best validation accuracy.

Outputs in the run directory: ``config.yaml``, ``log.txt``, ``tb/``, ``last.pt``,
``best.pt``, ``genotype.json`` (the trained architecture; not for Conv-4) and ``train.json`` (per-epoch
meta-train and validation accuracy in percent, the best epoch, the parameter and MAC
counts, and in ``"model"`` / ``"learner"`` everything :func:`tnas.stages.restore.build_learner` needs).

``--method maml`` (default) is first-order MAML (``--second_order`` for exact MAML);
``--method maml++`` switches on every MAML++ component (per-step BN, learned per-step inner
learning rates, multi-step loss, derivative-order annealing, cosine meta learning rate),
each of which is also a flag of its own (``--no-per_step_bn`` etc. to leave one out).

Library use: ``run(TrainSettings)`` trains one network; :func:`train_genotypes` trains (or resumes,
or skips when already done) one run per genotype, which is how the T-NAS protocol calls it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from tnas import distributed
from tnas.config import HelpFormatter, add_common_args, load_config, to_plain
from tnas.data import EpisodeSampler, FixedEpisodes
from tnas.engine import MetaTrainer
from tnas.errors import TnasError
from tnas.genotypes import canonical_key, genotype_from_dict, resolve_genotype, save_genotype
from tnas.meta.cuda_graph import make_optimizers_capturable
from tnas.meta.maml_pp import COSINE_UNITS, MAMLConfig, MAMLPlusPlus
from tnas.models.complexity import count_macs
from tnas.models import factory
from tnas.runlog import load_checkpoint, read_json
from tnas.stages import common
from tnas.stages.settings import (DataSettings, NetworkSettings, RunSettings, ScheduleSettings, Settings,
                                  differences, free, register_part)

METHODS = ("maml", "maml++")
MAML_PP_SWITCHES = ("per_step_bn", "learn_inner_lr", "multi_step_loss", "cosine_lr")


# -- settings ------------------------------------------------------------------------------------
@register_part
@dataclass(frozen=True)
class MAMLSettings(Settings):
    """The learner's flags: ``method`` and the MAML++ switches (None: on for maml++, off for maml)."""

    method: str = "maml"
    inner_steps: int = 5
    inner_steps_test: int = 10
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    weight_decay: float = 0.0
    drop_path_prob: float = 0.0
    second_order: bool = False
    per_step_bn: Optional[bool] = None
    learn_inner_lr: Optional[bool] = None
    multi_step_loss: Optional[bool] = None
    msl_epochs: int = 10
    first_order_epochs: Optional[int] = None
    cosine_lr: Optional[bool] = None
    min_meta_lr: float = 1e-5
    cosine_unit: str = "epoch"
    grad_clamp: Optional[float] = None


@dataclass(frozen=True)
class TrainSettings(Settings):
    """Everything a from-scratch training run reads. ``genotype``: a published name, a genotype JSON
    file or a search run directory (rerun-free: the protocol compares genotypes themselves)."""

    genotype: Optional[str] = free()
    model: str = "network"
    filters: int = 32
    data: DataSettings = DataSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    network: NetworkSettings = NetworkSettings()
    maml: MAMLSettings = MAMLSettings()
    run: RunSettings = RunSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a genotype's network from scratch with MAML or MAML++ "
                                                 "(best checkpoint by validation accuracy).",
                                     formatter_class=HelpFormatter)
    add_common_args(parser)
    parser.add_argument("--genotype", default=None, metavar="NAME|JSON|RUN_DIR",
                        help="published name (auto_maml_1shot, auto_maml_5shot), genotype JSON file, or a run "
                             "directory (a search's best_genotype.json, the genotype of its best.pt; else its "
                             "genotype.json) (required for --model network)")
    parser.add_argument("--model", choices=factory.MODELS, default="network",
                        help="network: the derived network of --genotype; conv4: MAML's 4-block baseline "
                             "(--filters channels; --genotype, --C, --layers, --drop_path_prob unused)")
    parser.add_argument("--filters", type=int, default=32,
                        help="Conv-4 channels per block (MAML: 32 on mini-ImageNet, 64 on Omniglot)")
    parser.add_argument("--method", choices=METHODS, default="maml",
                        help="maml: (first-order) MAML; maml++: every MAML++ component on")
    common.add_episode_args(parser)
    common.add_network_args(parser)
    common.add_schedule_args(parser, epochs=15, tasks_per_epoch=15000)
    group = common.add_meta_learning_args(parser)
    group.add_argument("--inner_lr", type=float, default=0.01, help="inner SGD learning rate (initial, if learned)")
    group.add_argument("--meta_lr", type=float, default=1e-3, help="outer Adam learning rate")
    group.add_argument("--weight_decay", type=float, default=0.0,
                       help="outer Adam weight decay on the network (the original auto-MAML from-scratch script: "
                            "3e-4; its T-NAS from-scratch training: none)")
    group.add_argument("--drop_path_prob", type=float, default=0.0, help="probability of dropping each path of a cell in meta-training (0: none)")
    group.add_argument("--second_order", action="store_true",
                       help="exact (second-order) MAML; default first order")
    group = parser.add_argument_group("MAML++ (on by default with --method maml++)")
    group.add_argument("--per_step_bn", action=argparse.BooleanOptionalAction, default=None,
                       help="BatchNorm weights and biases per inner step")
    group.add_argument("--learn_inner_lr", action=argparse.BooleanOptionalAction, default=None,
                       help="meta-learn an inner learning rate per parameter tensor and inner step")
    group.add_argument("--multi_step_loss", action=argparse.BooleanOptionalAction, default=None,
                       help="query loss after every inner step, weights annealed to the last over --msl_epochs")
    group.add_argument("--msl_epochs", type=int, default=10, help="epochs over which --multi_step_loss anneals to the last step's loss alone")
    group.add_argument("--first_order_epochs", type=int, default=None,
                       help="derivative-order annealing: first order for this many epochs, then second order "
                            "(default: none for maml, a third of --epochs for maml++)")
    group.add_argument("--cosine_lr", action=argparse.BooleanOptionalAction, default=None,
                       help="cosine annealing of the meta learning rate towards --min_meta_lr over the run (MAML++'s schedule: a period of the whole run, so the last epoch ends a little above it)")
    group.add_argument("--min_meta_lr", type=float, default=1e-5, help="the meta learning rate --cosine_lr anneals towards")
    group.add_argument("--cosine_unit", choices=COSINE_UNITS, default="epoch",
                       help="step the cosine schedule per epoch or per meta-iteration")
    group.add_argument("--grad_clamp", type=float, default=None, metavar="C",
                       help="clamp every network meta-gradient element to [-C, C] before the outer Adam step, "
                            "as MAML++'s code does on ImageNet-type data with 10 (default: off)")
    return parser


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    """The typed settings of the parsed flags (the CLI layer's only conversion)."""
    return TrainSettings.from_flags(vars(args))


def maml_config(settings: TrainSettings, device: Optional[torch.device] = None) -> MAMLConfig:
    """The learner settings; ``method maml++`` turns on every switch that is not set explicitly."""
    maml = settings.maml
    plus = maml.method == "maml++"
    switches = {name: plus if getattr(maml, name) is None else bool(getattr(maml, name)) for name in MAML_PP_SWITCHES}
    first_order_epochs = maml.first_order_epochs
    if first_order_epochs is None and plus:
        first_order_epochs = settings.schedule.epochs // 3  # MAML++: first order for the first third of training
    return MAMLConfig(inner_steps=maml.inner_steps, inner_steps_test=maml.inner_steps_test, inner_lr=maml.inner_lr,
                      meta_lr=maml.meta_lr, first_order=not maml.second_order, msl_epochs=maml.msl_epochs,
                      first_order_epochs=first_order_epochs, min_meta_lr=maml.min_meta_lr,
                      cosine_unit=maml.cosine_unit, weight_decay=maml.weight_decay, grad_clamp=maml.grad_clamp,
                      amp_dtype=common.amp_dtype(settings.run) if device else None,
                      **switches)


def check_settings(settings: TrainSettings) -> common.GraphDecision:
    """One-line errors for settings the stage cannot run, before anything is written (sizes out of
    range, ``--cuda_graph on`` where graphs cannot run); returns the resolved ``--cuda_graph``.
    Graphs need a CUDA device, a meta-batch kept in one process, and no cosine learning rate that
    changes every iteration (a graph freezes it until the next capture, once per epoch)."""
    common.check_positive(settings.data, "n_way", "k_shot", "q_query")
    common.check_data_options(settings.data)
    common.check_positive(settings.schedule, "tasks_per_batch", "epochs", "tasks_per_epoch", "val_episodes",
                          "val_batch_size")
    common.check_positive(settings.network, "C", "layers")
    common.check_positive(settings, "filters")
    common.check_positive(settings.maml, "inner_steps", "inner_steps_test", "meta_lr", "grad_clamp")
    maml = settings.maml
    common.check_positive(maml, "weight_decay", minimum=0)
    if not 0.0 <= maml.drop_path_prob < 1.0:
        raise TnasError(f"--drop_path_prob must be in [0, 1), got {maml.drop_path_prob}")
    if maml.msl_epochs < 0 or (maml.first_order_epochs is not None and maml.first_order_epochs < 0):
        raise TnasError("--msl_epochs and --first_order_epochs must be >= 0")
    blocker = None
    if maml_config(settings).cosine_lr and maml.cosine_unit != "epoch":
        blocker = (f"--cosine_unit epoch (a graph freezes the learning rate until the next capture), "
                   f"got --cosine_unit {maml.cosine_unit}")
    return common.check_cuda_graph(settings.run, blocker)


# -- resuming ------------------------------------------------------------------------------------
STRUCTURAL_LEARNER_KEYS = ("inner_steps", "per_step_bn", "learn_inner_lr")
"""Learner settings that shape the checkpoint (per-step BN sets, learned rates); the others may change on resume."""


def check_resumable(run_dir: str, summary: Mapping[str, object], logger=None) -> None:
    """A one-line error when ``--resume`` would continue a run of another network (genotype, C,
    layers, ...) or a learner of another shape; changed schedule settings are only logged."""
    saved = load_checkpoint(os.path.join(run_dir, "last.pt")).get("summary", {})
    old_model, new_model = to_plain(saved.get("model")), to_plain(summary["model"])
    if old_model is not None and old_model != new_model:
        keys = [k for k in sorted(set(old_model) | set(new_model)) if old_model.get(k) != new_model.get(k)]
        detail = ", ".join("genotype differs" if k == "genotype" else f"{k}: {old_model.get(k)} -> {new_model.get(k)}"
                           for k in keys)
        raise TnasError(f"--resume: {run_dir} holds another network ({detail}); use the same --genotype and "
                        f"network flags, or another --out")
    old_learner, new_learner = to_plain(saved.get("learner") or {}), to_plain(summary["learner"])
    changed = [k for k in sorted(set(old_learner) | set(new_learner)) if old_learner.get(k) != new_learner.get(k)]
    structural = [k for k in changed if k in STRUCTURAL_LEARNER_KEYS]
    if structural:
        detail = ", ".join(f"{k}: {old_learner.get(k)} -> {new_learner.get(k)}" for k in structural)
        raise TnasError(f"--resume: {run_dir} was trained with another learner ({detail}); use the same flags "
                        f"or another --out")
    if changed and logger is not None:
        logger.log("resuming with changed settings: " + ", ".join(
            f"{k}: {old_learner.get(k)} -> {new_learner.get(k)}" for k in changed))


# -- the stage -----------------------------------------------------------------------------------
def _build_network(settings: TrainSettings, genotype, image_shape, device) -> torch.nn.Module:
    """The genotype's derived network, or Conv-4 with ``--model conv4``, on ``device``."""
    smallest = factory.smallest_image(settings.model, settings.network.layers)
    if min(image_shape[1:]) < smallest:
        what = "--model conv4" if settings.model == "conv4" else f"--layers {settings.network.layers}"
        raise TnasError(f"images of {image_shape[1]}x{image_shape[2]} are too small for {what} "
                        f"(need at least {smallest}; see --img_size)")
    network = settings.network
    return factory.build_network(settings.model, settings.data.n_way, image_shape, genotype, C=network.C,
                                 layers=network.layers, filters=settings.filters,
                                 drop_path_prob=settings.maml.drop_path_prob).to(device)


def _summary(settings: TrainSettings, model: torch.nn.Module, learner: MAMLPlusPlus, image_shape,
             counted: Dict[str, Any]) -> Dict[str, object]:
    """The run's ``train.json`` head: task shape, complexity (``counted``: :func:`count_macs` of the
    network before the learner wraps it) and what rebuilds the learner."""
    data = settings.data
    return {"method": settings.maml.method, "dataset": data.dataset, "n_way": data.n_way, "k_shot": data.k_shot,
            "q_query": data.q_query, "image_shape": list(image_shape), "genotype_source": settings.genotype if settings.model == "network" else None,
            "model": model.config, "learner": learner.config.to_dict(),
            "drop_path_prob": settings.maml.drop_path_prob, "parameters": counted["parameters"],
            "macs": counted["macs"], "macs_source": counted["macs_source"],
            "meta_learned_parameters": learner.parameter_count(), **common.data_settings(data)}


def _trainer(settings: TrainSettings, learner: MAMLPlusPlus, splits, run_dir, logger, device, summary, is_main,
             cuda_graph: bool):
    """The MetaTrainer of one run: episode sampler, fixed validation episodes, the (graphed) step."""
    data, schedule = settings.data, common.schedule_from_args(settings.schedule)
    sampler = EpisodeSampler(splits["train"], n_way=data.n_way, k_shot=data.k_shot, q_query=data.q_query,
                             tasks_per_batch=schedule.tasks_per_batch, device=device, seed=settings.run.seed,
                             augment=data.augment, task_pool=settings.schedule.task_pool,
                             task_slice=common.data_parallel(learner, schedule.tasks_per_batch))
    val_episodes = FixedEpisodes.generate(splits["val"], data.n_way, data.k_shot, data.q_query,
                                          episodes=settings.schedule.val_episodes, seed=settings.run.seed + 1)
    per_epoch = schedule.iterations_per_epoch
    meta_step = common.graph_meta_step(learner, cuda_graph, key=learner.settings_key, log=logger.log)

    def step(iteration: int, track: bool):
        learner.set_progress(iteration, per_epoch, schedule.epochs)
        return meta_step(sampler.sample(), track)

    def epoch_hook(epoch: int, record: Dict[str, object]) -> Dict[str, object]:
        # the schedules as after the epoch's last step, also when a resume ran none of its steps
        learner.set_progress(max(int(record["iteration"]) - 1, 0), per_epoch, schedule.epochs)
        return {"meta_lr": learner.optimizers["weights"].param_groups[0]["lr"],
                "first_order": learner.first_order, "multi_step_loss": learner.multi_step_loss_active()}

    return MetaTrainer(learner, {"train": sampler}, step, val_episodes, run_dir, logger, schedule, device,
                       stage="train", summary=summary, epoch_hook=epoch_hook,
                       val_steps=settings.maml.inner_steps_test, is_main=is_main)


def _describe(settings: TrainSettings, config: MAMLConfig, summary, device, run_dir, cuda_graph: bool) -> str:
    switches = [name for name in MAML_PP_SWITCHES if getattr(config, name)]
    if config.first_order_epochs is not None:
        switches.append(f"first order for {config.first_order_epochs} epoch(s), then second order")
    else:
        switches.append(f"{'first' if config.first_order else 'second'} order")
    if cuda_graph:
        switches.append("CUDA graphs, captured again when an epoch changes the settings")
    data = settings.data
    subject = f"Conv-4 ({settings.filters} filters)" if settings.model == "conv4" else f"genotype {settings.genotype}"
    return (f"train ({settings.maml.method}: {', '.join(switches)}) of {subject} on "
            f"{data.dataset} {data.n_way}-way {data.k_shot}-shot, device {device}; {summary['parameters']:,} "
            f"parameters, {summary['macs'] / 1e6:.2f}M MACs per image ({summary['macs_source']}); "
            f"run directory {run_dir}")


def run(settings: TrainSettings) -> Dict[str, object]:
    """Train the network of ``settings.genotype`` from scratch; returns the summary (``train.json``)."""
    if isinstance(settings, argparse.Namespace):  # parsed flags (callers not yet converted)
        settings = settings_from_args(settings)
    conv4 = settings.model == "conv4"
    if not settings.genotype and not conv4:
        raise TnasError("--genotype is required: a published name (auto_maml_1shot, auto_maml_5shot), "
                        "a genotype JSON file or a search run directory")
    graph = check_settings(settings)
    genotype = None if conv4 else resolve_genotype(settings.genotype)
    flags = argparse.Namespace(**settings.to_flags())
    run_dir, logger, device = common.prepare_run(flags, "train")
    logger.log(graph.reason)
    try:
        splits = common.load_splits(flags, ("train", "val"), logger)
        image_shape = tuple(splits["train"].image_shape)
        model = _build_network(settings, genotype, image_shape, device)
        # counted before the learner gives the network per-step BatchNorm
        counted = {**count_macs(model, image_shape), "parameters": sum(p.numel() for p in model.parameters())}
        config = maml_config(settings, device)
        learner = MAMLPlusPlus(model, config)
        summary = _summary(settings, model, learner, image_shape, counted)
        if settings.run.resume:
            check_resumable(run_dir, summary, logger)
        is_main = distributed.current_info().is_main
        if is_main and genotype is not None:
            save_genotype(genotype, os.path.join(run_dir, "genotype.json"))
        trainer = _trainer(settings, learner, splits, run_dir, logger, device, summary, is_main, graph.enabled)
        if settings.run.resume:
            trainer.resume()
        if graph.enabled:  # after resume: a checkpoint's optimiser settings replace ours
            make_optimizers_capturable(learner.optimizers.values())
        logger.log(_describe(settings, config, summary, device, run_dir, graph.enabled))
        return common.run_trainer(trainer, logger, "train.json")
    finally:
        logger.close()  # also when the set-up above fails


# -- one run per genotype (the T-NAS protocol) -----------------------------------------------------
def saved_settings(run_dir: str) -> Optional[TrainSettings]:
    """The settings of the run in ``run_dir`` (its config.yaml), None when there is none to read."""
    try:
        return TrainSettings.from_flags(load_config(os.path.join(run_dir, "config.yaml")))
    except (TnasError, TypeError):
        return None


def genotype_run_status(run_dir: str, genotype: Dict[str, Any], settings: TrainSettings) -> str:
    """``"new"``, ``"done"`` (every epoch trained, best.pt there) or ``"resume"``; a one-line error when
    ``run_dir`` holds another genotype or a run whose settings differ in more than rerun-free fields."""
    saved_genotype = read_json(os.path.join(run_dir, "genotype.json"))
    if saved_genotype is not None:
        try:
            same = canonical_key(genotype_from_dict(saved_genotype).to_dict()) == canonical_key(genotype)
        except TnasError:
            same = False
        if not same:
            raise TnasError(f"{run_dir} holds the run of another genotype (its genotype.json differs from the one "
                            f"decoded now: other checkpoint or episodes?); choose another --out")
    if not os.path.exists(os.path.join(run_dir, "last.pt")):
        return "new"
    saved = saved_settings(run_dir) or settings
    # more epochs may continue a run; fewer than it already has is another run
    differ = [item for item in differences(saved, settings) if item[0] != "epochs"]
    if differ:
        detail = ", ".join(f"{name}: {old} -> {new}" for name, old, new in differ[:4])
        raise TnasError(f"{run_dir} was trained with other from-scratch settings ({detail}); use the same "
                        f"settings or another --out")
    if saved.schedule.epochs > settings.schedule.epochs:
        raise TnasError(f"{run_dir} was trained for {saved.schedule.epochs} epochs, more than --epochs "
                        f"{settings.schedule.epochs}; use the same settings or another --out")
    summary = read_json(os.path.join(run_dir, "train.json")) or {}
    if int(summary.get("epochs_done") or 0) >= settings.schedule.epochs and \
            os.path.exists(os.path.join(run_dir, "best.pt")):
        return "done"
    return "resume"


@dataclass
class GenotypeResult:
    """What :func:`train_genotypes` did for one genotype: ``status`` trained | resumed | skipped, the
    run's summary (``train.json``) and the training time of this call."""

    status: str
    summary: Dict[str, Any]
    wall_time_s: float = 0.0


def train_one_genotype(settings: TrainSettings, genotype: Dict[str, Any], run_dir: str,
                       log: Callable[[str], None] = print) -> GenotypeResult:
    """Train (or resume, or skip when done) one genotype's solo run in ``run_dir``, as a process of its own."""
    genotype_path = os.path.join(run_dir, "genotype.json")
    wanted = settings.replace(genotype=genotype_path, out=run_dir, resume=False)
    status = genotype_run_status(run_dir, genotype, wanted)
    if status == "done":
        summary = read_json(os.path.join(run_dir, "train.json")) or {}
        log(f"already trained ({summary.get('epochs_done')} epoch(s), best epoch {summary.get('best_epoch')}), "
            f"skipped")
        return GenotypeResult("skipped", summary)
    os.makedirs(run_dir, exist_ok=True)
    if not os.path.exists(genotype_path):
        save_genotype(genotype_from_dict(genotype), genotype_path)
    resume = status == "resume"
    log(f"{'resuming the interrupted' if resume else 'starting the'} from-scratch {settings.maml.method} "
        f"run in {run_dir}")
    started = time.perf_counter()
    with distributed.local_process():
        summary = run(dataclasses.replace(wanted, run=dataclasses.replace(wanted.run, resume=resume)))
    return GenotypeResult("resumed" if resume else "trained", summary, time.perf_counter() - started)


def check_genotypes_per_batch(value: int) -> None:
    """A one-line error for ``--genotypes_per_batch`` below 1."""
    if int(value) < 1:
        raise TnasError(f"--genotypes_per_batch must be >= 1, got {value}")


def train_genotypes(settings: TrainSettings, genotypes: Sequence[Dict[str, Any]], out_dirs: Sequence[str],
                    log: Callable[[str], None] = print, genotypes_per_batch: int = 1,
                    genotype_logs: Optional[Sequence[Callable[[str], None]]] = None) -> List[GenotypeResult]:
    """Train each genotype (a genotype dict) from scratch into its run directory.

    A run that already finished is skipped, an interrupted one resumed; each trains as a process
    of its own (:func:`tnas.distributed.local_process`), so torchrun ranks can each train their
    share. ``settings``: shared by every genotype (its ``genotype``, ``out`` and ``resume`` are
    set per run). ``log``: where the one-line notes on the runs go; ``genotype_logs`` (one per
    genotype, default ``log``): where the notes on each genotype's run go.

    ``genotypes_per_batch`` G: 1 trains one genotype after another (:func:`train_one_genotype`); G > 1
    trains the genotypes G at a time as one genotype batch (:mod:`tnas.stages.batched_train`), each
    still into its own run directory as a solo run writes it (the last group takes what is left).
    """
    check_genotypes_per_batch(genotypes_per_batch)
    if len(out_dirs) != len(genotypes):
        raise ValueError("train_genotypes needs one run directory per genotype")
    logs = list(genotype_logs) if genotype_logs is not None else [log] * len(genotypes)
    if genotypes_per_batch == 1 or len(genotypes) == 1 or settings.model != "network":
        return [train_one_genotype(settings, genotype, run_dir, genotype_log)
                for genotype, run_dir, genotype_log in zip(genotypes, out_dirs, logs)]
    from tnas.stages import batched_train  # it builds on this module

    results: Dict[int, GenotypeResult] = {}
    left = []
    for i, (genotype, run_dir) in enumerate(zip(genotypes, out_dirs)):  # finished runs first: skipped
        wanted = settings.replace(genotype=os.path.join(run_dir, "genotype.json"), out=run_dir, resume=False)
        if genotype_run_status(run_dir, genotype, wanted) == "done":
            results[i] = train_one_genotype(settings, genotype, run_dir, logs[i])
        else:
            left.append(i)
    for start in range(0, len(left), genotypes_per_batch):
        chosen = left[start:start + genotypes_per_batch]
        group = batched_train.train_group(settings, [genotypes[i] for i in chosen], [out_dirs[i] for i in chosen],
                                          [logs[i] for i in chosen], log)
        results.update(zip(chosen, group))
    return [results[i] for i in range(len(genotypes))]
