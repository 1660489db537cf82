"""The search stage: meta-train a supernet with T-NAS (or auto-MAML) and decode its genotype.

Outputs in the run directory: ``config.yaml``, ``log.txt``, ``tb/``, ``last.pt``,
``best.pt``, ``genotype.json`` (the meta-architecture, rewritten each epoch),
``best_genotype.json`` (the best validation epoch's, that of ``best.pt``: what ``--genotype RUN_DIR``
trains), ``cells/`` (diagrams of the latest genotype) and ``search.json`` (per-epoch meta-train
and validation accuracy after adaptation, in percent; the best epoch and its genotype).

Library use: ``run(SearchSettings)``; the command line builds the settings with
``settings_from_args(parse_args(build_parser()))``.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
from PIL import Image

from tnas import distributed
from tnas.config import HelpFormatter, add_common_args
from tnas.data import EpisodeSampler, FixedEpisodes, split_images_in_half
from tnas.engine import MetaTrainer
from tnas.errors import TnasError
from tnas.genotypes import BEST_GENOTYPE_FILE, PRIMITIVES, save_genotype
from tnas.meta.auto_maml import ALPHA_STEP, STEP_GROUPS, WEIGHT_STEP, AutoMAML, AutoMAMLConfig
from tnas.meta.cuda_graph import make_optimizers_capturable
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.supernet import Supernet
from tnas.stages import common
from tnas.stages.settings import (DataSettings, NetworkSettings, RunSettings, ScheduleSettings, Settings,
                                  register_part)
from tnas.visualize import edge_labels, plot_genotype

METHODS = ("tnas", "auto_maml")


@register_part
@dataclass(frozen=True)
class SearchMetaSettings(Settings):
    """The search learner's flags: method, inner steps, inner and outer learning rates of w and alpha."""

    method: str = "tnas"
    inner_steps: int = 5
    inner_steps_test: int = 10
    inner_lr_weights: float = 0.01
    inner_lr_alphas: float = 30.0
    meta_lr_weights: float = 1e-3
    meta_lr_alphas: Optional[float] = None  # None: the method's default (meta_lr_alphas())
    alpha_weight_decay: float = 1e-3
    second_order: bool = False
    alternate_steps: bool = False


@dataclass(frozen=True)
class SearchSettings(Settings):
    """Everything a search run reads."""

    data: DataSettings = DataSettings()
    schedule: ScheduleSettings = ScheduleSettings(epochs=10, tasks_per_epoch=5000)
    network: NetworkSettings = NetworkSettings()
    meta: SearchMetaSettings = SearchMetaSettings()
    run: RunSettings = RunSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Architecture search: T-NAS or auto-MAML meta-training of a "
                                                 "DARTS supernet.", formatter_class=HelpFormatter)
    add_common_args(parser)
    parser.add_argument("--method", choices=METHODS, default="tnas",
                        help="tnas: weights and alphas adapted per task, one architecture per task; auto_maml: "
                             "weights adapted per task, one architecture (alphas) shared by all")
    common.add_episode_args(parser)
    common.add_network_args(parser)
    common.add_schedule_args(parser, epochs=10, tasks_per_epoch=5000)
    group = common.add_meta_learning_args(parser)
    group.add_argument("--inner_lr_weights", type=float, default=0.01, help="inner SGD learning rate of the weights")
    group.add_argument("--inner_lr_alphas", type=float, default=30.0,
                       help="T-NAS: inner SGD learning rate of the alphas (the original code's; unused by auto-MAML)")
    group.add_argument("--meta_lr_weights", type=float, default=1e-3, help="outer Adam learning rate of the weights")
    group.add_argument("--meta_lr_alphas", type=float, default=None,
                       help="outer Adam lr of the alphas (default: 1e-3 for T-NAS, 3e-4 for auto-MAML, the "
                            "original code's values)")
    group.add_argument("--alpha_weight_decay", type=float, default=1e-3,
                       help="weight decay (L2 coefficient) of the alphas' outer Adam")
    group.add_argument("--second_order", action="store_true", help="exact MAML (default: first order)")
    group.add_argument("--alternate_steps", action="store_true",
                       help="auto-MAML: one step per meta-iteration, weights and alphas in turn (default: an "
                            "alpha-step and a weight-step every iteration, as the original code)")
    return parser


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    """The typed settings of the parsed flags (the CLI layer's only conversion)."""
    return SearchSettings.from_flags(vars(args))


