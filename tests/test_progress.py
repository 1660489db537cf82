"""Progress lines (tnas/progress.py): their exact format, the window means, when lines come, and a real
search run with stdout redirected to a file."""
import os
import re
import subprocess
import sys

import pytest
import torch

from tnas.meta.learner import StepStats
from tnas.progress import (TaskProgress, TrainingProgress, Window, bar_postfix, format_duration,
                           progress_bar, progress_line)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME = r"\d+:\d\d:\d\d"
# The meta-training line, as a user greps for it in a batch job's output.
TRAIN_LINE = re.compile(
    rf"^(?:\[[\d\- :]+\] )?(?P<stage>\w+) epoch (?P<epoch>\d+)/(?P<epochs>\d+) iter (?P<done>\d+)/(?P<total>\d+) "
    rf"\| loss (?P<loss>\d+\.\d{{4}}) acc (?P<acc>\d+\.\d\d)% \| (?P<rate>\d+\.\d) tasks/s "
    rf"\| epoch {TIME} eta (?P<eta>{TIME}) \| run {TIME} eta (?P<run_eta>{TIME})$")


class Sink:
    """Records what a RunLogger would get: ``(line, echo)``."""

    def __init__(self):
        self.lines = []

    def log(self, message, echo=True):
        self.lines.append((message, echo))


class Bar:
    """What the progress code uses of a tqdm bar."""

    def __init__(self, shown):
        self.disable = not shown
        self.postfix = None

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(100000) == "27:46:40"
    for unknown in (None, -1.0, float("inf"), float("nan")):
        assert format_duration(unknown) == "?"


def test_training_line_exact():
    line = progress_line("search", 50, 1250, epoch=1, epochs=10, loss=1.58731, accuracy=31.2, tasks_per_s=8.44,
                         elapsed_s=24, eta_s=571, run_elapsed_s=24, run_eta_s=5945)
    assert line == ("search epoch 1/10 iter 50/1250 | loss 1.5873 acc 31.20% | 8.4 tasks/s | epoch 0:00:24 "
                    "eta 0:09:31 | run 0:00:24 eta 1:39:05")
    assert TRAIN_LINE.match(line)


def test_task_line_exact_and_optional_fields():
    assert progress_line("evaluate", 300, 600, unit="tasks", accuracy=47.2, tasks_per_s=25.06, elapsed_s=12,
                         eta_s=12) == "evaluate tasks 300/600 | acc 47.20% | 25.1 tasks/s | elapsed 0:00:12 eta 0:00:12"
    assert progress_line("decode", 3, 5, unit="tasks", tasks_per_s=1.0, elapsed_s=3, eta_s=None) == \
        "decode tasks 3/5 | 1.0 tasks/s | elapsed 0:00:03 eta ?"
    assert bar_postfix(1.5, 40.0, 3.25, 61) == "loss 1.5000 acc 40.00% 3.2 tasks/s run eta 0:01:01"
    assert bar_postfix(None, None, None) == ""


def test_window_means_over_tasks_and_reset():
    window = Window()
    window.add(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 4.0]))
    window.add(torch.tensor([0.5]), torch.tensor([3.0]))
    assert window.tasks == 3
    loss, accuracy = window.read()
    assert loss == pytest.approx(3.0, abs=1e-12) and accuracy == pytest.approx(50.0, abs=1e-12)
    assert window.read() == (None, None) and window.tasks == 0
    window.add(torch.tensor([0.25, 0.75]))  # accuracy only (a scoring loop)
    assert window.read() == (None, pytest.approx(50.0))


def run_training(meter, epochs, per_epoch, log_every, losses):
    """The engine's loop, as far as progress is concerned; returns the lines reported."""
    iteration, lines = 0, []
    for epoch in range(epochs):
        meter.start_epoch(epoch, iteration, None)
        for _ in range(per_epoch):
            track = iteration % log_every == 0
            loss = losses[iteration]
            meter.add(StepStats(query_loss=torch.tensor([loss, loss]), query_accuracy=torch.tensor([0.5, 1.0])))
            iteration += 1
            if track:
                lines.append(meter.report(iteration, run_elapsed_s=1.0))
    return [line for line in lines if line is not None]


