"""The meta-learner: one object that holds a model, its outer optimisers and the inner-loop settings.

T-NAS, auto-MAML and (MAML / MAML++) training of a derived network are all "adapt some
parameters on the support sets, then step some optimisers on the query loss"; they
differ in which parameters adapt, at which rates, and which optimisers step. This class
does that once; :mod:`tnas.meta.tnas` and :mod:`tnas.meta.auto_maml` configure it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from tnas.meta.maml import (COMPILE_BACKENDS, ForwardFn, InnerLoopResult, LearningRate, Params, compile_forward,
                            inner_loop, loss_in_full_precision, model_forward, query_loss_and_accuracy)
from tnas.meta.optim_state import load_optimizer_state

GradientHook = Callable[[List[torch.Tensor]], None]
"""Called with the parameters about to be stepped (their ``.grad`` filled); e.g. an all-reduce."""


@dataclass
class StepStats:
    """Per-task statistics of a meta-step or an evaluation, all tensors (no host sync).

    ``query_loss`` / ``query_accuracy``: ``[T]`` after adaptation. ``per_step_loss`` /
    ``per_step_accuracy``: ``[S+1, T]`` before and after each inner step, when tracked.
    """

    query_loss: torch.Tensor
    query_accuracy: torch.Tensor
    per_step_loss: Optional[torch.Tensor] = None
    per_step_accuracy: Optional[torch.Tensor] = None

    def summary(self) -> Dict[str, float]:
        """Means over tasks as Python floats, accuracies in percent (this syncs; call at log time)."""
        out = {"loss": float(self.query_loss.float().mean()), "accuracy": 100.0 * float(self.query_accuracy.float().mean())}
        if self.per_step_accuracy is not None:
            for step, value in enumerate(self.per_step_accuracy.float().mean(dim=1).tolist()):
                out[f"accuracy_step{step}"] = 100.0 * value
        return out


def check_compile_forward(compile_forward: Union[bool, str], first_order: bool) -> None:
    """ValueError unless ``compile_forward`` is off, or on (True or a backend name) with first order:
    a compiled forward's backward cannot be differentiated again, which second order needs."""
    if isinstance(compile_forward, str) and compile_forward not in COMPILE_BACKENDS:
        raise ValueError(f"compile_forward must be True, False or one of {', '.join(COMPILE_BACKENDS)}, "
                         f"got {compile_forward!r}")
    if compile_forward and not first_order:
        raise ValueError("compile_forward needs first-order MAML: torch.compile gives no double backward, "
                         "which second order (and a schedule that turns it on) needs")


def check_inputs(model: nn.Module, images: torch.Tensor) -> None:
    """ValueError naming both sides unless ``images`` are on the device and of the floating dtype of
    ``model``'s first parameter (a one-line message instead of the first convolution's error).
    Batches come as float32: move and convert them with ``batch.to(device, dtype)``, or the model
    with ``model.to(device, dtype)``."""
    param = next(model.parameters(), None)
    if param is None or (images.device == param.device and images.dtype == param.dtype):
        return
    raise ValueError(f"the images are {str(images.dtype).replace('torch.', '')} on {images.device} but the "
                     f"model's parameters are {str(param.dtype).replace('torch.', '')} on {param.device}; "
                     f"convert one side (batch.to(device, dtype) or model.to(device, dtype))")


