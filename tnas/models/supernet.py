"""The DARTS supernet: every edge a softmax(alpha)-weighted mixture of all primitives.

Weights and architecture parameters are kept apart (``weights()`` / ``alphas()``) so they
can get their own learning rates and optimisers, and ``forward`` accepts alphas as
arguments so a functional inner loop can pass adapted ones. Everything is a pure function
of (parameters, input): BatchNorm uses batch statistics and keeps no running state.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnas.genotypes import PRIMITIVES, Genotype, decode_genotype, edge_inputs, num_edges
from tnas.models.branches import assign_lanes, run_branches
from tnas.models.skeleton import build_cells, make_stem
from tnas.ops import FactorizedReduce, ReLUConvBN, make_op
from tnas.task_folding import Linear, cat_channels, scale_per_task, weighted_sum

ALPHA_NAMES = ("alpha_normal", "alpha_reduce")


class MixedOp(nn.Module):
    """One edge: ``sum_o w_o * o(x)`` over the primitives except `none` (whose output is 0).

    Every supernet op but the identity ends in a parameter-free BatchNorm (``affine=False``;
    only the stem's BNs are affine).
    Those ops' outputs before that BN are stacked as ``[B, K, C, H, W]`` and normalised by ONE
    BatchNorm over ``K*C`` channels (per-channel statistics, so the same numbers as K separate
    BNs), then weighted: a few kernels per edge instead of a BN forward and backward per op.
    On a GPU the ops with convolutions run side by side on CUDA streams
    (:mod:`tnas.models.branches`).
    """

    supports_task_folding = True

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.ops = nn.ModuleList(make_op(name, channels, stride, affine=False) for name in PRIMITIVES[1:])
        norms = [getattr(op, "final_norm", None) for op in self.ops]
        self.normalized = [i for i, norm in enumerate(norms) if norm is not None and not norm.affine]
        self.plain = [i for i in range(len(self.ops)) if i not in self.normalized]
        epsilons = {norms[i].eps for i in self.normalized}
        if len(epsilons) > 1:
            raise ValueError(f"the ops of an edge normalise with different eps {sorted(epsilons)}")
        self.eps = epsilons.pop() if epsilons else 1e-5
        # convolutions per op: ops with some go to side streams, balanced by that count
        self.lanes = assign_lanes([sum(isinstance(m, nn.Conv2d) for m in op.modules()) for op in self.ops])

    def normalized_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The columns of ``weights`` ``[..., len(PRIMITIVES) - 1]`` for the ops normalised together
        (slices and at most one cat; :class:`SearchCell` does it once for all its edges)."""
        return gather_columns(weights, self.normalized)

    def forward(self, x: torch.Tensor, weights: torch.Tensor,
                normalized_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: [B, C, H, W]; ``weights``: [len(PRIMITIVES) - 1] softmax weights of the ops after
        `none` (folded: ``[T, len(PRIMITIVES) - 1]`` for per-task alphas); ``normalized_weights``:
        :meth:`normalized_weights` of them, if already at hand."""
        rectified = F.relu(x)  # shared by the ops that start with a ReLU (convs, factorized reduce)
        branches = [self._branch(i, x, rectified) for i in range(len(self.ops))]
        outputs = run_branches(branches, self.lanes, [x, rectified])
        stacked = torch.stack([outputs[i] for i in self.normalized], dim=1)  # [B, K, C, H, W]
        normalized = F.batch_norm(stacked.view(stacked.shape[0], -1, *stacked.shape[3:]), None, None,
                                  training=True, momentum=0.0, eps=self.eps).view(stacked.shape)
        if normalized_weights is None:
            normalized_weights = self.normalized_weights(weights)
        out = weighted_sum(normalized, normalized_weights)
        for i in self.plain:
            out = out + scale_per_task(outputs[i], weights[..., i])
        return out

    def _branch(self, index: int, x: torch.Tensor, rectified: torch.Tensor):
        """Op ``index`` as a call: its output before its final BN if normalised with the others."""
        op = self.ops[index]
        if index in self.normalized:
            if hasattr(op, "pre_norm_after_relu"):
                return lambda: op.pre_norm_after_relu(rectified)
            return lambda: op.pre_norm(x)
        if hasattr(op, "after_relu"):
            return lambda: op.after_relu(rectified)
        return lambda: op(x)


def gather_columns(weights: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """``weights[..., columns]`` for increasing ``columns``, as slices of consecutive runs and one
    cat (an index tensor would be a host-to-device copy on every call)."""
    runs: List[List[int]] = []
    for column in columns:
        if runs and runs[-1][0] + runs[-1][1] == column:
            runs[-1][1] += 1
        else:
            runs.append([column, 1])
    pieces = [weights.narrow(-1, start, length) for start, length in runs]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


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
        op_weights = weights[..., 1:]  # `none` contributes zero
        edge_weights = op_weights.unbind(-2)  # one view per edge
        # the normalised ops' columns, gathered once per distinct set of them (not once per edge)
        gathered: Dict[Tuple[int, ...], Tuple[torch.Tensor, ...]] = {}
        for edge in self.edges:
            key = tuple(edge.normalized)
            if key not in gathered:
                gathered[key] = edge.normalized_weights(op_weights).unbind(-2)
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        edge = 0
        for _ in range(self.steps):
            node = None
            for source in range(len(states)):
                mixed = self.edges[edge + source]
                term = mixed(states[source], edge_weights[edge + source],
                             gathered[tuple(mixed.normalized)][edge + source])
                node = term if node is None else node + term
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
        # The stem's two BNs are affine, as in the original code: their weights and biases are
        # adapted in the inner loop and meta-learned with the other weights.
        self.stem = make_stem(in_channels, stem_channels, affine=True)
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
