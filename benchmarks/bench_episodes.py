#!/usr/bin/env python
"""Episodes per second of `EpisodeSampler` from a warm uint8 cache, on CPU and (if present) GPU.

    python benchmarks/bench_episodes.py                    # glyphs at 84x84 RGB, 5-way 1-shot 15-query, T=4
    python benchmarks/bench_episodes.py --source synthetic --seconds 2

The dataset is built in a temporary cache directory first (not timed, reported as
``cache_build_seconds``), then loaded again from the cache (memory-mapped) and sampled for
``--seconds`` per setting after a warm-up. One episode = one task; a meta-batch holds
``--tasks`` episodes. Every timed batch is complete on the device: float32, normalised
(GPU timings synchronise after each batch). Each result gives episodes/s over the whole run
and at the 10th-percentile batch time (close to what an idle machine gives when other jobs
share the CPU; the JSON also records the load average). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from tnas.data import EpisodeSampler, FixedEpisodes, load_split, sample_episode_indices
from tnas.errors import TnasError, cli_entry


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("glyphs", "synthetic"), default="glyphs",
                        help="glyphs rendered at --img_size, or a synthetic folder dataset of random PNGs")
    parser.add_argument("--img_size", type=int, default=84)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--n_way", type=int, default=5)
    parser.add_argument("--k_shot", type=int, default=1)
    parser.add_argument("--q_query", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-batch (T)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed duration per setting")
    parser.add_argument("--devices", default="auto", help="comma list (cpu,cuda) or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache_dir", default=None, help="use this cache directory instead of a temporary one")
    parser.add_argument("--synthetic_classes", type=int, default=64)
    parser.add_argument("--synthetic_per_class", type=int, default=20)
    return parser.parse_args(argv)


def build_synthetic_folder(root: str, classes: int, per_class: int, img_size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        directory = os.path.join(root, "train", f"class{c:03d}")
        os.makedirs(directory, exist_ok=True)
        base = rng.integers(0, 256, size=(img_size, img_size, 3), dtype=np.uint8)
        for i in range(per_class):
            noise = rng.integers(-20, 21, size=base.shape)
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(os.path.join(directory, f"{i:03d}.png"))


def time_it(step, seconds: float, sync, tasks: int) -> Dict[str, float]:
    """Run ``step`` for ``seconds`` after a warm-up; episodes/s overall and at the 10th-percentile
    batch time (the latter approximates an idle machine when other jobs share the CPU)."""
    for _ in range(3):  # warm-up: page cache, allocator, CUDA context
        step()
    sync()
    times: List[float] = []
    started = time.perf_counter()
    while True:
        before = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    fast = float(np.percentile(times, 10))
    return {"batches": len(times), "seconds": round(elapsed, 3),
            "episodes_per_s": round(len(times) * tasks / elapsed, 1),
            "episodes_per_s_p10_batch": round(tasks / fast, 1) if fast > 0 else None}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    temp = tempfile.mkdtemp(prefix="tnas-bench-")
    cache_dir = args.cache_dir or os.path.join(temp, "cache")
    try:
        started = time.perf_counter()
        if args.source == "glyphs":
            load_options = dict(dataset="glyphs", data_path=None)
        else:
            folder = os.path.join(temp, "folder")
            build_synthetic_folder(folder, args.synthetic_classes, args.synthetic_per_class, args.img_size)
            load_options = dict(dataset="folder", data_path=folder)
        split = load_split(split="train", img_size=args.img_size, channels=args.channels, cache_dir=cache_dir,
                           **load_options)
        build_seconds = time.perf_counter() - started
        split = load_split(split="train", img_size=args.img_size, channels=args.channels, cache_dir=cache_dir,
                           **load_options)  # warm: memory-mapped from the cache
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
            else [d.strip() for d in args.devices.split(",") if d.strip()]
        results: List[Dict[str, Any]] = []
        per_class = args.k_shot + args.q_query

        rng = np.random.default_rng(0)
        timing = time_it(lambda: sample_episode_indices(split, rng, args.tasks, args.n_way, per_class),
                         min(1.0, args.seconds), lambda: None, args.tasks)
        results.append(dict(device="cpu", mode="indices only", **timing))
        for device in devices:
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise TnasError(f"--devices {device}: CUDA is not available on this machine")
            sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
            modes = [("resident", True), ("host transfer", False)] if device.startswith("cuda") else [("host", False)]
            for mode, resident in modes:
                for augment in (False, True):
                    sampler = EpisodeSampler(split, args.n_way, args.k_shot, args.q_query, args.tasks, device=device,
                                             seed=0, augment=augment, keep_on_device=resident)
                    timing = time_it(sampler.sample, args.seconds, sync, args.tasks)
                    results.append(dict(device=device, mode=mode, augment=augment, **timing))
            fixed = FixedEpisodes.generate(split, args.n_way, args.k_shot, args.q_query, episodes=600, seed=0)
            iterator = {"it": iter(())}

            def next_fixed_batch() -> None:
                try:
                    next(iterator["it"])
                except StopIteration:
                    iterator["it"] = fixed.batches(args.tasks, device)
                    next(iterator["it"])

            timing = time_it(next_fixed_batch, args.seconds, sync, args.tasks)
            results.append(dict(device=device, mode="FixedEpisodes.batches", augment=False, **timing))
        report = {
            "benchmark": "episodes per second from a warm uint8 cache (float32 normalised on the device)",
            "dataset": split.name, "images": len(split), "image_shape": list(split.image_shape),
            "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query, "tasks_per_batch": args.tasks,
            "cache_build_seconds": round(build_seconds, 2),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "results": results,
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    cli_entry(main)
