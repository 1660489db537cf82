"""Genotype batching: G derived networks of one shape run as ONE network, each with its own parameters.

The T-NAS protocol trains hundreds of genotypes from scratch, each a network of ~23K
parameters that fills a small fraction of a large GPU. :class:`GenotypeBatchNetwork` holds
G genotypes of the same shape (``n_way``, ``C``, ``layers``, input channels, stem multiplier,
nodes per cell and concat length) and runs them together on top of task folding
(:mod:`tnas.task_folding`): the channel groups of the folded activations are
(genotype, task) pairs, genotype-major, so with T tasks per genotype the group of task t of
genotype g is ``g*T + t`` and an activation is ``[N, G*T*C, H, W]``.

- The stem, the cells' preprocessing and the classifier are the same layers for every
  genotype; they fold like tasks (one grouped conv / BN / batched matmul over all G*T groups).
- In each cell, for each (node, input slot) the genotypes are grouped by their choice
  ``(op, input state)``. Each distinct choice is one op module whose parameters hold a row
  per genotype that made it; it runs once over those genotypes' channel groups (gathered from
  the input state), and its output is added into those genotypes' node sums (scatter-add).
  Identities add the gathered input directly (no op); when every genotype made the same
  choice there is no gather or scatter at all.
- Drop-path (training mode, ``drop_path_prob > 0``) draws a mask per sample and per
  (genotype, task) group on every op but identities, as the solo network draws one per task.

Parameters: every tensor of the solo :class:`tnas.models.network.Network` gains a leading
row dimension, one row per genotype holding it: ``[G, *shape]`` for the stem,
preprocessing and classifier, ``[G_c, *shape]`` for the op of choice c made by G_c
genotypes (``cells.{i}.edges.{e}.{c}.*``). For T tasks per genotype a forward takes them
either per genotype (rows) or per (genotype, task) (``[R*T, *shape]``, each row repeated over
its genotype's tasks, as MAML's fast weights are). :meth:`GenotypeBatchNetwork.genotype_names`
maps genotype g's solo parameter names to (batched name, row), which is how a solo checkpoint
is cut out of, or loaded into, the batch.

Each genotype's result is the one its solo network gives (same parameters, same images),
up to rounding: the batched grouped ops compute every group on its own
(``tests/test_genotype_batch.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from tnas import task_folding
from tnas.genotypes import Genotype
from tnas.models.network import Network, drop_path
from tnas.models.skeleton import build_cells, make_stem, min_image_size
from tnas.ops import FactorizedReduce, Identity, ReLUConvBN, make_op

SHAPE_KEYS = ("n_way", "C", "layers", "in_channels", "stem_multiplier")
"""Settings of :class:`Network` that all genotypes of a batch share."""


# -- rows ------------------------------------------------------------------------------------
def repeat_rows(value: torch.Tensor, tasks: int) -> torch.Tensor:
    """``[R, *shape] -> [R*tasks, *shape]``: row r repeated for its ``tasks`` tasks (rows stay
    together: r*tasks .. (r+1)*tasks - 1). Its gradient sums each row's tasks."""
    if tasks == 1:
        return value
    return value.unsqueeze(1).expand(value.shape[0], tasks, *value.shape[1:]).reshape(
        value.shape[0] * tasks, *value.shape[1:])


@dataclass(frozen=True)
class Choice:
    """One distinct choice at an edge position: op ``op`` on state ``source``, made by ``genotypes``."""

    op: str
    source: int
    genotypes: Tuple[int, ...]


def unused_parameters(network: Network) -> Set[str]:
    """Names of the parameters ``network``'s output does not depend on (e.g. the preprocessing of a
    cell input no node reads): alone they never get a gradient, so a solo optimiser holds no state for
    them. Found by one tiny forward and backward."""
    params = dict(network.named_parameters())
    side = min_image_size(network.config["layers"])
    reference = next(iter(params.values()))
    # Zeros: which parameters the output depends on is structural, and no random draw disturbs the
    # generator a run's later draws come from.
    x = torch.zeros(2, network.config["in_channels"], side, side, dtype=reference.dtype, device=reference.device)
    was_training = network.training
    network.eval()
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(network(x).sum(), list(params.values()), allow_unused=True)
    finally:
        network.train(was_training)
    return {name for name, grad in zip(params, grads) if grad is None}


