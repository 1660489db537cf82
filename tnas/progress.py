"""Progress you can watch off a terminal: one line per log interval, and the same numbers on the bar.

Runs under ``nohup``, ``tmux`` or a batch scheduler have no progress bar on stdout (tqdm
bars are drawn only when stderr is a terminal, see :func:`progress_bar`), so the
loops here also write plain lines such as::

    search epoch 1/10 iter 50/1250 | loss 1.5873 acc 31.20% | 8.4 tasks/s | epoch 0:00:24 eta 0:09:31 | run 0:00:24 eta 1:39:05
    evaluate tasks 300/600 | acc 47.20% | 25.1 tasks/s | elapsed 0:00:12 eta 0:00:12

In meta-training, loss and accuracy are means over the tasks since the previous line (the
"window"); in evaluation the accuracy is the running mean over the tasks scored so far.
tasks/s is measured over the window (evaluation: since the start) and the ETAs extrapolate it over what is left
(meta-training iterations only: validation time is not in the run ETA). Lines always go
to ``log.txt`` when there is one, and to stdout when no bar is shown; with a bar the
numbers appear in its postfix instead.

No extra host sync: per-task losses and accuracies are summed as device tensors
(:class:`Window`) and read once per line; the trainer writes its line right after the
check it already makes at each log interval.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Iterable, List, Optional

import torch


def format_duration(seconds: Optional[float]) -> str:
    """``H:MM:SS`` (hours unbounded, e.g. ``27:04:05``); ``?`` for unknown or negative times."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_line(stage: str, done: int, total: int, *, unit: str = "iter", epoch: Optional[int] = None,
                  epochs: Optional[int] = None, loss: Optional[float] = None, accuracy: Optional[float] = None,
                  tasks_per_s: Optional[float] = None, elapsed_s: Optional[float] = None,
                  eta_s: Optional[float] = None, run_elapsed_s: Optional[float] = None,
                  run_eta_s: Optional[float] = None) -> str:
    """One progress line (pure: numbers in, text out).

    ``done / total`` count ``unit`` (``iter`` for meta-iterations, ``tasks`` for evaluation);
    ``epoch`` is 1-based. ``accuracy`` is in percent. With ``epoch`` given, the times read
    ``epoch <elapsed> eta <left> | run <elapsed> eta <left>``; without, ``elapsed <t> eta <left>``.
    Fields that are None are left out (the loss of a decoding, say).
    """
    head = stage
    if epoch is not None:
        head += f" epoch {epoch}/{epochs if epochs is not None else '?'}"
    parts = [f"{head} {unit} {done}/{total}"]
    metrics = _metric_words(loss, accuracy)
    if metrics:
        parts.append(" ".join(metrics))
    if tasks_per_s is not None:
        parts.append(f"{tasks_per_s:.1f} tasks/s")
    if epoch is not None:
        parts.append(f"epoch {format_duration(elapsed_s)} eta {format_duration(eta_s)}")
        parts.append(f"run {format_duration(run_elapsed_s)} eta {format_duration(run_eta_s)}")
    else:
        parts.append(f"elapsed {format_duration(elapsed_s)} eta {format_duration(eta_s)}")
    return " | ".join(parts)


def _metric_words(loss: Optional[float], accuracy: Optional[float]) -> List[str]:
    """``loss 1.2345`` and ``acc 43.40%`` for those given: the same format in lines and bars."""
    words = []
    if loss is not None:
        words.append(f"loss {loss:.4f}")
    if accuracy is not None:
        words.append(f"acc {accuracy:.2f}%")
    return words


def bar_postfix(loss: Optional[float], accuracy: Optional[float], tasks_per_s: Optional[float],
                run_eta_s: Optional[float] = None) -> str:
    """The numbers of a line that a tqdm bar does not show itself (it has its own count, elapsed and ETA)."""
    parts = _metric_words(loss, accuracy)
    if tasks_per_s is not None:
        parts.append(f"{tasks_per_s:.1f} tasks/s")
    if run_eta_s is not None:
        parts.append(f"run eta {format_duration(run_eta_s)}")
    return " ".join(parts)


