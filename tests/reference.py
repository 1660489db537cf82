"""A plain per-task MAML reference: explicit Python loops, plain autograd, no vmap.

Kept only so tests can check the batched engine (:mod:`tnas.meta.maml`) against the
textbook algorithm; never used for training.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn.functional as F

from tnas.meta.maml import ForwardFn


def adapt_one_task(forward: ForwardFn, params: Mapping[str, torch.Tensor], learning_rates: Mapping[str, float],
                   support_x: torch.Tensor, support_y: torch.Tensor, steps: int,
                   first_order: bool) -> Dict[str, torch.Tensor]:
    """SGD on one task's support loss (``support_x`` [N, C, H, W])."""
    fast = dict(params)
    for step in range(steps):
        loss = F.cross_entropy(forward(fast, support_x, step), support_y)
        names = list(learning_rates)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not first_order, allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is None:
                continue
            lr = learning_rates[name]
            lr = lr[step] if isinstance(lr, torch.Tensor) and lr.dim() > 0 else lr
            fast[name] = fast[name] - lr * (grad.detach() if first_order else grad)
    return fast


def meta_gradient(forward: ForwardFn, params: Mapping[str, torch.Tensor], learning_rates: Mapping[str, float],
                  support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor,
                  steps: int, first_order: bool) -> Dict[str, torch.Tensor]:
    """Gradient of the mean over tasks of the query loss after adaptation, w.r.t. ``params``.

    Tasks are taken one at a time (``support_x`` [T, N, C, H, W]). Parameters must
    require grad. Returns name -> gradient (zeros where a parameter is unused).
    """
    tasks = support_x.shape[0]
    total = 0.0
    for task in range(tasks):
        fast = adapt_one_task(forward, params, learning_rates, support_x[task], support_y[task], steps, first_order)
        total = total + F.cross_entropy(forward(fast, query_x[task], steps), query_y[task]) / tasks
    names = list(params)
    grads = torch.autograd.grad(total, [params[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}
