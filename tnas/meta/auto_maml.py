"""auto-MAML: one architecture for all tasks, searched by alternating first-order MAML updates.

The images of every meta-train class are split 1:1 (:func:`tnas.data.split_images_in_half`):
tasks from the first half update the supernet weights w, tasks from the second half update
the architecture alpha. As in the original code, every meta-iteration takes one alpha-step
and then one w-step (:meth:`AutoMAML.step_kinds`); ``alternate=True`` instead takes one
step per iteration, w on even and alpha on odd iterations (half the updates of each kind
per epoch).

- w-step: the inner loop adapts w on each task's support set; the query loss at the adapted
  w' gives the meta-gradient of w (FO-MAML); Adam on w.
- alpha-step: the inner loop adapts w only (alpha is shared by all tasks and fixed in the
  loop); the query loss at (w', alpha) gives the gradient of alpha (first order: the direct
  term only; ``first_order=False`` also differentiates through the inner loop); Adam on
  alpha with lr 3e-4 (the original's default), betas (0.5, 0.999) and weight decay 1e-3.

Validation and meta-test adapt w only. The searched genotype is decoded from alpha
(``learner.genotype()``), then trained from scratch (:mod:`tnas.stages.train`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple, Union

from tnas.genotypes import Genotype
from tnas.meta.learner import MetaLearner, StepStats
from tnas.meta.tnas import SupernetSearchConfig
from tnas.models.supernet import Supernet

WEIGHT_STEP, ALPHA_STEP = "weights", "alphas"
STEP_GROUPS = {WEIGHT_STEP: {"adapt_groups": [WEIGHT_STEP], "update_groups": [WEIGHT_STEP]},
               ALPHA_STEP: {"adapt_groups": [WEIGHT_STEP], "update_groups": [ALPHA_STEP]}}
"""The ``meta_step`` groups of each kind of step: w adapts in both, the kind names what steps."""


@dataclass
class AutoMAMLConfig(SupernetSearchConfig):
    """The shared search hyper-parameters (outer alpha lr 3e-4, the original auto-MAML's), the
    seed of the 1:1 split of each class's images, and ``alternate``: False (the original) takes
    an alpha-step and a w-step every meta-iteration, True one of them in turn."""

    meta_lr_alphas: float = 3e-4
    split_seed: int = 0
    alternate: bool = False


class AutoMAML(MetaLearner):
    """The auto-MAML meta-learner over a :class:`~tnas.models.supernet.Supernet`.

    >>> learner = AutoMAML(Supernet(n_way=5, C=4, layers=1, in_channels=1))   # doctest: +SKIP
    >>> learner.weight_step(batch_from_first_half)    # updates w only
    >>> learner.alpha_step(batch_from_second_half)    # updates alpha only
    >>> learner.genotype()                            # the searched architecture
    """

    def __init__(self, model: Supernet, config: Optional[AutoMAMLConfig] = None,
                 compile_forward: Union[bool, str] = False):
        config = config or AutoMAMLConfig()
        self.config = config
        groups, optimizers = config.groups_and_optimizers(model)  # keys: WEIGHT_STEP, ALPHA_STEP
        # Only the weights have an inner learning rate: every adaptation adapts w alone.
        super().__init__(model, groups, {WEIGHT_STEP: config.inner_lr_weights}, optimizers,
                         inner_steps=config.inner_steps, inner_steps_test=config.inner_steps_test,
                         first_order=config.first_order, amp_dtype=config.amp_dtype,
                         compile_forward=compile_forward)

    def weight_step(self, batch, track_steps: bool = False, loss_scale: float = 1.0) -> StepStats:
        """FO-MAML update of w (tasks of the first half)."""
        return self.meta_step(batch, **STEP_GROUPS[WEIGHT_STEP], track_steps=track_steps, loss_scale=loss_scale)

    def alpha_step(self, batch, track_steps: bool = False, loss_scale: float = 1.0) -> StepStats:
        """Update of alpha from the query loss at the adapted w (tasks of the second half)."""
        return self.meta_step(batch, **STEP_GROUPS[ALPHA_STEP], track_steps=track_steps, loss_scale=loss_scale)

    @staticmethod
    def step_kind(iteration: int) -> str:
        """With ``alternate``: which parameters meta-iteration ``iteration`` updates (even -> weights,
        odd -> alphas)."""
        return WEIGHT_STEP if iteration % 2 == 0 else ALPHA_STEP

    def step_kinds(self, iteration: int) -> Tuple[str, ...]:
        """The steps of meta-iteration ``iteration``, in order: ``(alphas, weights)`` (the original's
        order: the alpha-step first), or one of them in turn with ``config.alternate``."""
        if self.config.alternate:
            return (self.step_kind(iteration),)
        return (ALPHA_STEP, WEIGHT_STEP)

    def genotype(self) -> Genotype:
        """The searched architecture, decoded from alpha by the DARTS rule."""
        return self.model.genotype()


def build_auto_maml_learner(summary: Mapping[str, object], device) -> AutoMAML:
    """An untrained auto-MAML learner (supernet and optimisers) from a search run's ``summary``,
    ready for ``learner.load_state_dict(state["learner"])``."""
    model = Supernet(**summary["model"]).to(device)
    return AutoMAML(model, AutoMAMLConfig.from_dict(summary["learner"]))
