"""tnas.runlog: log.txt and tensorboard events (figures, heatmaps, the rewind after a resume)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tb_events import read_events
from tnas.runlog import RunLogger


def test_run_logger_writes_log_and_events(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLogger(out) as logger:
        logger.log("hello world")
        logger.scalar("loss", torch.tensor(0.5), 1)
        logger.scalars({"acc": 50.0, "loss": 1.25}, 2, prefix="val")
        logger.text("genotype", "normal: ...", 2)
        logger.image("img", np.random.rand(8, 8, 3), 2)
        logger.image("gray", np.zeros((8, 8), dtype=np.uint8), 2)
        logger.heatmap("alpha/normal", torch.softmax(torch.randn(14, 8), -1), 3,
                       row_labels=[f"e{i}" for i in range(14)],
                       col_labels=[f"op{j}" for j in range(8)], title="alpha")
    assert "hello world" in capsys.readouterr().out
    lines = (out / "log.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("hello world") and lines[0].startswith("[")
    files = list((out / "tb").rglob("events.out.tfevents.*"))
    assert files and all(f.stat().st_size > 0 for f in files)
    values = {}
    for event in read_events(out / "tb"):
        for value in event.summary.value:
            values.setdefault(value.tag, []).append((event.step, value))
    assert values["loss"][0][0] == 1 and values["loss"][0][1].simple_value == pytest.approx(0.5)
    assert values["val/acc"][0][1].simple_value == pytest.approx(50.0)
    assert values["val/loss"][0][0] == 2
    assert {"img", "gray", "alpha/normal"} <= set(values)
    heat = values["alpha/normal"][0][1].image
    assert heat.width > 100 and heat.height > 100 and len(heat.encoded_image_string) > 0


def test_run_logger_append_quiet_and_no_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLogger(out, use_tensorboard=False, quiet=True) as logger:
        logger.log("first")
        logger.scalar("loss", 1.0, 0)
    with RunLogger(out, use_tensorboard=False, quiet=True, append=True) as logger:
        logger.log("second")
    assert capsys.readouterr().out == ""
    lines = (out / "log.txt").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["first", "second"]
    assert not (out / "tb").exists()


def test_figure_is_rendered_and_closed(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    with RunLogger(tmp_path, quiet=True) as logger:
        logger.figure("curve", figure, 0)
    assert not plt.fignum_exists(figure.number)
    tags = {v.tag for e in read_events(tmp_path / "tb") for v in e.summary.value}
    assert "curve" in tags


def test_without_tensorboardx_falls_back_to_torch_writer_or_turns_off(tmp_path, monkeypatch):
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX -> ImportError
    logger = RunLogger(tmp_path / "run", quiet=True)
    logger.scalar("loss", 1.5, 0)
    logger.close()
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "run" / "tb").glob("events*"))
    else:
        assert "tensorboard logging off" in (tmp_path / "run" / "log.txt").read_text()
        assert not (tmp_path / "run" / "tb").exists()


def _scalar_points(tb_dir):
    from tb_events import summary_values

    return sorted((tag, step, value.simple_value) for tag, step, value in summary_values(tb_dir)
                  if value.HasField("simple_value"))


@pytest.mark.parametrize("per_epoch, epochs, kills", [
    # killed with a point past iteration 4's checkpoint, twice (the second run's file has no checkpoint),
    # then between epoch 2's points and its last.pt
    (3, 2, [{"kill_iteration": 5}, {"kill_iteration": 5}, {"kill_epoch": 2}]),
    (1, 4, [{"kill_epoch": 3}]),  # an epoch of one iteration: epoch and iteration points share step numbers
])
def test_a_killed_run_resumed_logs_each_point_once(tmp_path, per_epoch, epochs, kills):
    """A run killed after logging past its checkpoint replays those iterations when resumed: its tensorboard
    events are cut back to the checkpoint's marker, so every tag (iteration and epoch points alike) has
    exactly the points, and values, of a run never killed. The kills: in a step after the checkpoint, and
    between an epoch's points (and best.pt) and its last.pt; a file begun after the checkpoint goes."""
    from collections import Counter

    from toy_trainer import Killed, toy_trainer
    from tnas.engine import Schedule

    schedule = Schedule(epochs=epochs, tasks_per_epoch=per_epoch, tasks_per_batch=1, log_every=1,
                        checkpoint_every=2)

    def train(out, resume=False, **kill):
        torch.manual_seed(0)  # as a new process does before it resumes
        with RunLogger(out, quiet=True, append=resume) as logger:  # closing writes every queued event
            _, trainer = toy_trainer(out, logger, schedule, **kill)
            if resume:
                trainer.resume()
            try:
                trainer.run()
            except Killed:
                return False
        return True

    assert train(tmp_path / "straight")
    out = tmp_path / "killed"
    for number, kill in enumerate(kills):
        assert not train(out, resume=number > 0, **kill)
    assert train(out, resume=True)
    want, got = _scalar_points(tmp_path / "straight" / "tb"), _scalar_points(out / "tb")
    assert max(Counter((tag, step) for tag, step, _ in got).values()) == 1
    assert {tag for tag, _, _ in got} >= {"epoch/val_accuracy", "meta_train/loss", "meta_train/loss_step1"}
    assert got == want
    log = (out / "log.txt").read_text()
    assert "tensorboard: dropped the events logged after the checkpoint (1 file(s) cut back to it" in log
    assert ("1 later file(s) removed" in log) is (len(kills) == 3)


