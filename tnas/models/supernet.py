"""The DARTS supernet: every edge a softmax(alpha)-weighted mixture of all primitives.

Weights and architecture parameters are kept apart (``weights()`` / ``alphas()``) so they
can get their own learning rates and optimisers, and ``forward`` accepts alphas as
arguments so a functional inner loop can pass adapted ones. Everything is a pure function
of (parameters, input): BatchNorm uses batch statistics and keeps no running state.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnas.genotypes import PRIMITIVES, Genotype, decode_genotype, edge_inputs, num_edges
from tnas.models.skeleton import build_cells, make_stem
from tnas.ops import FactorizedReduce, ReLUConvBN, make_op
from tnas.task_folding import Linear, cat_channels, scale_per_task, weighted_sum

ALPHA_NAMES = ("alpha_normal", "alpha_reduce")


class MixedOp(nn.Module):
    """One edge: ``sum_o w_o * o(x)`` over the primitives except `none` (whose output is 0).

    Every supernet op but the identity ends in a parameter-free BatchNorm (``affine=False``).
    Those ops' outputs before that BN are stacked as ``[B, K, C, H, W]`` and normalised by ONE
    BatchNorm over ``K*C`` channels (per-channel statistics, so the same numbers as K separate
    BNs), then weighted: a few kernels per edge instead of a BN forward and backward per op,
    which is what a meta-iteration at the paper setting spends its GPU time on.
    """

    supports_task_folding = True

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList(make_op(name, channels, stride, affine=False) for name in PRIMITIVES[1:])
        norms = [getattr(op, "final_norm", None) for op in self.ops]
        normalized = [i for i, norm in enumerate(norms) if norm is not None and not norm.affine]
        self.plain = [i for i in range(len(self.ops)) if i not in normalized]
        self.normalized = normalized
        epsilons = {norms[i].eps for i in normalized}
        if len(epsilons) > 1:
            raise ValueError(f"the ops of an edge normalise with different eps {sorted(epsilons)}")
        self.eps = epsilons.pop() if epsilons else 1e-5
        # the normalised ops' weights as runs of consecutive columns: slices and one cat, no index tensor
        self.normalized_runs = []
        for i in normalized:
            if self.normalized_runs and sum(self.normalized_runs[-1]) == i:
                self.normalized_runs[-1] = (self.normalized_runs[-1][0], self.normalized_runs[-1][1] + 1)
            else:
                self.normalized_runs.append((i, 1))

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x``: [B, C, H, W]; ``weights``: [len(PRIMITIVES) - 1] softmax weights of the ops after
        `none` (folded: ``[T, len(PRIMITIVES) - 1]`` for per-task alphas)."""
        rectified = F.relu(x)  # shared by the ops that start with a ReLU (convs, factorized reduce)
        before_norm = [self._pre_norm(self.ops[i], x, rectified) for i in self.normalized]
        stacked = torch.stack(before_norm, dim=1)  # [B, K, C, H, W]
        normalized = F.batch_norm(stacked.view(stacked.shape[0], -1, *stacked.shape[3:]), None, None,
                                  training=True, momentum=0.0, eps=self.eps).view(stacked.shape)
        runs = [weights.narrow(-1, start, length) for start, length in self.normalized_runs]
        out = weighted_sum(normalized, runs[0] if len(runs) == 1 else torch.cat(runs, dim=-1))
        for i in self.plain:
            op = self.ops[i]
            value = op.after_relu(rectified) if hasattr(op, "after_relu") else op(x)
            out = out + scale_per_task(value, weights[..., i])
        return out

    @staticmethod
    def _pre_norm(op: nn.Module, x: torch.Tensor, rectified: torch.Tensor) -> torch.Tensor:
        return op.pre_norm_after_relu(rectified) if hasattr(op, "pre_norm_after_relu") else op.pre_norm(x)


