"""Owning a run directory: one process at a time, stale temp files cleared, resumes checked first.

- :func:`claim_run_dir` makes ``--out`` (one-line errors when it is a file or not writable)
  and takes an exclusive ``fcntl.flock`` on ``<out>/run.lock``, which records the holder's
  pid. The OS drops the lock when the process dies, so a killed run never leaves a stale
  lock; a second run into a held directory fails at once naming the holder's pid. The
  claim is held until the process exits (a process may claim the same directory again).
  A forked child (a decoding worker) closes its copy of the lock at once
  (:func:`tnas.files.keep_from_forked_children`): an orphan that outlived a SIGKILLed run held it.
  With the lock held nobody else writes there, so ``.*.tmp`` files left by a killed atomic
  write are removed.
- :func:`check_resume` decides whether ``--resume`` may continue the run, reading
  ``last.pt`` (a corrupt or unsafe file is refused) and ``config.yaml`` *before anything is
  written*: a different model, method or task shape is refused in one line naming the keys;
  changed hyper-parameters are refused unless ``--resume_override``. Accepted overrides are
  appended to ``overrides.json`` with the epoch they start at (:func:`record_overrides`), and
  every later epoch record carries them (:func:`active_overrides`), so the history keeps
  saying which settings each epoch was trained with. Once a run has overrides, every resume
  appends a record, an empty one when it is back to the settings it started with.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, FrozenSet, Mapping, Tuple

from tnas.errors import TnasError
from tnas.files import keep_from_forked_children

LOCK_FILE = "run.lock"
OVERRIDES_FILE = "overrides.json"

FREE_KEYS = frozenset({
    "out", "resume", "resume_override", "device", "config", "log_every", "checkpoint_every", "val_batch_size",
    "cache_dir", "data_path", "genotype", "epochs", "amp", "threads", "help", "episodes_given"})
"""Flags that may differ on ``--resume`` without notice: where and how fast it runs, how often it
logs, how long it goes on. (``genotype`` names a file; the network it describes is checked
against the checkpoint by the stage.) The stages add every field their settings mark rerun-free
(:func:`tnas.stages.settings.rerun_free_flags`)."""

STRUCTURAL_KEYS = ("method", "dataset", "n_way", "k_shot", "q_query", "tasks_per_batch", "tasks_per_epoch",
                   "img_size", "C", "layers", "seed", "inner_steps", "per_step_bn", "learn_inner_lr")
"""Flags that shape the model, the checkpoint or the episode stream: never changed by a resume."""

_HELD: Dict[str, Any] = {}  # realpath -> open lock file (kept open: closing it releases the lock)

if hasattr(os, "register_at_fork"):  # a forked child holds no claim: its copies of the lock files are closed
    os.register_at_fork(after_in_child=_HELD.clear)  # (tnas.files.keep_from_forked_children)


def _out_problem(out: str, error: OSError) -> TnasError:
    return TnasError(f"--out {out}: cannot write there ({error.strerror or error})")


def claim_run_dir(out: str) -> None:
    """Create ``out`` and hold its exclusive lock for the life of this process (see module doc)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise TnasError(f"--out {out} is a file, not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise _out_problem(out, error) from None
    key = os.path.realpath(out)
    if key in _HELD:  # this process holds it already (a stage run again in process)
        remove_stale_temp_files(out)
        return
    path = os.path.join(out, LOCK_FILE)
    try:
        handle = open(path, "a+", encoding="utf-8")
    except OSError as error:
        raise _out_problem(out, error) from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before
        _HELD[key] = handle
        return
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise TnasError(f"--out {out} is in use by another run (pid {holder}); wait for it to finish or "
                        f"choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[key] = keep_from_forked_children(handle)
    remove_stale_temp_files(out)


def release_run_dir(out: str) -> None:
    """Give up this process's claim on ``out`` (no-op when it holds none)."""
    handle = _HELD.pop(os.path.realpath(out), None)
    if handle is not None:
        handle.close()


def remove_stale_temp_files(out: str) -> None:
    """Delete ``.<name>.<random>.tmp`` files left in ``out`` by an atomic write that was killed.

    Only call it while holding the directory's lock: then no live write of ours is in flight.
    """
    for name in os.listdir(out):
        if name.startswith(".") and name.endswith(".tmp"):
            path = os.path.join(out, name)
            if os.path.isfile(path):
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _plain(value: Any) -> Any:
    from tnas.config import to_plain

    return json.loads(json.dumps(to_plain(value)))


def _read_config(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, yaml.YAMLError) as error:
        # YAMLError (bad syntax, or a tag such as !!python/object that safe_load refuses) is no ValueError
        raise TnasError(f"--resume: cannot read {path} ({' '.join(str(error).split())})") from None
    if not isinstance(config, dict):
        raise TnasError(f"--resume: {path} does not hold the run's settings (not a mapping)")
    return config


def _checkpoint_settings(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The flags a checkpoint's summary pins down, as the run resolved them: method, task shape,
    network size and the learner settings that shape the checkpoint."""
    summary = state.get("summary") if isinstance(state.get("summary"), Mapping) else {}
    model = summary.get("model") if isinstance(summary.get("model"), Mapping) else {}
    learner = summary.get("learner") if isinstance(summary.get("learner"), Mapping) else {}
    found = {key: summary[key] for key in ("method", "dataset", "n_way", "k_shot", "q_query") if key in summary}
    found.update({key: model[key] for key in ("C", "layers") if key in model})
    found.update({key: learner[key] for key in STRUCTURAL_KEYS if key in learner})
    return found


def _describe(changes: Mapping[str, Tuple[Any, Any]], limit: int = 6) -> str:
    parts = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)


def check_resume(args, out: str, stage: str, free_keys: FrozenSet[str] = FREE_KEYS
                 ) -> Tuple[Dict[str, Tuple[Any, Any]], int, int]:
    """Whether ``--resume`` may continue the run in ``out``; returns the accepted overrides and the
    checkpoint's epoch and iteration.

    Reads ``out/last.pt`` (a corrupt or unsafe checkpoint is a one-line error) and
    ``out/config.yaml``; writes nothing. Differences in :data:`STRUCTURAL_KEYS`, or between the
    checkpoint's method / task shape / network and the flags, are refused; other changed flags
    (not in ``free_keys``) are refused unless ``args.resume_override``. Returns
    ``({flag: (saved value, new value)}, epoch, iteration)``.
    """
    from tnas.checkpoints import load_checkpoint

    last = os.path.join(out, "last.pt")
    state = load_checkpoint(last)
    if state.get("stage") != stage:
        raise TnasError(f"--resume: {last} is a '{state.get('stage')}' checkpoint, not '{stage}'")
    wanted = _plain(vars(args))
    saved_flags = _read_config(os.path.join(out, "config.yaml"))
    structural: Dict[str, Tuple[Any, Any]] = {}
    pinned = _checkpoint_settings(state)
    for key, value in pinned.items():
        # a flag left at None is resolved by the stage (a method's preset), so only a given value is compared
        if wanted.get(key) is not None and _plain(value) != wanted[key]:
            structural[key] = (_plain(value), wanted[key])
    changed: Dict[str, Tuple[Any, Any]] = {}
    for key in sorted(set(saved_flags) & set(wanted)):
        if key in free_keys or key in pinned or saved_flags[key] == wanted[key]:
            continue
        target = structural if key in STRUCTURAL_KEYS else changed
        target[key] = (saved_flags[key], wanted[key])
    if structural:
        raise TnasError(f"--resume: {out} holds a run with other {', '.join(structural)} "
                        f"({_describe(structural)}); use the same flags or another --out")
    if changed and not getattr(args, "resume_override", False):
        raise TnasError(f"--resume: the run in {out} was started with other settings ({_describe(changed)}); "
                        f"use the same flags, or pass --resume_override to continue with the new ones "
                        f"(recorded per epoch in {OVERRIDES_FILE})")
    return changed, int(state.get("epoch", 0)), int(state.get("iteration", 0))


def flags_new_since_start(args, out: str, free_keys: FrozenSet[str] = FREE_KEYS) -> Dict[str, Any]:
    """The flags of ``args`` that ``out/config.yaml`` does not hold -- added to tnas since the run
    started -- with the values a resume now runs with, leaving out those off (None, False): the
    epochs before ran without them. (A resume rewrites config.yaml with them, so this is said once.)"""
    saved_flags = _read_config(os.path.join(out, "config.yaml"))
    if not saved_flags:
        return {}
    wanted = _plain(vars(args))
    return {key: wanted[key] for key in sorted(set(wanted) - set(saved_flags))
            if key not in free_keys and wanted[key] is not None and wanted[key] is not False}


def record_overrides(out: str, changes: Mapping[str, Tuple[Any, Any]], epoch: int, iteration: int) -> None:
    """Append the settings a resume changed to ``out/overrides.json`` (from ``epoch`` + 1 on)."""
    from tnas.files import atomic_write_json

    records = read_overrides(out)
    records.append({"from_epoch": epoch + 1, "from_iteration": iteration,
                    "changed": {key: {"was": old, "now": new} for key, (old, new) in changes.items()}})
    atomic_write_json(os.path.join(out, OVERRIDES_FILE), records)


def read_overrides(out: str) -> list:
    path = os.path.join(out, OVERRIDES_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise TnasError(f"cannot read {path} ({' '.join(str(error).split())})") from None
    return records if isinstance(records, list) else []


def active_overrides(out: str) -> Dict[str, Any]:
    """``{flag: value}`` the latest resume overrode (empty when the run kept its settings)."""
    records = read_overrides(out)
    if not records:
        return {}
    return {key: change.get("now") for key, change in records[-1].get("changed", {}).items()}
