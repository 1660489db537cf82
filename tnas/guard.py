"""Finite checks for the meta-training loop, as device-side flags (no host sync of their own).

:func:`gradients_finite` is taken after every meta-iteration over the gradients the optimisers
just used; :func:`parameters_finite` before a checkpoint over everything the optimisers update.
Each is one fused reduction that stays on the device; the engine stacks the flags with the
losses it already syncs at its log / checkpoint / epoch points, so a non-finite gradient (under
a finite loss) stops the run naming its iteration before anything it touched is saved.
"""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch


def optimised_tensors(learner) -> List[torch.Tensor]:
    """The parameters ``learner.optimizers`` update (weights, alphas, learned inner rates)."""
    seen, tensors = set(), []
    for optimizer in getattr(learner, "optimizers", {}).values():
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in seen:
                    seen.add(id(param))
                    tensors.append(param)
    return tensors


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """0-d bool tensor: every element of ``tensors`` is finite (True for none). One fused norm per
    device and dtype (``torch._foreach_norm``); a NaN or inf anywhere makes a norm non-finite."""
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(tensors)
    return torch.isfinite(torch.stack([n.float().to(device) for n in norms])).all()


def gradients_finite(learner, device: torch.device) -> Optional[torch.Tensor]:
    """Flag of the gradients left on the optimised parameters by the last step (None if none)."""
    grads = [p.grad for p in optimised_tensors(learner) if p.grad is not None]
    return all_finite(grads, device) if grads else None


def parameters_finite(learner, device: torch.device) -> torch.Tensor:
    """Flag of the optimised parameters themselves (checked before a checkpoint)."""
    return all_finite(optimised_tensors(learner), device)
