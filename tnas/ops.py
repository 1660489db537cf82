"""The DARTS primitives and the small blocks the cells are built from.

Every op maps ``[B, C, H, W]`` to ``[B, C, H/stride, W/stride]``. BatchNorm is
*transductive*, as MAML uses it: statistics of the current batch, no running statistics
(``track_running_stats=False``), so a forward pass is a pure function of (parameters,
input) and works under ``torch.func.vmap``. ``affine=False`` in the supernet,
``affine=True`` in the derived network. Convolutions, BatchNorm and concatenation come from
:mod:`tnas.task_folding`, so every op also runs T tasks at once with per-task weights
(``[N, T*C, H, W]`` in and out).

The ops are plain modules: ``op(x)`` is the primitive. The supernet's fused edge path
(:mod:`tnas.models.fast_edges`) reads their parts (the layer order documented on each class)
to share work between the ops of an edge.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from tnas.genotypes import PRIMITIVES
from tnas.task_folding import BatchNorm2d, Conv2d, cat_channels

ConvCall = Callable[[nn.Conv2d, torch.Tensor], torch.Tensor]
"""``conv(layer, x)``: how an op's conv layer is applied (:func:`own_weights`: the layer itself; the
supernet's source folding passes one with several edges' weights, :mod:`tnas.models.source_folding`)."""


def own_weights(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The default :data:`ConvCall`: ``layer(x)``."""
    return layer(x)


def batch_norm(channels: int, affine: bool) -> nn.BatchNorm2d:
    """BatchNorm that always normalises with the current batch's statistics."""
    return BatchNorm2d(channels, affine=affine)


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv (no bias) -> BN: the 1x1 preprocessing of cell inputs."""

    supports_task_folding = True

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            batch_norm(c_out, affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> BN (``self[0]`` .. ``self[3]``)."""

    supports_task_folding = True

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            Conv2d(c_in, c_in, kernel_size, stride=stride, padding=padding, dilation=dilation,
                   groups=c_in, bias=False),
            Conv2d(c_in, c_out, 1, bias=False),
            batch_norm(c_out, affine),
        )


class SepConv(nn.Sequential):
    """Two stacked separable convs (the first carries the stride), as in DARTS: two :class:`DilConv`
    of dilation 1 (``self[0]``, ``self[1]``)."""

    supports_task_folding = True

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool):
        super().__init__(
            DilConv(c_in, c_in, kernel_size, stride, padding, 1, affine),
            DilConv(c_in, c_out, kernel_size, 1, padding, 1, affine),
        )


class Identity(nn.Module):
    """skip_connect at stride 1."""

    supports_task_folding = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The `none` op: zeros of the output shape (the supernet skips it; see MixedOp)."""

    supports_task_folding = True

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x * 0.0
        return x[:, :, :: self.stride, :: self.stride] * 0.0


def factorized_reduce_inputs(x: torch.Tensor):
    """The two inputs of FactorizedReduce's 1x1 stride-2 convs, as in the original T-NAS code.

    A side of odd size gets one zero row (height) or column (width) at the top / left; the
    first conv then reads the padded map and the second the padded map without its first
    row and column. ``x`` [B, C, H, W] -> (``[B, C, H', W']``, ``[B, C, H'-1, W'-1]``) with
    ``H' = H + H % 2``: both convs give ``ceil(H/2) x ceil(W/2)``. On an even side the first
    reads pixels 0, 2, 4, ... and the second 1, 3, 5, ...; on an odd side (21 at 84x84) the
    first reads the zero then 1, 3, ..., 19 and the second 0, 2, ..., 20. (The original pads
    both sides when the height is odd and cannot handle one odd side of a non-square map;
    for square maps the two rules agree.)
    """
    pad_height, pad_width = x.shape[-2] % 2, x.shape[-1] % 2
    if pad_height or pad_width:
        x = F.pad(x, (pad_width, 0, pad_height, 0))
    return x, x[:, :, 1:, 1:]


class FactorizedReduce(nn.Module):
    """skip_connect at stride 2: two offset 1x1 stride-2 convs, concatenated, then BN
    (inputs: :func:`factorized_reduce_inputs`)."""

    supports_task_folding = True

    def __init__(self, c_in: int, c_out: int, affine: bool):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        # conv_even reads the first input of factorized_reduce_inputs, conv_odd the second
        self.conv_even = Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_odd = Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = batch_norm(c_out, affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.convolve(F.relu(x)))

    def convolve(self, rectified: torch.Tensor,
                 conv: ConvCall = own_weights) -> torch.Tensor:
        """The two convs of ``relu(x)`` ``[B, C_in, H, W]``, concatenated, before the BN:
        ``[B, C_out, ceil(H/2), ceil(W/2)]`` (``[B, G*C_in, H, W]`` in, ``[B, G*C_out, ...]`` out for
        G channel groups). ``conv(layer, input)`` applies each conv (default: the layer itself; the
        supernet's source folding passes one with several edges' weights)."""
        groups = rectified.shape[1] // self.conv_even.in_channels
        first, second = factorized_reduce_inputs(rectified)
        return cat_channels([conv(self.conv_even, first), conv(self.conv_odd, second)], groups)


class Pool(nn.Module):
    """3x3 max or average pool (average excludes padding), with an optional BN (``self.pool``, ``self.bn``).

    The supernet follows pools with a BN (affine=False) so that their scale matches the
    conv ops' under the mixed-op weighting; the derived network uses the bare pool.
    """

    supports_task_folding = True

    def __init__(self, kind: str, channels: int, stride: int, with_bn: bool):
        super().__init__()
        if kind == "max":
            self.pool = nn.MaxPool2d(3, stride=stride, padding=1)
        else:
            self.pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        self.bn = batch_norm(channels, affine=False) if with_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(x)
        return self.bn(out) if self.bn is not None else out


OpBuilder = Callable[[int, int, bool], nn.Module]

OPS: Dict[str, OpBuilder] = {
    "none": lambda C, stride, affine: Zero(stride),
    "max_pool_3x3": lambda C, stride, affine: Pool("max", C, stride, with_bn=not affine),
    "avg_pool_3x3": lambda C, stride, affine: Pool("avg", C, stride, with_bn=not affine),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
}
"""Builders ``(channels, stride, affine) -> nn.Module``; ``affine=False`` means supernet use."""

assert tuple(OPS) == PRIMITIVES, "OPS must list the primitives in DARTS order"


def make_op(name: str, channels: int, stride: int, affine: bool) -> nn.Module:
    """Build primitive ``name``; raises KeyError naming it when unknown."""
    if name not in OPS:
        raise KeyError(f"unknown op '{name}' (known: {', '.join(PRIMITIVES)})")
    return OPS[name](channels, stride, affine)
