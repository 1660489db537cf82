"""The paper's table from a reproduction's steps: ``table.json`` and ``table.md`` (pure functions, no I/O).

One row per method, one column group per shot: this run's accuracy mean +- 95% CI over the
test tasks, the paper's figure beside it (when the plan names one), the device-hours the
cell cost and the number of distinct genotypes it trained. A cell whose steps are not all
done says what it is waiting for ("running: train (2/3)", "interrupted: search (1/3)", ...).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

LABELS = {"maml": "MAML (Conv-4)", "auto_maml": "auto-MAML", "tnas": "T-NAS", "tnas++": "T-NAS++"}

# The T-NAS paper's main table (5-way, accuracy % and 95% CI over 600 test tasks): {dataset: {method: {shot: ...}}}.
PAPER = {
    "miniimagenet": {
        "maml": {1: (48.70, 1.84), 5: (63.11, 0.92)},
        "auto_maml": {1: (51.23, 1.76), 5: (64.10, 1.12)},
        "tnas": {1: (52.84, 1.41), 5: (67.88, 0.92)},
        "tnas++": {1: (54.11, 1.35), 5: (69.59, 0.85)},
    },
}

STEP_STATES = ("pending", "running", "interrupted", "failed", "stale", "done")


def paper_figure(paper: Optional[str], method: str, shot: int) -> Optional[Dict[str, float]]:
    """The paper's ``{"accuracy_mean", "ci95"}`` for a cell, or None (no paper column, or no figure)."""
    figure = PAPER.get(paper or "", {}).get(method, {}).get(int(shot))
    return None if figure is None else {"accuracy_mean": figure[0], "ci95": figure[1]}


def distinct_genotypes(method: str, result: Mapping[str, Any]) -> Optional[int]:
    """Genotypes a cell trained: the protocol's count; 1 for auto-MAML; None for a fixed network (Conv-4)."""
    if "distinct_genotypes" in result:
        return int(result["distinct_genotypes"])
    return None if result.get("genotypes") is None else 1


def cell_record(method: str, shot: int, step_names: Sequence[str], steps: Mapping[str, Mapping[str, Any]],
                paper: Optional[str], shared: Sequence[str]) -> Dict[str, Any]:
    """One cell: its state, result, cost and steps.

    ``steps``: step name -> ``{"kind", "state" (one of STEP_STATES), "seconds", "devices", "result"
    (the final step's results.json, or None)}``; the cell's result is its last step's.
    """
    records = [steps[name] for name in step_names]
    hours = sum(float(r.get("seconds") or 0.0) * int(r.get("devices") or 1) for r in records) / 3600.0
    last = records[-1]
    cell: Dict[str, Any] = {
        "method": method, "shot": int(shot), "state": "pending", "accuracy_mean": None, "ci95": None,
        "episodes": None, "n_way": None, "distinct_genotypes": None, "device_hours": hours,
        "paper": paper_figure(paper, method, shot),
        "steps": [{"name": name, "kind": r.get("kind"), "state": r.get("state", "pending"),
                   "device_hours": float(r.get("seconds") or 0.0) * int(r.get("devices") or 1) / 3600.0,
                   "shared": name in shared} for name, r in zip(step_names, records)],
    }
    result = last.get("result")
    if last.get("state") == "done" and result is not None:
        cell.update(state="done", accuracy_mean=float(result["accuracy_mean"]), ci95=float(result["ci95"]),
                    episodes=int(result["episodes"]), n_way=result.get("n_way"),
                    distinct_genotypes=distinct_genotypes(method, result))
        return cell
    for wanted in ("running", "interrupted", "failed", "stale"):
        for position, record in enumerate(records, 1):
            if record.get("state") == wanted:
                cell["state"] = f"{wanted}: {record.get('kind')} ({position}/{len(records)})"
                return cell
    return cell