class Window:
    """Sums of per-task query loss and accuracy since the last read, kept on the device.

    :meth:`add` takes ``[T]`` tensors and only queues two additions (no host sync);
    :meth:`read` syncs once and returns the means (accuracy in percent) and starts a new window.
    """

    def __init__(self):
        self._loss: Optional[torch.Tensor] = None
        self._accuracy: Optional[torch.Tensor] = None
        self.tasks = 0

    def add(self, accuracy: Optional[torch.Tensor] = None, loss: Optional[torch.Tensor] = None) -> None:
        if accuracy is not None:
            accuracy = accuracy.detach()
            value = accuracy.double().sum()
            self._accuracy = value if self._accuracy is None else self._accuracy + value
            self.tasks += int(accuracy.shape[0]) if accuracy.dim() else 1
        if loss is not None:
            value = loss.detach().double().sum()
            self._loss = value if self._loss is None else self._loss + value

    def read(self):
        """``(mean loss or None, mean accuracy in percent or None)``; one host sync; resets the window."""
        loss = accuracy = None
        if self.tasks:
            present = [t for t in (self._loss, self._accuracy) if t is not None]
            values = torch.stack(present).tolist() if present else []
            if self._loss is not None:
                loss = values.pop(0) / self.tasks
            if self._accuracy is not None:
                accuracy = 100.0 * values.pop(0) / self.tasks
        self._loss = self._accuracy = None
        self.tasks = 0
        return loss, accuracy


class StdoutLog:
    """A stand-in for :class:`tnas.runlog.RunLogger` where a stage has no ``log.txt``: stdout only."""

    def log(self, message: str, echo: bool = True) -> None:
        if echo:
            from tqdm import tqdm

            tqdm.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}")


def _emit(log, bar, line: str, postfix: str) -> None:
    """The line to ``log.txt``, and to stdout only when no bar is shown; the postfix on the bar."""
    shown = bar is not None and not getattr(bar, "disable", True)
    if log is not None:
        log.log(line, echo=not shown)
    if shown:
        bar.set_postfix_str(postfix, refresh=False)


class TrainingProgress:
    """Progress of a meta-training run (:class:`tnas.engine.MetaTrainer`).

    Per epoch call :meth:`start_epoch` with its bar; after each meta-iteration :meth:`add`
    its per-task statistics; at each log interval (after the trainer's own sync)
    :meth:`report`. A window of one iteration at the start of an epoch (warm-up, the first
    tracked step) gives no line when ``log_every > 1``: its rate would mislead.
    """

    def __init__(self, stage: str, epochs: int, iterations_per_epoch: int, tasks_per_batch: int,
                 log_every: int, log=None):
        self.stage = stage
        self.epochs = epochs
        self.per_epoch = iterations_per_epoch
        self.tasks_per_batch = tasks_per_batch
        self.log_every = log_every
        self.log = log
        self.window = Window()
        self.bar = None
        self.epoch = 0
        self._epoch_first = 0  # global iteration at which this process started the epoch
        self._epoch_started = time.time()
        self._window_first = 0
        self._window_started = self._epoch_started

    def start_epoch(self, epoch: int, iteration: int, bar=None) -> None:
        """``epoch``: 0-based index; ``iteration``: global meta-iterations done so far."""
        self.epoch, self.bar = epoch, bar
        self._epoch_first = self._window_first = iteration
        self._epoch_started = self._window_started = time.time()
        self.window.read()  # drop what an earlier epoch left (no sync when empty)

    def add(self, stats) -> None:
        """Queue one meta-iteration's ``StepStats`` into the window (no sync)."""
        self.window.add(stats.query_accuracy, stats.query_loss)

    def report(self, iteration: int, run_elapsed_s: float) -> Optional[str]:
        """Write the line for the window ending at global iteration ``iteration``; returns it (None: no line)."""
        iterations = iteration - self._window_first
        if iterations <= 0 or (iterations == 1 and self._window_first == self._epoch_first and self.log_every > 1):
            self._restart_window(iteration)
            return None
        now = time.time()
        seconds = max(now - self._window_started, 1e-9)
        per_iteration = seconds / iterations
        loss, accuracy = self.window.read()
        done_in_epoch = iteration - self.epoch * self.per_epoch
        epoch_left = (self.per_epoch - done_in_epoch) * per_iteration
        run_left = (self.epochs * self.per_epoch - iteration) * per_iteration
        tasks_per_s = iterations * self.tasks_per_batch / seconds
        line = progress_line(self.stage, done_in_epoch, self.per_epoch, epoch=self.epoch + 1, epochs=self.epochs,
                             loss=loss, accuracy=accuracy, tasks_per_s=tasks_per_s,
                             elapsed_s=now - self._epoch_started, eta_s=epoch_left,
                             run_elapsed_s=run_elapsed_s, run_eta_s=run_left)
        _emit(self.log, self.bar, line, bar_postfix(loss, accuracy, tasks_per_s, run_left))
        self._window_first, self._window_started = iteration, now
        return line

    def _restart_window(self, iteration: int) -> None:
        self.window.read()
        self._window_first, self._window_started = iteration, time.time()


