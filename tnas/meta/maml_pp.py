"""MAML and MAML++ (Antoniou et al., "How to train your MAML", ICLR 2019) for a fixed network.

One learner, :class:`MAMLPlusPlus`, trains a network (e.g. the derived ``Network`` of a
genotype) by MAML; each MAML++ component is a switch of :class:`MAMLConfig`, and with all
switches off it is plain (first- or second-order) MAML:

- ``per_step_bn``: every affine BatchNorm gets ``S + 1`` sets of weights and biases
  (``S = inner_steps``); the network at parameters adapted ``s`` times runs with set ``s``
  (support forward of inner step ``s``, query forward after ``s`` updates). The BN sets are
  meta-learned only, not adapted in the inner loop (MAML++'s default: an inner update of
  set ``s`` would never be used again). Batch statistics are those of the current batch.
  A set reaches the meta-gradient through the forwards that use it: the query forwards
  (set ``S``; sets ``1..S`` with the multi-step loss) and, in second order only, the support
  forwards of the inner steps (first order drops that path, so set 0 then stays as initialised).
- ``learn_inner_lr``: a learning rate per parameter tensor and per inner step, ``[S]``,
  initialised to ``inner_lr`` and meta-learned by the outer optimiser (LSLR).
- ``multi_step_loss``: the meta-loss is ``sum_s w_s * L_query(theta_s)`` over the
  parameters after every inner step, ``w = msl_weights(epoch, S, msl_epochs)`` annealed
  from uniform to only-the-last; after ``msl_epochs`` only the final loss is computed.
- ``first_order_epochs``: derivative-order annealing, first order for epochs
  ``< first_order_epochs``, second order afterwards.
- ``cosine_lr``: cosine annealing of the outer learning rate from ``meta_lr`` towards
  ``min_meta_lr``, per epoch or per iteration, with the period of the whole training as in
  MAML++'s code (:func:`cosine_lr`: the last epoch runs a little above ``min_meta_lr``).
- ``grad_clamp``: every element of the network's meta-gradient (per-step BN sets included, the
  learned rates not) clamped to ``[-grad_clamp, grad_clamp]`` before the outer Adam step, as
  MAML++'s code does on ImageNet-type data (with 10).

The schedules are pure functions of the position in training (:meth:`set_progress`), so a
resumed run continues them exactly without any scheduler state.

Meta-test with more steps than trained (``inner_steps_test > inner_steps``): inner steps
``s >= S`` reuse the last trained step's values, i.e. learning rate ``lr[S-1]`` and BN set
``S-1`` for their support forwards, and the network after the final update always runs
with BN set ``S`` (the set trained for predictions after adaptation). Fewer steps than
trained use the first ones, and also finish with set ``S``. So no parameter exists that
training never reaches.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from tnas.meta.learner import MetaLearner, StepStats, check_compile_forward, check_inputs
from tnas.meta.maml import ForwardFn, InnerLoopResult, Params, inner_loop, per_task_cross_entropy, \
    batched_forward, loss_in_full_precision, per_task_accuracy, query_loss_and_accuracy
from tnas.models.per_step_bn import make_per_step_batch_norm, select_batch_norm_set

COSINE_UNITS = ("epoch", "iteration")


@dataclass
class MAMLConfig:
    """Hyper-parameters of MAML / MAML++ training; ``asdict`` of it (less ``amp_dtype``) rebuilds the learner."""

    inner_steps: int = 5
    inner_steps_test: int = 10
    inner_lr: float = 0.01
    meta_lr: float = 1e-3
    first_order: bool = True
    per_step_bn: bool = False
    learn_inner_lr: bool = False
    multi_step_loss: bool = False
    msl_epochs: int = 10
    first_order_epochs: Optional[int] = None
    cosine_lr: bool = False
    min_meta_lr: float = 1e-5
    cosine_unit: str = "epoch"
    weight_decay: float = 0.0  # outer Adam's on the network's parameters (auto-MAML from scratch: 3e-4)
    grad_clamp: Optional[float] = None  # clamp each network meta-gradient element to [-c, c] before Adam
    amp_dtype: Optional[torch.dtype] = field(default=None)

    def __post_init__(self):
        if self.inner_steps < 1 or self.inner_steps_test < 1:
            raise ValueError("inner_steps and inner_steps_test must be >= 1")
        if self.cosine_unit not in COSINE_UNITS:
            raise ValueError(f"cosine_unit must be one of {COSINE_UNITS}, got {self.cosine_unit!r}")
        if self.grad_clamp is not None and not self.grad_clamp > 0:
            raise ValueError(f"grad_clamp must be > 0 (or None: off), got {self.grad_clamp!r}")

    def to_dict(self) -> Dict[str, object]:
        """The JSON-able settings (everything but ``amp_dtype``), e.g. for a run's summary."""
        return {k: v for k, v in asdict(self).items() if k != "amp_dtype"}

    @classmethod
    def from_dict(cls, values: Mapping[str, object], **overrides) -> "MAMLConfig":
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in values.items() if k in known}, **overrides})


