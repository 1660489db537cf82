"""Source folding: all the edges of a supernet cell that read the same state, computed at once.

In a cell every state (the two preprocessed inputs, then each node) feeds E edges, one per
later node. :class:`tnas.models.fast_edges.FusedEdges` computes the edges one by one; this
module computes the E edges of a state together, the way task folding
(:mod:`tnas.task_folding`) runs T tasks at once:

- the ops that are the same on every edge from a state are computed ONCE for it: the
  max/avg pools with their parameter-free batch-statistics BN (``affine=False``: nothing
  per edge), and the stride-1 identity (the state itself);
- the ops with per-edge weights (the sep/dil convs, the stride-2 skip's FactorizedReduce)
  run on the state's ReLU repeated edge-major, ``[N, E*T*C, H, W]`` (edge e, task t owns
  channels ``(e*T + t)*C ..``), with the E edges' weights of each conv layer stacked to
  ``[E*T, ...]`` (``[E, ...]`` unfolded and shared): one grouped conv or batched matmul per
  conv layer of an op, whatever E. Every edge's output is a contiguous channel block;
- all these ops' final BNs are ONE batch norm over all their channels (statistics are per
  channel, so these are the numbers of the separate BNs);
- each edge's (and task's) ``softmax(alpha)`` row weights the results, giving
  ``[N, E, T, C, H', W']``; the nodes sum their incoming edges' blocks as the states are
  folded one after another (a node is complete once every earlier state has been).

The stride is the same on every edge from a state (reduction cell: 2 from the two inputs,
1 from the nodes). The parameters stay in the cell's per-edge ``MixedOp`` modules (so
checkpoints and the reference path do not change); their weights are stacked at forward time
(the stack's backward hands each edge its slice). On a GPU the op chains of a state can run
side by side on CUDA streams (:mod:`tnas.models.branches`), as the ops of a fused edge do.
The float64 tests compare this path with ``MixedOp``'s sum in value and gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnas.genotypes import edge_inputs
from tnas.models.branches import assign_lanes, run_branches
from tnas.models.fast_edges import ConvCall, convolutions, final_norm, gather_columns, pre_norm
from tnas.ops import Identity, Pool
from tnas.task_folding import Conv2d

__all__ = ["SourceFolding", "stack_parameters"]


@dataclass(frozen=True)
class _Source:
    """The edges that read one state and what is done with each op column (indices into the K
    ops of a ``MixedOp``, ``len(PRIMITIVES) - 1``)."""

    state: int  # 0, 1: the cell's preprocessed inputs; 2 + i: node i
    edges: Tuple[int, ...]  # the alpha rows of its edges, to nodes first_node, first_node + 1, ...
    first_node: int
    pools: Tuple[int, ...]  # shared ops ending in a parameter-free BN: computed once
    identity: Optional[int]  # the stride-1 identity: the state itself
    per_edge: Tuple[int, ...]  # ops with per-edge weights, ending in a parameter-free BN
    eps: float  # of the one BN over all the normalised ops
    lanes: Tuple[int, ...]  # stream lane of each op of pools + per_edge


def _fold_layout(state: int, edges: Sequence[int], first_node: int, edge_ops: Sequence[Sequence[nn.Module]],
                 streams: int) -> _Source:
    """Check that the edges' ops agree position by position and sort the op columns; a ValueError
    names the first op that has no source-folded form."""
    first = edge_ops[0]
    for ops in edge_ops[1:]:
        if [str(op) for op in ops] != [str(op) for op in first]:
            raise ValueError(f"the edges from state {state} do not have the same ops; cannot fold them")
    pools, per_edge, identity, epsilons = [], [], None, set()
    for column, op in enumerate(first):
        norm = final_norm(op)
        if isinstance(op, Identity):
            identity = column
            continue
        if norm is None:
            raise ValueError(f"{type(op).__name__} does not end in a parameter-free BatchNorm; cannot fold sources")
        epsilons.add(norm.eps)
        if isinstance(op, Pool):
            pools.append(column)
            continue
        affine = [m for m in op.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
        plain = [m for m in op.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, Conv2d)]
        if affine or plain:
            raise ValueError(f"{type(op).__name__} has a BatchNorm with per-edge parameters or a conv without "
                             f"folded weights; cannot fold sources")
        per_edge.append(column)
    if len(epsilons) > 1:
        raise ValueError(f"the ops of an edge normalise with different eps {sorted(epsilons)}")
    normalized = pools + per_edge
    lanes = assign_lanes([convolutions(first[column]) for column in normalized], streams)
    return _Source(state, tuple(edges), first_node, tuple(pools), identity, tuple(per_edge),
                   epsilons.pop() if epsilons else 1e-5, tuple(lanes))


def stack_parameters(values: Sequence[torch.Tensor], tasks: int, dims: int) -> torch.Tensor:
    """One layer's parameter in E edges (``values``, each ``[T, *shape]`` per task or ``[*shape]``
    shared, ``dims = len(shape)``) for E*T channel groups ordered edge-major: ``[E*T, *shape]``,
    or ``[E, *shape]`` when unfolded (T 1) and shared. One copy (the stack; shared values folded
    with T > 1 a second, the repeat over tasks)."""
    if all(value.dim() == dims for value in values):
        stacked = torch.stack(list(values))  # [E, *shape]
        return stacked if tasks == 1 else stacked.unsqueeze(1).expand(-1, tasks, *stacked.shape[1:]).flatten(0, 1)
    per_task = [value if value.dim() == dims + 1 else value.expand(tasks, *value.shape) for value in values]
    return torch.stack(per_task).flatten(0, 1)


def _stacked_convs(ops: Sequence[nn.Module], tasks: int) -> ConvCall:
    """The conv hook of :func:`tnas.models.fast_edges.pre_norm` that applies a conv layer of
    ``ops[0]`` with the weights of that layer in every op of ``ops`` (one op per edge), stacked."""
    layers = [[m for m in op.modules() if isinstance(m, nn.Conv2d)] for op in ops]
    siblings = {id(group[0]): group for group in zip(*layers)}

    def conv(layer: Conv2d, x: torch.Tensor) -> torch.Tensor:
        group = siblings[id(layer)]
        bias = None if layer.bias is None else stack_parameters([m.bias for m in group], tasks, 1)
        return layer.convolve(x, stack_parameters([m.weight for m in group], tasks, 4), bias)

    return conv


class SourceFolding:
    """The source-folded computation of a cell's nodes (see the module docstring).

    Built from the cell's ``MixedOp`` edges (alpha row order, :func:`tnas.genotypes.edge_inputs`);
    holds only their layout (no modules, so the parameters stay where they are). ``channels``:
    C, the channels of every state; ``branch_streams``: side CUDA streams for a state's op chains.
    """

    def __init__(self, edges: Sequence[nn.Module], steps: int, channels: int, branch_streams: int):
        self.steps, self.channels, self.streams = steps, channels, branch_streams
        pairs = edge_inputs(steps)
        if len(pairs) != len(edges):
            raise ValueError(f"{len(edges)} edges do not make a cell of {steps} steps ({len(pairs)} edges)")
        self.sources: List[_Source] = []
        for state in range(steps + 1):  # the last node feeds no edge
            rows = [index for index, (_, source) in enumerate(pairs) if source == state]
            self.sources.append(_fold_layout(state, rows, pairs[rows[0]][0], [edges[i].ops for i in rows],
                                             branch_streams))

    def nodes(self, edges: Sequence[nn.Module], inputs: Sequence[torch.Tensor],
              op_weights: torch.Tensor) -> List[torch.Tensor]:
        """The cell's ``steps`` nodes, each ``[N, T*C, H', W']``, from its two preprocessed inputs
        ``[N, T*C, H, W]`` (T folded tasks, or 1) and ``op_weights``: ``[num_edges, K]`` softmax
        weights of the ops after `none`, or ``[T, num_edges, K]`` per task. Node i equals
        ``sum_j edges[row(i, j)](state_j, op_weights[..., row(i, j), :])`` over its inputs j."""
        rows = (op_weights if op_weights.dim() == 3 else op_weights.unsqueeze(0)).unbind(-2)  # each [T_w, K]
        tasks = inputs[0].shape[1] // self.channels
        states, nodes = list(inputs), []
        pending = None  # [N, E, T, C, H', W']: the sums so far of nodes len(nodes) .. steps-1
        for source in self.sources:
            if source.state >= 2:  # every earlier state is in: node state-2 is complete
                complete, pending = pending.split([1, pending.shape[1] - 1], dim=1)  # backward: one cat
                nodes.append(complete.flatten(1, 3))
                states.append(nodes[-1])
            weights = torch.stack([rows[i] for i in source.edges], dim=-2)  # [T_w, E, K]
            out = self._source(source, [edges[i].ops for i in source.edges], states[source.state], weights, tasks)
            pending = out if pending is None else pending + out
        nodes.append(pending.flatten(1, 3))  # the last node's sum: [N, 1, T, C, H', W']
        return nodes

    def _source(self, source: _Source, edge_ops: Sequence[Sequence[nn.Module]], x: torch.Tensor,
                weights: torch.Tensor, tasks: int) -> torch.Tensor:
        """The E edges from state ``x`` ``[N, T*C, H, W]``, weighted by ``weights`` ``[T_w, E, K]``
        (T_w: T, or 1 for weights shared by the tasks): ``[N, E, T, C, H', W']``."""
        count = len(source.edges)
        first = edge_ops[0]
        rectified = F.relu(x)  # shared by every op that starts with a ReLU
        repeated = rectified if count == 1 else rectified.repeat(1, count, 1, 1)  # [N, E*T*C, H, W]
        branches = [lambda op=first[column]: pre_norm(op, x, None) for column in source.pools]
        branches += [lambda column=column: pre_norm(first[column], None, repeated,
                                                    _stacked_convs([ops[column] for ops in edge_ops], tasks))
                     for column in source.per_edge]
        outputs = run_branches(branches, source.lanes, [x, repeated], self.streams)
        # one BN over [pools: P*T*C | per-edge ops: Q*E*T*C] channels
        normalized = F.batch_norm(torch.cat(outputs, dim=1), None, None, training=True, momentum=0.0, eps=source.eps)
        shared = len(source.pools) * x.shape[1]
        pools, per_edge = normalized.split([shared, normalized.shape[1] - shared], dim=1)  # views; backward: one cat
        size = normalized.shape[-2:]
        per_edge = per_edge.view(x.shape[0], len(source.per_edge), count, tasks, self.channels, *size)
        out = (per_edge * _term_weights(weights, source.per_edge)).sum(1)  # [N, E, T, C, H', W']
        if source.pools:  # the same terms for every edge, weighted per edge
            pools = pools.view(x.shape[0], len(source.pools), 1, tasks, self.channels, *size)
            out = out + (pools * _term_weights(weights, source.pools)).sum(1)
        if source.identity is not None:
            identity = weights[..., source.identity].t()[None, :, :, None, None, None]  # [1, E, T_w, 1, 1, 1]
            out = out + x.view(x.shape[0], 1, tasks, self.channels, *x.shape[2:]) * identity
        return out


def _term_weights(weights: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """``weights`` ``[T_w, E, K]``'s ``columns`` (Q of them) shaped to multiply terms
    ``[N, Q, E or 1, T, C, H, W]``: ``[1, Q, E, T_w, 1, 1, 1]`` (a view of the gathered columns)."""
    return gather_columns(weights, columns).permute(2, 1, 0)[None, :, :, :, None, None, None]
