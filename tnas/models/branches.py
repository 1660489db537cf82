"""Independent branches of a network (the candidate ops of a supernet edge) on concurrent CUDA streams.

At the paper setting a T-NAS meta-iteration is some 23,000 kernels of a few microseconds
each (``benchmarks/profile_meta_iter.py``): each fills a small part of the GPU, and one
stream runs them one after another. The ops of a supernet edge do not depend on each
other, so :func:`run_branches` puts them on a few side streams: the GPU runs them side by
side, and autograd runs each op's backward on the stream of its forward, so the backward
overlaps too. Inside a CUDA graph (``--cuda_graph``) the streams become parallel branches
of the graph.

The kernels are the same as on one stream, so are the results. On a CPU, under
``torch.func`` transforms (vmap batching) or with ``streams=0`` (the caller's choice, see
:class:`tnas.models.fast_edges.ExecutionPlan`) the branches run in order on the current stream.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch

__all__ = ["run_branches", "assign_lanes"]

_side_streams: Dict[torch.device, List["torch.cuda.Stream"]] = {}
"""Side streams made so far, per device (a cache of CUDA resources, reused by every caller)."""


def assign_lanes(costs: Sequence[int], streams: int) -> List[int]:
    """A lane per branch: 0 (the current stream) for the branches of cost 0, the others spread
    over lanes ``1..streams`` heaviest first, each to the least loaded lane."""
    lanes = [0] * len(costs)
    if streams < 1:
        return lanes
    load = [0] * (streams + 1)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        if costs[index] > 0:
            lane = min(range(1, streams + 1), key=lambda k: load[k])
            lanes[index] = lane
            load[lane] += costs[index]
    return lanes


def _streams_for(device: torch.device, count: int) -> List["torch.cuda.Stream"]:
    streams = _side_streams.setdefault(device, [])
    while len(streams) < count:  # made once, in the eager warm-up, never while a graph is recorded
        streams.append(torch.cuda.Stream(device=device))
    return streams[:count]


def _concurrent(inputs: Sequence[torch.Tensor], streams: int) -> bool:
    first = inputs[0]
    return (streams > 0 and first.is_cuda
            and not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in inputs))


def run_branches(branches: Sequence[Callable[[], torch.Tensor]], lanes: Sequence[int],
                 inputs: Sequence[torch.Tensor], streams: int) -> List[torch.Tensor]:
    """``[branch() for branch in branches]``, branch i on lane ``lanes[i]``.

    Lane 0 is the current stream; lane k > 0 the k-th of at most ``streams`` side streams
    (lanes past ``streams`` fold back onto the existing ones; 0: all in order on the current
    stream). ``inputs``: the tensors
    made on the current stream that the branches read; they and the outputs are marked for
    the caching allocator (``record_stream``), so no memory is reused while another stream
    still reads it.
    """
    if streams < 0:
        raise ValueError(f"the number of branch streams must be >= 0, got {streams}")
    if not _concurrent(inputs, streams):
        return [branch() for branch in branches]
    device = inputs[0].device
    current = torch.cuda.current_stream(device)
    used = sorted({lane for lane in lanes if lane > 0})
    side = _streams_for(device, min(len(used), streams))
    stream_of = {lane: side[i % len(side)] for i, lane in enumerate(used)}
    for stream in side:
        stream.wait_stream(current)
    for tensor in inputs:
        for stream in side:
            tensor.record_stream(stream)
    outputs: List[torch.Tensor] = [None] * len(branches)  # type: ignore[list-item]
    for index, (branch, lane) in enumerate(zip(branches, lanes)):
        if lane == 0:
            continue
        with torch.cuda.stream(stream_of[lane]):
            outputs[index] = branch()
    for index, (branch, lane) in enumerate(zip(branches, lanes)):
        if lane == 0:
            outputs[index] = branch()
    for stream in side:
        current.wait_stream(stream)
    for index, lane in enumerate(lanes):
        if lane > 0:
            outputs[index].record_stream(current)
    return outputs