class MetaLearner:
    """Functional MAML over a model with named parameter groups.

    Args:
        model: the network; its ``forward(x)`` returns logits.
        groups: group name -> list of parameter names (e.g. ``{"weights": [...], "alphas": [...]}``).
        inner_lrs: group name -> inner learning rate; groups absent here are not adapted.
        optimizers: group name -> outer optimiser over that group's parameters.
        inner_steps / inner_steps_test: adaptation steps in meta-training / meta-testing.
        first_order: FO-MAML (default) or exact second order.
        forward: functional forward (default: ``functional_call`` of ``model``).
        amp_dtype: e.g. ``torch.bfloat16`` to run forwards under autocast (GPU fast path).
        compile_forward: run the forwards of meta-training steps (inner loop and query loss) through
            ``torch.compile`` (:func:`tnas.meta.maml.compile_forward`; True: inductor, or a backend
            name); evaluation and decoding stay eager (their shapes and modes vary). First order
            only: with ``first_order=False`` it is a ValueError.
    """

    def __init__(self, model: nn.Module, groups: Mapping[str, Sequence[str]], inner_lrs: Mapping[str, LearningRate],
                 optimizers: Mapping[str, torch.optim.Optimizer], inner_steps: int = 5, inner_steps_test: int = 10,
                 first_order: bool = True, forward: Optional[ForwardFn] = None,
                 amp_dtype: Optional[torch.dtype] = None, compile_forward: Union[bool, str] = False):
        check_compile_forward(compile_forward, first_order)
        self.model = model
        self.groups = {name: list(names) for name, names in groups.items()}
        self.inner_lrs = dict(inner_lrs)
        self.optimizers = dict(optimizers)
        self.inner_steps = inner_steps
        self.inner_steps_test = inner_steps_test
        self.first_order = first_order
        self.forward = forward or model_forward(model)
        self.amp_dtype = amp_dtype
        self.compile_forward = compile_forward
        self._compiled: Optional[tuple] = None  # (eager forward, its compiled version)
        self.gradient_hook: Optional[GradientHook] = None
        self.loss_scale = 1.0  # data parallel: this rank's share of the meta-batch (see tnas.distributed)

    # -- parameters -------------------------------------------------------------------
    def params(self) -> Params:
        """Every parameter the forward needs, by name."""
        return dict(self.model.named_parameters())

    def learning_rates(self, adapt_groups: Optional[Iterable[str]] = None) -> Dict[str, LearningRate]:
        """Parameter name -> inner learning rate for the adapted groups (default: all with a rate)."""
        adapt_groups = list(self.inner_lrs) if adapt_groups is None else list(adapt_groups)
        return {name: self.inner_lrs[group] for group in adapt_groups for name in self.groups[group]}

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # No cast cache: it would outlive a CUDA graph capture (tnas.meta.cuda_graph), and the
        # inner loop makes new weight tensors every step, so it would rarely hit anyway.
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype, cache_enabled=False)

    def training_forward(self, forward: Optional[ForwardFn] = None) -> ForwardFn:
        """The forward of meta-training steps: ``forward`` (default ``self.forward``), compiled once
        (and again only if it is replaced) when ``compile_forward`` is set."""
        forward = self.forward if forward is None else forward
        if not self.compile_forward:
            return forward
        if self._compiled is None or self._compiled[0] is not forward:
            backend = "inductor" if self.compile_forward is True else str(self.compile_forward)
            self._compiled = (forward, compile_forward(forward, backend))
        return self._compiled[1]

    # -- adaptation ---------------------------------------------------------------------
    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: Optional[int] = None,
              adapt_groups: Optional[Iterable[str]] = None, meta_gradient: bool = False,
              query_x: Optional[torch.Tensor] = None, query_y: Optional[torch.Tensor] = None,
              track_query: bool = False) -> InnerLoopResult:
        """Adapt on the support sets of a batch of tasks (``support_x [T, N, C, H, W]``, ``support_y [T, N]``),
        ``steps`` steps (default ``inner_steps_test``)."""
        check_inputs(self.model, support_x)
        steps = self.inner_steps_test if steps is None else steps
        forward = self.training_forward() if meta_gradient else self.forward
        with self._autocast(support_x.device):
            return inner_loop(forward, self.params(), self.learning_rates(adapt_groups), support_x, support_y,
                              steps, first_order=self.first_order, meta_gradient=meta_gradient,
                              query_x=query_x, query_y=query_y, track_query=track_query)

    def shared_params(self, adapted: Params) -> Params:
        return {n: p for n, p in self.params().items() if n not in adapted}

    def evaluate(self, batch, steps: Optional[int] = None, adapt_groups: Optional[Iterable[str]] = None,
                 track_steps: bool = False) -> StepStats:
        """Adapt (no meta-gradient) and score the query sets. ``batch``: an EpisodeBatch."""
        steps = self.inner_steps_test if steps is None else steps
        result = self.adapt(batch.support_x, batch.support_y, steps, adapt_groups, meta_gradient=False,
                            query_x=batch.query_x, query_y=batch.query_y, track_query=track_steps)
        with torch.no_grad(), self._autocast(batch.query_x.device):
            shared = {n: p.detach() for n, p in self.shared_params(result.task_params).items()}
            loss, accuracy = query_loss_and_accuracy(self.forward, result.task_params, shared, batch.query_x,
                                                     batch.query_y, steps)
        return StepStats(loss_in_full_precision(loss), accuracy, result.query_loss, result.query_accuracy)

    # -- meta-training ---------------------------------------------------------------------
    # A meta-step is three phases: meta_gradients (adapt, query loss, backward into ``.grad``),
    # gradient_hook (data parallelism: the sum over ranks) and apply_gradients (the optimisers'
    # steps). meta_step runs them in turn; under torchrun with CUDA graphs the first phase is
    # replayed as a graph and the other two run eagerly between replays (tnas.meta.cuda_graph).
    def update_group_names(self, update_groups: Optional[Iterable[str]] = None) -> List[str]:
        """The groups whose optimisers a meta-step steps (default: every group with an optimiser)."""
        return list(self.optimizers) if update_groups is None else list(update_groups)

    def stepped_params(self, update_groups: Optional[Iterable[str]] = None) -> List[torch.Tensor]:
        """The parameters the optimisers of ``update_groups`` step (those that need a gradient),
        in optimiser order: the tensors whose ``.grad`` :meth:`meta_gradients` fills."""
        return [p for group in self.update_group_names(update_groups)
                for param_group in self.optimizers[group].param_groups for p in param_group["params"]
                if p.requires_grad]

    def meta_gradients(self, batch, adapt_groups: Optional[Iterable[str]] = None,
                       update_groups: Optional[Iterable[str]] = None, track_steps: bool = False,
                       loss_scale: float = 1.0) -> StepStats:
        """The first phase of :meth:`meta_step`: fresh ``.grad`` of :meth:`stepped_params`, nothing stepped.

        Adapts ``adapt_groups`` on each task's support set, takes the mean query loss after
        adaptation, scales it by ``loss_scale * self.loss_scale`` (data-parallel ranks holding
        part of a batch) and back-propagates it to the initial parameters.
        """
        update_groups = self.update_group_names(update_groups)
        for group in update_groups:
            self.optimizers[group].zero_grad(set_to_none=True)
        result = self.adapt(batch.support_x, batch.support_y, self.inner_steps, adapt_groups, meta_gradient=True,
                            query_x=batch.query_x, query_y=batch.query_y, track_query=track_steps)
        with self._autocast(batch.query_x.device):
            loss, accuracy = query_loss_and_accuracy(self.training_forward(), result.task_params,
                                                     self.shared_params(result.task_params), batch.query_x,
                                                     batch.query_y, self.inner_steps)
        # Only the stepped groups' gradients: auto-MAML's alpha step then skips the weight gradients
        # of every convolution (autograd prunes what no requested input needs).
        (loss_in_full_precision(loss).mean() * (loss_scale * self.loss_scale)).backward(inputs=self.stepped_params(update_groups))
        return StepStats(loss_in_full_precision(loss.detach()), accuracy, result.query_loss, result.query_accuracy)

    def apply_gradients(self, update_groups: Optional[Iterable[str]] = None) -> None:
        """The last phase of :meth:`meta_step`: the optimisers of ``update_groups`` step on the ``.grad`` there."""
        for group in self.update_group_names(update_groups):
            self.optimizers[group].step()

    def meta_step(self, batch, adapt_groups: Optional[Iterable[str]] = None,
                  update_groups: Optional[Iterable[str]] = None, track_steps: bool = False,
                  loss_scale: float = 1.0) -> StepStats:
        """One outer update on a meta-batch: :meth:`meta_gradients`, then ``gradient_hook`` (the sum
        of the gradients over data-parallel ranks), then :meth:`apply_gradients`."""
        stats = self.meta_gradients(batch, adapt_groups, update_groups, track_steps, loss_scale)
        if self.gradient_hook is not None:
            self.gradient_hook(self.stepped_params(update_groups))
        self.apply_gradients(update_groups)
        return stats

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        return {"model": self.model.state_dict(),
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore weights and optimiser moments; the optimisers keep this learner's own
        hyper-parameters (learning rate, weight decay, betas, capturable), so a resume with changed
        flags (``--resume_override``) trains with the new ones, and an exact resume is unchanged; Adam's
        step counters go where these optimisers keep them (:func:`tnas.meta.optim_state.load_optimizer_state`:
        a graphed run's checkpoint resumed eagerly gets them on the CPU, no host read per step)."""
        self.model.load_state_dict(state["model"])
        for name, opt in self.optimizers.items():
            load_optimizer_state(opt, state["optimizers"][name])