def test_rewind_leaves_event_files_it_cannot_read_alone(tmp_path):
    """Bytes that are no event file (a header promising more than the file holds, a directory of an event
    file's name) are left as they are by a resume's rewind, not a traceback; the marker's file is still cut."""
    with RunLogger(tmp_path, quiet=True) as logger:
        logger.scalar("a", 1.0, 0)
        mark = logger.mark_checkpoint(0)
        logger.scalar("a", 2.0, 1)
    foreign = tmp_path / "tb" / "events.out.tfevents.1.foreign"
    foreign.write_bytes(b"\xff" * 64)  # its first 8 bytes read as a length of 2**64 - 1
    (tmp_path / "tb" / "events.out.tfevents.2.dir").mkdir()
    mark["files"] += [foreign.name, "events.out.tfevents.2.dir"]
    with RunLogger(tmp_path, quiet=True, append=True) as logger:
        line = logger.rewind_tensorboard(mark)
    assert line is not None and "1 file(s) cut back to it" in line
    assert foreign.read_bytes() == b"\xff" * 64
    foreign.unlink()  # (the test's event reader is no more forgiving than tensorboard's)
    (tmp_path / "tb" / "events.out.tfevents.2.dir").rmdir()
    assert [step for _, step, _ in _scalar_points(tmp_path / "tb")] == [0]


KILLED_AFTER_A_CHECKPOINT = """
import os, signal, sys
from tnas.runlog import RunLogger
logger = RunLogger(sys.argv[1], quiet=True)
for step in range(3):
    logger.scalar("meta_train/loss", float(step), step)
logger.scalar("epoch/val_accuracy", 50.0, 1)
mark = logger.mark_checkpoint(3)
print(mark["marker"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would, right after the checkpoint is saved
"""


def test_points_logged_before_a_checkpoint_outlive_a_sigkill(tmp_path):
    """A process killed outright after a checkpoint keeps every tensorboard point logged before it and the
    checkpoint's marker in its event file: the resume cuts back to the marker and logs only what follows
    it, so a point still queued in the writer at the kill would be lost for good (an epoch's points
    missing from a resumed run). tensorboardX's writer queues events for a thread that writes them every
    120 s; its flush() alone leaves the queue as it is."""
    import os
    import signal
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_A_CHECKPOINT, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    events = read_events(tmp_path / "tb")
    points = sorted((value.tag, event.step) for event in events if event.HasField("summary")
                    for value in event.summary.value)
    assert points == [("epoch/val_accuracy", 1), ("meta_train/loss", 0), ("meta_train/loss", 1),
                      ("meta_train/loss", 2)]
    markers = [event.session_log.checkpoint_path for event in events if event.HasField("session_log")]
    assert markers == [killed.stdout.strip()]
