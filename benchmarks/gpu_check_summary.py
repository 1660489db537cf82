#!/usr/bin/env python
"""One line per measurement of ``bench_meta_iter.py`` JSON reports, for ``gpu_check.sh``'s log.

    python benchmarks/gpu_check_summary.py OUT/bench_meta_iter_*.json

Each line names the report (its file name without ``bench_meta_iter_``), the case and the figures
it has (tasks/s, GFLOP per meta-iteration, fraction of peak and its basis, and of the TF32 peak
when cuDNN may use TF32, protocol hours, memory, whether it ran graphed, its error). A report's
``setting.cuda_graph_reason`` (what ``--cuda_graph auto`` chose) and ``cut_short`` get a line each.
A file that a failed or cut step left empty or partial gets one ``unreadable`` line instead of a
traceback, so the summary covers every file and its exit status is 0. Needs only the standard
library (no torch import: it runs in a second).
"""
from __future__ import annotations

import json
import os
import sys
from typing import List

FIELDS = (("s/iter", "seconds_per_iteration"), ("tasks/s", "tasks_per_second"),
          ("x orig", "speedup_vs_original"), ("GFLOP/iter", "gflop_per_iteration"),
          ("TFLOP/s", "achieved_tflops"), ("of peak", "fraction_of_peak"), ("peak basis", "peak_basis"),
          ("of tf32 peak", "fraction_of_tf32_peak"),
          ("G", "genotypes"), ("protocol h", "protocol_hours_600"), ("t_g h", "genotype_hours_paper_schedule"),
          ("GiB", "peak_gpu_memory_gib"), ("warm-up s", "warmup_seconds"), ("", "cuda_graph"),
          ("error", "error"))
"""(label, record key) of the figures a line shows, when the record has them."""


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_lines(path: str) -> List[str]:
    """The lines for one report file (never raises for a bad file: it says so in one line)."""
    name = os.path.basename(path)
    label = name[len("bench_meta_iter_"):] if name.startswith("bench_meta_iter_") else name
    label = label[:-len(".json")] if label.endswith(".json") else label
    try:
        with open(path) as handle:
            report = json.load(handle)
        results = report["results"]
    except (OSError, ValueError, KeyError, TypeError) as error:  # a step cut short leaves an empty or partial file
        return [f"{label}: unreadable ({type(error).__name__}: {error})"]
    lines = []
    reason = (report.get("setting") or {}).get("cuda_graph_reason")
    if reason:
        lines.append(f"{label}: {reason}")
    for record in results:
        figures = [f"{title} {_show(record[key])}".strip() for title, key in FIELDS if record.get(key) is not None]
        lines.append(" ".join([label, str(record.get("case"))] + figures))
    if report.get("cut_short"):
        lines.append(f"{label}: {report['cut_short']}")
    return lines


def main(paths: List[str]) -> int:
    for path in paths:
        for line in summary_lines(path):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
