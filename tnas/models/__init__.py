"""Networks: the DARTS supernet (search), the derived network of a genotype, MAML's Conv-4, and their size.

>>> from tnas.models import Network, Supernet, count_macs
>>> net = Network(genotype, n_way=5, C=4, layers=1, in_channels=1)      # logits [B, 5] of images [B, 1, H, W]
>>> count_macs(net, (1, 16, 16))["macs"], sum(p.numel() for p in net.parameters())

Every model here takes images ``[B, C, H, W]`` and gives logits ``[B, n_way]``, and runs T tasks
at once with per-task parameters by folding them into channel groups (:mod:`tnas.task_folding`).
"""
from tnas.models.complexity import count_macs
from tnas.models.conv4 import Conv4
from tnas.models.network import Network
from tnas.models.supernet import Supernet

__all__ = ["count_macs", "Conv4", "Network", "Supernet"]
