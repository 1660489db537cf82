#!/usr/bin/env python
"""Where the time of one meta-iteration goes: the top operators and kernels of a
``bench_meta_iter.py`` case under ``torch.profiler``, and how many kernels it launches.

    python benchmarks/profile_meta_iter.py --cases tnas_1shot_T4                 # eager, paper setting
    python benchmarks/profile_meta_iter.py --cases tnas_1shot_T4 --cuda_graph on # kernels inside a graph (auto: graphed on a GPU)
    python benchmarks/profile_meta_iter.py --tiny --device cpu --cases scratch_1shot_T4

Takes every flag of ``bench_meta_iter.py`` plus ``--profile_iterations`` and ``--rows``.
Prints, per case, a table of the operators sorted by device time (by CPU time on a CPU),
then one JSON line: kernels launched and device time per iteration. Too slow on a CPU for
the supernet at the paper setting; meant for the GPU (``benchmarks/gpu_check.sh``).
"""
from __future__ import annotations

import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench_meta_iter import CASES, parse_args, prepare_case, synchronize  # the sibling script (its folder is on sys.path)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    iterations, rows = 1, 25
    for flag in ("--profile_iterations", "--rows"):
        if flag in argv:
            at = argv.index(flag)
            value = int(argv[at + 1])
            del argv[at:at + 2]
            iterations, rows = (value, rows) if flag == "--profile_iterations" else (iterations, value)
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    for name in args.cases:
        one_iteration, warmup, _ = prepare_case(CASES[name], args, device)
        for iteration in range(warmup):
            one_iteration(iteration)
        synchronize(device)
        with profile(activities=activities) as prof:
            for iteration in range(warmup, warmup + iterations):
                one_iteration(iteration)
            synchronize(device)
        sort_by = "cuda_time_total" if on_gpu else "cpu_time_total"
        print(f"== {name} ({iterations} iteration(s), sorted by {sort_by})")
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        device_us = sum(e.time_range.elapsed_us() for e in kernels)
        print(json.dumps({"case": name, "kernels_per_iteration": len(kernels) / iterations,
                          "device_ms_per_iteration": device_us / iterations / 1000,
                          "mean_kernel_us": device_us / max(len(kernels), 1)}), flush=True)


if __name__ == "__main__":
    main()
