"""The derived network of a genotype: the supernet's skeleton with one op per kept edge."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from tnas.genotypes import Genotype, validate_genotype
from tnas.models.fast_edges import ExecutionPlan
from tnas.models.skeleton import build_cells, make_stem
from tnas.ops import FactorizedReduce, Identity, ReLUConvBN, make_op
from tnas.task_folding import Linear, TaskWindow, cat_channels, sample_mask, use_pointwise_mode


def drop_path(x: torch.Tensor, drop_prob: float, tasks: int = 1, window: Optional[TaskWindow] = None) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob`` and rescale the rest (``x``: [B, T*C, H, W]
    for ``tasks`` T folded tasks, each drawing its own mask; ``window``: the T tasks are that
    slice of a larger meta-batch, see :func:`tnas.task_folding.sample_mask`)."""
    keep = 1.0 - drop_prob
    return x * sample_mask(x, keep, tasks, window) / keep


class DerivedCell(nn.Module):
    """A cell of a genotype: each node sums two ops applied to two earlier states."""

    supports_task_folding = True

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, channels: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        pairs = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.channels = channels
        self.out_channels = len(self.concat) * channels
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, affine=True) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=True))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=True)
        self.inputs = [source for _, source in pairs]
        self.ops = nn.ModuleList(make_op(op, channels, 2 if reduction and source < 2 else 1, affine=True)
                                 for op, source in pairs)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0,
                window: Optional[TaskWindow] = None) -> torch.Tensor:
        """``drop_prob`` > 0 in training mode: drop-path on every op but identities, its masks drawn
        for the folded tasks, or for the whole meta-batch of ``window`` and sliced."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        tasks = states[0].shape[1] // self.channels
        for node in range(len(self.ops) // 2):
            total = 0
            for edge in (2 * node, 2 * node + 1):
                op = self.ops[edge]
                h = op(states[self.inputs[edge]])
                if self.training and drop_prob > 0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob, tasks, window)
                total = total + h
            states.append(total)
        return cat_channels([states[i] for i in self.concat], tasks)


class Network(nn.Module):
    """Few-shot classifier built from ``genotype`` (affine BN, batch statistics).

    Input ``[B, in_channels, H, W]``, output logits ``[B, n_way]``. ``drop_path_prob``
    applies in training mode to every op but identities. Runs T tasks at once with per-task
    parameters given T folded images ``[B, T*in_channels, H, W]`` (:mod:`tnas.task_folding`).
    ``plan``: only its ``pointwise`` choice applies to a derived network.

    ``task_window`` (None, or a :class:`~tnas.task_folding.TaskWindow` that
    :func:`tnas.stages.common.data_parallel` sets on a data-parallel process's model): the
    training-mode forwards fold exactly that slice of each meta-batch, and draw their drop-path
    masks for the whole batch and keep the slice's, as one process on the whole batch would. A
    training-mode forward of another number of tasks with drop-path on is then a ValueError (a
    bug: only meta-training steps run in training mode); evaluation runs in eval mode (no
    drop-path), where the window plays no part.
    """

    supports_task_folding = True

    def __init__(self, genotype: Genotype, n_way: int = 5, C: int = 16, layers: int = 2, in_channels: int = 3,
                 stem_multiplier: int = 3, drop_path_prob: float = 0.0, plan: ExecutionPlan = ExecutionPlan()):
        super().__init__()
        validate_genotype(genotype)
        self.genotype = genotype
        self.config = dict(n_way=n_way, C=C, layers=layers, in_channels=in_channels,
                           stem_multiplier=stem_multiplier, genotype=genotype.to_dict())
        self.drop_path_prob = drop_path_prob
        self.task_window: Optional[TaskWindow] = None
        stem_channels = stem_multiplier * C
        self.stem = make_stem(in_channels, stem_channels, affine=True)
        self.cells, c_prev = build_cells(
            lambda c_pp, c_p, channels, reduction, reduction_prev: DerivedCell(
                genotype, c_pp, c_p, channels, reduction, reduction_prev),
            stem_channels, C, layers)
        self.classifier = Linear(c_prev, n_way)
        use_pointwise_mode(self, plan.pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob, self.task_window)
        return self.classifier(s1.mean(dim=(2, 3)))
