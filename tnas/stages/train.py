"""The from-scratch training stage: MAML (T-NAS, auto-MAML, the MAML baseline) or MAML++ (T-NAS++) of a network.

The derived :class:`~tnas.models.network.Network` of ``--genotype`` (a published name, a
genotype JSON file or a search run directory), or with ``--model conv4`` MAML's Conv-4
baseline (``--filters`` channels, no genotype), is meta-trained on the meta-train classes;
after each epoch it is adapted on fixed episodes of the *validation* classes, and
``best.pt`` keeps the epoch with the best validation accuracy.

Outputs in the run directory: ``config.yaml``, ``log.txt``, ``tb/``, ``last.pt``,
``best.pt``, ``genotype.json`` (the trained architecture; not for Conv-4) and ``train.json`` (per-epoch
meta-train and validation accuracy in percent, the best epoch, the parameter and MAC
counts, and in ``"model"`` / ``"learner"`` everything :func:`build_learner` needs).

``--method maml`` (default) is first-order MAML (``--second_order`` for exact MAML);
``--method maml++`` switches on every MAML++ component (per-step BN, learned per-step inner
learning rates, multi-step loss, derivative-order annealing, cosine meta learning rate),
each of which is also a flag of its own (``--no-per_step_bn`` etc. to leave one out).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Mapping, Optional

import torch

from tnas import distributed
from tnas.config import add_common_args
from tnas.engine import MetaTrainer
from tnas.errors import TnasError
from tnas.genotypes import resolve_genotype, save_genotype
from tnas.meta.maml_pp import COSINE_UNITS, MAMLConfig, MAMLPlusPlus
from tnas.models.complexity import count_macs
from tnas.models import factory
from tnas.runlog import load_checkpoint
from tnas.stages import common

METHODS = ("maml", "maml++")
MAML_PP_SWITCHES = ("per_step_bn", "learn_inner_lr", "multi_step_loss", "cosine_lr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a genotype's network from scratch with MAML or MAML++ "
                                                 "(best checkpoint by validation accuracy).")
    add_common_args(parser)
    parser.add_argument("--genotype", default=None, metavar="NAME|JSON|RUN_DIR",
                        help="published name (auto_maml_1shot, auto_maml_5shot), genotype JSON file, or a search "
                             "run directory holding genotype.json (required for --model network)")
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
    group.add_argument("--drop_path_prob", type=float, default=0.0, help="drop-path probability in meta-training")
    group.add_argument("--second_order", action="store_true",
                       help="exact (second-order) MAML; default first order")
    group = parser.add_argument_group("MAML++ (on by default with --method maml++)")
    group.add_argument("--per_step_bn", action=argparse.BooleanOptionalAction, default=None,
                       help="BatchNorm weights and biases per inner step")
    group.add_argument("--learn_inner_lr", action=argparse.BooleanOptionalAction, default=None,
                       help="meta-learn an inner learning rate per parameter tensor and inner step")
    group.add_argument("--multi_step_loss", action=argparse.BooleanOptionalAction, default=None,
                       help="query loss after every inner step, weights annealed to the last over --msl_epochs")
    group.add_argument("--msl_epochs", type=int, default=10, help="epochs of the multi-step loss annealing")
    group.add_argument("--first_order_epochs", type=int, default=None,
                       help="derivative-order annealing: first order for this many epochs, then second order "
                            "(default: none for maml, a third of --epochs for maml++)")
    group.add_argument("--cosine_lr", action=argparse.BooleanOptionalAction, default=None,
                       help="cosine annealing of the meta learning rate to --min_meta_lr at the end of the run")
    group.add_argument("--min_meta_lr", type=float, default=1e-5, help="final meta learning rate of --cosine_lr")
    group.add_argument("--cosine_unit", choices=COSINE_UNITS, default="epoch",
                       help="step the cosine schedule per epoch or per meta-iteration")
    return parser


def maml_config(args, device: Optional[torch.device] = None) -> MAMLConfig:
    """The learner settings of the flags; ``--method maml++`` turns on what is not set explicitly."""
    plus = args.method == "maml++"
    switches = {name: plus if getattr(args, name) is None else bool(getattr(args, name)) for name in MAML_PP_SWITCHES}
    first_order_epochs = args.first_order_epochs
    if first_order_epochs is None and plus:
        first_order_epochs = args.epochs // 3  # MAML++: first order for the first third of training
    return MAMLConfig(inner_steps=args.inner_steps, inner_steps_test=args.inner_steps_test, inner_lr=args.inner_lr,
                      meta_lr=args.meta_lr, first_order=not args.second_order, msl_epochs=args.msl_epochs,
                      first_order_epochs=first_order_epochs, min_meta_lr=args.min_meta_lr,
                      cosine_unit=args.cosine_unit, weight_decay=getattr(args, "weight_decay", 0.0),
                      amp_dtype=common.amp_dtype(args, device) if device else None,
                      **switches)


def check_cuda_graph(args) -> "common.GraphDecision":
    """``--cuda_graph`` resolved for this stage: graphs need a CUDA device, a meta-batch kept in
    one process, and no cosine learning rate that changes every iteration (a graph freezes it
    until the next capture, once per epoch). ``on`` where impossible is a one-line error."""
    blocker = None
    if maml_config(args).cosine_lr and args.cosine_unit != "epoch":
        blocker = (f"--cosine_unit epoch (a graph freezes the learning rate until the next capture), "
                   f"got --cosine_unit {args.cosine_unit}")
    return common.check_cuda_graph(args, blocker)


# -- models and learners from a summary ------------------------------------------------------
network_from_config = factory.network_from_config  # the network a summary's "model" config describes


def build_learner(summary: Mapping[str, object], device) -> MAMLPlusPlus:
    """An untrained learner rebuilt from a train run's ``summary`` (``state["summary"]`` or
    ``train.json``), so that ``learner.load_state_dict(state["learner"])`` restores it."""
    model = network_from_config(summary["model"], float(summary.get("drop_path_prob", 0.0))).to(device)
    return MAMLPlusPlus(model, MAMLConfig.from_dict(summary["learner"]))


# -- the stage -----------------------------------------------------------------------------
def _plain(value):
    return json.loads(json.dumps(value))


STRUCTURAL_LEARNER_KEYS = ("inner_steps", "per_step_bn", "learn_inner_lr")
"""Learner settings that shape the checkpoint (per-step BN sets, learned rates); the others may change on resume."""


def check_resumable(run_dir: str, summary: Mapping[str, object], logger=None) -> None:
    """A one-line error when ``--resume`` would continue a run of another network (genotype, C,
    layers, ...) or a learner of another shape; changed schedule settings are only logged."""
    state = load_checkpoint(os.path.join(run_dir, "last.pt"))
    saved = state.get("summary", {})
    old_model, new_model = _plain(saved.get("model")), _plain(summary["model"])
    if old_model is not None and old_model != new_model:
        keys = [k for k in sorted(set(old_model) | set(new_model)) if old_model.get(k) != new_model.get(k)]
        detail = ", ".join("genotype differs" if k == "genotype" else f"{k}: {old_model.get(k)} -> {new_model.get(k)}"
                           for k in keys)
        raise TnasError(f"--resume: {run_dir} holds another network ({detail}); use the same --genotype and "
                        f"network flags, or another --out")
    old_learner, new_learner = _plain(saved.get("learner") or {}), _plain(summary["learner"])
    changed = [k for k in sorted(set(old_learner) | set(new_learner)) if old_learner.get(k) != new_learner.get(k)]
    structural = [k for k in changed if k in STRUCTURAL_LEARNER_KEYS]
    if structural:
        detail = ", ".join(f"{k}: {old_learner.get(k)} -> {new_learner.get(k)}" for k in structural)
        raise TnasError(f"--resume: {run_dir} was trained with another learner ({detail}); use the same flags "
                        f"or another --out")
    if changed and logger is not None:
        logger.log("resuming with changed settings: " + ", ".join(
            f"{k}: {old_learner.get(k)} -> {new_learner.get(k)}" for k in changed))


def run(args) -> Dict[str, object]:
    """Run the from-scratch training stage described by ``args``; returns the summary (``train.json``)."""
    conv4 = args.model == "conv4"
    if not args.genotype and not conv4:
        raise TnasError("--genotype is required: a published name (auto_maml_1shot, auto_maml_5shot), "
                        "a genotype JSON file or a search run directory")
    common.check_positive(args, "n_way", "k_shot", "q_query", "tasks_per_batch", "epochs", "tasks_per_epoch",
                          "inner_steps", "inner_steps_test", "C", "layers", "filters", "val_episodes",
                          "val_batch_size", "meta_lr")
    if args.weight_decay < 0:
        raise TnasError(f"--weight_decay must be >= 0, got {args.weight_decay}")
    if not 0.0 <= args.drop_path_prob < 1.0:
        raise TnasError(f"--drop_path_prob must be in [0, 1), got {args.drop_path_prob}")
    if args.msl_epochs < 0 or (args.first_order_epochs is not None and args.first_order_epochs < 0):
        raise TnasError("--msl_epochs and --first_order_epochs must be >= 0")
    graph = check_cuda_graph(args)
    genotype = None if conv4 else resolve_genotype(args.genotype)
    from tnas.data import EpisodeSampler, FixedEpisodes

    run_dir, logger, device = common.prepare_run(args, "train")
    logger.log(graph.reason)
    try:
        splits = common.load_splits(args, ("train", "val"), logger)
        image_shape = tuple(splits["train"].image_shape)
        smallest = factory.smallest_image(args.model, args.layers)
        if min(image_shape[1:]) < smallest:
            what = "--model conv4" if conv4 else f"--layers {args.layers}"
            raise TnasError(f"images of {image_shape[1]}x{image_shape[2]} are too small for {what} "
                            f"(need at least {smallest}; see --img_size)")
        model = factory.build_network(args.model, args.n_way, image_shape, genotype, C=args.C, layers=args.layers,
                                      filters=args.filters, drop_path_prob=args.drop_path_prob).to(device)
        parameters = sum(p.numel() for p in model.parameters())
        counted = count_macs(model, image_shape)
        macs, macs_source = counted["macs"], counted["macs_source"]
        config = maml_config(args, device)
        learner = MAMLPlusPlus(model, config)
        summary = {"method": args.method, "dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot,
                   "q_query": args.q_query, "image_shape": list(image_shape),
                   "genotype_source": None if conv4 else args.genotype,
                   "model": model.config, "learner": config.to_dict(), "drop_path_prob": args.drop_path_prob,
                   "parameters": parameters, "macs": macs, "macs_source": macs_source,
                   "meta_learned_parameters": learner.parameter_count(), **common.data_settings(args)}
        if args.resume:
            check_resumable(run_dir, summary, logger)
        is_main = distributed.current_info().is_main
        if is_main and genotype is not None:
            save_genotype(genotype, os.path.join(run_dir, "genotype.json"))
        sampler = EpisodeSampler(splits["train"], n_way=args.n_way, k_shot=args.k_shot, q_query=args.q_query,
                                 tasks_per_batch=args.tasks_per_batch, device=device, seed=args.seed,
                                 augment=args.augment, task_pool=args.task_pool,
                                 task_slice=common.data_parallel(learner, args.tasks_per_batch))
        val_episodes = FixedEpisodes.generate(splits["val"], args.n_way, args.k_shot, args.q_query,
                                              episodes=args.val_episodes, seed=args.seed + 1)
        schedule = common.schedule_from_args(args)
        per_epoch = schedule.iterations_per_epoch

        meta_step = common.graph_untracked(lambda batch, track: learner.meta_step(batch, track_steps=track),
                                           graph.enabled, key=learner.settings_key, log=logger.log)

        def step(iteration: int, track: bool):
            learner.set_progress(iteration, per_epoch, schedule.epochs)
            return meta_step(sampler.sample(), track)

        def epoch_hook(epoch: int, record: Dict[str, object]) -> Dict[str, object]:
            return {"meta_lr": learner.optimizers["weights"].param_groups[0]["lr"],
                    "first_order": learner.first_order,
                    "multi_step_loss": learner.multi_step_loss_active()}

        trainer = MetaTrainer(learner, {"train": sampler}, step, val_episodes, run_dir, logger, schedule, device,
                              stage="train", summary=summary, epoch_hook=epoch_hook, val_steps=args.inner_steps_test,
                              is_main=is_main)
        if args.resume:
            trainer.resume()
        if graph.enabled:  # after resume: a checkpoint's optimiser settings replace ours
            from tnas.meta.cuda_graph import make_optimizers_capturable

            make_optimizers_capturable(learner.optimizers.values())
        switches = [name for name in MAML_PP_SWITCHES if getattr(config, name)]
        if config.first_order_epochs is not None:
            switches.append(f"first order for {config.first_order_epochs} epoch(s), then second order")
        else:
            switches.append(f"{'first' if config.first_order else 'second'} order")
        if graph.enabled:
            switches.append("CUDA graphs, captured again when an epoch changes the settings")
        subject = f"Conv-4 ({args.filters} filters)" if conv4 else f"genotype {args.genotype}"
        logger.log(f"train ({args.method}: {', '.join(switches)}) of {subject} on "
                   f"{args.dataset} {args.n_way}-way {args.k_shot}-shot, device {device}; {parameters:,} parameters, "
                   f"{macs / 1e6:.2f}M MACs per image ({macs_source}); run directory {run_dir}")
        return common.run_trainer(trainer, logger, "train.json")
    finally:
        logger.close()  # also when the set-up above fails
