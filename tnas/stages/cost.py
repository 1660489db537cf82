"""Cost accounting of the T-NAS protocol: wall time and device-hours per stage, and what the paper's
from-scratch schedule would cost on this device (the ``cost`` block of results.json)."""
from __future__ import annotations

import platform
import socket
from typing import Any, Dict, List

import torch

from tnas import distributed

PAPER_TASKS_PER_GENOTYPE = 15 * 15000  # the original code's from-scratch schedule: 15 epochs of 15,000 tasks


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine() or 'unknown'}, {torch.get_num_threads()} thread(s))"


def device_id(device: torch.device) -> str:
    """Which physical device this process computes on: ``host:cuda:N``, or ``host:cpu:RANK`` (CPU
    processes are counted as one device each)."""
    where = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}" \
        if device.type == "cuda" else f"{device.type}:{distributed.current_info().rank}"
    return f"{socket.gethostname()}:{where}"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost_record(parts: List[Dict[str, Any]], runs: Dict[str, Dict[str, Any]], wall_time_s: float,
                schedule: Dict[str, Any], decode_cached: bool) -> Dict[str, Any]:
    """Wall time (slowest rank) and device-hours (sum over ranks) of each stage, per genotype for training.

    Where processes share a GPU (``devices`` < ``world_size``), the summed device-hours are
    process-hours; ``allocated_device_hours`` (wall time x devices) is what the GPUs were held.
    """
    world = len(parts)
    devices = len({part.get("device_id", part["rank"]) for part in parts})
    stages: Dict[str, Dict[str, Any]] = {}
    for stage in ("decode", "train", "evaluate"):
        times = [part["seconds"].get(stage, 0.0) for part in parts]
        stages[stage] = {"wall_time_s": max(times), "device_hours": sum(times) / 3600.0}
    stages["decode"]["cached"] = decode_cached
    train = stages["train"]
    train["per_genotype"] = {gid: {"rank": run["rank"], "status": run["status"], "wall_time_s": run["wall_time_s"],
                                   "device_hours": run["wall_time_s"] / 3600.0,
                                   "total_train_wall_time_s": run["total_train_wall_time_s"]}
                             for gid, run in runs.items()}
    for status in ("trained", "resumed", "skipped"):
        train[status] = sum(1 for run in runs.values() if run["status"] == status)
    totals = [run["total_train_wall_time_s"] for run in runs.values() if run["total_train_wall_time_s"]]
    # The whole from-scratch cost, over every invocation that trained these genotypes.
    train["total_train_device_hours"] = sum(totals) / 3600.0
    mean_genotype_s = sum(totals) / len(totals) if totals else None
    train["mean_genotype_train_s"] = mean_genotype_s
    tasks = schedule["epochs"] * schedule["tasks_per_epoch"]
    seconds_per_task = mean_genotype_s / tasks if mean_genotype_s else None
    per_genotype_hours = PAPER_TASKS_PER_GENOTYPE * seconds_per_task / 3600.0 if seconds_per_task else None
    names = sorted({part["device"] for part in parts})
    return {
        "device": names[0] if len(names) == 1 else names, "device_type": parts[0]["device_type"],
        "world_size": world, "devices": devices, "processes_per_device": world / devices,
        "wall_time_s": wall_time_s,
        "device_hours": sum(stage["device_hours"] for stage in stages.values()),
        "allocated_device_hours": wall_time_s * devices / 3600.0,
        "stages": stages,
        "extrapolation": {
            "distinct_genotypes": len(runs), "tasks_per_genotype": tasks, "seconds_per_task": seconds_per_task,
            "paper_tasks_per_genotype": PAPER_TASKS_PER_GENOTYPE,
            "paper_schedule_device_hours_per_genotype": per_genotype_hours,
            "paper_schedule_train_device_hours": len(runs) * per_genotype_hours if per_genotype_hours else None,
            "formula": "distinct genotypes x paper_tasks_per_genotype x seconds_per_task / 3600 (seconds_per_task: "
                       "from-scratch trainer time, validation included, per meta-training task on this device and "
                       "network size)"},
    }