class SearchCell(nn.Module):
    """A cell of the supernet: two preprocessed inputs, ``steps`` nodes, every node fed by all earlier ones."""

    supports_task_folding = True

    def __init__(self, steps: int, multiplier: int, c_prev_prev: int, c_prev: int, channels: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.out_channels = multiplier * channels
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, affine=False) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(channels, 2 if reduction and source < 2 else 1) for _, source in edge_inputs(steps))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``weights``: [num_edges, len(PRIMITIVES)] softmax weights (folded: [T, ...] for per-task
        alphas); returns the concatenation of the last ``multiplier`` nodes."""
        edge_weights = weights[..., 1:].unbind(-2)  # `none` contributes zero; one view per edge
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        edge = 0
        for _ in range(self.steps):
            node = self.edges[edge](states[0], edge_weights[edge])
            for source in range(1, len(states)):
                node = node + self.edges[edge + source](states[source], edge_weights[edge + source])
            edge += len(states)
            states.append(node)
        return cat_channels(states[-self.multiplier:])


class Supernet(nn.Module):
    """DARTS supernet for few-shot classification.

    Args:
        n_way: classes of the classifier.
        C: channels of the first cell (doubled at each reduction).
        layers: 1 (one reduction cell), 2 (normal + reduction, the paper) or >= 3.
        steps, multiplier: intermediate nodes per cell and how many are concatenated.
        in_channels: 3 for RGB, 1 for grayscale.
        stem_multiplier: stem width is ``stem_multiplier * C``.
    Input ``[B, in_channels, H, W]`` with ``H, W >= min_image_size(layers)``; output logits ``[B, n_way]``.
    Runs T tasks at once with per-task parameters under :func:`tnas.task_folding.folded`.
    """

    supports_task_folding = True

    def __init__(self, n_way: int = 5, C: int = 16, layers: int = 2, steps: int = 4, multiplier: int = 4,
                 in_channels: int = 3, stem_multiplier: int = 3):
        super().__init__()
        self.config = dict(n_way=n_way, C=C, layers=layers, steps=steps, multiplier=multiplier,
                           in_channels=in_channels, stem_multiplier=stem_multiplier)
        self.steps, self.multiplier = steps, multiplier
        stem_channels = stem_multiplier * C
        self.stem = make_stem(in_channels, stem_channels, affine=False)
        self.cells, c_prev = build_cells(
            lambda c_pp, c_p, channels, reduction, reduction_prev: SearchCell(
                steps, multiplier, c_pp, c_p, channels, reduction, reduction_prev),
            stem_channels, C, layers)
        self.classifier = Linear(c_prev, n_way)
        shape = (num_edges(steps), len(PRIMITIVES))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape))

    def forward(self, x: torch.Tensor, alpha_normal: Optional[torch.Tensor] = None,
                alpha_reduce: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, n_way]``; alphas default to the module's own parameters."""
        weights_normal = F.softmax(self.alpha_normal if alpha_normal is None else alpha_normal, dim=-1)
        weights_reduce = F.softmax(self.alpha_reduce if alpha_reduce is None else alpha_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, weights_reduce if cell.reduction else weights_normal)
        return self.classifier(s1.mean(dim=(2, 3)))

    def named_weights(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """Network weights (everything but the alphas)."""
        return ((name, p) for name, p in self.named_parameters() if name not in ALPHA_NAMES)

    def named_alphas(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """The architecture parameters ``alpha_normal`` and ``alpha_reduce``, each [num_edges, 8]."""
        return ((name, p) for name, p in self.named_parameters() if name in ALPHA_NAMES)

    def weights(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_weights())

    def alphas(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_alphas())

    def genotype(self, alphas: Optional[Dict[str, torch.Tensor]] = None) -> Genotype:
        """Decode the module's alphas, or the given ``{"alpha_normal", "alpha_reduce"}``, by the DARTS rule."""
        alphas = alphas if alphas is not None else dict(self.named_alphas())
        return decode_genotype(alphas["alpha_normal"], alphas["alpha_reduce"], self.steps, self.multiplier)
