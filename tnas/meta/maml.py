"""Functional MAML core: an inner loop that adapts any subset of parameters of all tasks at once.

Parameters live in dicts ``name -> tensor``. A meta-batch holds ``T`` tasks:
``support_x [T, n*k, C, H, W]``, ``support_y [T, n*k]``. The adapted ("fast") parameters
carry a leading task dimension ``[T, *shape]`` and the model runs on all tasks in one call.
Models built from :mod:`tnas.task_folding` layers (every model of :mod:`tnas.models`) fold
the tasks into channel groups: one plain-autograd forward in which a conv with per-task
weights is one grouped conv. Any other model runs through ``torch.func.vmap`` over
``torch.func.functional_call``. Both give the same result; folding dispatches about a third
as many operations (the GPU is host-bound at the paper setting, docs/design.md section 3).
Parameters that are not adapted are shared by all tasks and enter unbatched.

The inner gradient is plain ``torch.autograd.grad`` of the sum of the per-task mean
losses, whose gradient with respect to the ``[T, ...]`` fast tensor is, slice by slice,
each task's own gradient. Second order passes ``create_graph=True`` (exact MAML); first
order drops the inner gradients from the graph, so the outer gradient of the query loss
reaching the initial parameters through ``expand`` is the FO-MAML meta-gradient, summed
over tasks. Nothing in the loop reads a value back to the host.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from tnas import task_folding

Params = Dict[str, torch.Tensor]
LearningRate = Union[float, torch.Tensor]
ForwardFn = Callable[[Params, torch.Tensor, int], torch.Tensor]
"""``forward(params, x, step) -> logits`` for ONE task: ``x`` [N, C, H, W] -> [N, n_way].
``step`` is the inner step (0..S); models without per-step state ignore it. A forward with
the attribute ``folds_tasks = True`` also accepts per-task parameters ``[T, *shape]`` and
folded images ``[N, T*C, H, W]``, giving ``[N, T*n_way]``."""


def model_forward(model: nn.Module, fold_tasks: Optional[bool] = None) -> ForwardFn:
    """The functional forward of an ``nn.Module`` whose ``forward(x)`` gives logits.

    ``fold_tasks``: batch tasks by folding (:mod:`tnas.task_folding`) or by ``vmap``;
    default: fold when the model supports it. ``True`` for a model that does not is a ValueError.

    Any other model (e.g. a plain ``nn.Sequential``) runs through ``vmap``: a BatchNorm in it (or an
    InstanceNorm that tracks statistics) must use batch statistics (``track_running_stats=False``, as
    MAML does), since vmap cannot update running statistics shared by all tasks in place; in training
    mode one that keeps them is a ValueError naming it (in eval mode it reads them, which works).
    """
    supported = task_folding.supports_folding(model)
    if fold_tasks and not supported:
        raise ValueError(f"{type(model).__name__} is not built from task-folding layers; use fold_tasks=False")
    folds = supported if fold_tasks is None else bool(fold_tasks)
    # every norm with running-statistics buffers (BatchNorm, SyncBatchNorm, the lazy ones, an InstanceNorm
    # that tracks them); whether one updates them is read at each call: model.train()/eval() and
    # track_running_stats may change after this forward was built
    running_stats = [] if folds else [(name, module) for name, module in model.named_modules()
                                      if isinstance(module, nn.modules.batchnorm._NormBase)
                                      and module.running_mean is not None]

    def forward(params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
        for name, module in running_stats:
            if module.training and module.track_running_stats:
                raise ValueError(f"{type(module).__name__} {name!r} of {type(model).__name__} keeps running "
                                 f"statistics, which tasks batched by vmap cannot update; build it with "
                                 f"track_running_stats=False (batch statistics, as MAML does) or call model.eval()")
        return functional_call(model, params, (x,))

    forward.folds_tasks = folds
    forward.uses_step = False
    return forward


COMPILE_BACKENDS = ("inductor", "aot_eager")
"""``torch.compile`` backends a learner's ``compile_forward`` may name (True: inductor, fused kernels;
aot_eager: the same graphs run by eager kernels, a fast check of the tracing alone)."""


def compile_forward(forward: ForwardFn, backend: str = "inductor") -> ForwardFn:
    """``forward`` through ``torch.compile(dynamic=False)``: one graph per input shape (and stride,
    grad mode), each with its own compiled backward. A forward marked ``uses_step = False`` (that of
    :func:`model_forward`) is compiled without ``step``, so the inner steps share graphs; any other
    is compiled with it (a graph per step value). The result keeps ``folds_tasks``.

    The compiled backward cannot itself be differentiated, so only first-order MAML (no
    ``create_graph`` through the forward) may use it; the learners refuse it with second order.
    """
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {', '.join(COMPILE_BACKENDS)}, got {backend!r}")
    if getattr(forward, "uses_step", True):
        compiled = torch.compile(forward, backend=backend, dynamic=False)
    else:
        core = torch.compile(lambda params, x: forward(params, x, 0), backend=backend, dynamic=False)

        def compiled(params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
            return core(params, x)

        compiled.uses_step = False
    compiled.folds_tasks = getattr(forward, "folds_tasks", False)
    return compiled


def batched_forward(forward: ForwardFn, task_params: Params, shared_params: Params, x: torch.Tensor,
                    step: int = 0) -> torch.Tensor:
    """Run ``forward`` on every task at once.

    ``task_params``: name -> ``[T, *shape]`` (one slice per task); ``shared_params``:
    name -> ``[*shape]`` (the same for all tasks); ``x``: ``[T, N, C, H, W]``.
    Returns logits ``[T, N, n_way]``.
    """
    if getattr(forward, "folds_tasks", False):
        tasks = x.shape[0]
        logits = forward({**shared_params, **task_params}, task_folding.fold_images(x), step)
        return task_folding.unfold_logits(logits, tasks)

    def one_task(params: Params, images: torch.Tensor) -> torch.Tensor:
        return forward({**shared_params, **params}, images, step)
    return vmap(one_task, randomness="different")(task_params, x)


def per_task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each task: ``logits [T, N, n_way]``, ``labels [T, N]`` -> ``[T]``."""
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return losses.view(labels.shape).mean(dim=1)


