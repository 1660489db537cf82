"""MAML / MAML++ training of G genotypes at once, each exactly as it would train alone.

:class:`GenotypeBatchLearner` is :class:`tnas.meta.maml_pp.MAMLPlusPlus` over a
:class:`tnas.models.genotype_batch.GenotypeBatchNetwork`. A meta-batch holds T tasks per
genotype, stacked genotype-major: ``support_x [G*T, N, C, H, W]`` (tasks ``g*T .. g*T+T-1``
are genotype g's; :func:`stack_batches` builds it from G solo batches). The inner loop is
MAML's (:func:`tnas.meta.maml.inner_loop`) with G*T "tasks": a fast parameter of R
genotypes' rows is ``[R*T, *shape]``, row r repeated over its genotype's tasks.

Why each genotype gets its solo result:

- The inner gradient is that of the sum of the per-task losses, so each (genotype, task)
  slice gets its own task's gradient, as alone.
- The meta-loss is the solo meta-loss (mean over a genotype's T tasks) SUMMED over
  genotypes, so genotype g's parameters receive exactly its solo meta-gradient.
- Adam (and any elementwise optimiser) then steps each row as the solo run steps its tensor.
- MAML++: the per-step BN sets are ``[S+1, R, C]`` (a row per genotype in every set) and the
  learned per-step inner rates ``[R, S]`` (a row per genotype), so each genotype learns its own;
  the schedules (multi-step loss weights, derivative order, cosine LR) depend only on the
  position in training, which all genotypes of a batch share.

Same seed, same task stream and same settings then give the same parameters as G solo runs,
up to rounding (``tests/test_genotype_batch.py`` checks 1e-10 in float64). Drop-path, when on,
draws other random masks than the solo runs would (same distribution), so it is not exact.

>>> model = GenotypeBatchNetwork.from_genotypes(genotypes, seed=0, n_way=5, C=16, layers=2)  # doctest: +SKIP
>>> learner = GenotypeBatchLearner(model, MAMLConfig(first_order=True))                      # doctest: +SKIP
>>> stats = learner.meta_step(stack_batches([sampler.sample() for sampler in samplers]))    # doctest: +SKIP
>>> per_genotype = learner.split_stats(stats)          # G StepStats of [T] tensors         # doctest: +SKIP
>>> solo_state = learner.genotype_state_dict(g)        # what MAMLPlusPlus.state_dict() holds  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import torch

from tnas.meta.learner import MetaLearner, StepStats
from tnas.meta.maml import ForwardFn, Params
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.optim_state import place_step
from tnas.models.genotype_batch import GenotypeBatchNetwork, repeat_rows


def stack_batches(batches: Sequence) -> "EpisodeBatch":  # noqa: F821 (tnas.data imported lazily)
    """G solo meta-batches of T tasks each -> one of G*T tasks, genotype-major.

    A ValueError naming the first batch whose tensors differ in shape from batch 0's."""
    from tnas.data.episodes import EpisodeBatch

    if not batches:
        raise ValueError("stack_batches needs at least one batch")
    first = list(batches[0])
    for g, batch in enumerate(batches[1:], 1):
        for field, mine, theirs in zip(("support_x", "support_y", "query_x", "query_y"), batch, first):
            if mine.shape != theirs.shape:
                raise ValueError(f"batch {g} has {field} of shape {tuple(mine.shape)}, batch 0 has "
                                 f"{tuple(theirs.shape)}; a genotype batch needs meta-batches of one shape")
    return EpisodeBatch(*(torch.cat(tensors) for tensors in zip(*batches)))


def _split(value: Optional[torch.Tensor], genotypes: int, dim: int) -> Optional[List[torch.Tensor]]:
    if value is None:
        return None
    return list(value.unflatten(dim, (genotypes, -1)).unbind(dim))


