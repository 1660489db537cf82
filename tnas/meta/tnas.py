"""T-NAS: meta-learn the weights AND the architecture of a supernet (Lian et al., ICLR 2020).

Inner loop: SGD on each task's support loss over weights (``inner_lr_weights``) and
alphas (``inner_lr_alphas``) together. Outer loop: the query loss at the adapted
(w', alpha') gives the meta-gradient; Adam on the weights, and Adam with betas
(0.5, 0.999) and weight decay on the alphas. At meta-test, adapting (w, alpha) on a
task's support set and decoding the adapted alpha gives that task's architecture.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from tnas.genotypes import Genotype, decode_genotype
from tnas.meta.learner import MetaLearner
from tnas.models.supernet import Supernet


@dataclass
class SupernetSearchConfig:
    """Hyper-parameters shared by the supernet searches (T-NAS, auto-MAML); defaults are the
    original code's 5-way 1-shot settings. ``to_dict`` / ``from_dict`` give the JSON form
    stored in a run's summary (``amp_dtype`` is a run-time choice and is not stored)."""

    inner_steps: int = 5
    inner_steps_test: int = 10
    inner_lr_weights: float = 0.01
    meta_lr_weights: float = 1e-3
    meta_lr_alphas: float = 1e-3
    alpha_betas: Tuple[float, float] = (0.5, 0.999)
    alpha_weight_decay: float = 1e-3
    first_order: bool = True
    amp_dtype: Optional[torch.dtype] = field(default=None)

    def to_dict(self) -> Dict[str, object]:
        """JSON-able settings (everything but ``amp_dtype``; betas as a list)."""
        values = {k: v for k, v in asdict(self).items() if k != "amp_dtype"}
        values["alpha_betas"] = list(values["alpha_betas"])
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, object], **overrides):
        """Inverse of :meth:`to_dict` (unknown keys, e.g. ``method``, are ignored)."""
        known = {f.name for f in fields(cls)} - {"amp_dtype"}
        config = {k: v for k, v in dict(values or {}).items() if k in known}
        if "alpha_betas" in config:
            config["alpha_betas"] = tuple(config["alpha_betas"])
        return cls(**{**config, **overrides})

    def groups_and_optimizers(self, model: Supernet):
        """The supernet's parameter groups ``{"weights", "alphas"}`` (names) and their outer
        optimisers: Adam for w, Adam with ``alpha_betas`` and ``alpha_weight_decay`` for alpha."""
        groups = {"weights": [name for name, _ in model.named_weights()],
                  "alphas": [name for name, _ in model.named_alphas()]}
        optimizers = {
            "weights": torch.optim.Adam(model.weights(), lr=self.meta_lr_weights),
            "alphas": torch.optim.Adam(model.alphas(), lr=self.meta_lr_alphas, betas=tuple(self.alpha_betas),
                                       weight_decay=self.alpha_weight_decay),
        }
        return groups, optimizers


@dataclass
class TNASConfig(SupernetSearchConfig):
    """T-NAS adds the inner learning rate of the alphas (30 in the original code)."""

    inner_lr_alphas: float = 30.0


class TNAS(MetaLearner):
    """The T-NAS meta-learner over a :class:`~tnas.models.supernet.Supernet`.

    >>> learner = TNAS(Supernet(n_way=5, C=4, layers=1, in_channels=1))  # doctest: +SKIP
    >>> stats = learner.meta_step(batch)          # one outer update of w and alpha
    >>> genotypes = learner.decode(batch)          # one architecture per task
    """

    def __init__(self, model: Supernet, config: Optional[TNASConfig] = None,
                 compile_forward: Union[bool, str] = False):
        config = config or TNASConfig()
        self.config = config
        groups, optimizers = config.groups_and_optimizers(model)
        super().__init__(model, groups, {"weights": config.inner_lr_weights, "alphas": config.inner_lr_alphas},
                         optimizers, inner_steps=config.inner_steps, inner_steps_test=config.inner_steps_test,
                         first_order=config.first_order, amp_dtype=config.amp_dtype,
                         compile_forward=compile_forward)

    def genotype(self) -> Genotype:
        """The meta-architecture: decoded from the meta-learned alphas (before any adaptation)."""
        return self.model.genotype()

    def decode(self, batch, steps: Optional[int] = None) -> List[Genotype]:
        """Adapt w and alpha on each task's support set and decode each task's adapted alpha."""
        result = self.adapt(batch.support_x, batch.support_y, steps)
        params = {**self.params(), **result.task_params}
        normal, reduce = params["alpha_normal"], params["alpha_reduce"]
        tasks = batch.support_x.shape[0]
        normal = normal.expand(tasks, *normal.shape[-2:]) if normal.dim() == 2 else normal
        reduce = reduce.expand(tasks, *reduce.shape[-2:]) if reduce.dim() == 2 else reduce
        steps_, multiplier = self.model.steps, self.model.multiplier
        return [decode_genotype(normal[t], reduce[t], steps_, multiplier) for t in range(tasks)]
