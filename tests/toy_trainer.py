"""A :class:`tnas.engine.MetaTrainer` around a toy learner: the loop, checkpoints, logs, RNG states and
resume of a real run, without a model, in milliseconds per iteration."""
import torch

from tnas import distributed
from tnas.engine import MetaTrainer, Schedule
from tnas.meta.learner import StepStats


class Killed(Exception):
    """Stands for a SIGKILL (raised from a step or from the best-checkpoint hook)."""


class ToyLearner:
    """A learner whose whole state is ``total``, the running sum (over ranks) of its steps' random draws."""

    optimizers = {}

    def __init__(self):
        self.total = torch.zeros((), dtype=torch.float64)

    def state_dict(self):
        return {"total": self.total.clone()}

    def load_state_dict(self, state):
        self.total = state["total"].clone()


class ToyTrainer(MetaTrainer):
    """Validation accuracy = the epoch number, so every epoch improves on the best (writes ``best.pt``)."""

    def validate(self):
        return {"val_accuracy": float(self.epoch + 1), "val_ci95": 0.0}


def toy_trainer(out, logger, schedule: Schedule, draws: int = 1, kill_iteration=None, kill_epoch=None,
                is_main: bool = True):
    """``(learner, trainer)``. Each step draws ``draws`` numbers from the torch generator (as drop-path
    draws its masks) and adds their sum over data-parallel ranks to the learner's total, then reports
    random per-task statistics ``[2]`` (``[2, 2]`` per-step losses when tracked, so they are logged).
    ``kill_iteration``: the step of that (0-based) iteration raises :class:`Killed`; ``kill_epoch``: so
    does the best hook of that epoch, after the epoch's points are logged and ``best.pt`` is written but
    before ``last.pt``."""
    learner = ToyLearner()

    def step(iteration, track):
        if iteration == kill_iteration:
            raise Killed()
        learner.total += distributed.sum_across_ranks(torch.rand(draws, dtype=torch.float64).sum())
        return StepStats(torch.rand(2), torch.rand(2), torch.rand(2, 2) if track else None)

    def best_hook(record):
        if record["epoch"] == kill_epoch:
            raise Killed()

    return learner, ToyTrainer(learner, {}, step, None, str(out), logger, schedule, torch.device("cpu"),
                               is_main=is_main, best_hook=best_hook)
