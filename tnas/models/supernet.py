"""The DARTS supernet: every edge a softmax(alpha)-weighted mixture of all primitives.

Weights and architecture parameters are kept apart (``weights()`` / ``alphas()``) so they
can get their own learning rates and optimisers, and ``forward`` accepts alphas as
arguments so a functional inner loop can pass adapted ones. Everything is a pure function
of (parameters, input): BatchNorm uses batch statistics and keeps no running state.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnas.genotypes import PRIMITIVES, Genotype, decode_genotype, edge_inputs, num_edges
from tnas.models.fast_edges import ExecutionPlan, FusedEdges
from tnas.models.skeleton import build_cells, make_stem
from tnas.models.source_folding import SourceFolding
from tnas.ops import FactorizedReduce, ReLUConvBN, make_op
from tnas.task_folding import Linear, cat_channels, scale_per_task, use_pointwise_mode

ALPHA_NAMES = ("alpha_normal", "alpha_reduce")


class MixedOp(nn.Module):
    """One edge: ``sum_o w_o * o(x)`` over the primitives, `none` left out (its output is 0).

    ``x``: ``[B, C, H, W]`` (or ``[B, T*C, H, W]``, T folded tasks); ``weights``:
    ``[len(PRIMITIVES) - 1]`` softmax weights of the ops after `none` (``[T, ...]`` per task).
    This is the reference computation; :mod:`tnas.models.fast_edges` (edge by edge) and
    :mod:`tnas.models.source_folding` (all edges from one state at once) compute the same sums
    with fewer kernels when the supernet's plan asks for it.
    """

    supports_task_folding = True

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList(make_op(name, channels, stride, affine=False) for name in PRIMITIVES[1:])

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return add_all(scale_per_task(op(x), w) for op, w in zip(self.ops, weights.unbind(-1)))


def add_all(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)`` without the extra kernel of adding the first term to 0."""
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total


class SearchCell(nn.Module):
    """A cell of the supernet: two preprocessed inputs, ``steps`` nodes, every node fed by all earlier ones."""

    supports_task_folding = True

    def __init__(self, steps: int, multiplier: int, c_prev_prev: int, c_prev: int, channels: int,
                 reduction: bool, reduction_prev: bool, plan: ExecutionPlan = ExecutionPlan()):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.channels = channels
        self.out_channels = multiplier * channels
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, affine=False) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(channels, 2 if reduction and source < 2 else 1) for _, source in edge_inputs(steps))
        # the plan's fast path, if any: all edges from a state at once, or edge by edge
        self.sources = (SourceFolding(self.edges, steps, channels, plan.branch_streams)
                        if plan.fold_sources else None)
        self.fused = (FusedEdges(self.edges, plan.branch_streams)
                      if plan.fused_edges and not plan.fold_sources else None)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``weights``: [num_edges, len(PRIMITIVES)] softmax weights (``[T, ...]`` per task);
        returns the concatenation of the last ``multiplier`` nodes."""
        op_weights = weights[..., 1:]  # `none` contributes zero
        inputs = [self.preprocess0(s0), self.preprocess1(s1)]
        if self.sources is not None:
            states = inputs + self.sources.nodes(self.edges, inputs, op_weights)
        else:
            mix, states, edge = self._mixer(op_weights), inputs, 0
            for _ in range(self.steps):  # each node: the sum of one edge from every earlier state
                states.append(add_all(mix(edge + source, state) for source, state in enumerate(states)))
                edge += len(states) - 1
        return cat_channels(states[-self.multiplier:], tasks=states[0].shape[1] // self.channels)

    def _mixer(self, op_weights: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``mix(edge, x)``: the edge's mixed op on ``x``, by the plan's path."""
        if self.fused is not None:
            return self.fused.mixer(self.edges, op_weights)
        per_edge = op_weights.unbind(-2)
        return lambda edge, x: self.edges[edge](x, per_edge[edge])


class Supernet(nn.Module):
    """DARTS supernet for few-shot classification.

    Args:
        n_way: classes of the classifier.
        C: channels of the first cell (doubled at each reduction).
        layers: 1 (one reduction cell), 2 (normal + reduction, the paper) or >= 3.
        steps, multiplier: intermediate nodes per cell and how many are concatenated.
        in_channels: 3 for RGB, 1 for grayscale.
        stem_multiplier: stem width is ``stem_multiplier * C``.
        plan: how to compute (:class:`tnas.models.fast_edges.ExecutionPlan`; the same numbers
            whatever it says): by default all edges from a cell state at once (source folding)
            and 1x1 convs as matmuls.
    Input ``[B, in_channels, H, W]`` with ``H, W >= min_image_size(layers)``; output logits ``[B, n_way]``.
    Runs T tasks at once with per-task parameters given T folded images ``[B, T*in_channels, H, W]``
    (:mod:`tnas.task_folding`); the logits are then ``[B, T*n_way]``.
    """

    supports_task_folding = True

    def __init__(self, n_way: int = 5, C: int = 16, layers: int = 2, steps: int = 4, multiplier: int = 4,
                 in_channels: int = 3, stem_multiplier: int = 3, plan: ExecutionPlan = ExecutionPlan()):
        super().__init__()
        self.plan = plan
        self.config = dict(n_way=n_way, C=C, layers=layers, steps=steps, multiplier=multiplier,
                           in_channels=in_channels, stem_multiplier=stem_multiplier)
        self.steps, self.multiplier = steps, multiplier
        stem_channels = stem_multiplier * C
        # The stem's two BNs are affine, as in the original code: their weights and biases are
        # adapted in the inner loop and meta-learned with the other weights.
        self.stem = make_stem(in_channels, stem_channels, affine=True)
        self.cells, c_prev = build_cells(
            lambda c_pp, c_p, channels, reduction, reduction_prev: SearchCell(
                steps, multiplier, c_pp, c_p, channels, reduction, reduction_prev, plan),
            stem_channels, C, layers)
        self.classifier = Linear(c_prev, n_way)
        shape = (num_edges(steps), len(PRIMITIVES))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape))
        use_pointwise_mode(self, plan.pointwise)

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
