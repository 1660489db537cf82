"""The DARTS search space: primitives, genotypes, the alpha -> genotype decoding rule, JSON I/O.

A genotype lists, for each of the ``steps`` intermediate nodes of a cell, two
``(op, input)`` pairs; inputs 0 and 1 are the cell's two inputs, input ``2 + i`` is
intermediate node ``i``. Alphas have one row per edge, edges ordered node by node
(node 0: inputs 0, 1; node 1: inputs 0, 1, 2; ...), so 14 rows for 4 steps, and one
column per primitive in :data:`PRIMITIVES` order.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch

from tnas.errors import TnasError
from tnas.files import atomic_write_json

PRIMITIVES: Tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

Pair = Tuple[str, int]


def num_edges(steps: int) -> int:
    """Edges of a cell with ``steps`` intermediate nodes: 2 + 3 + ... + (steps + 1)."""
    return sum(2 + node for node in range(steps))


def edge_inputs(steps: int) -> List[Tuple[int, int]]:
    """``(node, input)`` of every edge, in alpha row order."""
    return [(node, source) for node in range(steps) for source in range(node + 2)]


@dataclass(frozen=True)
class Genotype:
    """A discrete cell pair: ``normal`` and ``reduce`` lists of ``(op, input)`` pairs."""

    normal: Tuple[Pair, ...]
    reduce: Tuple[Pair, ...]
    normal_concat: Tuple[int, ...] = field(default=(2, 3, 4, 5))
    reduce_concat: Tuple[int, ...] = field(default=(2, 3, 4, 5))

    def __post_init__(self):
        for name in ("normal", "reduce"):
            object.__setattr__(self, name, tuple((str(op), int(src)) for op, src in getattr(self, name)))
        for name in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def to_dict(self) -> Dict[str, list]:
        return {
            "normal": [[op, src] for op, src in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, src] for op, src in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        def fmt(pairs):
            return ", ".join(f"{op} {src}" for op, src in pairs)
        return f"normal: {fmt(self.normal)} | reduce: {fmt(self.reduce)}"


def validate_genotype(genotype: Genotype, source: str = "genotype") -> Genotype:
    """Check ops, input indices, edge counts and concat indices; TnasError naming the problem."""
    for cell in ("normal", "reduce"):
        pairs = getattr(genotype, cell)
        if len(pairs) == 0 or len(pairs) % 2:
            raise TnasError(f"{source}: {cell} cell has {len(pairs)} edges; need two per node (an even number > 0)")
        for position, (op, src) in enumerate(pairs):
            node = position // 2
            if op not in PRIMITIVES or op == "none":
                raise TnasError(f"{source}: unknown op '{op}' in {cell} cell, edge {position} "
                                f"(known: {', '.join(PRIMITIVES[1:])})")
            if not 0 <= src < node + 2:
                raise TnasError(f"{source}: {cell} cell edge {position} (node {node}) reads input {src}; "
                                f"allowed inputs are 0..{node + 1}")
        concat = getattr(genotype, f"{cell}_concat")
        steps = len(pairs) // 2
        if not concat or any(not 0 <= i < steps + 2 for i in concat):
            raise TnasError(f"{source}: {cell}_concat {list(concat)} must list node indices in 0..{steps + 1}")
    if len(genotype.normal) != len(genotype.reduce):
        raise TnasError(f"{source}: normal cell has {len(genotype.normal)} edges but reduce cell has "
                        f"{len(genotype.reduce)}; both cells need the same number of nodes")
    return genotype


def genotype_from_dict(data: object, source: str = "genotype") -> Genotype:
    """Build and validate a genotype from its JSON form (see :meth:`Genotype.to_dict`)."""
    if not isinstance(data, dict):
        raise TnasError(f"{source}: expected a JSON object with keys normal, normal_concat, reduce, reduce_concat")
    missing = [key for key in ("normal", "reduce") if key not in data]
    if missing:
        raise TnasError(f"{source}: missing key(s) {', '.join(missing)} (found: {', '.join(map(str, data)) or 'none'})")
    unknown = sorted(set(data) - {"normal", "reduce", "normal_concat", "reduce_concat"})
    if unknown:
        raise TnasError(f"{source}: unknown key(s) {', '.join(map(str, unknown))}")
    cells = {}
    for cell in ("normal", "reduce"):
        pairs = data[cell]
        if not isinstance(pairs, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
                and isinstance(p[1], int) and not isinstance(p[1], bool) for p in pairs):
            raise TnasError(f"{source}: '{cell}' must be a list of [op_name, input_index] pairs")
        cells[cell] = pairs
        concat_key = f"{cell}_concat"
        steps = len(pairs) // 2
        concat = data.get(concat_key, list(range(2, steps + 2)))
        if not isinstance(concat, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in concat):
            raise TnasError(f"{source}: '{concat_key}' must be a list of integers")
        cells[concat_key] = concat
    return validate_genotype(Genotype(**cells), source)


def canonical_key(genotype: Dict[str, object]) -> str:
    """The text that identifies a genotype dict whatever its key order (sorted-key compact JSON)."""
    return json.dumps(genotype, sort_keys=True, separators=(",", ":"))


def group_genotypes(genotypes: Sequence[Dict[str, object]]) -> Tuple[List[str], Dict[str, Dict[str, object]],
                                                                     Dict[str, List[int]]]:
    """Identical genotypes (by :func:`canonical_key`) of a per-episode list, grouped.

    Returns ``(id per episode, {id: genotype}, {id: episode indices})`` with ids ``g0000``,
    ``g0001``, ... in order of first occurrence.
    """
    ids: Dict[str, str] = {}
    per_episode: List[str] = []
    by_id: Dict[str, Dict[str, object]] = {}
    episodes: Dict[str, List[int]] = {}
    for index, genotype in enumerate(genotypes):
        key = canonical_key(genotype)
        if key not in ids:
            ids[key] = f"g{len(ids):04d}"
            by_id[ids[key]] = genotype
            episodes[ids[key]] = []
        per_episode.append(ids[key])
        episodes[ids[key]].append(index)
    return per_episode, by_id, episodes


def genotype_counts(genotypes: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Distinct genotypes of a list, most frequent first (ties: first seen first).

    Returns ``[{"id": "g0000", "genotype": dict, "count": n, "episodes": [indices]}, ...]`` (ids as
    :func:`group_genotypes` gives them); counts sum to ``len(genotypes)``.
    """
    _, by_id, episodes = group_genotypes(genotypes)
    groups = [{"id": gid, "genotype": by_id[gid], "count": len(episodes[gid]), "episodes": episodes[gid]}
              for gid in by_id]
    return sorted(groups, key=lambda group: (-group["count"], group["episodes"][0]))


