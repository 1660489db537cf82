"""The search stage: meta-train a supernet with T-NAS (or auto-MAML) and decode its genotype.

Outputs in the run directory: ``config.yaml``, ``log.txt``, ``tb/``, ``last.pt``,
``best.pt``, ``genotype.json`` (the meta-architecture, rewritten each epoch),
``cells/`` (diagrams of the latest genotype) and ``search.json`` (per-epoch meta-train
and validation accuracy after adaptation, in percent; the best epoch and its genotype).
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image

from tnas import distributed
from tnas.config import add_common_args
from tnas.data import EpisodeSampler, FixedEpisodes, split_images_in_half
from tnas.engine import MetaTrainer
from tnas.errors import TnasError
from tnas.genotypes import PRIMITIVES, save_genotype
from tnas.meta.auto_maml import ALPHA_STEP, WEIGHT_STEP, AutoMAML, AutoMAMLConfig
from tnas.meta.cuda_graph import make_optimizers_capturable
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.supernet import Supernet
from tnas.stages import common
from tnas.visualize import edge_labels, plot_genotype

METHODS = ("tnas", "auto_maml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Architecture search: T-NAS or auto-MAML meta-training of a "
                                                 "DARTS supernet.")
    add_common_args(parser)
    parser.add_argument("--method", choices=METHODS, default="tnas")
    common.add_episode_args(parser)
    common.add_network_args(parser)
    common.add_schedule_args(parser, epochs=10, tasks_per_epoch=5000)
    group = common.add_meta_learning_args(parser)
    group.add_argument("--inner_lr_weights", type=float, default=0.01)
    group.add_argument("--inner_lr_alphas", type=float, default=30.0)
    group.add_argument("--meta_lr_weights", type=float, default=1e-3)
    group.add_argument("--meta_lr_alphas", type=float, default=1e-3)
    group.add_argument("--alpha_weight_decay", type=float, default=1e-3)
    group.add_argument("--second_order", action="store_true", help="exact MAML (default: first order)")
    return parser


def build_supernet(args, in_channels: int) -> Supernet:
    return Supernet(n_way=args.n_way, C=args.C, layers=args.layers, in_channels=in_channels)


def tnas_config(args, device: torch.device) -> TNASConfig:
    return TNASConfig(inner_steps=args.inner_steps, inner_steps_test=args.inner_steps_test,
                      inner_lr_weights=args.inner_lr_weights, inner_lr_alphas=args.inner_lr_alphas,
                      meta_lr_weights=args.meta_lr_weights, meta_lr_alphas=args.meta_lr_alphas,
                      alpha_weight_decay=args.alpha_weight_decay, first_order=not args.second_order,
                      amp_dtype=common.amp_dtype(args))


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


def build_auto_maml(args, model: Supernet, train_split, device: torch.device):
    """The learner, its two episode samplers and the step function of an auto-MAML search.

    ``args``: the search stage's flags. The meta-train split's images are halved per class
    with ``seed = args.seed``; sampler ``"weights"`` draws from the first half, ``"alphas"``
    from the second. Returns ``(learner, {"weights": ..., "alphas": ...}, step)`` where
    ``step(iteration, track)`` takes one alternating meta-iteration (even: w, odd: alpha).
    """
    config = AutoMAMLConfig(inner_steps=args.inner_steps, inner_steps_test=args.inner_steps_test,
                            inner_lr_weights=args.inner_lr_weights, meta_lr_weights=args.meta_lr_weights,
                            meta_lr_alphas=args.meta_lr_alphas, alpha_weight_decay=args.alpha_weight_decay,
                            first_order=not args.second_order, split_seed=args.seed,
                            amp_dtype=common.amp_dtype(args))
    learner = AutoMAML(model, config)
    task_slice = common.data_parallel(learner, args.tasks_per_batch)
    halves = split_images_in_half(train_split, seed=config.split_seed)
    samplers = {}
    for offset, (kind, half) in enumerate(zip((WEIGHT_STEP, ALPHA_STEP), halves)):
        try:
            samplers[kind] = EpisodeSampler(half, n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query,
                                            tasks_per_batch=args.tasks_per_batch, device=device,
                                            seed=args.seed + 1000 * offset, augment=args.augment,
                                            task_slice=task_slice)
        except TnasError as error:
            raise TnasError(f"auto-MAML halves the images of each class: {error}") from None

    cuda_graph = getattr(args, "cuda_graph", False)
    calls = {WEIGHT_STEP: common.graph_untracked(
                 lambda batch, track: learner.weight_step(batch, track_steps=track), cuda_graph),
             ALPHA_STEP: common.graph_untracked(
                 lambda batch, track: learner.alpha_step(batch, track_steps=track), cuda_graph)}

    def step(iteration: int, track: bool):
        kind = AutoMAML.step_kind(iteration)
        return calls[kind](samplers[kind].sample(), track)

    return learner, samplers, step


def run(args) -> Dict[str, object]:
    """Run the search stage described by ``args`` (the parsed flags); returns the summary."""
    common.check_positive(args, "n_way", "k_shot", "q_query", "tasks_per_batch", "epochs", "tasks_per_epoch",
                          "inner_steps", "inner_steps_test", "C", "layers", "val_episodes", "val_batch_size")
    common.check_cuda_graph(args)
    run_dir, logger, device = common.prepare_run(args, "search")
    is_main = distributed.current_info().is_main
    splits = common.load_splits(args, ("train", "val"))
    in_channels = common.image_channels(splits["train"])
    model = build_supernet(args, in_channels).to(device)
    summary = {"method": args.method, "dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot,
               "q_query": args.q_query, "image_shape": list(splits["train"].image_shape), "model": model.config}
    val_episodes = FixedEpisodes.generate(splits["val"], args.n_way, args.k_shot, args.q_query,
                                          episodes=args.val_episodes, seed=args.seed + 1)
    if args.method == "auto_maml":
        learner, samplers, step = build_auto_maml(args, model, splits["train"], device)
        summary["learner"] = learner.config.to_dict()
    else:
        learner = TNAS(model, tnas_config(args, device))
        summary["learner"] = learner.config.to_dict()
        sampler = EpisodeSampler(splits["train"], n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query,
                                 tasks_per_batch=args.tasks_per_batch, device=device, seed=args.seed,
                                 augment=args.augment,
                                 task_slice=common.data_parallel(learner, args.tasks_per_batch))
        samplers = {"train": sampler}

        meta_step = common.graph_untracked(lambda batch, track: learner.meta_step(batch, track_steps=track),
                                           args.cuda_graph)

        def step(iteration: int, track: bool):
            return meta_step(sampler.sample(), track)

    trainer = MetaTrainer(learner, samplers, step, val_episodes, run_dir, logger, common.schedule_from_args(args),
                          device, stage="search", summary=summary,
                          epoch_hook=genotype_epoch_hook(learner, run_dir, logger),
                          val_steps=args.inner_steps_test, is_main=is_main)
    if args.resume:
        trainer.resume()
    if args.cuda_graph:  # after resume: a checkpoint's optimiser settings replace ours
        make_optimizers_capturable(learner.optimizers.values())
    logger.log(f"search ({args.method}) on {args.dataset} {args.n_way}-way {args.k_shot}-shot, device {device}, "
               f"supernet {sum(p.numel() for p in model.weights()):,} weights; run directory {run_dir}")
    return common.run_trainer(trainer, logger, "search.json")
