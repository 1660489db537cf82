"""What the tasks chose: op frequencies per edge and the diversity of per-task genotypes.

T-NAS decodes one genotype per test task. Over a list of them (one per task) this module
counts, for each edge of a cell (alpha row order, ``node <- input``; see
:func:`tnas.genotypes.edge_inputs`) and each op of :data:`tnas.genotypes.PRIMITIVES`, how
many tasks keep that op on that edge. The ``none`` column counts the tasks that do not
keep the edge at all (the DARTS rule never keeps the ``none`` op itself), so each row
sums to the number of tasks: row ``e`` is the distribution of what happens on edge ``e``.
Its entropy (bits) says how much the tasks disagree there: 0 when all tasks agree,
``log2(k)`` when they split evenly over ``k`` choices.

Pure functions over genotypes, and :func:`write_task_choices`, which writes what the decode stage
and the protocol leave: ``op_frequency_{normal,reduce}.png`` (drawn by :mod:`tnas.visualize`),
``genotype_diversity.json``, and the same in tensorboard.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence, Union

import numpy as np

from tnas.errors import TnasError
from tnas.genotypes import PRIMITIVES, Genotype, edge_inputs, genotype_counts, genotype_from_dict, num_edges
from tnas.files import atomic_write_bytes, atomic_write_json
from tnas.visualize import edge_labels, op_frequency_image, png_bytes

CELLS = ("normal", "reduce")
GenotypeLike = Union[Genotype, Dict[str, object]]


def _as_genotype(genotype: GenotypeLike) -> Genotype:
    return genotype if isinstance(genotype, Genotype) else genotype_from_dict(genotype)


def op_counts(genotypes: Sequence[GenotypeLike], cell: str = "normal") -> np.ndarray:
    """``[num_edges(steps), len(PRIMITIVES)]`` int64 counts over ``genotypes`` (one per task).

    Entry ``[e, o]`` (``o > 0``) is how many kept ``(op, input)`` pairs put op ``o`` on edge
    ``e``; column 0 (``none``) is how many genotypes keep no pair on edge ``e``. With the
    DARTS rule (two distinct inputs per node) each row sums to ``len(genotypes)``.
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be 'normal' or 'reduce', got {cell!r}")
    parsed = [_as_genotype(genotype) for genotype in genotypes]
    if not parsed:
        raise TnasError("no genotypes to count")
    steps = parsed[0].steps
    if any(genotype.steps != steps for genotype in parsed):
        raise TnasError(f"genotypes of different cell sizes: {sorted({g.steps for g in parsed})} nodes")
    row_of = {edge: row for row, edge in enumerate(edge_inputs(steps))}
    counts = np.zeros((num_edges(steps), len(PRIMITIVES)), dtype=np.int64)
    for genotype in parsed:
        kept = np.zeros(num_edges(steps), dtype=bool)
        for position, (op, source) in enumerate(getattr(genotype, cell)):
            row = row_of[(position // 2, source)]
            counts[row, PRIMITIVES.index(op)] += 1
            kept[row] = True
        counts[~kept, 0] += 1
    return counts


def edge_entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row of ``counts`` taken as a distribution (``[E, O] -> [E]``; 0 for empty rows)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1) + 0.0  # + 0.0: no -0.0


def meta_choice(genotype: GenotypeLike, cell: str = "normal") -> np.ndarray:
    """``op_counts`` of one genotype: the 0/1 matrix of the ops it keeps per edge (``none``: edge dropped)."""
    return op_counts([genotype], cell)


def genotype_diversity(genotypes: Sequence[GenotypeLike],
                       meta_genotype: Optional[GenotypeLike] = None) -> Dict[str, object]:
    """The ``genotype_diversity.json`` record of per-task genotypes (one per task, in task order).

    Fields: ``tasks``, ``distinct_genotypes``, ``most_common_count`` (tasks sharing the most
    common genotype; ties: the first seen), ``most_common_fraction``, ``most_common_genotype``,
    ``tasks_with_meta_genotype`` (when ``meta_genotype`` is given), ``ops`` (column names) and per
    cell: ``edges`` (row names ``node <- input``), ``op_counts`` ``[E][O]``, ``edge_entropy_bits``
    ``[E]``, ``mean_edge_entropy_bits`` and, with ``meta_genotype``, ``meta_ops`` (the op it
    keeps on each edge, or null).
    """
    parsed = [_as_genotype(genotype) for genotype in genotypes]
    if not parsed:
        raise TnasError("no genotypes to summarise")
    groups = genotype_counts([genotype.to_dict() for genotype in parsed])  # most frequent first, ties: first seen
    record: Dict[str, object] = {
        "tasks": len(parsed),
        "distinct_genotypes": len(groups),
        "most_common_count": groups[0]["count"],
        "most_common_fraction": groups[0]["count"] / len(parsed),
        "most_common_genotype": groups[0]["genotype"],
    }
    meta = _as_genotype(meta_genotype) if meta_genotype is not None else None
    if meta is not None:
        record["tasks_with_meta_genotype"] = sum(group["count"] for group in groups
                                                 if group["genotype"] == meta.to_dict())
    record["ops"] = list(PRIMITIVES)
    cells = {}
    for cell in CELLS:
        counts = op_counts(parsed, cell)
        entropy = edge_entropy(counts)
        entry: Dict[str, object] = {
            "edges": edge_labels(parsed[0].steps),
            "op_counts": counts.tolist(),
            "edge_entropy_bits": [float(value) for value in entropy],
            "mean_edge_entropy_bits": float(entropy.mean()),
        }
        if meta is not None:
            chosen = meta_choice(meta, cell)
            entry["meta_ops"] = [None if row[0] else PRIMITIVES[int(np.argmax(row))] for row in chosen]
        cells[cell] = entry
    record["cells"] = cells
    return record


FREQUENCY_PNG = "op_frequency_{cell}.png"
DIVERSITY_FILE = "genotype_diversity.json"


def write_task_choices(out_dir: str, genotypes: Sequence[GenotypeLike], meta_genotype: GenotypeLike,
                       tensorboard: bool = True, step: int = 0) -> Dict[str, object]:
    """Write ``op_frequency_{normal,reduce}.png`` and ``genotype_diversity.json`` into ``out_dir``
    (atomically), and, with ``tensorboard``, the pictures and counts to ``out_dir/tb`` (tags
    ``tasks/...``). Each picture: the fraction of tasks keeping each op on each edge, beside the
    meta-architecture's choice. Returns the diversity record with the written paths.
    """
    record = genotype_diversity(genotypes, meta_genotype)
    tasks = record["tasks"]
    images = {}
    for cell in CELLS:
        counts = np.asarray(record["cells"][cell]["op_counts"], dtype=np.float64)
        images[cell] = op_frequency_image(counts / tasks, meta_choice(meta_genotype, cell),
                                          title=f"{cell} cell: ops kept by {tasks} task(s) (none: edge dropped)")
        path = os.path.join(out_dir, FREQUENCY_PNG.format(cell=cell))
        atomic_write_bytes(path, png_bytes(images[cell]))
        record["cells"][cell]["picture"] = os.path.abspath(path)
    atomic_write_json(os.path.join(out_dir, DIVERSITY_FILE), record)
    if tensorboard:
        _to_tensorboard(os.path.join(out_dir, "tb"), record, images, step)
    return record


TASKS_EVENTS_SUFFIX = ".tnas-tasks"
"""The name ending of the event files :func:`write_task_choices` writes (``events.out.tfevents.<time>.<host>``
then this), so that a rewrite can find and replace its own files among other event files in ``tb/``."""


def _to_tensorboard(logdir: str, record: Dict[str, object], images: Dict[str, np.ndarray], step: int) -> None:
    """The pictures, the counts and a one-line summary as tensorboard events (skipped without tensorboardX).

    They replace those an earlier call wrote into ``logdir``: each protocol invocation (a rerun, a resume
    after a kill) rewrites what the tasks chose, and a new event file beside the old ones would show every
    point once per invocation. The new file is written first and the older ones removed after, so a kill
    in between leaves a duplicate until the next call, never nothing; other event files are left alone."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return
    with SummaryWriter(logdir, filename_suffix=TASKS_EVENTS_SUFFIX) as writer:
        for cell, image in images.items():
            writer.add_image(f"tasks/op_frequency_{cell}", image, step, dataformats="HWC")
            writer.add_scalar(f"tasks/mean_edge_entropy_bits_{cell}", record["cells"][cell]["mean_edge_entropy_bits"],
                              step)
        writer.add_scalar("tasks/distinct_genotypes", record["distinct_genotypes"], step)
        writer.add_scalar("tasks/most_common_count", record["most_common_count"], step)
        writer.add_text("tasks/diversity", diversity_line(record), step)
        events = getattr(writer._get_file_writer(), "event_writer", None)
        written = getattr(getattr(events, "_ev_writer", None), "_file_name", None)  # tensorboardX's file
    if written is None or not os.path.isfile(written):  # a writer that keeps its file name elsewhere: no cleanup
        return
    for name in os.listdir(logdir):
        path = os.path.join(logdir, name)
        if name.startswith("events.out.tfevents.") and name.endswith(TASKS_EVENTS_SUFFIX) and \
                not os.path.samefile(path, written):
            try:
                os.unlink(path)
            except OSError:
                pass


def diversity_line(record: Dict[str, object]) -> str:
    """``20 tasks -> 17 distinct genotypes; the most common is shared by 3; mean edge entropy 1.02 / 0.87 bits
    (normal / reduce)``."""
    cells = record["cells"]
    return (f"{record['tasks']} tasks -> {record['distinct_genotypes']} distinct genotype(s); the most common is "
            f"shared by {record['most_common_count']}; mean edge entropy "
            f"{cells['normal']['mean_edge_entropy_bits']:.2f} / {cells['reduce']['mean_edge_entropy_bits']:.2f} "
            f"bits (normal / reduce)")