def _check_same_shape(networks: Sequence[Network]) -> None:
    """A ValueError naming the first setting in which a network differs from network 0."""
    if not networks:
        raise ValueError("a genotype batch needs at least one network")
    first = networks[0]
    for g, network in enumerate(networks[1:], 1):
        if not isinstance(network, Network):
            raise ValueError(f"genotype batch entry {g} is a {type(network).__name__}, not a derived Network")
        differences = [(key, network.config[key], first.config[key]) for key in SHAPE_KEYS
                       if network.config[key] != first.config[key]]
        for cell in ("normal", "reduce"):
            mine, theirs = getattr(network.genotype, cell), getattr(first.genotype, cell)
            if len(mine) != len(theirs):
                differences.append((f"{cell} cell nodes", len(mine) // 2, len(theirs) // 2))
            mine, theirs = getattr(network.genotype, f"{cell}_concat"), getattr(first.genotype, f"{cell}_concat")
            if len(mine) != len(theirs):
                differences.append((f"{cell}_concat length", len(mine), len(theirs)))
        if network.drop_path_prob != first.drop_path_prob:
            differences.append(("drop_path_prob", network.drop_path_prob, first.drop_path_prob))
        mine, theirs = next(network.parameters()), next(first.parameters())
        if (mine.dtype, mine.device) != (theirs.dtype, theirs.device):
            differences.append(("dtype/device", f"{mine.dtype}/{mine.device}", f"{theirs.dtype}/{theirs.device}"))
        if differences:
            key, value, expected = differences[0]
            raise ValueError(f"genotypes of different shapes in one batch: genotype {g} has {key} {value}, "
                             f"genotype 0 has {expected}")


class GenotypeBatchCell(nn.Module):
    """One cell position of G genotypes (normal or reduction): shared preprocessing, one op per
    distinct (edge, choice). Input states ``[N, G*T*C_prev, H, W]``; output ``[N, G*T*K*C, H', W']``
    (K the concat length)."""

    supports_task_folding = True

    def __init__(self, genotypes: Sequence[Genotype], c_prev_prev: int, c_prev: int, channels: int,
                 reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.count = len(genotypes)
        cells = [g.reduce if reduction else g.normal for g in genotypes]
        concats = [g.reduce_concat if reduction else g.normal_concat for g in genotypes]
        self.steps = len(cells[0]) // 2
        self.out_channels = len(concats[0]) * channels
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels, affine=True) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=True))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=True)
        self.choices: List[List[Choice]] = []
        self.edges = nn.ModuleList()
        for edge in range(2 * self.steps):
            choices = self._group([pairs[edge] for pairs in cells])
            self.choices.append(choices)
            self.edges.append(nn.ModuleList(
                make_op(c.op, channels, 2 if reduction and c.source < 2 else 1, affine=True) for c in choices))
            for k, choice in enumerate(choices):
                self._register_index(f"edge{edge}_choice{k}", choice.genotypes)
        # Concat: position k of genotype g's output is its state concat_g[k].
        self.concat: List[List[Choice]] = []
        for position in range(len(concats[0])):
            groups = self._group([("concat", concat[position]) for concat in concats])
            self.concat.append(groups)
            for j, group in enumerate(groups):
                self._register_index(f"concat{position}_group{j}", group.genotypes)

    @staticmethod
    def _group(picks: Sequence[Tuple[str, int]]) -> List[Choice]:
        grouped: Dict[Tuple[str, int], List[int]] = {}
        for g, pick in enumerate(picks):
            grouped.setdefault(tuple(pick), []).append(g)
        return [Choice(op, source, tuple(gs)) for (op, source), gs in grouped.items()]

    def _register_index(self, name: str, genotypes: Tuple[int, ...]) -> None:
        # A buffer, so that .to(device) moves it and a forward makes no host-to-device copy.
        if len(genotypes) < self.count:
            self.register_buffer(f"index_{name}", torch.tensor(genotypes, dtype=torch.long), persistent=False)

    def _index(self, name: str) -> Optional[torch.Tensor]:
        return getattr(self, f"index_{name}", None)

    def _gather(self, state: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        """The channel groups of the genotypes in ``index`` (all when None): ``[N, G_c*T*C, H, W]``."""
        if index is None:
            return state
        n = state.shape[0]
        return state.reshape(n, self.count, -1, *state.shape[2:]).index_select(1, index).reshape(
            n, -1, *state.shape[2:])

    def _add(self, total: Optional[torch.Tensor], h: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
        """``total + h`` on the genotypes in ``index`` (all when None); ``total`` None counts as zeros."""
        if index is None:
            return h if total is None else total + h
        n, rows = h.shape[0], index.shape[0]
        grouped = h.reshape(n, rows, -1, *h.shape[2:])
        if total is None:
            total = h.new_zeros(n, self.count * grouped.shape[2], *h.shape[2:])
        return total.reshape(n, self.count, -1, *h.shape[2:]).index_add(1, index, grouped).reshape(total.shape)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, tasks: int, drop_prob: float = 0.0) -> torch.Tensor:
        """``tasks``: T, the tasks per genotype (the states hold G*T channel groups)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(self.steps):
            total = None
            for edge in (2 * node, 2 * node + 1):
                for k, choice in enumerate(self.choices[edge]):
                    op = self.edges[edge][k]
                    index = self._index(f"edge{edge}_choice{k}")
                    h = self._gather(states[choice.source], index)
                    if not isinstance(op, Identity):  # its layers read len(genotypes)*T groups from h
                        h = op(h)
                        if self.training and drop_prob > 0:
                            h = drop_path(h, drop_prob, len(choice.genotypes) * tasks)
                    total = self._add(total, h, index)
            states.append(total)
        outputs = []
        for position, groups in enumerate(self.concat):
            out = None
            for j, group in enumerate(groups):
                index = self._index(f"concat{position}_group{j}")
                out = self._add(out, self._gather(states[group.source], index), index)
            outputs.append(out)
        return task_folding.cat_channels(outputs, self.count * tasks)


class GenotypeBatchNetwork(nn.Module):
    """G derived networks of one shape as one module (see the module docstring).

    Build it from solo networks (:meth:`from_networks`, which copies their parameters, so
    seeding each solo build as a solo run does gives the solo run's initial parameters) or
    from genotypes and a seed (:meth:`from_genotypes`).

    Input: images of G*T channel groups ``[N, G*T*in_channels, H, W]`` (group g*T + t: task t
    of genotype g) and parameters per (genotype, task) ``[R*T, ...]`` or per genotype
    ``[R, ...]`` (:meth:`functional_forward`); output ``[N, G*T*n_way]``. ``model(x)`` with
    the module's own parameters runs one task per genotype: ``[N, G*in_channels, H, W] -> [N, G*n_way]``.
    """

    supports_task_folding = True

    def __init__(self, genotypes: Sequence[Genotype], n_way: int = 5, C: int = 16, layers: int = 2,
                 in_channels: int = 3, stem_multiplier: int = 3, drop_path_prob: float = 0.0):
        """The structure with freshly initialised, row-stacked parameters (each genotype's rows drawn
        one after another, NOT as a solo network draws them); use :meth:`from_networks` for solo-equal
        initial parameters."""
        super().__init__()
        networks = [Network(g, n_way=n_way, C=C, layers=layers, in_channels=in_channels,
                            stem_multiplier=stem_multiplier, drop_path_prob=drop_path_prob) for g in genotypes]
        self._build(networks)

    @classmethod
    def from_networks(cls, networks: Sequence[Network]) -> "GenotypeBatchNetwork":
        """Batch solo networks (their current parameters, dtype and device); a ValueError naming the
        mismatch when they differ in shape."""
        _check_same_shape(networks)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model._build(list(networks))
        return model

    @classmethod
    def from_genotypes(cls, genotypes: Sequence[Genotype], seed: Optional[int] = None, **network_kwargs
                       ) -> "GenotypeBatchNetwork":
        """Each genotype's solo network built right after ``torch.manual_seed(seed)`` (when given), as a
        solo run seeded with ``seed`` builds it, then batched."""
        networks = []
        for genotype in genotypes:
            if seed is not None:
                torch.manual_seed(seed)
            networks.append(Network(genotype, **network_kwargs))
        return cls.from_networks(networks)

    def _build(self, networks: Sequence[Network]) -> None:
        _check_same_shape(networks)
        first = networks[0]
        self.genotypes: List[Genotype] = [network.genotype for network in networks]
        self.count = len(networks)
        self.config = {key: first.config[key] for key in SHAPE_KEYS}
        self.network_configs = [dict(network.config) for network in networks]
        self.drop_path_prob = first.drop_path_prob
        stem_channels = self.config["stem_multiplier"] * self.config["C"]
        # The layers' own initial values are replaced by the solo networks' below; drawing them must
        # not move the generator that a run's later draws (tasks, drop-path) come from.
        with torch.random.fork_rng(devices=[]):
            self.stem = make_stem(self.config["in_channels"], stem_channels, affine=True)
            self.cells, c_prev = build_cells(
                lambda c_pp, c_p, channels, reduction, reduction_prev: GenotypeBatchCell(
                    self.genotypes, c_pp, c_p, channels, reduction, reduction_prev),
                stem_channels, self.config["C"], self.config["layers"])
            self.classifier = task_folding.Linear(c_prev, self.config["n_way"])
        self.solo_names: List[List[str]] = [[name for name, _ in network.named_parameters()] for network in networks]
        self.sources: Dict[str, List[Tuple[int, str]]] = {}
        solo = [dict(network.named_parameters()) for network in networks]
        for name, value in list(self.named_parameters()):
            self.sources[name] = self._solo_sources(name)
            for g, solo_name in self.sources[name]:
                shape = tuple(solo[g][solo_name].shape)
                if shape != tuple(value.shape):
                    raise ValueError(f"genotype {g}: parameter {solo_name} has shape {shape}, a Network of its "
                                     f"genotype has {tuple(value.shape)}; batch plain networks (not ones changed "
                                     f"in place, e.g. by MAML++'s per-step BatchNorm)")
        self.unused: List[Set[str]] = [unused_parameters(network) for network in networks]
        for name, rows in self.sources.items():
            module_name, _, attribute = name.rpartition(".")
            module = self.get_submodule(module_name)
            stacked = torch.stack([solo[g][solo_name].detach() for g, solo_name in rows])
            setattr(module, attribute, nn.Parameter(stacked.clone()))
        reference = next(first.parameters())
        self.to(device=reference.device)
        self._genotype_names = [self._names_of(g) for g in range(self.count)]

    def _solo_sources(self, name: str) -> List[Tuple[int, str]]:
        """(genotype, solo parameter name) of each row of batched parameter ``name``."""
        parts = name.split(".")
        if parts[0] == "cells" and parts[2] == "edges":
            cell, edge, k = int(parts[1]), int(parts[3]), int(parts[4])
            choice = self.cells[cell].choices[edge][k]
            solo = ".".join(["cells", str(cell), "ops", str(edge)] + parts[5:])
            return [(g, solo) for g in choice.genotypes]
        return [(g, name) for g in range(self.count)]

    def _names_of(self, genotype: int) -> Dict[str, Tuple[str, int]]:
        names = {}
        for name, rows in self.sources.items():
            for row, (g, solo_name) in enumerate(rows):
                if g == genotype:
                    names[solo_name] = (name, row)
        missing = set(self.solo_names[genotype]) - set(names)
        if missing:  # a bug, not bad input: the batch must hold every solo parameter
            raise RuntimeError(f"genotype {genotype}: no batched parameter for {sorted(missing)}")
        return {solo_name: names[solo_name] for solo_name in self.solo_names[genotype]}

    def genotype_names(self, genotype: int) -> Dict[str, Tuple[str, int]]:
        """Genotype ``genotype``'s solo parameter names, in the solo network's order, -> (batched
        parameter name, row)."""
        return dict(self._genotype_names[genotype])

    def rows(self, name: str) -> int:
        """How many genotypes hold batched parameter ``name`` (its row count)."""
        return len(self.sources[name])

    # -- forward -------------------------------------------------------------------------------
    def tasks_per_genotype(self, x: torch.Tensor) -> int:
        """T of folded images ``x`` ``[N, G*T*in_channels, H, W]`` (G*T channel groups); a ValueError
        when the groups do not divide by G."""
        groups = task_folding.groups_of(x, self.config["in_channels"])
        if groups % self.count:
            raise ValueError(f"a batch of {self.count} genotypes needs images of a multiple of {self.count} "
                             f"channel groups, got {groups}")
        return groups // self.count

    def per_task(self, params: Mapping[str, torch.Tensor], tasks: int) -> Dict[str, torch.Tensor]:
        """``params`` with every per-genotype tensor ``[R, ...]`` repeated to ``[R*tasks, ...]``; per
        (genotype, task) ones ``[R*tasks, ...]`` are kept."""
        out = {}
        for name, value in params.items():
            rows = self.rows(name) if name in self.sources else None
            if rows is not None and tasks > 1 and value.shape[0] == rows:
                value = repeat_rows(value, tasks)
            out[name] = value
        return out

    def functional_forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The network at ``params`` (per genotype or per (genotype, task), see :meth:`per_task`) on
        folded images ``x`` ``[N, G*T*in_channels, H, W]`` (G*T channel groups)."""
        return torch.func.functional_call(self, self.per_task(params, self.tasks_per_genotype(x)), (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tasks = self.tasks_per_genotype(x)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, tasks, self.drop_path_prob)
        return self.classifier(s1.mean(dim=(2, 3)))

    # -- solo checkpoints ------------------------------------------------------------------------
    def genotype_state_dict(self, genotype: int, state: Optional[Mapping[str, torch.Tensor]] = None,
                            row_dims: Optional[Mapping[str, int]] = None) -> Dict[str, torch.Tensor]:
        """Genotype ``genotype``'s parameters as its solo ``Network.state_dict()`` holds them (copies).

        ``state``: batched tensors by name (default: this model's state_dict); ``row_dims``: the
        dimension holding the rows of a tensor when not 0 (per-step BN sets ``[sets, R, C]``)."""
        state = self.state_dict() if state is None else state
        row_dims = row_dims or {}
        return {solo: state[name].detach().select(row_dims.get(name, 0), row).clone()
                for solo, (name, row) in self._genotype_names[genotype].items()}

    def load_genotype_state_dict(self, genotype: int, solo_state: Mapping[str, torch.Tensor],
                                 row_dims: Optional[Mapping[str, int]] = None) -> None:
        """Copy genotype ``genotype``'s solo parameters into its rows (the inverse of :meth:`genotype_state_dict`)."""
        names = self._genotype_names[genotype]
        missing, unexpected = set(names) - set(solo_state), set(solo_state) - set(names)
        if missing or unexpected:
            raise KeyError(f"genotype {genotype}: solo state does not match its network "
                           f"(missing: {sorted(missing)[:3]}, unexpected: {sorted(unexpected)[:3]})")
        params = dict(self.named_parameters())
        row_dims = row_dims or {}
        with torch.no_grad():
            for solo, (name, row) in names.items():
                params[name].select(row_dims.get(name, 0), row).copy_(solo_state[solo])
