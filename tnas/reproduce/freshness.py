"""Whether a step's run still belongs to the current output of the steps it reads, and moving a stale one aside.

When the runner launches a step it records, in the step's ledger entry, what the step reads of
earlier steps' outputs (its :class:`~tnas.reproduce.plan.Input` files): per upstream step, the
file's name and SHA-256, e.g. ``"inputs": {"1shot/auto_maml/search": {"file": "best_genotype.json",
"sha256": "..."}}``. A step that has left anything in its run directory is **stale** when

- its record differs from those files now (other bytes, another file, or none): the upstream
  step was redone since -- its run directory deleted and searched again, a search resumed and
  extended that found a better epoch, a ``best.pt`` replaced by hand; or
- it has no record (run by a tnas from before these records, or by hand) and one of its
  upstream steps ran (or, for :func:`stale_steps`, is due to run) in this invocation: it cannot
  have read that run's output.

A step without a record whose upstream steps do not run is taken as current -- redoing hours of
training because tnas was upgraded would be the bigger surprise -- and the runner records its
inputs then, so a later change is seen. Bytes are compared, not times: copying or touching a run
directory leaves its downstream current.

A stale step is redone from the start, never resumed from a checkpoint of its old input: its run
directory is moved aside to ``<dir>.stale-<n>`` (nothing is deleted).
"""
from __future__ import annotations

import os
from typing import Any, Container, Dict, List, Mapping, Optional, Sequence, Tuple

from tnas.errors import TnasError
from tnas.reproduce.plan import Input, Step
from tnas.files import sha256_file

_DIGESTS: Dict[Tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime) -> sha256: one read per version


def _sha256(path: str) -> str:
    stat = os.stat(path)
    key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def fingerprint(item: Input) -> Optional[Dict[str, str]]:
    """``{"file": name, "sha256": hex}`` of the first of ``item.files`` that exists, or None (none does)."""
    for path in item.files:
        if os.path.isfile(path):
            return {"file": os.path.basename(path), "sha256": _sha256(path)}
    return None


def read_inputs(step: Step) -> Dict[str, Optional[Dict[str, str]]]:
    """What ``step`` would read now: upstream step name -> :func:`fingerprint` (the ledger's ``inputs``)."""
    return {item.step: fingerprint(item) for item in step.inputs}


def has_run(step: Step) -> bool:
    """Whether ``step`` left anything (a result, a checkpoint, a log) in its run directory."""
    try:
        return bool(os.listdir(step.out))
    except OSError:
        return False


def _change(item: Input, before: Optional[Mapping[str, str]], now: Optional[Mapping[str, str]]) -> str:
    if now is None:
        return f"{item.step}/{before['file'] if before else os.path.basename(item.files[0])} is gone"
    if before is None:
        return f"{item.step}/{now['file']} was not recorded"
    if before.get("file") != now["file"]:
        return f"{item.step} now gives {now['file']} instead of {before.get('file')}"
    return f"{item.step}/{now['file']} changed (sha256 {str(before.get('sha256'))[:12]} -> {now['sha256'][:12]})"


def _record(recorded: Any, name: str) -> Optional[Dict[str, str]]:
    """The ledger's fingerprint of input ``name``; None (not recorded) for anything else a hand-edited
    ledger may hold there."""
    value = recorded.get(name) if isinstance(recorded, Mapping) else None
    return value if isinstance(value, Mapping) and isinstance(value.get("file"), str) else None


def changed_inputs(step: Step, recorded: Mapping[str, Any]) -> List[str]:
    """One phrase per input of ``step`` that differs from ``recorded`` (its ledger ``inputs``)."""
    changes = []
    for item in step.inputs:
        before, now = _record(recorded, item.step), fingerprint(item)
        if before != now:
            changes.append(_change(item, before, now))
    return changes


def stale_reason(step: Step, entry: Mapping[str, Any], rerun: Container[str]) -> Optional[str]:
    """Why ``step``'s run no longer belongs to its upstream (see the module's rules), or None: current, or
    not run at all. ``entry``: its ledger entry; ``rerun``: steps run (or due to run) in this invocation."""
    if not step.inputs or not has_run(step):
        return None
    if "inputs" not in entry:
        again = [item.step for item in step.inputs if item.step in rerun]
        return (f"no record of what it read (run by an older tnas) and {', '.join(again)} ran again"
                if again else None)
    changes = changed_inputs(step, entry["inputs"] or {})
    return "; ".join(changes) or None


def stale_steps(steps: Sequence[Step], entries: Mapping[str, Mapping[str, Any]],
                states: Mapping[str, str]) -> Dict[str, str]:
    """Step name -> why, for the steps the runner will find stale, foreseen before anything runs (the table,
    ``--dry_run``): :func:`stale_reason` with the steps not done (``states``, from
    :func:`tnas.reproduce.runner.step_state`) as due to run, and every step below a stale one that has
    run (its upstream's redo will give another output)."""
    stale: Dict[str, str] = {}
    for step in steps:
        below = [item.step for item in step.inputs if item.step in stale]
        if below and has_run(step):
            stale[step.name] = f"{', '.join(below)} is stale and will be redone"
            continue
        due = {item.step for item in step.inputs if states.get(item.step) != "done"}
        reason = stale_reason(step, entries.get(step.name, {}), due)
        if reason:
            stale[step.name] = reason
    return stale


def move_aside(path: str) -> str:
    """Rename run directory ``path`` to the first free ``<path>.stale-<n>`` and return that name."""
    number = 1
    while os.path.exists(f"{path}.stale-{number}"):
        number += 1
    target = f"{path}.stale-{number}"
    try:
        os.rename(path, target)
    except OSError as error:
        raise TnasError(f"cannot move the stale run {path} aside to {target}: {error.strerror}; move or delete "
                        f"it yourself and rerun") from None
    return target