def loss_in_full_precision(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` in float32 when autocast left it in bf16 or fp16, as it is otherwise: a float64 run's
    losses, means and meta-gradients stay float64 (a cast to float32 would round the mean's
    ``1 / T`` for a task count that is not a power of two)."""
    return loss.float() if loss.dtype in (torch.bfloat16, torch.float16) else loss


def per_task_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction correct of each task, ``[T]`` (a tensor; no host sync)."""
    return (logits.argmax(dim=-1) == labels).float().mean(dim=1)


@dataclass
class InnerLoopResult:
    """What :func:`inner_loop` returns.

    ``task_params``: the adapted parameters, name -> ``[T, *shape]``.
    ``support_loss``: ``[S, T]`` support loss before each step.
    ``query_loss`` / ``query_accuracy``: ``[S+1, T]`` (step 0 = before adaptation), only
    when ``track_query``; diagnostics computed without gradient.
    """

    task_params: Params
    support_loss: torch.Tensor
    query_loss: Optional[torch.Tensor] = None
    query_accuracy: Optional[torch.Tensor] = None


def expand_to_tasks(params: Mapping[str, torch.Tensor], tasks: int, meta_gradient: bool) -> Params:
    """``[*shape] -> [T, *shape]`` views; detached leaves that require grad when no meta-gradient is wanted."""
    out = {}
    for name, value in params.items():
        if meta_gradient:
            out[name] = value.unsqueeze(0).expand(tasks, *value.shape)
        else:
            out[name] = value.detach().unsqueeze(0).expand(tasks, *value.shape).clone().requires_grad_(True)
    return out


def _step_lr(lr: LearningRate, step: int) -> LearningRate:
    """A float, a per-step tensor ``[S]``, or a scalar tensor."""
    if isinstance(lr, torch.Tensor) and lr.dim() > 0:
        return lr[step]
    return lr


def sgd_update(params: Params, names: Sequence[str], grads: Sequence[Optional[torch.Tensor]],
               learning_rates: Mapping[str, LearningRate], step: int) -> Params:
    """``params[name] - lr * grad`` for each name, differentiable; the parameters sharing a float
    learning rate in one ``torch._foreach_add`` (one dispatch instead of two per tensor). A
    ``None`` gradient (a parameter the model did not use) leaves the parameter as it is."""
    updated: Params = {}
    by_rate: Dict[float, list] = {}
    for name, grad in zip(names, grads):
        lr = _step_lr(learning_rates[name], step)
        if grad is None:
            updated[name] = params[name]
        elif isinstance(lr, torch.Tensor):
            updated[name] = params[name] - lr * grad
        else:
            by_rate.setdefault(float(lr), []).append((name, grad))
    for lr, items in by_rate.items():
        stepped = torch._foreach_add([params[name] for name, _ in items], [grad for _, grad in items], alpha=-lr)
        updated.update((name, value) for (name, _), value in zip(items, stepped))
    return {name: updated[name] for name in names}


def check_task_batch(x: torch.Tensor, y: torch.Tensor, name: str = "support") -> None:
    """ValueError unless ``x`` is ``[T, N, ...]`` (T tasks of N images each) and ``y`` is ``[T, N]``:
    the task dimension comes first, also for a single task (``x[None]``, ``y[None]``). Shapes only,
    no host sync."""
    if y.dim() != 2 or x.dim() < 3 or tuple(x.shape[:2]) != tuple(y.shape):
        raise ValueError(f"{name}_x must be [T, N, C, H, W] and {name}_y [T, N] (T tasks of N images; one task: "
                         f"x[None], y[None]), got {tuple(x.shape)} and {tuple(y.shape)}")


def inner_loop(forward: ForwardFn, params: Mapping[str, torch.Tensor],
               learning_rates: Union[float, Mapping[str, LearningRate]],
               support_x: torch.Tensor, support_y: torch.Tensor, steps: int, first_order: bool = True,
               meta_gradient: bool = True, query_x: Optional[torch.Tensor] = None,
               query_y: Optional[torch.Tensor] = None, track_query: bool = False,
               on_step: Optional[Callable[[int, Params], None]] = None,
               expand: Optional[Callable[[Params, int, bool], Params]] = None) -> InnerLoopResult:
    """``steps`` steps of SGD on the support loss of every task, batched over tasks.

    Args:
        forward: functional forward of one task (see :data:`ForwardFn`).
        params: all parameters the forward needs, unbatched.
        learning_rates: the parameters to adapt, name -> learning rate (a float, or a
            tensor of at least ``steps`` learned per-step rates, which then receive gradients).
            Parameters not named here are shared and not adapted. A single float adapts every
            parameter at that rate.
        support_x, support_y: ``[T, N, C, H, W]``, ``[T, N]`` (a ValueError otherwise; the task
            dimension is there for one task too).
        first_order: drop second-order terms (FO-MAML); ``False`` differentiates through
            the inner loop.
        meta_gradient: ``False`` for meta-test adaptation: the result is cut from ``params``.
        query_x, query_y, track_query: record query loss and accuracy before and after
            each step (costs extra forwards; use at validation/logging time).
        on_step: called as ``on_step(s, task_params)`` after the s-th update (s = 1..steps)
            with the adapted parameters, still in the graph when ``meta_gradient`` (e.g. the
            per-step query losses of MAML++'s multi-step loss).
        expand: how the adapted parameters become per-task fast ones, called as
            ``expand(params, T, meta_gradient)``; default :func:`expand_to_tasks` (``[*shape] ->
            [T, *shape]``). A genotype batch (:mod:`tnas.meta.genotype_batch`) passes one that
            repeats each genotype's row over that genotype's tasks.
    """
    if isinstance(learning_rates, numbers.Real) and not isinstance(learning_rates, bool):
        learning_rates = {name: float(learning_rates) for name in params}
    elif not isinstance(learning_rates, Mapping):
        raise TypeError(f"learning_rates must be one number or a mapping name -> rate, got "
                        f"{type(learning_rates).__name__}")
    unknown = [name for name in learning_rates if name not in params]
    if unknown:
        raise KeyError(f"learning rates given for unknown parameter(s): {', '.join(unknown)}")
    check_task_batch(support_x, support_y, "support")
    if query_x is not None and query_y is not None:
        check_task_batch(query_x, query_y, "query")
    short = [name for name, lr in learning_rates.items()
             if isinstance(lr, torch.Tensor) and lr.dim() > 0 and lr.shape[0] < steps]
    if short:
        raise ValueError(f"per-step learning rates of {short[0]} have {learning_rates[short[0]].shape[0]} "
                         f"entries, fewer than the {steps} inner steps")
    tasks = support_x.shape[0]
    task_params = (expand or expand_to_tasks)({n: params[n] for n in learning_rates}, tasks, meta_gradient)
    shared = {n: p for n, p in params.items() if n not in learning_rates}
    if not meta_gradient:
        shared = {n: p.detach() for n, p in shared.items()}
    create_graph = meta_gradient and not first_order
    support_losses, query_losses, query_accuracies = [], [], []

    def record_query(step: int) -> None:
        with torch.no_grad():
            logits = batched_forward(forward, task_params, shared, query_x, step)
            query_losses.append(per_task_cross_entropy(logits, query_y))
            query_accuracies.append(per_task_accuracy(logits, query_y))

    tracking = track_query and query_x is not None
    for step in range(steps):
        if tracking:
            record_query(step)
        with torch.enable_grad():
            logits = batched_forward(forward, task_params, shared, support_x, step)
            losses = per_task_cross_entropy(logits, support_y)
            names = list(task_params)
            grads = torch.autograd.grad(losses.sum(), [task_params[n] for n in names], create_graph=create_graph,
                                        allow_unused=True)
        support_losses.append(losses.detach())
        updated = sgd_update(task_params, names, grads, learning_rates, step)
        if not meta_gradient:
            updated = {n: p.detach().requires_grad_(True) for n, p in updated.items()}
        task_params = updated
        if on_step is not None:
            on_step(step + 1, task_params)
    if tracking:
        record_query(steps)
    if not meta_gradient:
        task_params = {n: p.detach() for n, p in task_params.items()}
    return InnerLoopResult(
        task_params=task_params,
        support_loss=torch.stack(support_losses) if support_losses else support_x.new_zeros(0, tasks),
        query_loss=torch.stack(query_losses) if tracking else None,
        query_accuracy=torch.stack(query_accuracies) if tracking else None,
    )


def query_loss_and_accuracy(forward: ForwardFn, task_params: Params, shared_params: Params, query_x: torch.Tensor,
                            query_y: torch.Tensor, step: int = 0):
    """Per-task query loss and accuracy at the given parameters: two ``[T]`` tensors."""
    logits = batched_forward(forward, task_params, shared_params, query_x, step)
    return per_task_cross_entropy(logits, query_y), per_task_accuracy(logits.detach(), query_y)
