"""The supernet's fast edge path, and the :class:`ExecutionPlan` that chooses it.

:class:`tnas.models.supernet.MixedOp` computes an edge as the method states it,
``sum_o w_o * o(x)``. At the paper setting that is a few thousand small kernels per
forward, and on a GPU the host that launches them is the bottleneck. This module computes
the SAME edges (the float64 tests compare both paths in value and gradient) with fewer
kernels, from the same modules and parameters (so checkpoints do not depend on the path):

- one ReLU per edge, shared by every op that starts with one (the sep/dil convs and the
  stride-2 skip), instead of one per op;
- one BatchNorm per edge: every supernet op but the identity ends in a parameter-free BN
  (``affine=False``, batch statistics); those ops' outputs before it are stacked as
  ``[B, K, C, H, W]`` and normalised as ``K*C`` channels (statistics are per channel, so
  these are the numbers of K separate BNs), then weighted by one multiply and one sum;
- the weights of those K ops gathered once per cell, not once per edge;
- on a GPU, the ops with convolutions side by side on CUDA streams
  (:mod:`tnas.models.branches`).

Source folding (:mod:`tnas.models.source_folding`, ``plan.fold_sources``) goes one step
further on the same pieces: all the edges that read one cell state at once.

Which path runs is the model's constructor argument ``plan`` (nothing global): the
supernet's cells hold a :class:`tnas.models.source_folding.SourceFolding` when
``plan.fold_sources`` (the default), a :class:`FusedEdges` when only ``plan.fused_edges``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnas.models.branches import assign_lanes, run_branches
from tnas.ops import ConvCall, DilConv, FactorizedReduce, Pool, SepConv, own_weights
from tnas.task_folding import POINTWISE_MODES, scale_per_task, weighted_sum

__all__ = ["ExecutionPlan", "REFERENCE", "FusedEdges", "gather_columns", "pre_norm", "final_norm", "EdgeLayout",
           "edge_layout", "ConvCall"]


@dataclass(frozen=True)
class ExecutionPlan:
    """How a model computes (never what): every plan gives the same numbers.

    ``fused_edges``: the supernet's edges through :class:`FusedEdges` (shared ReLU, one BN per
    edge) instead of ``MixedOp``'s plain sum. ``fold_sources``: further, every edge that reads
    the same cell state computed at once (:class:`tnas.models.source_folding.SourceFolding`:
    the pools and the identity once per state, the convs of all its edges as one grouped conv
    per op layer); it is built on the fused path's pieces, so it needs ``fused_edges``.
    ``branch_streams``: side CUDA streams for the op chains of a fused edge, or of a folded
    state (0: one stream; ignored off a GPU). ``pointwise``: folded 1x1 convolutions as batched
    matmuls or grouped convs (:func:`tnas.task_folding.use_pointwise_mode`).
    The default is the fastest measured (source folding: the fewest operators, 13,300 instead of
    23,800 per T-NAS meta-iteration); :data:`REFERENCE` is the textbook computation.
    """

    fused_edges: bool = True
    branch_streams: int = 3
    pointwise: str = "matmul"
    fold_sources: bool = True

    def __post_init__(self):
        if self.fold_sources and not self.fused_edges:
            raise ValueError("fold_sources needs fused_edges (it builds on the fused edge path); "
                             "pass fold_sources=False for the plain MixedOp sum")
        if self.branch_streams < 0:
            raise ValueError(f"the number of branch streams must be >= 0, got {self.branch_streams}")
        if self.pointwise not in POINTWISE_MODES:
            raise ValueError(f"pointwise mode must be one of {POINTWISE_MODES}, got {self.pointwise!r}")


REFERENCE = ExecutionPlan(fused_edges=False, branch_streams=0, pointwise="conv", fold_sources=False)
"""The plain computation: ``MixedOp``'s ``sum(w * op(x))`` and every conv a (grouped) convolution."""


def pre_norm(op: nn.Module, x: Optional[torch.Tensor], rectified: Optional[torch.Tensor],
             conv: ConvCall = own_weights) -> torch.Tensor:
    """``op(x)`` before its final parameter-free BN (an op of :func:`final_norm`), given
    ``rectified = relu(x)`` (the ops with convolutions read it, the pools ``x``), each conv layer
    applied by ``conv``. Shapes: ``[B, G*C, H, W]`` in, ``[B, G*C, H', W']`` out for G channel
    groups (tasks; for source folding edges x tasks)."""
    if isinstance(op, DilConv):  # ReLU, depthwise, pointwise, BN
        return conv(op[2], conv(op[1], rectified))
    if isinstance(op, SepConv):  # DilConv, DilConv
        return pre_norm(op[1], None, F.relu(op[0][3](conv(op[0][2], conv(op[0][1], rectified)))), conv)
    if isinstance(op, FactorizedReduce):
        return op.convolve(rectified, conv)
    if isinstance(op, Pool):
        return op.pool(x)
    raise TypeError(f"no fused form for {type(op).__name__}")