def meta_lr_alphas(settings) -> float:
    """``--meta_lr_alphas``, else the method's default (T-NAS 1e-3, auto-MAML 3e-4). ``settings``:
    :class:`SearchSettings` or its ``meta`` part (or parsed flags)."""
    meta = getattr(settings, "meta", settings)
    if meta.meta_lr_alphas is not None:
        return meta.meta_lr_alphas
    return AutoMAMLConfig.meta_lr_alphas if meta.method == "auto_maml" else TNASConfig.meta_lr_alphas


def build_supernet(settings: SearchSettings, in_channels: int) -> Supernet:
    return Supernet(n_way=settings.data.n_way, C=settings.network.C, layers=settings.network.layers,
                    in_channels=in_channels)


def tnas_config(settings: SearchSettings) -> TNASConfig:
    meta = settings.meta
    return TNASConfig(inner_steps=meta.inner_steps, inner_steps_test=meta.inner_steps_test,
                      inner_lr_weights=meta.inner_lr_weights, inner_lr_alphas=meta.inner_lr_alphas,
                      meta_lr_weights=meta.meta_lr_weights, meta_lr_alphas=meta_lr_alphas(meta),
                      alpha_weight_decay=meta.alpha_weight_decay, first_order=not meta.second_order,
                      amp_dtype=common.amp_dtype(settings.run))


def genotype_epoch_hook(learner, run_dir: str, logger, is_main: Optional[bool] = None):
    """After each epoch: write genotype.json and cell diagrams, log alpha heatmaps and the genotype.

    Every rank decodes the genotype (it joins the epoch record); only the main rank
    (``is_main``, default: this process's rank is 0) writes files, so data-parallel ranks
    never race on the same diagram.
    """
    model = learner.model
    if is_main is None:
        is_main = distributed.current_info().is_main

    def hook(epoch: int, record: Dict[str, object]) -> Dict[str, object]:
        genotype = model.genotype()
        if not is_main:
            return {"genotype": genotype.to_dict()}
        save_genotype(genotype, os.path.join(run_dir, "genotype.json"))
        for path in plot_genotype(genotype, os.path.join(run_dir, "cells")):
            if path.endswith(".png"):  # the cell diagrams in tensorboard too
                with Image.open(path) as picture:
                    logger.image(f"cells/{os.path.basename(path)[:-4]}", np.asarray(picture.convert("RGB")), epoch)
        for name, alpha in model.named_alphas():
            logger.heatmap(f"alphas/{name}", torch.softmax(alpha.detach().float().cpu(), dim=-1).numpy(), epoch,
                           row_labels=edge_labels(model.steps), col_labels=list(PRIMITIVES),
                           title=f"softmax({name}), epoch {epoch}")
        logger.text("genotype", str(genotype), epoch)
        logger.log(f"epoch {epoch} genotype: {genotype}")
        return {"genotype": genotype.to_dict()}

    return hook


def _sampler(settings: SearchSettings, split, device, seed: int, task_slice) -> EpisodeSampler:
    data = settings.data
    return EpisodeSampler(split, n_way=data.n_way, k_shot=data.k_shot, q_query=data.q_query,
                          tasks_per_batch=settings.schedule.tasks_per_batch, device=device, seed=seed,
                          augment=data.augment, task_pool=settings.schedule.task_pool, task_slice=task_slice)


def build_auto_maml(settings: SearchSettings, model: Supernet, train_split, device: torch.device,
                    cuda_graph: bool = False, log: Optional[Callable[[str], None]] = None):
    """The learner, its two episode samplers and the step function of an auto-MAML search.

    ``cuda_graph``: the resolved ``--cuda_graph`` (``log`` takes the line of a failed capture).
    The meta-train split's images are halved per class with ``seed = settings.run.seed``;
    sampler ``"weights"`` draws from the first half, ``"alphas"`` from the second. Returns
    ``(learner, {"weights": ..., "alphas": ...}, step)`` where ``step(iteration, track)`` takes the
    steps of one meta-iteration (:meth:`AutoMAML.step_kinds`: an alpha-step then a w-step, or one
    of them in turn) and returns the last one's statistics.
    """
    meta, seed = settings.meta, settings.run.seed
    config = AutoMAMLConfig(inner_steps=meta.inner_steps, inner_steps_test=meta.inner_steps_test,
                            inner_lr_weights=meta.inner_lr_weights, meta_lr_weights=meta.meta_lr_weights,
                            meta_lr_alphas=meta_lr_alphas(meta), alpha_weight_decay=meta.alpha_weight_decay,
                            first_order=not meta.second_order, split_seed=seed, alternate=meta.alternate_steps,
                            amp_dtype=common.amp_dtype(settings.run))
    learner = AutoMAML(model, config)
    task_slice = common.data_parallel(learner, settings.schedule.tasks_per_batch)
    halves = split_images_in_half(train_split, seed=config.split_seed)
    samplers = {}
    for offset, (kind, half) in enumerate(zip((WEIGHT_STEP, ALPHA_STEP), halves)):
        try:
            samplers[kind] = _sampler(settings, half, device, seed + 1000 * offset, task_slice)
        except TnasError as error:
            raise TnasError(f"auto-MAML halves the images of each class: {error}") from None

    calls = {kind: common.graph_meta_step(learner, cuda_graph, log=log, **STEP_GROUPS[kind])
             for kind in (WEIGHT_STEP, ALPHA_STEP)}

    def step(iteration: int, track: bool):
        stats = None
        for kind in learner.step_kinds(iteration):
            stats = calls[kind](samplers[kind].sample(), track)
        return stats

    return learner, samplers, step