def test_one_training_line_per_log_interval_with_window_means():
    sink = Sink()
    meter = TrainingProgress("search", epochs=2, iterations_per_epoch=10, tasks_per_batch=2, log_every=3, log=sink)
    losses = [float(i) for i in range(20)]
    lines = run_training(meter, 2, 10, 3, losses)
    parsed = [TRAIN_LINE.match(line) for line in lines]
    assert all(parsed), lines
    # tracked iterations 0, 3, 6, 9 | 12, 15, 18: the first window of each epoch start that holds one
    # iteration (warm-up) gives no line; epoch 2 starts at iteration 10, its first tracked is 12.
    assert [(m["epoch"], m["done"]) for m in parsed] == [("1", "4"), ("1", "7"), ("1", "10"), ("2", "3"),
                                                          ("2", "6"), ("2", "9")]
    # window means: iterations 1..3 -> loss 2.0; iterations 10, 11, 12 (epoch 2 start) -> 11.0
    assert [float(m["loss"]) for m in parsed] == [2.0, 5.0, 8.0, 11.0, 14.0, 17.0]
    assert all(float(m["acc"]) == 75.0 and m["total"] == "10" and m["epochs"] == "2" for m in parsed)
    assert [line for line, _ in sink.lines] == lines and all(echo for _, echo in sink.lines)


def test_on_a_terminal_the_bar_shows_the_numbers_and_log_txt_gets_the_line():
    sink, bar = Sink(), Bar(shown=True)
    meter = TrainingProgress("train", epochs=1, iterations_per_epoch=4, tasks_per_batch=1, log_every=2, log=sink)
    meter.start_epoch(0, 0, bar)
    for iteration in range(3):
        meter.add(StepStats(query_loss=torch.tensor([1.0]), query_accuracy=torch.tensor([1.0])))
        if iteration in (0, 2):
            meter.report(iteration + 1, run_elapsed_s=0.0)
    assert len(sink.lines) == 1 and sink.lines[0][1] is False  # log.txt only: the bar is on screen
    assert re.fullmatch(r"loss 1\.0000 acc 100\.00% \d+\.\d tasks/s run eta \d+:\d\d:\d\d", bar.postfix)


def test_task_progress_lines_and_running_accuracy():
    sink = Sink()
    meter = TaskProgress("evaluate", total_tasks=10, total_batches=4, log=sink, lines=2)
    assert list(meter.wrap(range(4))) == [0, 1, 2, 3]
    returned = [meter.add(3, torch.tensor([1.0, 1.0, 0.0])), meter.add(3, torch.tensor([0.0, 0.0, 0.0])),
                meter.add(3, torch.tensor([1.0, 1.0, 1.0])), meter.add(1, torch.tensor([1.0]))]
    assert returned[0] is None and returned[2] is None  # every ceil(4 / 2) = 2 batches, and after the last
    lines = [line for line, _ in sink.lines]
    assert lines == returned[1::2]
    assert re.fullmatch(rf"evaluate tasks 6/10 \| acc 33\.33% \| \d+\.\d tasks/s \| elapsed {TIME} eta {TIME}",
                        lines[0])
    assert re.fullmatch(rf"evaluate tasks 10/10 \| acc 60\.00% \| \d+\.\d tasks/s \| elapsed {TIME} eta 0:00:00",
                        lines[1])


def test_search_stdout_to_a_file_has_a_line_per_log_interval(tmp_path):
    """The tiny demo search with stdout redirected to a file (no terminal, no bar)."""
    from test_search_stage import TINY

    out, stdout = tmp_path / "run", tmp_path / "stdout.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TNAS_PROGRESS", None)  # the default: no terminal here, so no bar and lines on stdout
    with open(stdout, "w") as handle:
        result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "search.py"), *TINY, "--log_every",
                                 "2", "--epochs", "2", "--tasks_per_epoch", "12", "--out", str(out)],
                                env=env, stdout=handle, stderr=subprocess.PIPE, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "\r" not in stdout.read_text() + result.stderr  # no bar drawn
    for text in (stdout.read_text(), (out / "log.txt").read_text()):
        parsed = [TRAIN_LINE.match(line) for line in text.splitlines() if " iter " in line]
        assert all(parsed), text
        # 6 iterations of 2 tasks per epoch, tracked at 0, 2, 4 | 6, 8, 10 (global): lines after 3 and 5
        assert [(m["stage"], m["epoch"], m["done"], m["total"]) for m in parsed] == \
            [("search", "1", "3", "6"), ("search", "1", "5", "6"), ("search", "2", "3", "6"),
             ("search", "2", "5", "6")]
        assert all(float(m["rate"]) > 0 for m in parsed)


def test_progress_respects_environment(monkeypatch):
    monkeypatch.setenv("TNAS_PROGRESS", "0")
    bar = progress_bar(range(3), desc="x")
    assert bar.disable and list(bar) == [0, 1, 2]
    monkeypatch.setenv("TNAS_PROGRESS", "1")
    bar = progress_bar(total=3, file=open("/dev/null", "w"))
    assert not bar.disable and bar.leave is False
    bar.close()