def build_table(cells: Sequence[Mapping[str, Any]], steps: Mapping[str, Mapping[str, Any]],
                meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``table.json`` record.

    ``cells``: ``[{"method", "shot", "steps": [step names, in order]}]``, in table order;
    ``steps``: as for :func:`cell_record`; ``meta``: ``title``, ``dataset``, ``paper`` (a key of
    :data:`PAPER`, or None for no paper column), ``budget``, ``commit``, ``settings`` and
    anything else to carry along. A step listed by several cells (the T-NAS search, shared
    by T-NAS and T-NAS++) counts in each cell's device-hours, once in the total.
    """
    counts: Dict[str, int] = {}
    for cell in cells:
        for name in cell["steps"]:
            counts[name] = counts.get(name, 0) + 1
    shared = [name for name, count in counts.items() if count > 1]
    methods: List[str] = []
    shots: List[int] = []
    for cell in cells:
        if cell["method"] not in methods:
            methods.append(cell["method"])
        if int(cell["shot"]) not in shots:
            shots.append(int(cell["shot"]))
    rows = []
    for method in methods:
        row = {"method": method, "label": LABELS.get(method, method), "cells": {}}
        for cell in cells:
            if cell["method"] == method:
                row["cells"][str(int(cell["shot"]))] = cell_record(method, cell["shot"], cell["steps"], steps,
                                                                   meta.get("paper"), shared)
        states = [c["state"] for c in row["cells"].values()]
        row["state"] = "done" if all(s == "done" for s in states) else next(
            (s for s in states if s.startswith("running")), "incomplete")
        rows.append(row)
    total = sum(float(steps[name].get("seconds") or 0.0) * int(steps[name].get("devices") or 1)
                for name in counts) / 3600.0
    devices = sorted({str(device) for device in (_device_of(record.get("result")) for record in steps.values())
                      if device})
    table = dict(meta)
    table.update({"shots": shots, "methods": methods, "rows": rows, "device_hours_total": total,
                  "shared_steps": shared, "devices": devices})
    return table


def _device_of(result: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The kind of device (cpu, cuda) a result was computed on: the evaluation's device, the protocol's cost block."""
    if not result:
        return None
    cost = result.get("cost")
    device = (cost.get("device_type") if isinstance(cost, dict) else None) or result.get("device")
    return str(device).split(":")[0] if device else None


def _accuracy(mean: Optional[float], ci95: Optional[float]) -> str:
    return "—" if mean is None else f"{mean:.2f} ± {ci95:.2f}"


def _hours(hours: float) -> str:
    return f"{hours:.3f}" if hours < 1 else f"{hours:.1f}"


def render_markdown(table: Mapping[str, Any]) -> str:
    """``table.md``: a title, the table (this run, the paper, device-hours, genotypes per shot) and the provenance."""
    paper = table.get("paper")
    shots = table["shots"]
    header = ["method"]
    for shot in shots:
        header += [f"{shot}-shot (this run)"] + ([f"{shot}-shot (paper)"] if paper else []) + \
                  [f"{shot}-shot device-h", f"{shot}-shot genotypes"]
    lines = [f"# {table.get('title', 'Reproduction')}", ""]
    if table.get("budget"):
        lines += ["**Budget run: short schedules, not the paper's; accuracies are not comparable to the paper's.**",
                  ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        cells = [row["label"]]
        for shot in shots:
            cell = row["cells"].get(str(shot))
            if cell is None:
                cells += ["not run"] + (["—"] if paper else []) + ["—", "—"]
                continue
            mine = _accuracy(cell["accuracy_mean"], cell["ci95"]) if cell["state"] == "done" else cell["state"]
            cells.append(mine)
            if paper:
                figure = cell.get("paper") or {}
                cells.append(_accuracy(figure.get("accuracy_mean"), figure.get("ci95")))
            if cell["state"] == "pending" and not cell["device_hours"]:
                hours = "—"
            else:
                hours = _hours(cell["device_hours"]) + ("" if cell["state"] == "done" else " so far")
            cells.append(hours)
            genotypes = cell.get("distinct_genotypes")
            cells.append("—" if genotypes is None else str(genotypes))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    episodes = sorted({c["episodes"] for r in table["rows"] for c in r["cells"].values() if c.get("episodes")})
    ways = sorted({c["n_way"] for r in table["rows"] for c in r["cells"].values() if c.get("n_way")})
    notes = [f"Accuracy: mean ± 95% CI over {', '.join(map(str, episodes)) or 'the'} fixed test tasks "
             f"({table.get('dataset')}, {'/'.join(map(str, ways)) or table.get('n_way', 5)}-way), the same tasks "
             f"for every method."]
    where = ", ".join(table.get("devices") or []) or "no step done yet"
    shared = (" The T-NAS search is shared by the T-NAS and T-NAS++ rows and counted in both."
              if table.get("shared_steps") else "")
    notes.append(f"Device-hours: wall time x processes of each cell's steps, over every invocation; "
                 f"{_hours(table['device_hours_total'])} in all ({where}).{shared}")
    notes.append("Genotypes: distinct architectures trained from scratch (T-NAS: one per test task, grouped).")
    notes.append(f"Produced by commit {table.get('commit')} with {table.get('command', 'scripts/reproduce.py')}; "
                 f"every step's command line is in table.json.")
    if table.get("generated"):
        notes.append(f"Written {table['generated']}.")
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