class TaskProgress:
    """Progress of a loop over batches of tasks (evaluation, decoding, protocol scoring).

    ``for batch in meter.wrap(batches): ...; meter.add(n_tasks, accuracy)``: a bar on a
    terminal, and about ``lines`` progress lines (every ``ceil(batches / lines)`` batches and
    after the last) to ``log`` (a :class:`~tnas.runlog.RunLogger`; default stdout only).
    Reading the accuracy for a line is the only sync it adds.
    """

    def __init__(self, stage: str, total_tasks: int, total_batches: int, log=None, lines: int = 10):
        self.stage = stage
        self.total_tasks = int(total_tasks)
        self.total_batches = max(1, int(total_batches))
        self.every = max(1, math.ceil(self.total_batches / max(1, lines)))
        self.log = log if log is not None else StdoutLog()
        self.window = Window()
        self.bar = None
        self.tasks = 0
        self.batches = 0
        self._accuracy_sum = 0.0
        self._accuracy_tasks = 0
        self._manual = False
        self._started = time.time()

    def wrap(self, batches: Optional[Iterable], desc: Optional[str] = None):
        """``batches`` under a tqdm bar (shown on a terminal only). ``None``: a bar that :meth:`add`
        advances, for loops that are not one iterable (the protocol scores genotype after genotype)."""
        self._manual = batches is None
        self.bar = progress_bar(batches, total=self.total_batches, desc=desc or self.stage)
        self._started = time.time()
        return self.bar

    def add(self, tasks: int, accuracy: Optional[torch.Tensor] = None) -> Optional[str]:
        """Count a finished batch of ``tasks`` (``accuracy``: its ``[T]`` fractions, if scored)."""
        self.tasks += int(tasks)
        self.batches += 1
        if self._manual and self.bar is not None:
            self.bar.update(1)
        if accuracy is not None:
            self.window.add(accuracy)
        if self.batches % self.every and self.batches < self.total_batches:
            return None
        counted = self.window.tasks
        _, accuracy_mean = self.window.read()
        if accuracy_mean is not None:  # running mean over everything scored so far
            self._accuracy_sum += accuracy_mean * counted
            self._accuracy_tasks += counted
        running = self._accuracy_sum / self._accuracy_tasks if self._accuracy_tasks else None
        elapsed = time.time() - self._started
        rate = self.tasks / elapsed if elapsed > 0 else None
        left = (self.total_tasks - self.tasks) / rate if rate else None
        line = progress_line(self.stage, self.tasks, self.total_tasks, unit="tasks", accuracy=running,
                             tasks_per_s=rate, elapsed_s=elapsed, eta_s=left)
        _emit(self.log, self.bar, line, bar_postfix(None, running, rate))
        if self._manual and self.bar is not None and self.batches >= self.total_batches:
            self.bar.close()
        return line


def progress_bar(iterable=None, total=None, desc=None, disable=None, **kw):
    """A tqdm progress bar with our defaults (``leave=False``).

    With ``disable=None`` the bar is off when ``TNAS_PROGRESS=0``, forced on when
    ``TNAS_PROGRESS=1``, and otherwise shown only when stderr is a terminal (so logs of
    batch jobs stay clean).
    """
    from tqdm import tqdm

    if disable is None:
        setting = os.environ.get("TNAS_PROGRESS", "").strip()
        if setting == "0":
            disable = True
        elif setting == "1":
            disable = False
        else:
            disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kw)
