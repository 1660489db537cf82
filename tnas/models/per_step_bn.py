"""Per-step BatchNorm (MAML++, Antoniou et al. 2019): one set of BN weights and biases per inner step.

:func:`make_per_step_batch_norm` turns the ``weight`` and ``bias`` ``[C]`` of every affine
BatchNorm of a model into parameters ``[sets, C]`` (every row starts as the old values), and
returns their names. The model is then only run functionally, through
:func:`select_batch_norm_set`, which replaces each ``[sets, C]`` tensor by its row ``index``
before ``torch.func.functional_call``; the gradient of a forward at one set reaches that row
only. Statistics stay those of the current batch (transductive, no running statistics), so
"per-step statistics" need no state: each step normalises with its own batch.

>>> names = make_per_step_batch_norm(network, sets=6)   # doctest: +SKIP
>>> logits = functional_call(network, select_batch_norm_set(params, names, 2), (x,))  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import torch
import torch.nn as nn


def make_per_step_batch_norm(model: nn.Module, sets: int) -> List[str]:
    """Give every affine BatchNorm of ``model`` ``sets`` rows of weights and biases (in place).

    Returns the names (as in ``model.named_parameters()``) of the new ``[sets, C]``
    parameters. After this, ``model(x)`` no longer works directly: run it through
    :func:`select_batch_norm_set`.
    """
    if sets < 1:
        raise ValueError(f"sets must be >= 1, got {sets}")
    names = []
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
            continue
        for attribute in ("weight", "bias"):
            value = getattr(module, attribute)
            rows = value.detach().unsqueeze(0).repeat(sets, *([1] * value.dim()))
            setattr(module, attribute, nn.Parameter(rows))
            names.append(f"{module_name}.{attribute}" if module_name else attribute)
    return names


def select_batch_norm_set(params: Mapping[str, torch.Tensor], names: Sequence[str], index: int) -> Dict[str, torch.Tensor]:
    """``params`` with each per-step BN tensor ``[sets, C]`` (named in ``names``) replaced by its row
    ``index``; a per-task ``[T, sets, C]`` one (task folding) by ``[T, C]``."""
    selected = dict(params)
    for name in names:
        selected[name] = params[name].select(-2, index)
    return selected
