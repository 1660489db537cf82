"""The skeleton shared by the supernet and the derived network: stem and cell layout.

Stem (as in the original T-NAS code for 84x84 mini-ImageNet): conv3x3 -> BN -> 2x2
max-pool -> ReLU -> conv3x3 -> BN -> 2x2 max-pool, ``C*m/2`` then ``C*m`` channels
(``m`` the stem multiplier), so 84 -> 21, 28 -> 7, 32 -> 8.
"""
from __future__ import annotations

from typing import Callable, List, Tuple

import torch.nn as nn

from tnas.ops import batch_norm
from tnas.task_folding import Conv2d


def make_stem(in_channels: int, stem_channels: int, affine: bool) -> nn.Sequential:
    """The two-conv stem; ``[B, in_channels, H, W] -> [B, stem_channels, H//4, W//4]``."""
    half = stem_channels // 2
    return nn.Sequential(
        Conv2d(in_channels, half, 3, padding=1, bias=False),
        batch_norm(half, affine),
        nn.MaxPool2d(2, 2),
        nn.ReLU(inplace=False),
        Conv2d(half, stem_channels, 3, padding=1, bias=False),
        batch_norm(stem_channels, affine),
        nn.MaxPool2d(2, 2),
    )


def reduction_layout(layers: int) -> List[bool]:
    """Which cells reduce: layers=1 -> [reduce]; 2 -> [normal, reduce]; >=3 -> at 1/3 and 2/3."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if layers == 1:
        return [True]
    if layers == 2:
        return [False, True]
    return [i in (layers // 3, 2 * layers // 3) for i in range(layers)]


def min_image_size(layers: int) -> int:
    """Smallest input side that survives the stem (/4) and every reduction (/2 each)."""
    return 4 * 2 ** sum(reduction_layout(layers))


CellBuilder = Callable[[int, int, int, bool, bool], nn.Module]
"""``make_cell(c_prev_prev, c_prev, channels, reduction, reduction_prev) -> cell`` whose
``out_channels`` attribute gives the channels of its output."""


def build_cells(make_cell: CellBuilder, stem_channels: int, C: int, layers: int) -> Tuple[nn.ModuleList, int]:
    """The cell stack: channels double at each reduction; each cell reads the two previous outputs.

    Returns the cells and the channels of the last cell's output (the classifier's input).
    """
    cells = nn.ModuleList()
    c_prev_prev, c_prev, channels = stem_channels, stem_channels, C
    reduction_prev = False
    for reduction in reduction_layout(layers):
        if reduction:
            channels *= 2
        cell = make_cell(c_prev_prev, c_prev, channels, reduction, reduction_prev)
        cells.append(cell)
        reduction_prev = reduction
        c_prev_prev, c_prev = c_prev, cell.out_channels
    return cells, c_prev
