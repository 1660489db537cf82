"""The networks the from-scratch stage trains, built from flags or rebuilt from a checkpoint's ``model`` config.

Two kinds: ``"network"`` (default), the derived :class:`~tnas.models.network.Network` of a
genotype, and ``"conv4"``, MAML's :class:`~tnas.models.conv4.Conv4` baseline. A model's
``config`` dict (saved as ``summary["model"]`` in ``train.json`` and the checkpoints) names
its kind under ``"kind"``; configs without it (older runs) are genotype networks.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch.nn as nn

from tnas.genotypes import Genotype, genotype_from_dict
from tnas.models.conv4 import MIN_IMAGE_SIZE as CONV4_MIN_IMAGE_SIZE
from tnas.models.conv4 import Conv4
from tnas.models.network import Network
from tnas.models.skeleton import min_image_size

MODELS = ("network", "conv4")


def model_kind(config: Mapping[str, object]) -> str:
    return str(config.get("kind", "network"))


def build_network(kind: str, n_way: int, image_shape: Tuple[int, int, int], genotype: Optional[Genotype] = None,
                  C: int = 16, layers: int = 2, filters: int = 32, drop_path_prob: float = 0.0) -> nn.Module:
    """A fresh network of ``kind`` for images ``[channels, H, W]``: the genotype's (``C``, ``layers``,
    ``drop_path_prob``) or Conv-4 (``filters``; square images)."""
    if kind == "conv4":
        return Conv4(n_way=n_way, filters=filters, in_channels=image_shape[0], image_size=min(image_shape[1:]))
    if kind != "network":
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(MODELS)})")
    if genotype is None:
        raise ValueError("a genotype network needs a genotype")
    return Network(genotype, n_way=n_way, C=C, layers=layers, in_channels=image_shape[0],
                   drop_path_prob=drop_path_prob)


def smallest_image(kind: str, layers: int) -> int:
    """The smallest image side a network of ``kind`` accepts."""
    return CONV4_MIN_IMAGE_SIZE if kind == "conv4" else min_image_size(layers)


def network_from_config(config: Mapping[str, object], drop_path_prob: float = 0.0) -> nn.Module:
    """The network a ``model.config`` dict describes (``Network(**config)`` with the genotype as a dict,
    or ``Conv4(**config)`` for ``"kind": "conv4"``)."""
    values = dict(config)
    kind = values.pop("kind", "network")
    if kind == "conv4":
        return Conv4(**values)
    if kind != "network":
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(MODELS)})")
    genotype = values.pop("genotype")
    if not isinstance(genotype, Genotype):
        genotype = genotype_from_dict(genotype)
    return Network(genotype, drop_path_prob=drop_path_prob, **values)
