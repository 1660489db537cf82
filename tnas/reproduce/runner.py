"""Run a plan's steps in order, resumably, and keep ``table.json`` / ``table.md`` up to date.

A step is **done** when its result file says so: ``results.json`` for an evaluation or a
protocol; for a search or a from-scratch training, ``search.json`` / ``train.json`` with
every epoch of its schedule done and ``best.pt`` present. A done step is skipped; a search
or training with a ``last.pt`` but not done is continued with the stage's ``--resume``; an
evaluation or protocol is simply run again (the protocol reuses its decoded genotypes and
trained genotype runs by itself). Each stage runs as a process of its own (under
``torchrun --nproc_per_node N`` with ``nproc`` > 1, except evaluations).

A step run from an earlier output of the steps it reads is **stale** (:mod:`tnas.reproduce.freshness`):
each step's ledger entry records the SHA-256 of what it read (the search's ``best_genotype.json``,
the training's or search's ``best.pt``) when it was launched; when those files are other now (an
upstream step was redone), the step is redone from the start -- its run directory moved aside to
``<dir>.stale-<n>``, never resumed -- with one log line naming it and the file that changed, and
the table shows it as stale until then, not its old result. A step without a record (run by an
older tnas) is taken as current unless a step it reads runs again in this invocation.

``OUT/ledger.json`` keeps, per step, its state (running, done, interrupted, failed), what it
read (``inputs``) and the seconds spent on it over every invocation (updated every
``heartbeat_s`` while it runs, so a killed run loses at most that much; those of a stale run, or
of a finished run whose directory was deleted, move to ``superseded``); device-hours = seconds x
processes / 3600.
``OUT/settings.json`` pins what must not change between reruns into the same ``OUT`` (the
plan and ``--budget``). One reproduction at a time holds ``OUT`` (:func:`tnas.run_dir.claim_run_dir`):
a second one into it is refused in one line naming the first's pid.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from tnas import run_dir
from tnas.errors import TnasError
from tnas.reproduce import freshness
from tnas.reproduce.plan import REPO, Cell, Plan, Settings, Step, step_summary
from tnas.reproduce.table import build_table, render_markdown
from tnas.files import atomic_write_bytes, atomic_write_json

LEDGER_FILE = "ledger.json"
SETTINGS_FILE = "settings.json"
HEARTBEAT_S = 30.0

Launch = Callable[[List[str], Callable[[float], None]], int]
"""``launch(command, tick) -> exit status``; calls ``tick(seconds_so_far)`` now and then while it runs."""


class Interrupted(Exception):
    """The pipeline was asked to stop (SIGINT / SIGTERM); the running stage saved its checkpoint."""


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def step_state(step: Step) -> str:
    """``"done"``, ``"resume"`` (a search / training with a checkpoint to continue) or ``"new"``."""
    if step.kind in ("search", "train"):
        summary = _read_json(step.result) or {}
        epochs = summary.get("epochs")
        if isinstance(epochs, int) and int(summary.get("epochs_done") or 0) >= epochs and \
                os.path.isfile(os.path.join(step.out, "best.pt")):
            return "done"
        return "resume" if os.path.isfile(os.path.join(step.out, "last.pt")) else "new"
    summary = _read_json(step.result)
    return "done" if summary is not None and "accuracy_mean" in summary else "new"


def step_command(step: Step, state: str, nproc: int, python: str = sys.executable) -> List[str]:
    """The process to start for ``step``: the stage script (under torchrun when ``nproc`` > 1)."""
    argv = list(step.argv) + (["--resume"] if state == "resume" else [])
    if nproc > 1 and step.distributed:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", step.script] + argv
    return [python, step.script] + argv


def launch_subprocess(command: List[str], tick: Callable[[float], None], heartbeat_s: float = HEARTBEAT_S) -> int:
    """Run ``command`` (output to this terminal); SIGINT / SIGTERM are passed on to it, and once it has
    exited (saving its checkpoint) :class:`Interrupted` is raised."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO)
    stop = {"signal": None}

    def forward(signum, frame):
        stop["signal"] = signum
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = process.wait(timeout=heartbeat_s)
                break
            except subprocess.TimeoutExpired:
                tick(time.monotonic() - started)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    tick(time.monotonic() - started)
    if stop["signal"] is not None:
        raise Interrupted(f"stopped by signal {stop['signal']}")
    return code


