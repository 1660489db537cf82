#!/usr/bin/env python
"""Sum the tasks/s of concurrent ``bench_meta_iter.py`` runs that shared one GPU.

    python benchmarks/shared_gpu.py OUT/bench_shared_*.json > OUT/bench_shared.json

Each input is one process's JSON report (same case, timed over the same interval with
``--start_at``). Prints one JSON object: per case, the processes, the summed tasks/s, and
the per-genotype and 600-genotype protocol device-hours that this throughput implies when
that many genotype trainings share each GPU (the T-NAS protocol under
``torchrun --nproc_per_node`` larger than the GPU count). A process's case that failed or was cut
short (no ``tasks_per_second``) is listed under ``errors`` and left out of the sums.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Dict, List


def combine(reports: List[Dict[str, object]]) -> Dict[str, object]:
    by_case: Dict[str, List[Dict[str, object]]] = defaultdict(list)
    errors: List[Dict[str, object]] = []  # a process's failed or cut case has no rate to add
    for report in reports:
        for record in report["results"]:
            (by_case[record["case"]] if "tasks_per_second" in record else errors).append(record)
    combined = []
    for case, records in sorted(by_case.items()):
        total = sum(float(r["tasks_per_second"]) for r in records)
        entry = {"case": case, "processes": len(records), "tasks_per_second_total": total,
                 "tasks_per_second_each": [float(r["tasks_per_second"]) for r in records]}
        if "genotype_hours_paper_schedule" in records[0]:
            # One process's figures, rescaled to the summed throughput.
            single = records[0]
            scale = float(single["tasks_per_second"]) / total
            entry["genotype_device_hours_paper_schedule"] = float(single["genotype_hours_paper_schedule"]) * scale
            key = next(k for k in single if k.startswith("protocol_device_hours_"))
            entry[key] = float(single[key]) * scale
        combined.append(entry)
    device = reports[0].get("device") if reports else None
    return {"benchmark": "shared_gpu", "device": device, "results": combined, "errors": errors}


def main(paths: List[str]) -> int:
    if not paths:
        print("usage: shared_gpu.py REPORT.json [REPORT.json ...]", file=sys.stderr)
        return 2
    reports = []
    for path in paths:
        try:
            with open(path) as handle:
                reports.append(json.load(handle))
        except (OSError, ValueError) as error:
            print(f"{path}: not a bench_meta_iter JSON report ({error})", file=sys.stderr)
            return 2
    print(json.dumps(combine(reports), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