def build_tnas(settings: SearchSettings, model: Supernet, train_split, device: torch.device,
               cuda_graph: bool = False, log: Optional[Callable[[str], None]] = None):
    """The T-NAS learner, its episode sampler and step function (as :func:`build_auto_maml`)."""
    learner = TNAS(model, tnas_config(settings))
    sampler = _sampler(settings, train_split, device, settings.run.seed,
                       common.data_parallel(learner, settings.schedule.tasks_per_batch))
    meta_step = common.graph_meta_step(learner, cuda_graph, log=log)

    def step(iteration: int, track: bool):
        return meta_step(sampler.sample(), track)

    return learner, {"train": sampler}, step


def check_settings(settings: SearchSettings) -> common.GraphDecision:
    """One-line errors for sizes out of range or a ``--cuda_graph on`` this run cannot use; returns
    the resolved ``--cuda_graph``."""
    common.check_positive(settings.data, "n_way", "k_shot", "q_query")
    common.check_data_options(settings.data)
    common.check_positive(settings.schedule, "tasks_per_batch", "epochs", "tasks_per_epoch", "val_episodes",
                          "val_batch_size")
    common.check_positive(settings.meta, "inner_steps", "inner_steps_test")
    common.check_positive(settings.network, "C", "layers")
    return common.check_cuda_graph(settings.run)


def run(settings: SearchSettings) -> Dict[str, object]:
    """Run the search stage described by ``settings``; returns the summary (``search.json``)."""
    if isinstance(settings, argparse.Namespace):  # parsed flags (callers not yet converted)
        settings = settings_from_args(settings)
    graph = check_settings(settings)
    flags = argparse.Namespace(**settings.to_flags())
    run_dir, logger, device = common.prepare_run(flags, "search")
    try:
        logger.log(graph.reason)
        is_main = distributed.current_info().is_main
        data, meta = settings.data, settings.meta
        splits = common.load_splits(flags, ("train", "val"), logger)
        model = build_supernet(settings, common.image_channels(splits["train"])).to(device)
        val_episodes = FixedEpisodes.generate(splits["val"], data.n_way, data.k_shot, data.q_query,
                                              episodes=settings.schedule.val_episodes, seed=settings.run.seed + 1)
        build = build_auto_maml if meta.method == "auto_maml" else build_tnas
        learner, samplers, step = build(settings, model, splits["train"], device, graph.enabled, logger.log)
        summary = {"method": meta.method, "dataset": data.dataset, "n_way": data.n_way, "k_shot": data.k_shot,
                   "q_query": data.q_query, "image_shape": list(splits["train"].image_shape), "model": model.config,
                   "learner": learner.config.to_dict(), **common.data_settings(data)}
        trainer = MetaTrainer(learner, samplers, step, val_episodes, run_dir, logger,
                              common.schedule_from_args(settings.schedule), device, stage="search", summary=summary,
                              epoch_hook=genotype_epoch_hook(learner, run_dir, logger),
                              best_hook=lambda record: save_genotype(learner.model.genotype(),  # this epoch's
                                                                     os.path.join(run_dir, BEST_GENOTYPE_FILE)),
                              val_steps=meta.inner_steps_test, is_main=is_main)
        if settings.run.resume:
            trainer.resume()
        if graph.enabled:  # after resume: a checkpoint's optimiser settings replace ours
            make_optimizers_capturable(learner.optimizers.values())
        logger.log(f"search ({meta.method}) on {data.dataset} {data.n_way}-way {data.k_shot}-shot, device {device}, "
                   f"supernet {sum(p.numel() for p in model.weights()):,} weights; run directory {run_dir}")
        return common.run_trainer(trainer, logger, "search.json")
    finally:
        logger.close()  # also when the set-up above fails; releases the run directory