class GenotypeBatchLearner(MAMLPlusPlus):
    """MAML / MAML++ (:class:`MAMLConfig`) of a :class:`GenotypeBatchNetwork`; see the module docstring.

    The meta-step, evaluation, schedules (:meth:`set_progress`), CUDA-graph key and batch
    checkpoint (:meth:`state_dict`) are MAMLPlusPlus's; what differs is where the genotype rows
    go: the fast parameters, the per-step BN sets and the learned rates.
    """

    def __init__(self, model: GenotypeBatchNetwork, config: Optional[MAMLConfig] = None):
        if not isinstance(model, GenotypeBatchNetwork):
            raise ValueError(f"GenotypeBatchLearner needs a GenotypeBatchNetwork, got {type(model).__name__}")
        super().__init__(model, config)
        self.genotype_count = model.count
        # Per-step BN sets are [S+1, R, C]: their rows sit on dimension 1.
        self.row_dims = {name: 1 for name in self.batch_norm_names}

        def forward(params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
            return model.functional_forward(params, x)

        forward.folds_tasks = True
        self.forward = forward

    def initial_inner_lr(self, param: torch.Tensor) -> torch.Tensor:
        """``[R, S]``: a row of per-step rates for each genotype holding ``param`` ``[R, ...]``."""
        rates = super().initial_inner_lr(param)
        return rates.unsqueeze(0).repeat(param.shape[0], 1)

    # -- functional pieces ------------------------------------------------------------------
    def tasks_per_genotype(self, batch_tasks: int) -> int:
        """T of a meta-batch of ``batch_tasks`` = G*T tasks; a ValueError naming the count otherwise."""
        if batch_tasks % self.genotype_count:
            raise ValueError(f"a meta-batch of {batch_tasks} tasks does not split over {self.genotype_count} "
                             f"genotypes; stack one meta-batch per genotype (stack_batches)")
        return batch_tasks // self.genotype_count

    def forward_for(self, steps: int) -> ForwardFn:
        """The functional forward of an adaptation of ``steps`` steps: per-step BN set chosen per step."""
        if not self.batch_norm_names:
            return self.forward
        names, forward = set(self.batch_norm_names), self.forward

        def select(params: Params, x: torch.Tensor, step: int) -> torch.Tensor:
            index = self.batch_norm_set(step, steps)
            return forward({n: p[index] if n in names else p for n, p in params.items()}, x, step)

        select.folds_tasks = True
        return select

    def learning_rates(self, adapt_groups: Optional[Iterable[str]] = None, steps: Optional[int] = None,
                       tasks: int = 1):
        """Parameter name -> inner rate; a learned one ``[R, S]`` becomes ``[steps, R*tasks, 1, ...]``, so
        that step s scales each (genotype, task) slice of the gradient by its genotype's rate."""
        rates = MetaLearner.learning_rates(self, adapt_groups)
        if not self.learned_lrs:
            return rates
        steps = self.inner_steps if steps is None else steps
        params = self.params()
        out = {}
        for name, rate in rates.items():
            if name in self.learned_lrs:
                per_step = self.learned_lrs[name]  # [R, S]
                if steps <= per_step.shape[1]:
                    per_step = per_step[:, :steps]
                else:  # steps beyond the trained ones reuse the last rate (as MAMLPlusPlus)
                    per_step = torch.cat([per_step, per_step[:, -1:].expand(-1, steps - per_step.shape[1])], 1)
                rate = repeat_rows(per_step, tasks).t().reshape(steps, -1, *([1] * (params[name].dim() - 1)))
            out[name] = rate
        return out

    def expand(self, tasks: int):
        """The inner loop's ``expand``: ``[R, ...]`` -> ``[R*tasks, ...]`` fast parameters."""
        def expand(params: Mapping[str, torch.Tensor], batch_tasks: int, meta_gradient: bool) -> Params:
            if meta_gradient:
                return {n: repeat_rows(p, tasks) for n, p in params.items()}
            return {n: repeat_rows(p.detach(), tasks).clone().requires_grad_(True) for n, p in params.items()}
        return expand

    # -- adaptation and meta-training ------------------------------------------------------------
    def inner_loop_setup(self, support_x: torch.Tensor, adapt_groups: Optional[Iterable[str]], steps: int):
        """For :meth:`MAMLPlusPlus.adapt` on ``support_x [G*T, N, C, H, W]`` (genotype-major): each
        genotype's rates spread over its T tasks, fast parameters ``[R*T, ...]``."""
        tasks = self.tasks_per_genotype(support_x.shape[0])
        return self.learning_rates(adapt_groups, steps, tasks), self.expand(tasks)

    def meta_gradients(self, batch, adapt_groups: Optional[Iterable[str]] = None,
                       update_groups: Optional[Iterable[str]] = None, track_steps: bool = False,
                       loss_scale: float = 1.0) -> StepStats:
        """The gradients of one outer update of every genotype on ``batch`` (G*T tasks, genotype-major;
        ``meta_step`` then steps): the solo meta-losses summed over genotypes (MAMLPlusPlus averages
        over the G*T tasks; times G)."""
        self.tasks_per_genotype(batch.support_x.shape[0])
        return super().meta_gradients(batch, adapt_groups, update_groups, track_steps,
                                 loss_scale=loss_scale * self.genotype_count)

    def split_stats(self, stats: StepStats) -> List[StepStats]:
        """A meta-step's or evaluation's statistics (``[G*T]``, ``[S+1, G*T]``) -> one StepStats per
        genotype (``[T]``, ``[S+1, T]``), as its solo run would report them."""
        g = self.genotype_count
        columns = [_split(stats.query_loss, g, 0), _split(stats.query_accuracy, g, 0),
                   _split(stats.per_step_loss, g, 1), _split(stats.per_step_accuracy, g, 1)]
        return [StepStats(*(None if column is None else column[i] for column in columns)) for i in range(g)]

    # -- solo checkpoints ------------------------------------------------------------------------
    def _solo_parameters(self, genotype: int):
        """Genotype ``genotype``'s meta-learned tensors in its solo learner's optimiser order:
        (solo name, batched tensor, row, row dim, kind) with kind "model" or "inner_lr"."""
        model: GenotypeBatchNetwork = self.model
        params = dict(model.named_parameters())
        names = model.genotype_names(genotype)
        entries = [(solo, params[name], row, self.row_dims.get(name, 0), "model")
                   for solo, (name, row) in names.items()]
        entries += [(solo, self.learned_lrs[name], row, 0, "inner_lr")
                    for solo, (name, row) in names.items() if name in self.learned_lrs]
        return entries

    def genotype_state_dict(self, genotype: int) -> Dict[str, object]:
        """Genotype ``genotype``'s learner state in the form its solo :class:`MAMLPlusPlus` saves
        (``{"model", "optimizers", "inner_lrs"}``, copies): a solo ``Network`` + ``MAMLPlusPlus`` of its
        genotype and settings loads it with ``load_state_dict``."""
        entries = self._solo_parameters(genotype)
        model_state = self.model.genotype_state_dict(genotype, row_dims=self.row_dims)
        inner_lrs = {solo: tensor.detach().select(dim, row).clone()
                     for solo, tensor, row, dim, kind in entries if kind == "inner_lr"}
        optimizer = self.optimizers["weights"]
        batched = optimizer.state_dict()
        index_of = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
        state = {}
        unused = self.model.unused[genotype]
        for solo_index, (solo, tensor, row, dim, kind) in enumerate(entries):
            saved = batched["state"].get(index_of[id(tensor)])
            if saved is None or solo in unused:
                continue  # alone, a parameter without gradient never gets optimiser state
            state[solo_index] = {key: (value.select(dim, row).clone()
                                       if isinstance(value, torch.Tensor) and value.shape == tensor.shape
                                       else (value.clone() if isinstance(value, torch.Tensor) else value))
                                 for key, value in saved.items()}
        groups = [dict(group, params=list(range(len(entries)))) for group in batched["param_groups"]]
        if len(groups) != 1:
            raise RuntimeError("expected one optimiser parameter group (as MAMLPlusPlus builds)")
        return {"model": model_state, "optimizers": {"weights": {"state": state, "param_groups": groups}},
                "inner_lrs": inner_lrs}

    def load_genotype_state_dict(self, genotype: int, state: Mapping[str, object]) -> None:
        """Load a solo learner's state (:meth:`MAMLPlusPlus.state_dict`, e.g. ``state["learner"]`` of a
        genotype's ``last.pt``) into genotype ``genotype``'s rows, optimiser moments included (resuming
        a batch); without an ``"optimizers"`` entry only the network and learned rates (scoring)."""
        entries = self._solo_parameters(genotype)
        self.model.load_genotype_state_dict(genotype, state["model"], row_dims=self.row_dims)
        saved_lrs = state.get("inner_lrs", {}) or {}
        expected = {solo for solo, *_, kind in entries if kind == "inner_lr"}
        if set(saved_lrs) != expected:
            raise KeyError(f"genotype {genotype}: learned inner learning rates in the state do not match "
                           f"({len(saved_lrs)} saved, {len(expected)} expected)")
        optimizer = self.optimizers["weights"]
        solo_optimizer = (state.get("optimizers") or {}).get("weights") or {"state": {}}
        with torch.no_grad():
            for solo, tensor, row, dim, kind in entries:
                if kind == "inner_lr":
                    tensor.select(dim, row).copy_(saved_lrs[solo])
            for solo_index, (_, tensor, row, dim, _) in enumerate(entries):
                saved = solo_optimizer["state"].get(solo_index)
                if saved is None:
                    continue
                current = optimizer.state[tensor]
                for key, value in saved.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        if key not in current:
                            current[key] = torch.zeros_like(tensor)
                        current[key].select(dim, row).copy_(value)
                    elif isinstance(value, torch.Tensor):  # the step count: one per batched tensor
                        if key in current:
                            current[key].copy_(value)
                        else:  # where torch keeps it: on the parameter's device only when capturable/fused
                            current[key] = place_step(value.detach().clone(), optimizer.param_groups[0], tensor)
                    else:
                        current[key] = value