def step_states(steps: Sequence[Step], ledger: "Ledger") -> Dict[str, str]:
    """Each step's :func:`step_state`, or ``"stale: why"`` where its run belongs to an earlier output of the
    steps it reads (:func:`tnas.reproduce.freshness.stale_steps`; it will be redone from the start)."""
    states = {step.name: step_state(step) for step in steps}
    for name, why in freshness.stale_steps(steps, ledger.steps, states).items():
        states[name] = f"stale: {why}"
    return states


class Ledger:
    """``OUT/ledger.json``: per step ``{"kind", "state", "seconds", "devices", "attempts", "inputs"}`` (and
    ``"superseded"``: the stale runs moved aside, with their seconds)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LEDGER_FILE)
        self.steps: Dict[str, Dict[str, Any]] = (_read_json(self.path) or {}).get("steps", {})

    def entry(self, step: Step) -> Dict[str, Any]:
        return self.steps.setdefault(step.name, {"kind": step.kind, "state": "pending", "seconds": 0.0,
                                                 "devices": 1, "attempts": 0})

    def save(self) -> None:
        atomic_write_json(self.path, {"steps": self.steps})

    def supersede(self, step: Step, moved_to: Optional[str], reason: str) -> Dict[str, Any]:
        """Start ``step``'s entry afresh after its run was moved to ``moved_to`` (stale; None: deleted by the
        user); the old run's cost goes with it, out of the table's."""
        old = self.steps.pop(step.name, {})
        superseded = list(old.get("superseded", [])) + [
            {"run": moved_to, "reason": reason, "seconds": old.get("seconds", 0.0), "devices": old.get("devices", 1)}]
        entry = self.entry(step)
        entry["superseded"] = superseded
        return entry


def source_version(repo: str = REPO) -> str:
    """The git commit of ``repo`` (``+dirty`` with uncommitted changes), else the package version."""
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        import tnas

        return f"tnas {tnas.__version__} (no git checkout)"


def check_settings(out: str, plan: Plan, settings: Settings) -> None:
    """Refuse a rerun into ``out`` with another plan or ``--budget`` (its finished steps would be reused)."""
    with open(plan.path, "rb") as handle:
        pinned = {"plan": plan.path, "plan_sha256": hashlib.sha256(handle.read()).hexdigest(),
                  "budget": settings.budget}
    path = os.path.join(out, SETTINGS_FILE)
    saved = _read_json(path)
    if saved is not None:
        differ = [key for key in ("plan", "budget") if saved.get(key) != pinned[key]]
        if differ:
            detail = ", ".join(f"{key}: {saved.get(key)} -> {pinned[key]}" for key in differ)
            raise TnasError(f"--out {out} holds a reproduction with other settings ({detail}); use the same "
                            f"settings or another --out")
        if saved.get("plan_sha256") != pinned["plan_sha256"]:
            print(f"reproduce: note: the plan {plan.path} changed since {out} was started; finished steps are kept")
    os.makedirs(out, exist_ok=True)
    atomic_write_json(path, pinned)


def step_records(steps: Sequence[Step], ledger: Ledger) -> Dict[str, Dict[str, Any]]:
    """What :func:`tnas.reproduce.table.build_table` needs per step: state, seconds, devices, result."""
    records = {}
    states = step_states(steps, ledger)
    for step in steps:
        entry = dict(ledger.steps.get(step.name, {}))
        on_disk = states[step.name]
        if on_disk.startswith("stale"):  # made from an earlier upstream: neither its result nor its cost listed
            record = {"state": "stale", "seconds": 0.0, "devices": entry.get("devices", 1), "result": None}
        elif on_disk == "done":
            result = _read_json(step.result) or {}
            seconds = entry.get("seconds") or float(result.get("wall_time_s") or 0.0)  # no ledger: the stage's own
            record = {"state": "done", "seconds": seconds, "devices": entry.get("devices", 1),
                      "result": result if step.kind in ("evaluate", "protocol") else None}
        else:
            state = entry.get("state", "pending")
            record = {"state": "pending" if state == "done" else state, "seconds": entry.get("seconds", 0.0),
                      "devices": entry.get("devices", 1), "result": None}
        record["kind"] = step.kind
        records[step.name] = record
    return records


def current_table(steps: Sequence[Step], cells: Sequence[Cell], ledger: Ledger,
                  meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The table of what the steps' files and the ledger say now."""
    meta = dict(meta)
    meta["generated"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta["steps"] = step_summary(steps)
    return build_table([{"method": c.method, "shot": c.shot, "steps": list(c.steps)} for c in cells],
                       step_records(steps, ledger), meta)


def write_table(out: str, steps: Sequence[Step], cells: Sequence[Cell], ledger: Ledger,
                meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Rebuild ``OUT/table.json`` and ``OUT/table.md`` from the steps' files and the ledger."""
    table = current_table(steps, cells, ledger, meta)
    atomic_write_json(os.path.join(out, "table.json"), table)
    atomic_write_bytes(os.path.join(out, "table.md"), render_markdown(table).encode("utf-8"))
    return table


def run_pipeline(plan: Plan, settings: Settings, steps: Sequence[Step], cells: Sequence[Cell],
                 meta: Mapping[str, Any], nproc: int = 1, launch: Optional[Launch] = None,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every step not done yet, in order; returns the final table. A failing stage is a one-line
    error naming the step and its run directory (its log says why); the table shows where it stopped."""
    # one reproduction at a time in --out: a second one would mark the first's running step interrupted,
    # rerun it alongside, or move a live run directory aside as stale
    run_dir.claim_run_dir(settings.out)
    try:
        return _run_steps(plan, settings, steps, cells, meta, nproc, launch or launch_subprocess, log)
    finally:
        run_dir.release_run_dir(settings.out)


def _run_steps(plan: Plan, settings: Settings, steps: Sequence[Step], cells: Sequence[Cell],
               meta: Mapping[str, Any], nproc: int, launch: Launch, log: Callable[[str], None]) -> Dict[str, Any]:
    """:func:`run_pipeline`'s work, with ``--out`` held."""
    out = settings.out
    check_settings(out, plan, settings)
    ledger = Ledger(out)
    for entry in ledger.steps.values():  # a previous invocation killed without a word
        if entry.get("state") == "running":
            entry["state"] = "interrupted"
    write_table(out, steps, cells, ledger, meta)
    ran = set()  # steps launched in this invocation
    for position, step in enumerate(steps, 1):
        entry = ledger.entry(step)
        label = f"[{position}/{len(steps)}] {step.name}"
        stale = freshness.stale_reason(step, entry, ran)
        if stale:
            moved = freshness.move_aside(step.out)
            log(f"reproduce: {label}: stale, redoing it from the start ({stale}); its old run is now {moved}")
            entry = ledger.supersede(step, moved, stale)
            ledger.save()
        elif entry["state"] == "done" and not freshness.has_run(step):  # deleted by the user: run anew
            entry = ledger.supersede(step, None, "its run directory was deleted")
            ledger.save()
        elif "inputs" not in entry and step.inputs and freshness.has_run(step):
            log(f"reproduce: {label}: note: no record of what it read (run by an older tnas); taken as current "
                f"and recorded now")
        state = step_state(step)
        if state == "done":
            if entry["state"] != "done" or "inputs" not in entry:
                entry["state"] = "done"
                if "inputs" not in entry:  # an older tnas's step, taken as current
                    entry["inputs"] = freshness.read_inputs(step)
                ledger.save()
            log(f"reproduce: {label}: done, skipped ({step.result})")
            continue
        command = step_command(step, state, nproc)
        devices = nproc if (nproc > 1 and step.distributed) else 1
        action = "resuming" if state == "resume" or entry["state"] in ("interrupted", "failed") else "starting"
        log(f"reproduce: {label}: {action}: {' '.join(os.path.relpath(c, REPO) if c == step.script else c for c in command)}")
        entry.update(state="running", devices=devices, attempts=int(entry.get("attempts", 0)) + 1,
                     inputs=freshness.read_inputs(step))  # what it reads now (checked above when resuming)
        ran.add(step.name)
        before = float(entry.get("seconds") or 0.0)
        ledger.save()
        write_table(out, steps, cells, ledger, meta)

        def tick(seconds: float) -> None:
            entry["seconds"] = before + seconds
            ledger.save()
            write_table(out, steps, cells, ledger, meta)  # "so far" device-hours of the running cell

        try:
            code = launch(command, tick)
        except (Interrupted, KeyboardInterrupt):
            entry["state"] = "interrupted"
            ledger.save()
            write_table(out, steps, cells, ledger, meta)
            raise
        finished = code == 0 and step_state(step) == "done"
        entry["state"] = "done" if finished else "failed"
        ledger.save()
        write_table(out, steps, cells, ledger, meta)
        if not finished:
            why = f"exit status {code}" if code != 0 else f"finished without a complete {step.result}"
            raise TnasError(f"step {step.name} failed ({why}); see {os.path.join(step.out, 'log.txt')}; rerun to "
                            f"continue from there")
    table = write_table(out, steps, cells, ledger, meta)
    log(f"reproduce: all {len(steps)} steps done; {os.path.join(out, 'table.md')}")
    return table