def save_genotype(genotype: Genotype, path: str) -> None:
    """Write ``genotype`` as JSON (atomically: temp file, fsync, then rename)."""
    atomic_write_json(path, genotype.to_dict(), indent=1)


BEST_GENOTYPE_FILE = "best_genotype.json"
"""A search run's best epoch's genotype (that of its ``best.pt``); ``genotype.json`` is its latest epoch's."""


def load_genotype(path: str) -> Genotype:
    """Read a genotype JSON file. A run directory gives its result: a search's best epoch's genotype
    (``best_genotype.json``, the architecture of ``best.pt``, as T-NAS's protocol uses), else its
    ``genotype.json`` (a search made before that file existed: the latest epoch's; a training run's)."""
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in (BEST_GENOTYPE_FILE, "genotype.json")]
        found = [candidate for candidate in candidates if os.path.isfile(candidate)]
        if not found:
            raise TnasError(f"{path} is a directory without {BEST_GENOTYPE_FILE} or genotype.json")
        path = found[0]
    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as error:
        raise TnasError(f"cannot read genotype file {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise TnasError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError:
        raise TnasError(f"{path}: not a genotype JSON file (binary content)") from None
    except RecursionError:  # json's decoder recurses once per nested [ or {
        raise TnasError(f"{path}: not a genotype JSON file (nested too deeply)") from None
    return genotype_from_dict(data, source=path)


def _pairs(text: str) -> Tuple[Pair, ...]:
    tokens = text.split()
    return tuple((tokens[i], int(tokens[i + 1])) for i in range(0, len(tokens), 2))


PUBLISHED: Dict[str, Genotype] = {
    # The original code's AUTO_MAML_2 (5-way 1-shot mini-ImageNet search).
    "auto_maml_1shot": Genotype(
        normal=_pairs("avg_pool_3x3 0 avg_pool_3x3 1 avg_pool_3x3 1 avg_pool_3x3 2 "
                      "avg_pool_3x3 1 avg_pool_3x3 2 dil_conv_3x3 3 avg_pool_3x3 2"),
        reduce=_pairs("avg_pool_3x3 0 dil_conv_5x5 1 avg_pool_3x3 0 dil_conv_5x5 1 "
                      "skip_connect 3 dil_conv_5x5 2 skip_connect 4 skip_connect 3"),
    ),
    # The original code's AUTO_MAML_3 (5-way 5-shot mini-ImageNet search).
    "auto_maml_5shot": Genotype(
        normal=_pairs("dil_conv_5x5 1 dil_conv_5x5 0 dil_conv_5x5 2 dil_conv_3x3 1 "
                      "sep_conv_5x5 2 sep_conv_3x3 3 skip_connect 4 dil_conv_3x3 3"),
        reduce=_pairs("sep_conv_5x5 0 avg_pool_3x3 1 avg_pool_3x3 1 skip_connect 2 "
                      "skip_connect 2 avg_pool_3x3 1 skip_connect 2 max_pool_3x3 1"),
    ),
}
"""Published genotypes by CLI name."""


def resolve_genotype(name_or_path: str) -> Genotype:
    """A published name, a genotype JSON file, or a run directory holding ``genotype.json``."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    if os.path.exists(name_or_path):
        return load_genotype(name_or_path)
    raise TnasError(f"unknown genotype '{name_or_path}': not a published name "
                    f"({', '.join(PUBLISHED)}) nor an existing JSON file or run directory")


def _decode_cell(alpha: torch.Tensor, steps: int) -> Tuple[Pair, ...]:
    """DARTS rule for one cell. ``alpha``: [num_edges, len(PRIMITIVES)] logits."""
    weights = torch.softmax(alpha.detach().double().cpu(), dim=-1)[:, 1:]  # drop `none`
    strongest_weight, strongest_op = weights.max(dim=-1)
    pairs: List[Pair] = []
    start = 0
    for node in range(steps):
        inputs = node + 2
        node_weights = strongest_weight[start:start + inputs].tolist()
        # Two strongest inputs; ties go to the lower input index (stable sort).
        kept = sorted(range(inputs), key=lambda source: -node_weights[source])[:2]
        for source in kept:
            pairs.append((PRIMITIVES[1 + int(strongest_op[start + source])], source))
        start += inputs
    return tuple(pairs)


def decode_genotype(alpha_normal: torch.Tensor, alpha_reduce: torch.Tensor, steps: int = 4,
                    multiplier: int = 4) -> Genotype:
    """Alpha logits -> genotype by the DARTS rule.

    For each node keep the two incoming edges whose strongest non-`none` softmax weight is
    largest, and on each kept edge its strongest non-`none` op. ``alpha_*``:
    ``[num_edges(steps), len(PRIMITIVES)]``. Ties go to the lower index.
    """
    expected = (num_edges(steps), len(PRIMITIVES))
    for name, alpha in (("alpha_normal", alpha_normal), ("alpha_reduce", alpha_reduce)):
        if tuple(alpha.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(alpha.shape)}, expected {expected}")
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=_decode_cell(alpha_normal, steps), reduce=_decode_cell(alpha_reduce, steps),
                    normal_concat=concat, reduce_concat=concat)