def final_norm(op: nn.Module) -> Optional[nn.BatchNorm2d]:
    """The parameter-free BN an op ends in, or None (identity, or a BN with affine parameters)."""
    norm = {DilConv: lambda: op[3], SepConv: lambda: op[1][3], FactorizedReduce: lambda: op.bn,
            Pool: lambda: op.bn}.get(type(op), lambda: None)()
    return norm if norm is not None and not norm.affine else None


def convolutions(op: nn.Module) -> int:
    """The conv layers of ``op`` (its cost when ops are spread over streams)."""
    return sum(isinstance(m, nn.Conv2d) for m in op.modules())


@dataclass(frozen=True)
class EdgeLayout:
    """Which ops of an edge are normalised together (``normalized``) and which run whole (``plain``)."""

    normalized: Tuple[int, ...]
    plain: Tuple[int, ...]
    eps: float
    lanes: Tuple[int, ...]


def edge_layout(ops: Sequence[nn.Module], streams: int) -> EdgeLayout:
    """The layout of an edge's ops (a ``MixedOp``'s ``ops``), with the ops that have convolutions on
    side-stream lanes (:func:`tnas.models.branches.assign_lanes`)."""
    norms = [final_norm(op) for op in ops]
    normalized = tuple(i for i, norm in enumerate(norms) if norm is not None)
    epsilons = {norms[i].eps for i in normalized}
    if len(epsilons) > 1:
        raise ValueError(f"the ops of an edge normalise with different eps {sorted(epsilons)}")
    lanes = assign_lanes([convolutions(op) for op in ops], streams)  # ops with convs go to side streams
    return EdgeLayout(normalized, tuple(i for i in range(len(ops)) if i not in normalized),
                       epsilons.pop() if epsilons else 1e-5, tuple(lanes))


class FusedEdges:
    """The fused computation of a cell's edges (see the module docstring).

    Built from the cell's ``MixedOp`` edges; holds only their layout (no modules, so the
    cell's parameters stay where they are). ``mixer(edges, op_weights)`` returns
    ``mix(index, x)``, the value of edge ``index`` on its input ``x`` ``[B, C, H, W]`` (or
    folded ``[B, T*C, H, W]``), equal to ``edges[index](x, op_weights[..., index, :])``.
    """

    def __init__(self, edges: Sequence[nn.Module], branch_streams: int):
        self.layouts = [edge_layout(edge.ops, branch_streams) for edge in edges]
        self.streams = branch_streams

    def mixer(self, edges: Sequence[nn.Module], op_weights: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``op_weights``: ``[num_edges, K]`` softmax weights of the ops after `none` (``[T, num_edges, K]``
        per task)."""
        per_edge = op_weights.unbind(-2)
        # the normalised ops' columns, gathered once per distinct set of them (not once per edge)
        gathered = {}
        for layout in self.layouts:
            if layout.normalized not in gathered:
                gathered[layout.normalized] = gather_columns(op_weights, layout.normalized).unbind(-2)

        def mix(index: int, x: torch.Tensor) -> torch.Tensor:
            layout = self.layouts[index]
            return self._edge(edges[index].ops, layout, x, per_edge[index], gathered[layout.normalized][index])

        return mix

    def _edge(self, ops: Sequence[nn.Module], layout: EdgeLayout, x: torch.Tensor, weights: torch.Tensor,
              normalized_weights: torch.Tensor) -> torch.Tensor:
        rectified = F.relu(x)  # shared by the ops that start with a ReLU
        branches = [(lambda op=op: pre_norm(op, x, rectified)) if i in layout.normalized else (lambda op=op: op(x))
                    for i, op in enumerate(ops)]
        outputs = run_branches(branches, layout.lanes, [x, rectified], self.streams)
        out = None
        if layout.normalized:
            stacked = torch.stack([outputs[i] for i in layout.normalized], dim=1)  # [B, K, C, H, W]
            normalized = F.batch_norm(stacked.view(stacked.shape[0], -1, *stacked.shape[3:]), None, None,
                                      training=True, momentum=0.0, eps=layout.eps).view(stacked.shape)
            out = weighted_sum(normalized, normalized_weights)
        for i in layout.plain:
            term = scale_per_task(outputs[i], weights[..., i])
            out = term if out is None else out + term
        return out


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
