"""Pictures of the search space: cell diagrams of a genotype, edge labels, op-frequency heatmaps.

A cell diagram is the usual DARTS picture: the two cell inputs ``c_{k-2}`` and
``c_{k-1}``, the intermediate nodes ``0 .. steps-1``, one arrow per kept ``(op, input)``
pair labelled with the op, and the concatenated nodes feeding the output ``c_{k}``.

:func:`genotype_to_dot` writes Graphviz DOT text (no Python graphviz package needed);
:func:`render_cell` renders it with the ``dot`` program when it is installed and
otherwise draws the same graph with matplotlib, so a PNG always comes out
(``renderer="dot"`` insists on graphviz: a one-line error when ``dot`` is not on PATH,
:func:`dot_program` says whether it is). Matplotlib is
imported lazily and only through its object API (``Figure`` + ``FigureCanvasAgg``): the
global backend is never changed.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from tnas.errors import TnasError
from tnas.genotypes import PRIMITIVES, Genotype, edge_inputs, num_edges, validate_genotype
from tnas.runlog import atomic_write_bytes, render_heatmap

CELLS = ("normal", "reduce")
INPUT_NAMES = ("c_{k-2}", "c_{k-1}")
OUTPUT_NAME = "c_{k}"
DOT_TIMEOUT_S = 60
RENDERERS = ("auto", "dot", "matplotlib")

_INPUT_COLOR = "darkseagreen2"
_NODE_COLOR = "lightblue"
_OUTPUT_COLOR = "palegoldenrod"
# The same colours as RGB for matplotlib (it does not know the X11 names above).
_MPL_COLORS = {_INPUT_COLOR: "#b4eeb4", _NODE_COLOR: "#add8e6", _OUTPUT_COLOR: "#eee8aa"}


def _state_name(index: int) -> str:
    """Name of genotype state ``index``: 0, 1 are the cell inputs, ``2 + i`` is node ``i``."""
    return INPUT_NAMES[index] if index < 2 else str(index - 2)


def _cell_graph(genotype: Genotype, cell: str) -> Tuple[List[Tuple[str, str, str]], List[str], int]:
    """``(edges as (source, target, op), states feeding the output, steps)`` of one cell."""
    if cell not in CELLS:
        raise ValueError(f"cell must be 'normal' or 'reduce', got {cell!r}")
    validate_genotype(genotype)
    pairs = getattr(genotype, cell)
    concat = getattr(genotype, f"{cell}_concat")
    steps = len(pairs) // 2
    edges = [(_state_name(source), str(position // 2), op) for position, (op, source) in enumerate(pairs)]
    return edges, [_state_name(index) for index in concat], steps


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def genotype_to_dot(genotype: Genotype, cell: str = "normal") -> str:
    """Graphviz DOT source of the ``cell`` ("normal" or "reduce") of ``genotype``."""
    edges, concat, steps = _cell_graph(genotype, cell)
    lines = [
        f"digraph {cell} {{",
        '  rankdir=LR;',
        '  graph [fontname="helvetica", fontsize=20];',
        '  node [style="filled,rounded", shape=rect, align=center, fontname="helvetica", fontsize=20, '
        'height=0.5, width=0.5, penwidth=2];',
        '  edge [fontname="helvetica", fontsize=20];',
    ]
    for name in INPUT_NAMES:
        lines.append(f"  {_quote(name)} [fillcolor={_INPUT_COLOR}];")
    for node in range(steps):
        lines.append(f"  {_quote(str(node))} [fillcolor={_NODE_COLOR}];")
    lines.append(f"  {_quote(OUTPUT_NAME)} [fillcolor={_OUTPUT_COLOR}];")
    for source, target, op in edges:
        lines.append(f"  {_quote(source)} -> {_quote(target)} [label={_quote(op)}, fillcolor=gray];")
    for source in concat:
        lines.append(f"  {_quote(source)} -> {_quote(OUTPUT_NAME)} [fillcolor=gray];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _layout(steps: int) -> Dict[str, Tuple[float, float]]:
    """Positions for the matplotlib drawing: inputs left, nodes in a zig-zag, output right."""
    positions = {INPUT_NAMES[0]: (0.0, 1.0), INPUT_NAMES[1]: (0.0, -1.0)}
    for node in range(steps):
        positions[str(node)] = (1.0 + node, 0.6 if node % 2 == 0 else -0.6)
    positions[OUTPUT_NAME] = (1.0 + steps, 0.0)
    return positions


def _draw_cell_png(genotype: Genotype, cell: str, png_path: str) -> None:
    """Draw the cell diagram with matplotlib (no global backend change); written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    edges, concat, steps = _cell_graph(genotype, cell)
    positions = _layout(steps)
    figure = Figure(figsize=(2.2 * (steps + 2), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.set_xlim(-0.6, steps + 1.6)
    axes.set_ylim(-1.7, 1.7)
    axes.axis("off")
    axes.set_title(f"{cell} cell")

    def _shrink(name: str) -> float:
        # Points to stop short of a node's centre so arrows end at its box.
        return 24.0 if name in INPUT_NAMES or name == OUTPUT_NAME else 14.0

    for name, (x, y) in positions.items():
        color = (_INPUT_COLOR if name in INPUT_NAMES else _OUTPUT_COLOR if name == OUTPUT_NAME else _NODE_COLOR)
        label = {"c_{k-2}": "$c_{k-2}$", "c_{k-1}": "$c_{k-1}$", "c_{k}": "$c_{k}$"}.get(name, name)
        axes.text(x, y, label, ha="center", va="center", fontsize=13, zorder=3,
                  bbox=dict(boxstyle="round,pad=0.4", facecolor=_MPL_COLORS[color], edgecolor="black",
                            linewidth=1.5))

    def arrow(source: str, target: str, rad: float, label: str = "") -> None:
        (x0, y0), (x1, y1) = positions[source], positions[target]
        patch = FancyArrowPatch((x0, y0), (x1, y1), connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                mutation_scale=14, linewidth=1.2, color="dimgray", zorder=1,
                                shrinkA=_shrink(source), shrinkB=_shrink(target))
        axes.add_patch(patch)
        if label:
            # Midpoint of the quadratic arc: chord midpoint shifted by rad/2 along the normal.
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            dx, dy = x1 - x0, y1 - y0
            lx, ly = mx + rad * dy / 2, my - rad * dx / 2
            axes.text(lx, ly, label, ha="center", va="center", fontsize=8, zorder=2,
                      bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85))

    seen: Dict[Tuple[str, str], int] = {}
    for source, target, op in edges:
        repeat = seen.get((source, target), 0)
        seen[(source, target)] = repeat + 1
        # Bend longer edges more so they do not run through the nodes in between; bend a
        # repeated (source, target) pair the other way so both labels stay readable.
        span = abs(positions[target][0] - positions[source][0])
        rad = (0.08 + 0.12 * (span - 1)) * (-1 if repeat % 2 else 1)
        arrow(source, target, rad, op)
    for source in concat:
        arrow(source, OUTPUT_NAME, 0.05)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(png_path, buffer.getvalue())


def dot_program() -> Optional[str]:
    """The path of graphviz's ``dot`` program, None when it is not on PATH (then ``renderer="auto"``
    draws with matplotlib)."""
    return shutil.which("dot")


def _render_with_dot(dot_text: str, dot_program_path: str) -> Tuple[Optional[bytes], str]:
    """``(PNG bytes, "")``, or ``(None, why)`` when ``dot`` fails. dot reads the source from stdin and
    writes the PNG to stdout: no half-written file on disk."""
    try:
        result = subprocess.run([dot_program_path, "-Tpng"], input=dot_text.encode("utf-8"), capture_output=True,
                                timeout=DOT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        return None, str(error)
    if result.returncode == 0 and result.stdout.startswith(b"\x89PNG"):
        return result.stdout, ""
    reason = result.stderr.decode("utf-8", "replace").strip().splitlines()
    return None, reason[0] if reason else f"exit status {result.returncode}"


def render_cell(genotype: Genotype, cell: str, out_path_without_ext: str, renderer: str = "auto") -> List[str]:
    """Write ``<out>.dot`` and ``<out>.png`` of one cell atomically; returns the paths written.

    ``renderer``: ``"auto"`` (the PNG from the ``dot`` program when it is on PATH and succeeds,
    otherwise from a matplotlib drawing of the same graph), ``"dot"`` (graphviz only: a
    :class:`~tnas.errors.TnasError` when ``dot`` is missing or fails) or ``"matplotlib"``.
    """
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {', '.join(RENDERERS)}, got {renderer!r}")
    program = dot_program() if renderer != "matplotlib" else None
    if renderer == "dot" and program is None:
        raise TnasError("graphviz's `dot` program is not on PATH: install graphviz, or draw with "
                        "renderer='matplotlib' ('auto' uses dot when it is there, matplotlib otherwise)")
    dot_text = genotype_to_dot(genotype, cell)
    directory = os.path.dirname(out_path_without_ext)
    if directory:
        os.makedirs(directory, exist_ok=True)
    dot_path, png_path = f"{out_path_without_ext}.dot", f"{out_path_without_ext}.png"
    atomic_write_bytes(dot_path, dot_text.encode("utf-8"))
    png = None
    if program:
        png, reason = _render_with_dot(dot_text, program)
        if png is None and renderer == "dot":
            raise TnasError(f"graphviz's dot ({program}) failed on {dot_path}: {reason}")
    if png is not None:
        atomic_write_bytes(png_path, png)
    else:
        _draw_cell_png(genotype, cell, png_path)
    return [dot_path, png_path]


def plot_genotype(genotype: Genotype, out_dir: str, prefix: str = "", renderer: str = "auto") -> List[str]:
    """Diagrams of both cells: ``{out_dir}/{prefix}normal.{dot,png}`` and ``...reduce...`` (``renderer``:
    as :func:`render_cell`'s)."""
    paths: List[str] = []
    for cell in CELLS:
        paths += render_cell(genotype, cell, os.path.join(out_dir, f"{prefix}{cell}"), renderer)
    return paths


def edge_labels(steps: int) -> List[str]:
    """One label per alpha row, ``node <- input``, e.g. ``0 <- c_{k-2}``, ``2 <- 1``."""
    return [f"{node} <- {_state_name(source)}" for node, source in edge_inputs(steps)]


def _steps_of(rows: int) -> int:
    """The node count of a cell with ``rows`` edges (a ValueError when no cell has that many)."""
    steps = 1
    while num_edges(steps) < rows:
        steps += 1
    if num_edges(steps) != rows:
        raise ValueError(f"{rows} alpha rows is not the edge count of any cell (2, 5, 9, 14, ...)")
    return steps



def op_frequency_image(frequency: Sequence, meta_choice: Sequence, title: str = "") -> np.ndarray:
    """RGB uint8 image [H, W, 3]: heatmap of ``frequency`` ([edges, len(PRIMITIVES)], the fraction of
    tasks keeping each op on each edge; ``none``: edge dropped) beside the meta-architecture's 0/1
    choice of the same shape (rows line up), both drawn by :func:`tnas.runlog.render_heatmap`."""
    frequency, meta_choice = np.asarray(frequency, dtype=float), np.asarray(meta_choice, dtype=float)
    if frequency.ndim != 2 or frequency.shape[1] != len(PRIMITIVES) or meta_choice.shape != frequency.shape:
        raise ValueError(f"op frequencies of shape {frequency.shape} and a meta choice of shape {meta_choice.shape}: "
                         f"expected both [edges, {len(PRIMITIVES)}]")
    rows = edge_labels(_steps_of(frequency.shape[0]))
    left = render_heatmap(frequency, rows, PRIMITIVES, title)
    right = render_heatmap(meta_choice, rows, PRIMITIVES, "meta-architecture's choice")
    height = max(left.shape[0], right.shape[0])
    pad = lambda image: np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)),  # noqa: E731
                               constant_values=255)
    return np.concatenate([pad(left), pad(right)], axis=1)


def png_bytes(image) -> bytes:
    """PNG encoding of an RGB uint8 image [H, W, 3]."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png", optimize=True)
    return buffer.getvalue()
