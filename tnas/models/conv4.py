"""Conv-4: the 4-block network of MAML (Finn et al., 2017), the baseline row of the T-NAS paper's table.

Four blocks of [3x3 convolution (padding 1, with bias, as in MAML's code) -> BatchNorm
(batch statistics, affine) -> ReLU -> 2x2 max-pool], then the flattened features to a
linear classifier. ``filters`` is 32 on mini-ImageNet and 64 on Omniglot (MAML's choices).
Each max-pool floors the side: 84 -> 42 -> 21 -> 10 -> 5, so a 5-way 84x84 RGB network with
32 filters classifies 32 x 5 x 5 = 800 features and has 32,901 parameters
(:func:`conv4_parameter_count`). (MAML's Omniglot network replaces the pools by strided
convolutions; here every dataset gets the pools.)

Built from the task-folding layers (:mod:`tnas.task_folding`), so a meta-batch of T tasks
with per-task parameters runs as one network, like the derived network of a genotype.
Input ``[B, in_channels, H, W]``, logits ``[B, n_way]`` (folded: ``[N, T*C, H, W]`` ->
``[N, T*n_way]``).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from tnas.task_folding import BatchNorm2d, Conv2d, Linear

BLOCKS = 4
MIN_IMAGE_SIZE = 2 ** BLOCKS  # every pool halves the side; the last block must keep at least one pixel


def pooled_side(side: int, blocks: int = BLOCKS) -> int:
    """The side of the feature map after ``blocks`` floor-halving 2x2 max-pools."""
    for _ in range(blocks):
        side //= 2
    return side


def conv4_parameter_count(n_way: int, filters: int, in_channels: int, image_size: int) -> int:
    """Parameters of :class:`Conv4`: per block a 3x3 conv with bias and a BN weight and bias, then the classifier."""
    blocks = (9 * in_channels * filters + filters) + 2 * filters
    blocks += (BLOCKS - 1) * ((9 * filters * filters + filters) + 2 * filters)
    features = filters * pooled_side(image_size) ** 2
    return blocks + features * n_way + n_way


class Conv4(nn.Module):
    """MAML's Conv-4 classifier for ``image_size`` x ``image_size`` inputs (see the module docstring).

    ``config`` holds every constructor argument plus ``"kind": "conv4"``, which
    :func:`tnas.models.factory.network_from_config` reads to rebuild it from a checkpoint.
    """

    supports_task_folding = True

    def __init__(self, n_way: int = 5, filters: int = 32, in_channels: int = 3, image_size: int = 84):
        super().__init__()
        if filters < 1 or n_way < 1 or in_channels < 1:
            raise ValueError(f"n_way, filters and in_channels must be >= 1, got {n_way}, {filters}, {in_channels}")
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"Conv-4 needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} "
                             f"(four 2x2 max-pools), got {image_size}")
        self.config: Dict[str, object] = dict(kind="conv4", n_way=n_way, filters=filters, in_channels=in_channels,
                                              image_size=image_size)
        layers = []
        channels = in_channels
        for _ in range(BLOCKS):
            layers += [Conv2d(channels, filters, 3, padding=1, bias=True), BatchNorm2d(filters, affine=True),
                       nn.ReLU(inplace=False), nn.MaxPool2d(2, 2)]
            channels = filters
        self.features = nn.Sequential(*layers)
        self.classifier = Linear(filters * pooled_side(image_size) ** 2, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, (T*)C, h, w] -> [N, (T*)C*h*w]: folded, task t's features stay contiguous (its channels are).
        return self.classifier(self.features(x).flatten(1))