# -- schedules (pure functions) -------------------------------------------------------------
def msl_weights(epoch: int, steps: int, msl_epochs: int, dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Multi-step loss weights ``[steps]`` at ``epoch`` (0-based): uniform at epoch 0, linearly
    moved to only-the-last by ``msl_epochs``; they always sum to 1.

    As Antoniou et al.: each non-final weight falls by ``1 / (steps * msl_epochs)`` per epoch and
    the final weight takes up the rest (without their small floor on the non-final weights).
    """
    progress = 1.0 if msl_epochs <= 0 else min(max(epoch, 0) / msl_epochs, 1.0)
    weights = torch.full((steps,), (1.0 - progress) / steps, dtype=dtype, device=device)
    weights[-1] += progress
    return weights


def first_order_at(epoch: int, first_order_epochs: Optional[int], default: bool) -> bool:
    """Derivative-order annealing: first order before ``first_order_epochs``, second after (``None``: ``default``)."""
    if first_order_epochs is None:
        return default
    return epoch < first_order_epochs


def cosine_lr(position: int, length: int, max_lr: float, min_lr: float) -> float:
    """Cosine annealing over positions ``0 .. length-1`` with a period of ``length``, as MAML++'s
    code steps torch's ``CosineAnnealingLR(T_max=epochs)`` once per epoch: ``max_lr`` at 0, halfway
    at ``length / 2``; ``min_lr`` would come at ``length``, one past the last position, so the last
    one runs a little above it (15 epochs, 1e-3 to 1e-5: 2.1e-5)."""
    if length <= 1:
        return max_lr
    fraction = min(max(position, 0), length - 1) / length
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * fraction))


def extend_steps(rates: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step rates ``[S]`` for ``steps`` steps: the first ``steps``, or the last repeated beyond ``S``."""
    if steps <= rates.shape[0]:
        return rates[:steps]
    return torch.cat([rates, rates[-1:].expand(steps - rates.shape[0])])


# -- the learner ---------------------------------------------------------------------------
class MAMLPlusPlus(MetaLearner):
    """MAML / MAML++ over a plain network (``forward(x) -> logits``); see the module docstring.

    Groups: ``"weights"`` (adapted in the inner loop) and ``"batch_norm"`` (the per-step BN
    sets, meta-learned only). One Adam (``optimizers["weights"]``) steps every network
    parameter and the learned inner learning rates.

    >>> learner = MAMLPlusPlus(network, MAMLConfig(per_step_bn=True, learn_inner_lr=True))  # doctest: +SKIP
    >>> learner.set_progress(iteration, iterations_per_epoch, epochs)   # schedules    # doctest: +SKIP
    >>> stats = learner.meta_step(batch)                                                  # doctest: +SKIP
    >>> stats = learner.evaluate(test_batch, steps=10)                                    # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, config: Optional[MAMLConfig] = None,
                 compile_forward: Union[bool, str] = False):
        """``compile_forward``: as :class:`MetaLearner`'s; refused (ValueError) with second order,
        also with ``first_order_epochs`` (second order later in training)."""
        config = config or MAMLConfig()
        check_compile_forward(compile_forward, config.first_order and config.first_order_epochs is None)
        self.config = config
        steps = config.inner_steps
        self.batch_norm_names: List[str] = make_per_step_batch_norm(model, steps + 1) if config.per_step_bn else []
        per_step = set(self.batch_norm_names)
        weights = [name for name, _ in model.named_parameters() if name not in per_step]
        self.learned_lrs: Dict[str, nn.Parameter] = {}
        if config.learn_inner_lr:
            for name, param in model.named_parameters():
                if name not in per_step:
                    self.learned_lrs[name] = nn.Parameter(self.initial_inner_lr(param))
        # weight decay (the original auto-MAML from-scratch Adam's) on the network, not on learned rates;
        # one parameter group otherwise (network, then learned rates), as genotype batches expect
        network, rates = list(model.parameters()), list(self.learned_lrs.values())
        if config.weight_decay and rates:
            groups = [{"params": network, "weight_decay": config.weight_decay}, {"params": rates, "weight_decay": 0.0}]
        else:
            groups = [{"params": network + rates, "weight_decay": config.weight_decay}]
        optimizers = {"weights": torch.optim.Adam(groups, lr=config.meta_lr)}
        super().__init__(model, {"weights": weights, "batch_norm": self.batch_norm_names},
                         {"weights": config.inner_lr}, optimizers, inner_steps=steps,
                         inner_steps_test=config.inner_steps_test,
                         first_order=first_order_at(0, config.first_order_epochs, config.first_order),
                         amp_dtype=config.amp_dtype, compile_forward=compile_forward)
        self.epoch = 0

    def initial_inner_lr(self, param: torch.Tensor) -> torch.Tensor:
        """The learned per-step rates of one parameter tensor before training: ``[S]``, all ``inner_lr``."""
        return torch.full((self.config.inner_steps,), float(self.config.inner_lr), dtype=param.dtype,
                          device=param.device)

    # -- schedules ------------------------------------------------------------------------
    def set_progress(self, iteration: int, iterations_per_epoch: int, epochs: int) -> None:
        """Set the epoch-dependent state for meta-iteration ``iteration`` (0-based, global):
        derivative order, multi-step loss weights (through ``self.epoch``) and the cosine LR."""
        config = self.config
        self.epoch = iteration // max(1, iterations_per_epoch)
        self.first_order = first_order_at(self.epoch, config.first_order_epochs, config.first_order)
        if config.cosine_lr:
            if config.cosine_unit == "epoch":
                lr = cosine_lr(self.epoch, epochs, config.meta_lr, config.min_meta_lr)
            else:
                lr = cosine_lr(iteration, epochs * iterations_per_epoch, config.meta_lr, config.min_meta_lr)
            for optimizer in self.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = lr

    def multi_step_loss_active(self) -> bool:
        return self.config.multi_step_loss and self.epoch < self.config.msl_epochs

    def settings_key(self) -> tuple:
        """The Python-side settings a meta-step reads that :meth:`set_progress` changes: the
        derivative order, the multi-step loss weights (through the epoch while they anneal)
        and the outer learning rates. A CUDA graph of ``meta_step`` stays valid while this
        key does (:class:`tnas.meta.cuda_graph.KeyedGraphedStep`)."""
        annealing = self.epoch if self.multi_step_loss_active() else None
        rates = tuple(group["lr"] for optimizer in self.optimizers.values() for group in optimizer.param_groups)
        return self.first_order, annealing, rates

    # -- functional pieces ------------------------------------------------------------------
    def batch_norm_set(self, step: int, steps: int) -> int:
        """The BN set used by parameters adapted ``step`` times in a run of ``steps`` steps."""
        if step >= steps:
            return self.inner_steps
        return min(step, self.inner_steps - 1)

    def forward_for(self, steps: int, base: Optional[ForwardFn] = None) -> ForwardFn:
        """The functional forward of an adaptation of ``steps`` steps (per-step BN mapped; see module
        docstring) around ``base`` (default ``self.forward``)."""
        base = self.forward if base is None else base
        if not self.batch_norm_names:
            return base
        names = self.batch_norm_names

        def forward(params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
            return base(select_batch_norm_set(params, names, self.batch_norm_set(step, steps)), x, step)

        forward.folds_tasks = getattr(base, "folds_tasks", False)
        return forward

    def training_forward_for(self, steps: int) -> ForwardFn:
        """:meth:`forward_for` of a meta-training step: around the compiled forward with
        ``compile_forward`` (the BN set is picked outside it, so the steps share its graphs)."""
        if not self.compile_forward:
            return self.forward_for(steps)
        return self.forward_for(steps, self.training_forward())

    def learning_rates(self, adapt_groups: Optional[Iterable[str]] = None, steps: Optional[int] = None):
        """Parameter name -> inner learning rate (learned ones as ``[steps]`` tensors)."""
        rates = super().learning_rates(adapt_groups)
        if self.learned_lrs:
            steps = self.inner_steps if steps is None else steps
            rates = {name: extend_steps(self.learned_lrs[name], steps) if name in self.learned_lrs else rate
                     for name, rate in rates.items()}
        return rates

    # -- adaptation ---------------------------------------------------------------------------
    def inner_loop_setup(self, support_x: torch.Tensor, adapt_groups: Optional[Iterable[str]], steps: int):
        """The inner loop's learning rates for ``steps`` steps and its ``expand`` (None: every parameter
        copied once per task of ``support_x [T, N, C, H, W]``). A genotype batch overrides it."""
        return self.learning_rates(adapt_groups, steps), None

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: Optional[int] = None,
              adapt_groups: Optional[Iterable[str]] = None, meta_gradient: bool = False,
              query_x: Optional[torch.Tensor] = None, query_y: Optional[torch.Tensor] = None,
              track_query: bool = False, on_step=None) -> InnerLoopResult:
        """As :meth:`MetaLearner.adapt`, with the per-step BN sets and learned rates; ``on_step`` as
        :func:`~tnas.meta.maml.inner_loop`'s."""
        check_inputs(self.model, support_x)
        steps = self.inner_steps_test if steps is None else steps
        rates, expand = self.inner_loop_setup(support_x, adapt_groups, steps)
        if not meta_gradient:
            rates = {n: r.detach() if isinstance(r, torch.Tensor) else r for n, r in rates.items()}
        with self._autocast(support_x.device):
            forward = self.training_forward_for(steps) if meta_gradient else self.forward_for(steps)
            return inner_loop(forward, self.params(), rates, support_x, support_y, steps,
                              first_order=self.first_order, meta_gradient=meta_gradient, query_x=query_x,
                              query_y=query_y, track_query=track_query, on_step=on_step, expand=expand)

    @contextlib.contextmanager
    def _inference_mode(self):
        """Evaluation: the model in eval mode (no drop-path; BN still uses batch statistics)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def evaluate(self, batch, steps: Optional[int] = None, adapt_groups: Optional[Iterable[str]] = None,
                 track_steps: bool = False) -> StepStats:
        """Adapt ``steps`` steps (default ``inner_steps_test``) without meta-gradient and score the query sets."""
        steps = self.inner_steps_test if steps is None else steps
        with self._inference_mode():
            result = self.adapt(batch.support_x, batch.support_y, steps, adapt_groups, meta_gradient=False,
                                query_x=batch.query_x, query_y=batch.query_y, track_query=track_steps)
            with torch.no_grad(), self._autocast(batch.query_x.device):
                shared = {n: p.detach() for n, p in self.shared_params(result.task_params).items()}
                loss, accuracy = query_loss_and_accuracy(self.forward_for(steps), result.task_params, shared,
                                                         batch.query_x, batch.query_y, steps)
        return StepStats(loss_in_full_precision(loss), accuracy, result.query_loss, result.query_accuracy)

    # -- meta-training ---------------------------------------------------------------------
    def update_group_names(self, update_groups: Optional[Iterable[str]] = None) -> List[str]:
        """Always ``["weights"]``: the single optimiser steps every meta-learned tensor (``update_groups``
        is accepted for API compatibility)."""
        return ["weights"]

    def meta_gradients(self, batch, adapt_groups: Optional[Iterable[str]] = None,
                       update_groups: Optional[Iterable[str]] = None, track_steps: bool = False,
                       loss_scale: float = 1.0) -> StepStats:
        """The gradients of one outer update (:meth:`MetaLearner.meta_step` runs the phases): the
        (multi-step, when active) query loss after adaptation, scaled by ``loss_scale *
        self.loss_scale``, back-propagated into the ``.grad`` of every meta-learned tensor."""
        self.optimizers["weights"].zero_grad(set_to_none=True)
        steps = self.inner_steps
        forward = self.training_forward_for(steps)
        step_losses: List[torch.Tensor] = []
        final: Dict[str, torch.Tensor] = {}
        multi_step = self.multi_step_loss_active()

        def on_step(step: int, task_params: Params) -> None:
            if multi_step or step == steps:
                shared = self.shared_params(task_params)
                logits = batched_forward(forward, task_params, shared, batch.query_x, step)
                step_losses.append(per_task_cross_entropy(logits, batch.query_y))
                if step == steps:
                    final["accuracy"] = per_task_accuracy(logits.detach(), batch.query_y)

        result = self.adapt(batch.support_x, batch.support_y, steps, adapt_groups, meta_gradient=True,
                            query_x=batch.query_x, query_y=batch.query_y, track_query=track_steps,
                            on_step=on_step)
        losses = loss_in_full_precision(torch.stack(step_losses))  # [S, T] or [1, T]
        if multi_step:
            weights = msl_weights(self.epoch, steps, self.config.msl_epochs, dtype=losses.dtype, device=losses.device)
            meta_loss = (weights[:, None] * losses).sum(dim=0).mean()
        else:
            meta_loss = losses[-1].mean()
        (meta_loss * (loss_scale * self.loss_scale)).backward()
        return StepStats(losses[-1].detach(), final["accuracy"], result.query_loss, result.query_accuracy)

    def apply_gradients(self, update_groups: Optional[Iterable[str]] = None) -> None:
        """The outer Adam step on the ``.grad`` that :meth:`meta_gradients` (and a data-parallel sum) left,
        after clamping the network's elements to ``[-grad_clamp, grad_clamp]`` when set (in place: a CUDA
        graph of the step records it)."""
        clamp = self.config.grad_clamp
        if clamp is not None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_clamp_min_(grads, -clamp)
                torch._foreach_clamp_max_(grads, clamp)
        super().apply_gradients(update_groups)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, object]:
        state = super().state_dict()
        state["inner_lrs"] = {name: lr.detach().clone() for name, lr in self.learned_lrs.items()}
        return state

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        saved = state.get("inner_lrs", {}) or {}
        if set(saved) != set(self.learned_lrs):
            raise KeyError("learned inner learning rates in the checkpoint do not match this learner "
                           f"({len(saved)} saved, {len(self.learned_lrs)} expected)")
        with torch.no_grad():
            for name, lr in self.learned_lrs.items():
                lr.copy_(saved[name])
        super().load_state_dict(state)

    def parameter_count(self) -> int:
        """Meta-learned numbers: network parameters (with per-step BN sets) and learned learning rates."""
        return sum(p.numel() for p in self.model.parameters()) + sum(p.numel() for p in self.learned_lrs.values())
