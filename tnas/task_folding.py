"""Task folding: one forward pass of a network for T tasks at once, each task with its own parameters.

MAML adapts a copy of the parameters per task, so a meta-batch of T tasks runs T different
networks on T image batches of the same shape. Folding runs them as ONE network: the
activations of the T tasks are stacked as channel groups, ``[N, T*C, H, W]`` (task t owns
channels ``t*C .. (t+1)*C-1``), and

- a convolution with per-task weights ``[T, C_out, C_in/g, kh, kw]`` is one grouped
  convolution with ``g*T`` groups (the weights reshaped to ``[T*C_out, C_in/g, kh, kw]``);
- BatchNorm over ``T*C`` channels computes each task's own batch statistics (statistics are
  per channel), with per-task affine parameters ``[T, C]`` flattened to ``[T*C]``;
- elementwise ops and pooling act per channel and need nothing;
- concatenation of cell states, the mixed-op weighting by per-task alphas and the
  classifier (a batched matrix product) are task-aware (:func:`cat_channels`,
  :func:`scale_per_task`, :func:`weighted_sum`, :class:`Linear`).

No state says "we are folded": the data does. A layer built for ``C`` input channels that
receives ``T*C`` reads T channel groups (``T = x.shape[1] // C``); a per-task parameter
carries T as its leading dimension; the helpers that cannot see T take it as an argument
(:func:`cat_channels`, :func:`sample_mask`, whose callers know their per-task channels). A
data-parallel process that holds a slice of a meta-batch's tasks folds only those; a
:class:`TaskWindow` tells :func:`sample_mask` where they sit in the whole batch.
With T = 1 and unbatched parameters every layer is exactly its torch parent.

Parameters without a task dimension (shared by all tasks, e.g. the alphas of auto-MAML's
weight-only inner loop) are repeated across the groups. Everything is plain autograd, so
first- and second-order meta-gradients, CUDA graphs and ``torch.compile`` work as for a
single network; it dispatches far fewer (and no per-op batching-rule) operations than
``torch.func.vmap`` over tasks, whose result it equals (see ``tests/test_task_folding.py``).

Modules take part through the layers below (drop-in subclasses of ``nn.Conv2d``,
``nn.BatchNorm2d``, ``nn.Linear``) and the helpers; :func:`supports_folding` says whether a
whole model does. The models of :mod:`tnas.models` all do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["groups_of", "fold_images", "unfold_logits", "fold_parameter", "cat_channels", "weighted_sum", "scale_per_task",
           "TaskWindow", "sample_mask", "POINTWISE_MODES", "use_pointwise_mode", "Conv2d", "BatchNorm2d", "Linear",
           "supports_folding"]


def groups_of(x: torch.Tensor, channels: int) -> int:
    """T, the channel groups of a folded activation ``x`` ``[N, T*channels, ...]`` (1 when unfolded)."""
    if x.shape[1] % channels:
        raise ValueError(f"an input of {x.shape[1]} channels is not a whole number of task groups of {channels} "
                         f"(this layer takes {channels} channels per task, T*{channels} for T folded tasks: "
                         f"is the model's in_channels that of the images?)")
    return x.shape[1] // channels


def fold_images(x: torch.Tensor) -> torch.Tensor:
    """``[T, N, C, H, W] -> [N, T*C, H, W]`` (one copy)."""
    tasks, count, channels = x.shape[:3]
    return x.transpose(0, 1).reshape(count, tasks * channels, *x.shape[3:])


def unfold_logits(logits: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[N, T*n] -> [T, N, n]`` (a view)."""
    return logits.view(logits.shape[0], tasks, -1).transpose(0, 1)


