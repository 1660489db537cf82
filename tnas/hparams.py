"""Runs side by side in tensorboard: each run's resolved settings and final metrics as "hparams".

At the end of a meta-training run (search, from-scratch training) the flags saved in the
run's ``config.yaml`` and the final numbers of its summary go to tensorboard's HPARAMS tab
(events under ``<run>/tb/hparams``), so ``tensorboard --logdir runs`` lists every run in
one table with its learning rates, schedule and best validation accuracy.
"""
from __future__ import annotations

import inspect
import json
import os
from typing import Dict, Mapping, Tuple, Union

Value = Union[bool, int, float, str]
SKIPPED_KEYS = ("out", "resume", "help", "config")  # where a run went / how it was started: not settings
HPARAMS_RUN = "hparams"


def hparam_values(config: Mapping[str, object]) -> Dict[str, Value]:
    """Flat ``{flag: value}`` that tensorboard accepts: bools, numbers and strings stay; None becomes
    ``"none"``; lists and dicts become their JSON text. Keys are sorted; :data:`SKIPPED_KEYS` dropped."""
    values: Dict[str, Value] = {}
    for key in sorted(config):
        if key in SKIPPED_KEYS:
            continue
        value = config[key]
        if value is None:
            values[key] = "none"
        elif isinstance(value, (bool, int, float, str)):
            values[key] = value
        else:
            values[key] = json.dumps(value, sort_keys=True, default=str)
    return values


def final_metrics(summary: Mapping[str, object]) -> Dict[str, float]:
    """The comparable numbers of a trainer summary (``search.json`` / ``train.json``), tagged ``hparam/...``:
    best validation accuracy and its epoch, the last epoch's meta-train and validation accuracy, epochs
    done and wall time in hours. Missing numbers are left out."""
    metrics: Dict[str, float] = {}
    for key in ("best_val_accuracy", "best_epoch", "epochs_done"):
        if isinstance(summary.get(key), (int, float)):
            metrics[f"hparam/{key}"] = float(summary[key])
    history = summary.get("history") or []
    if history:
        last = history[-1]
        for key, name in (("train_accuracy", "final_train_accuracy"), ("val_accuracy", "final_val_accuracy")):
            if isinstance(last.get(key), (int, float)):
                metrics[f"hparam/{name}"] = float(last[key])
    if isinstance(summary.get("wall_time_s"), (int, float)):
        metrics["hparam/wall_time_h"] = float(summary["wall_time_s"]) / 3600.0
    return metrics


def run_hparams(run_dir: str, summary: Mapping[str, object]) -> Tuple[Dict[str, Value], Dict[str, float]]:
    """``(hparams, metrics)`` of a finished run: its ``config.yaml`` (``{}`` when unreadable) with the
    summary's stage and method (search and from-scratch runs share one table), and ``summary``'s numbers."""
    import yaml

    config: Mapping[str, object] = {}
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
        config = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError, yaml.YAMLError):
        pass
    config = {**config, **{key: summary[key] for key in ("stage", "method") if summary.get(key) is not None}}
    return hparam_values(config), final_metrics(summary)


def log_hparams(logger, run_dir: str, summary: Mapping[str, object]) -> bool:
    """Write the run's hparams and final metrics through ``logger``'s tensorboard writer (a
    :class:`tnas.runlog.RunLogger`); returns False when tensorboard logging is off."""
    writer = logger.writer
    if writer is None:
        return False
    hparams, metrics = run_hparams(run_dir, summary)
    if not metrics:
        return False
    # tensorboardX names the sub-run ``name``; torch's writer (the fallback) calls it ``run_name``
    keyword = "run_name" if "run_name" in inspect.signature(writer.add_hparams).parameters else "name"
    writer.add_hparams(hparams, metrics, **{keyword: HPARAMS_RUN})
    return True