def fold_parameter(value: Optional[torch.Tensor], tasks: int, dims: int) -> Optional[torch.Tensor]:
    """A layer parameter of ``dims`` dimensions for the folded layer: ``[T, d0, ...]`` (per task)
    becomes ``[T*d0, ...]``; ``[d0, ...]`` (shared) is repeated ``T`` times along d0."""
    if value is None:
        return None
    if value.dim() == dims + 1:
        if value.shape[0] != tasks:
            raise ValueError(f"a per-task parameter of shape {tuple(value.shape)} does not match {tasks} folded tasks")
        return value.reshape(tasks * value.shape[1], *value.shape[2:])
    if value.dim() != dims:
        raise ValueError(f"expected a parameter of {dims} (shared) or {dims + 1} (per-task) dimensions, "
                         f"got shape {tuple(value.shape)}")
    return value.repeat(tasks, *([1] * (dims - 1)))


def _grouped(x: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[N, T*C, ...] -> [N, T, C, ...]`` (a view)."""
    return x.view(x.shape[0], tasks, x.shape[1] // tasks, *x.shape[2:])


def cat_channels(states: Sequence[torch.Tensor], tasks: int) -> torch.Tensor:
    """``torch.cat(states, dim=1)`` of each task's channel group, for ``tasks`` folded tasks: task t's
    channels of every state stay together (``tasks`` 1: the plain concatenation)."""
    if tasks == 1:
        return torch.cat(list(states), dim=1)
    first = states[0]
    joined = torch.cat([_grouped(state, tasks) for state in states], dim=2)
    return joined.view(first.shape[0], -1, *first.shape[2:])


def weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * stacked[:, k]`` for ``stacked`` [N, K, C, H, W] and ``weights`` [K], or
    (folded) per task: task t's channels weighted by ``weights[t]`` of ``weights`` [T, K].
    One multiply and one reduction, whatever K (a chain of K multiply-adds is 2K kernels).
    The terms sit on dim 1 so that the stack also reads as ``[N, K*C, H, W]``, one BatchNorm
    input for all K terms (see :class:`tnas.models.supernet.MixedOp`)."""
    trailing = [1] * (stacked.dim() - 3)
    if weights.dim() == 1:
        return (stacked * weights.view(1, -1, 1, *trailing)).sum(1)
    tasks = _folded_tasks_for(weights, stacked.shape[2], terms=stacked.shape[1])
    grouped = stacked.view(stacked.shape[0], stacked.shape[1], tasks, -1, *stacked.shape[3:])
    return (grouped * weights.t().reshape(1, stacked.shape[1], tasks, 1, *trailing)).sum(1).view(
        stacked.shape[0], *stacked.shape[2:])


def scale_per_task(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * x`` for a scalar ``weight`` [], or (folded) task t's channels of ``x``
    [N, T*C, ...] times ``weight[t]`` of ``weight`` [T]."""
    if weight.dim() == 0:
        return x * weight
    tasks = _folded_tasks_for(weight, x.shape[1])
    return (_grouped(x, tasks) * weight.view(1, tasks, *([1] * (x.dim() - 1)))).view(x.shape)


def _folded_tasks_for(weights: torch.Tensor, channels: int, terms: Optional[int] = None) -> int:
    """T of per-task ``weights`` (``[T]``, or ``[T, terms]``) applied to ``channels`` folded channels;
    a ValueError when the channels are not T groups or the terms do not match."""
    tasks = weights.shape[0]
    expected = (tasks,) if terms is None else (tasks, terms)
    if weights.shape != expected or channels % tasks:
        raise ValueError(f"per-task weights of shape {tuple(weights.shape)} need {tasks} folded task groups in "
                         f"{channels} channels" + ("" if terms is None else f" and {terms} terms"))
    return tasks


@dataclass(frozen=True)
class TaskWindow:
    """Tasks ``start .. stop-1`` of a meta-batch of ``total`` tasks: the slice one data-parallel
    process computes (:func:`tnas.stages.common.data_parallel`).

    A model that draws random numbers per task (drop-path, :func:`sample_mask`) draws them for
    all ``total`` tasks and keeps the window's, so that the processes together draw exactly what
    one process draws for the whole meta-batch (every process's generator is seeded alike and
    makes the same calls as that one process)."""

    start: int
    stop: int
    total: int

    def __post_init__(self):
        if not 0 <= self.start < self.stop <= self.total:
            raise ValueError(f"a task window {self.start}:{self.stop} must be a non-empty part of 0:{self.total}")

    @classmethod
    def of(cls, part: slice, total: int) -> "TaskWindow":
        """The window of ``part`` (a slice with start and stop, as :func:`tnas.distributed.task_slice` gives)."""
        return cls(part.start, part.stop, total)

    @property
    def size(self) -> int:
        return self.stop - self.start


def sample_mask(x: torch.Tensor, keep: float, tasks: int, window: Optional[TaskWindow] = None) -> torch.Tensor:
    """A Bernoulli(``keep``) mask that zeroes whole samples of ``x``, drawn per task of ``tasks``
    folded ones, shaped to multiply ``x`` (``[N, T*C, H, W]``; ``tasks`` 1: one draw per sample).

    With a ``window`` (``tasks`` must be its size, else a ValueError: a forward under a window
    holds exactly its slice of the meta-batch) the draw is ``[N, window.total]``, of which the
    window's columns are kept: the numbers one process draws for those tasks. One tensor op, no
    host sync, so it records in a CUDA graph as the unwindowed draw does."""
    if window is not None:
        if tasks != window.size:
            raise ValueError(f"a forward of {tasks} folded task(s) under the task window {window.start}:{window.stop} "
                             f"of {window.total} tasks: it must hold exactly the window's {window.size}")
        full = torch.bernoulli(torch.full((x.shape[0], window.total, 1, 1, 1), keep, device=x.device, dtype=x.dtype))
        mask = full[:, window.start:window.stop]
    else:
        shape = (x.shape[0], 1, 1, 1) if tasks == 1 else (x.shape[0], tasks, 1, 1, 1)
        mask = torch.bernoulli(torch.full(shape, keep, device=x.device, dtype=x.dtype))
        if tasks == 1:
            return mask
    return mask.expand(x.shape[0], tasks, x.shape[1] // tasks, *x.shape[2:]).reshape(x.shape)


POINTWISE_MODES = ("matmul", "conv")


def use_pointwise_mode(model: nn.Module, mode: str) -> nn.Module:
    """How the folded 1x1 convolutions (any stride, no padding, one group per task) of ``model`` run.

    ``"matmul"`` (every :class:`Conv2d`'s default): one batched matrix product
    ``[T, C_out, C_in] @ [N, T, C_in, H*W]``. ``"conv"``: one grouped convolution like every
    other conv; cuDNN wraps grouped fp32 convolutions in NCHW in layout transposes, and
    oneDNN's grouped 1x1 backward is slow. Matmul was the faster on both kinds of device
    measured: a T-NAS meta-iteration at the paper setting (4 tasks, 1-shot) took 0.138 s
    instead of 0.210 s as a CUDA graph on an H200, and 24 s instead of 57 s on a 2-core CPU
    (``benchmarks/bench_meta_iter.py --pointwise``). The results are the same either way.
    Sets the mode on this model's layers only; returns the model.
    """
    if mode not in POINTWISE_MODES:
        raise ValueError(f"pointwise mode must be one of {POINTWISE_MODES}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.pointwise_mode = mode
    return model


def _pointwise_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      tasks: int, stride: Sequence[int] = (1, 1)) -> torch.Tensor:
    """Folded 1x1 conv as a batched matmul: ``x [N, T*C_in, H, W]``, ``weight [T, C_out, C_in, 1, 1]``
    (per task) or ``[C_out, C_in, 1, 1]`` (shared) -> ``[N, T*C_out, H', W']``. A stride s (no
    padding) keeps every s-th pixel first, which is all a strided 1x1 conv does."""
    if tuple(stride) != (1, 1):
        x = x[:, :, :: stride[0], :: stride[1]]
    n, _, height, width = x.shape
    matrix = weight.flatten(-3)  # [T, C_out, C_in] or [C_out, C_in]
    out = torch.matmul(matrix, x.reshape(n, tasks, -1, height * width))  # [N, T, C_out, H*W]
    if bias is not None:
        out = out + bias.reshape(-1, out.shape[2], 1)  # [T, C_out, 1] or [1, C_out, 1]
    return out.view(n, -1, height, width)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, given ``T*in_channels`` input channels, runs T tasks as one grouped conv, with
    per-task weights ``[T, C_out, C_in/g, kh, kw]`` or shared ones (1x1 convs as a batched matmul
    unless :func:`use_pointwise_mode` says ``"conv"``)."""

    supports_task_folding = True
    pointwise_mode = "matmul"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.weight, self.bias)

    def convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This layer's convolution (stride, padding, groups, pointwise mode) with the given ``weight``:
        ``[G, C_out, C_in/g, kh, kw]`` for ``x`` of G channel groups ``[N, G*C_in, H, W]``, or one shared
        ``[C_out, C_in/g, kh, kw]``. ``forward`` passes the layer's own; the supernet's source folding
        passes the weights of several edges' layers stacked (:mod:`tnas.models.source_folding`)."""
        tasks = groups_of(x, self.in_channels)
        if tasks == 1 and weight.dim() == 4:
            return self._conv_forward(x, weight, bias)
        if self.padding_mode != "zeros":
            raise NotImplementedError("task folding supports zero padding only")
        if self._is_pointwise() and self.pointwise_mode == "matmul":
            return _pointwise_matmul(x, weight, bias, tasks, self.stride)
        return F.conv2d(x, fold_parameter(weight, tasks, 4), fold_parameter(bias, tasks, 1), self.stride,
                        self.padding, self.dilation, self.groups * tasks)

    def _is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding == (0, 0) and self.groups == 1


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with batch statistics only (no running state); given ``T*num_features``
    channels, each task's channels get their own statistics and its (per-task ``[T, C]`` or shared) affine
    parameters."""

    supports_task_folding = True

    def __init__(self, num_features: int, affine: bool = True, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = groups_of(x, self.num_features)
        if tasks == 1 and (self.weight is None or self.weight.dim() == 1):
            return super().forward(x)
        return F.batch_norm(x, None, None, fold_parameter(self.weight, tasks, 1), fold_parameter(self.bias, tasks, 1),
                            True, 0.0, self.eps)


class Linear(nn.Linear):
    """``nn.Linear`` that maps ``[N, T*C_in]`` to ``[N, T*C_out]``, task by task, with per-task weights
    ``[T, C_out, C_in]`` or shared ones."""

    supports_task_folding = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = groups_of(x, self.in_features)
        if tasks == 1 and self.weight.dim() == 2:
            return super().forward(x)
        weight = self.weight if self.weight.dim() == 3 else self.weight.expand(tasks, *self.weight.shape)
        out = torch.bmm(x.view(x.shape[0], tasks, -1).transpose(0, 1), weight.transpose(1, 2))  # [T, N, C_out]
        if self.bias is not None:
            bias = self.bias if self.bias.dim() == 2 else self.bias.expand(tasks, -1)
            out = out + bias.unsqueeze(1)
        return out.transpose(0, 1).reshape(x.shape[0], -1)


_FOLD_NEUTRAL = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def supports_folding(model: nn.Module) -> bool:
    """True when every module of ``model`` is a per-channel layer (ReLU, pooling, containers)
    or its class declares ``supports_task_folding = True`` (the layers above, the ops and
    models of tnas); otherwise a meta-learner falls back to ``torch.func.vmap`` over tasks."""
    for module in model.modules():
        if type(module) in _FOLD_NEUTRAL:
            continue
        if not type(module).__dict__.get("supports_task_folding", False):
            return False
    return True
