"""Fault injection: what a hostile or unlucky user does to checkpoints, run directories and caches.

Each test plants one fault (a code-running checkpoint, a second run into a busy --out, an image
changed under the cache, a NaN gradient, a mismatched or corrupt resume, a full disk, a pickle
naming an unsafe module, bad small inputs) and checks that tnas answers with one ``error:`` line
(exit 2) or recovers, and that nothing on disk is lost or half-written. Tiny glyph searches
(16x16 images, C 4, one cell) run in process where they can, as subprocesses where the test
needs a second process.
"""
import errno
import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data_fixtures as fx
from run_locks import another_process_can_lock
from test_evaluate import _genotype_json_hook, assert_one_line_error, run_in_process
from tnas import distributed
from tnas.errors import TnasError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "glyphs", "--img_size", "16", "--device", "cpu", "--n_way", "3", "--k_shot", "1",
        "--q_query", "2", "--tasks_per_batch", "2", "--C", "4", "--layers", "1", "--inner_steps", "1",
        "--inner_steps_test", "1", "--val_episodes", "2", "--val_batch_size", "2", "--log_every", "0",
        "--seed", "3"]


def search_main(argv):
    from tnas.config import parse_args
    from tnas.stages import search

    search.run(parse_args(search.build_parser(), argv))


@pytest.fixture
def quick_search(monkeypatch, capsys):
    """``run(out, *flags)``: a tiny in-process search (no cell diagrams) through ``cli_entry``."""
    from tnas.stages import search

    monkeypatch.setattr(search, "genotype_epoch_hook", _genotype_json_hook)

    def run(out, *flags):
        return run_in_process(search_main, TINY + ["--out", str(out), *flags], capsys)

    return run


def finished_run(quick_search, out, *flags):
    result = quick_search(out, "--epochs", "1", "--tasks_per_epoch", "4", *flags)
    assert result.returncode == 0, result.stderr
    return out


# ------------------------------------------------------------------------- safe loading
class _Planted:
    """Unpickling this runs ``open(marker, "w")``: the stand-in for any code a checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_planted_reduce_in_a_checkpoint_runs_nothing(tmp_path, quick_search, capsys):
    from tnas.checkpoints import load_checkpoint

    out = finished_run(quick_search, tmp_path / "run")
    marker = tmp_path / "pwned"
    state = torch.load(out / "best.pt", weights_only=True)
    state["summary"]["payload"] = _Planted(str(marker))
    torch.save(state, out / "best.pt")
    torch.save(state, out / "last.pt")
    with pytest.raises(TnasError, match="best.pt.*refusing"):
        load_checkpoint(out / "best.pt")
    from script_loader import load_script

    evaluate = load_script("scripts/evaluate.py")
    result = run_in_process(evaluate.main, ["--checkpoint", str(out / "best.pt"), "--episodes", "2",
                                            "--batch_size", "2", "--update_step_test", "1", "--device", "cpu",
                                            "--out", str(tmp_path / "eval")], capsys)
    assert_one_line_error(result, "best.pt", "refusing")
    result = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume")
    assert_one_line_error(result, "last.pt", "refusing")
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(tmp_path, quick_search):
    out = finished_run(quick_search, tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)  # would raise on anything else
        assert state["stage"] == "search"


# ------------------------------------------------------------------------- exclusive run directories
def test_second_run_into_a_busy_out_is_refused_and_the_first_is_intact(tmp_path, quick_search):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TNAS_PROGRESS="0", PYTHONPATH=REPO)
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "scripts", "search.py"), *TINY, "--out", str(out),
                              "--epochs", "2", "--tasks_per_epoch", "40", "--checkpoint_every", "1000"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "config.yaml").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        second = quick_search(out, "--epochs", "1", "--tasks_per_epoch", "4")
        assert_one_line_error(second, f"pid {first.pid}", str(out))
    finally:
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    summary = json.loads((out / "search.json").read_text())
    assert summary["epochs_done"] == 2 and summary["epochs"] == 2 and len(summary["history"]) == 2
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 40


def test_a_finished_or_failed_in_process_run_releases_its_out(tmp_path, quick_search):
    """A stage called as a library function owns --out only while it runs: afterwards another
    process may take it (e.g. a notebook run, then a script resuming it)."""
    done = finished_run(quick_search, tmp_path / "done")
    failed = tmp_path / "failed"
    result = quick_search(failed, "--epochs", "1", "--tasks_per_epoch", "4", "--n_way", "500")
    assert result.returncode == 2 and (failed / "run.lock").exists(), result.stderr
    for out in (done, failed):
        taken = another_process_can_lock(out / "run.lock")
        assert taken.stdout.strip() == "locked", (out, taken.stderr)


HOLD_OUT = "from tnas import run_dir\nrun_dir.claim_run_dir(sys.argv[1])\n"
HOLD_CACHE_BUILD = ("from tnas.data import cache\nbuilding = cache._build_lock(os.path.join(sys.argv[1], 'entry'))\n"
                    "assert building.__enter__()\n")


@pytest.mark.parametrize("hold, lock_file", [(HOLD_OUT, "run.lock"), (HOLD_CACHE_BUILD, "entry.lock")],
                         ids=["out", "cache_build"])
def test_a_killed_runs_forked_workers_do_not_keep_its_locks(tmp_path, hold, lock_file):
    """A run SIGKILLed while forked workers live (decoding a dataset): the workers shared its locks, and
    concurrent.futures' workers outlive their parent waiting for work, so every rerun was refused naming
    the dead pid (--out) or waited forever (a cache entry's build). A forked child now closes its copies,
    and the locks go with the run."""
    script = ("import multiprocessing, os, sys, time\n" + hold +
              "worker = multiprocessing.get_context('fork').Process(target=time.sleep, args=(120,))\n"
              "worker.start()\nprint(worker.pid, flush=True)\ntime.sleep(120)\n")
    run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=dict(os.environ, PYTHONPATH=REPO),
                           stdout=subprocess.PIPE, text=True)
    worker = int(run.stdout.readline())
    try:
        run.kill()
        run.wait(timeout=60)
        again = another_process_can_lock(tmp_path / lock_file)
        assert again.stdout.strip() == "locked", again.stderr
    finally:
        os.kill(worker, 9)
        run.stdout.close()


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, quick_search):
    afile = tmp_path / "afile"
    afile.write_text("not a directory\n")
    short = ["--epochs", "1", "--tasks_per_epoch", "2"]
    assert_one_line_error(quick_search(afile, *short), str(afile), "is a file")
    assert afile.read_text() == "not a directory\n"
    assert_one_line_error(quick_search(afile / "below", *short), "--out", "cannot write")


@pytest.mark.parametrize("flag", ["--checkpoint_every", "--log_every"])
def test_negative_intervals_are_refused(tmp_path, quick_search, flag):
    result = quick_search(tmp_path / "run", "--epochs", "1", "--tasks_per_epoch", "2", flag, "-1")
    assert_one_line_error(result, flag, "-1")
    assert not (tmp_path / "run").exists()


def test_stale_temp_files_of_a_killed_write_are_cleaned(tmp_path, quick_search):
    out = finished_run(quick_search, tmp_path / "run")
    stale = out / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]



def test_a_fresh_run_after_an_attempt_killed_before_its_first_checkpoint_logs_each_point_once(tmp_path, quick_search):
    """A run killed before its first last.pt is started again without --resume; the event files that attempt
    left in tb/ (tensorboardX writes its first points at once) are removed, as its log.txt is rewritten, so
    no point shows twice. The killed attempt is planted: an earlier run's tb/ without its last.pt."""
    from tb_events import summary_values

    out = finished_run(quick_search, tmp_path / "run", "--log_every", "1")
    want = sorted((tag, step) for tag, step, _ in summary_values(out / "tb"))
    for name in ("last.pt", "best.pt", "search.json"):
        os.unlink(out / name)
    again = finished_run(quick_search, out, "--log_every", "1")
    got = sorted((tag, step) for tag, step, _ in summary_values(again / "tb"))
    assert got == want and any(tag.startswith("meta_train/") for tag, _ in got)
    assert "removed" in (out / "log.txt").read_text()

# ------------------------------------------------------------------------- resume compatibility
@pytest.mark.parametrize("flags, keys", [
    (["--C", "8"], "C: 4 -> 8"),
    (["--n_way", "2"], "n_way"),
    (["--method", "auto_maml"], "method"),
])
def test_mismatched_resume_is_one_line_and_leaves_config_alone(tmp_path, quick_search, flags, keys):
    out = finished_run(quick_search, tmp_path / "run")
    config, log = (out / "config.yaml").read_bytes(), (out / "log.txt").read_bytes()
    result = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume", *flags)
    assert_one_line_error(result, "--resume", keys)
    assert (out / "config.yaml").read_bytes() == config and (out / "log.txt").read_bytes() == log


def test_resume_may_change_a_rerun_free_flag_such_as_cuda_graph(tmp_path, quick_search):
    """--cuda_graph (graphed or eager: the same steps) is rerun-free in the settings, so a resume may
    change it without --resume_override."""
    out = finished_run(quick_search, tmp_path / "run", "--cuda_graph", "off")
    resumed = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "search.json").read_text())["epochs_done"] == 2


def test_a_flag_newer_than_the_run_is_named_once_when_a_resume_turns_it_on(tmp_path, quick_search):
    """A run started before a flag existed has no line for it in config.yaml; a resume that runs with it on
    (a preset gained it) says so in the log, and only once: the resume writes the flag into config.yaml."""
    import yaml

    out = finished_run(quick_search, tmp_path / "run")
    config = yaml.safe_load((out / "config.yaml").read_text())
    del config["meta_lr_weights"]  # as if the flag were newer than the run
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    resumed = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    log = (out / "log.txt").read_text()
    assert "resuming with flags this run's config.yaml predates" in log and "--meta_lr_weights 0.001" in log
    again = quick_search(out, "--epochs", "3", "--tasks_per_epoch", "4", "--resume")
    assert again.returncode == 0, again.stderr
    assert (out / "log.txt").read_text().count("config.yaml predates") == 1


def test_resume_of_a_corrupt_checkpoint_leaves_config_alone(tmp_path, quick_search):
    out = finished_run(quick_search, tmp_path / "run")
    config = (out / "config.yaml").read_bytes()
    (out / "last.pt").write_bytes(b"\x00garbage, not a checkpoint")
    result = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume", "--meta_lr_weights", "0.5")
    assert_one_line_error(result, "last.pt")
    assert (out / "config.yaml").read_bytes() == config


@pytest.mark.parametrize("text", ["lr: [0.1, 0.2\n", "lr: !!python/object/apply:os.system ['touch {marker}']\n"])
def test_resume_with_a_corrupt_or_code_naming_config_yaml_is_one_line(tmp_path, text):
    """A run directory's config.yaml that is no YAML, or that names Python code (which safe_load refuses
    with a YAMLError, no ValueError), is refused on --resume in one line naming the file; nothing runs."""
    import argparse

    from tnas.checkpoints import save_checkpoint
    from tnas.run_dir import check_resume

    marker = tmp_path / "ran"
    save_checkpoint({"stage": "search", "summary": {}}, tmp_path / "last.pt")
    (tmp_path / "config.yaml").write_text(text.format(marker=marker))
    with pytest.raises(TnasError, match=r"--resume: cannot read .*config\.yaml") as raised:
        check_resume(argparse.Namespace(seed=3), str(tmp_path), "search")
    assert "\n" not in str(raised.value) and not marker.exists()


def test_changed_hyper_parameters_need_resume_override_and_are_recorded_per_epoch(tmp_path, quick_search):
    out = finished_run(quick_search, tmp_path / "run")
    config = (out / "config.yaml").read_bytes()
    refused = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume", "--meta_lr_weights", "0.01")
    assert_one_line_error(refused, "meta_lr_weights: 0.001 -> 0.01", "--resume_override")
    assert (out / "config.yaml").read_bytes() == config
    accepted = quick_search(out, "--epochs", "2", "--tasks_per_epoch", "4", "--resume", "--meta_lr_weights", "0.01",
                            "--resume_override")
    assert accepted.returncode == 0, accepted.stderr
    history = json.loads((out / "search.json").read_text())["history"]
    assert "overrides" not in history[0]  # epoch 1 ran with the original settings
    assert history[1]["overrides"] == {"meta_lr_weights": 0.01}
    records = json.loads((out / "overrides.json").read_text())
    assert records == [{"from_epoch": 2, "from_iteration": 2,
                        "changed": {"meta_lr_weights": {"was": 0.001, "now": 0.01}}}]
    assert b"meta_lr_weights: 0.001" in (out / "config.yaml").read_bytes()  # how the run started
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["learner"]["optimizers"]["weights"]["param_groups"][0]["lr"] == 0.01  # and it was used
    # back to the flags the run started with: from epoch 3 on, nothing is overridden
    back = quick_search(out, "--epochs", "3", "--tasks_per_epoch", "4", "--resume")
    assert back.returncode == 0, back.stderr
    history = json.loads((out / "search.json").read_text())["history"]
    assert history[1]["overrides"] == {"meta_lr_weights": 0.01} and "overrides" not in history[2]
    assert json.loads((out / "overrides.json").read_text())[-1] == {"from_epoch": 3, "from_iteration": 4,
                                                                    "changed": {}}


# ------------------------------------------------------------------------- NaN guard
def test_nan_gradient_under_a_finite_loss_keeps_the_last_good_checkpoint(tmp_path, quick_search, monkeypatch):
    from tnas.stages import common

    calls = {"n": 0}
    original = common.data_parallel

    def poisoned(learner, tasks_per_batch):
        def hook(params):  # runs between backward and the optimiser step
            calls["n"] += 1
            if calls["n"] == 3:
                params[0].grad.view(-1)[0] = float("nan")
        learner.gradient_hook = hook
        return original(learner, tasks_per_batch)

    monkeypatch.setattr(common, "data_parallel", poisoned)
    out = tmp_path / "run"
    result = quick_search(out, "--epochs", "1", "--tasks_per_epoch", "12", "--checkpoint_every", "1")
    assert_one_line_error(result, "non-finite gradient", "iteration 2")
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["iteration"] == 2
    for name, tensor in state["learner"]["model"].items():
        if tensor.is_floating_point():
            assert torch.isfinite(tensor).all(), name
    monkeypatch.setattr(common, "data_parallel", original)
    resumed = quick_search(out, "--epochs", "1", "--tasks_per_epoch", "12", "--checkpoint_every", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "search.json").read_text())["epochs_done"] == 1


# ------------------------------------------------------------------------- full disk
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_on_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from tnas import checkpoints

    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint({"iteration": torch.tensor(1)}, path)
    before = path.read_bytes()

    def partial_then_full(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        _enospc()

    monkeypatch.setattr(torch, "save", partial_then_full)
    with pytest.raises(TnasError, match="cannot write checkpoint .*last.pt: No space left on device; the previous"):
        checkpoints.save_checkpoint({"iteration": torch.tensor(2)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


def test_full_disk_while_building_a_cache_leaves_no_partial_entry(tmp_path, monkeypatch):
    from tnas.data import cache, load_split

    root = tmp_path / "mine"
    fx.build_class_folders(root, {"train": 3}, per_class=4)
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(os, "posix_fallocate", _enospc, raising=False)
    with pytest.raises(TnasError, match="No space left on device") as raised:
        load_split("folder", "train", data_path=str(root), cache_dir=str(cache_dir))
    assert "\n" not in str(raised.value)
    leftovers = [name for name in os.listdir(cache_dir / "folder") if not name.endswith(".lock")]
    assert leftovers == []
    monkeypatch.setattr(cache, "free_bytes", lambda directory: 1 << 20)
    with pytest.raises(TnasError, match="MiB free"):
        load_split("folder", "train", data_path=str(root), cache_dir=str(cache_dir))
    assert [name for name in os.listdir(cache_dir / "folder") if not name.endswith(".lock")] == []


def test_a_cache_entry_with_an_empty_npy_is_rebuilt(tmp_path):
    """An installed entry whose labels.npy is empty (what a crash leaves when the rename reached the disk
    before the data) is rebuilt, not a traceback: np.load raises EOFError on it, no OSError/ValueError."""
    from tnas.data import load_split

    root = tmp_path / "mine"
    fx.build_class_folders(root, {"train": 3}, per_class=4)
    first = load_split("folder", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))
    expected = np.array(first.labels)
    (labels,) = (tmp_path / "c").rglob("labels.npy")
    labels.write_bytes(b"")
    again = load_split("folder", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))
    assert np.array_equal(again.labels, expected) and labels.stat().st_size > 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name fsynced descriptors")
def test_a_cache_entry_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Every file of a new entry, and its directory, reach the disk before the rename that installs it."""
    from tnas.data import cache, load_split

    root = tmp_path / "mine"
    fx.build_class_folders(root, {"train": 3}, per_class=4)
    synced, real_fsync, real_install = set(), os.fsync, cache._install

    def recording_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def checked_install(tmp, directory):
        wanted = {os.path.realpath(os.path.join(tmp, name)) for name in os.listdir(tmp)} | {os.path.realpath(tmp)}
        assert wanted <= synced, sorted(wanted - synced)
        real_install(tmp, directory)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(cache, "_install", checked_install)
    load_split("folder", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))


def test_abandoned_cache_builds_are_removed_by_the_next_build(tmp_path):
    from tnas.data import load_split

    root = tmp_path / "mine"
    fx.build_class_folders(root, {"train": 3}, per_class=4)
    first = load_split("folder", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))
    abandoned = f"{os.path.dirname(first.cache_path)}/.{os.path.basename(first.cache_path)}.tmp-killed"
    os.makedirs(abandoned)
    np.save(os.path.join(abandoned, "images.npy"), np.zeros(3, np.uint8))
    fx.write_image(str(root / "train" / fx.wnid("train", 0) / "extra.png"), np.random.default_rng(7))
    load_split("folder", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))  # rebuilds
    assert not os.path.exists(abandoned)


# ------------------------------------------------------------------------- validated caches
def _first_image(root):
    folder = root / "train" / sorted(os.listdir(root / "train"))[0]
    return folder / sorted(os.listdir(folder))[0]


def test_an_image_changed_in_place_rebuilds_the_cache(tmp_path):
    from PIL import Image

    from tnas.data import load_split

    root = tmp_path / "mine"
    fx.build_class_folders(root, {"train": 3}, per_class=4)
    cache_dir = str(tmp_path / "cache")
    before = load_split("folder", "train", data_path=str(root), cache_dir=cache_dir, img_size=8)
    old = np.array(before.images[0])
    path = _first_image(root)
    with Image.open(path) as image:
        size, mode = image.size, image.mode
    Image.new(mode, size, color=(255,) * len(mode)).save(path, format=Image.open(path).format)
    stamp = os.stat(path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # a later edit, whatever the clock
    after = load_split("folder", "train", data_path=str(root), cache_dir=cache_dir, img_size=8)
    assert after.cache_path == before.cache_path and len(after) == len(before)
    assert not np.array_equal(np.array(after.images[0]), old)
    assert (np.array(after.images[0]) == 255).all()


def test_an_emptied_class_folder_is_an_error_even_with_a_cache(tmp_path):
    from tnas.data import load_split

    root = tmp_path / "mine"
    fx.build_class_folders(root, {"train": 3}, per_class=4)
    cache_dir = str(tmp_path / "cache")
    load_split("folder", "train", data_path=str(root), cache_dir=cache_dir, img_size=8)
    folder = _first_image(root).parent
    for name in os.listdir(folder):
        os.unlink(folder / name)
    with pytest.raises(TnasError, match=f"{folder.name}.* no "):
        load_split("folder", "train", data_path=str(root), cache_dir=cache_dir, img_size=8)


def test_a_csv_row_naming_a_missing_file_is_an_error_even_with_a_cache(tmp_path):
    from tnas.data import load_split

    root = tmp_path / "mini"
    fx.build_mini_csv(str(root))
    cache_dir = str(tmp_path / "cache")
    load_split("miniimagenet", "val", data_path=str(root), cache_dir=cache_dir, img_size=8)
    with open(root / "val.csv", "a", encoding="utf-8") as handle:
        handle.write("missing_image.jpg,n0000000\n")
    with pytest.raises(TnasError, match="missing_image.jpg"):
        load_split("miniimagenet", "val", data_path=str(root), cache_dir=cache_dir, img_size=8)


def test_data_path_for_glyphs_is_not_silently_ignored(tmp_path):
    from tnas.data import load_split

    with pytest.raises(TnasError, match="glyphs.*--data_path"):
        load_split("glyphs", "train", data_path=str(tmp_path), img_size=16)


# ------------------------------------------------------------------------- pickle allow-list
def test_pickle_allow_list_names_pairs_not_prefixes(tmp_path):
    """A dataset pickle naming ``numpy.f2py.__main__`` must not import it (importing runs f2py)."""
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"\x80\x02cnumpy.f2py.__main__\ndtype\nq\x00.")
    probe = ("import sys\nfrom tnas.data.safe_pickle import load_pickle\nfrom tnas.errors import TnasError\n"
             f"try:\n    load_pickle({str(path)!r})\nexcept TnasError as error:\n    print('refused:', error)\n"
             "print('imported' if 'numpy.f2py' in sys.modules else 'not imported')\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert "refused:" in result.stdout and "numpy.f2py.__main__.dtype" in result.stdout, result.stdout + result.stderr
    assert result.stdout.strip().endswith("not imported"), result.stdout


def test_pickle_allow_list_still_reads_numpy_arrays(tmp_path):
    from tnas.data.safe_pickle import load_pickle

    data = {"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "labels": [1, 2, 3]}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = load_pickle(str(path))
        assert np.array_equal(loaded["data"], data["data"]) and loaded["labels"] == [1, 2, 3]


# ------------------------------------------------------------------------- episode files
def test_episodes_file_holding_a_json_list_is_one_line(tmp_path):
    from tnas.data import FixedEpisodes, load_split

    split = load_split("glyphs", "test", img_size=16)
    bad = tmp_path / "episodes.json"
    bad.write_text("[1, 2, 3]\n")
    with pytest.raises(TnasError, match="episodes.json: not an episode file.*list") as raised:
        FixedEpisodes.load(bad, split, n_way=3, k_shot=1, q_query=2)
    assert "\n" not in str(raised.value)


def _spoilt_episodes(path, how):
    if how == "deep_json":
        path.write_text("[" * 100000 + "]" * 100000)
        return
    if how == "index_out_of_range":
        data = json.loads(path.read_text())
        data["indices"] = (np.asarray(data["indices"]) + 10 ** 6).tolist()
        path.write_text(json.dumps(data))
        return
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes({"truncated": data[:middle], "empty": b"",
                      "flipped_byte": data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]}[how])


@pytest.mark.parametrize("name, how", [("episodes.npz", "truncated"), ("episodes.npz", "empty"),
                                       ("episodes.npz", "flipped_byte"), ("episodes.json", "deep_json"),
                                       ("episodes.json", "index_out_of_range")])
def test_a_damaged_episodes_file_is_one_line_naming_it(tmp_path, name, how):
    """An --episodes_file someone sent that is damaged: one line naming the file (a damaged .npz fails in
    zipfile / zlib, deeply nested JSON in the decoder's recursion, none of them an OSError/ValueError)."""
    from tnas.data import FixedEpisodes, load_split

    split = load_split("glyphs", "test", img_size=16)
    path = tmp_path / name
    FixedEpisodes.generate(split, 3, 1, 2, episodes=4, seed=0).save(path)
    _spoilt_episodes(path, how)
    with pytest.raises(TnasError) as raised:
        FixedEpisodes.load(path, split, n_way=3, k_shot=1, q_query=2)
    assert str(raised.value).startswith(f"{path}: ") and "\n" not in str(raised.value)


# ------------------------------------------------------------------------- folder data keeps its shape
def _gray_folder(root, side=28, classes=3, per_class=4, mode="L"):
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(classes):
            for i in range(per_class):
                fx.write_image(str(root / split / f"class{c}" / f"{i}.png"), rng, size=(side, side), mode=mode)


def test_folder_default_shape_follows_the_data(tmp_path):
    from tnas.data import load_split

    _gray_folder(tmp_path / "gray")
    fx.write_image(str(tmp_path / "gray" / "train" / "class0" / "odd.png"), np.random.default_rng(1), size=(40, 30),
                   mode="L")
    split = load_split("folder", "val", data_path=str(tmp_path / "gray"), cache_dir=str(tmp_path / "c"))
    assert split.image_shape == (1, 28, 28)
    assert "28x28" in split.shape_note and "12 of 13" in split.shape_note and "grayscale" in split.shape_note
    _gray_folder(tmp_path / "rgb", side=20, mode="RGB")
    split = load_split("folder", "train", data_path=str(tmp_path / "rgb"), cache_dir=str(tmp_path / "c"))
    assert split.image_shape == (3, 20, 20) and "colour" in split.shape_note
    given = load_split("folder", "train", data_path=str(tmp_path / "gray"), cache_dir=str(tmp_path / "c"),
                       img_size=16, channels=3)
    assert given.image_shape == (3, 16, 16)


def test_an_image_over_pils_size_limit_in_a_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    """An image whose header claims more pixels than PIL allows (a decompression bomb) raises
    DecompressionBombError, no OSError: the shape probe of a folder dataset skips it as it skips other
    unreadable headers, and decoding names the file."""
    from PIL import Image

    from tnas.data import load_split

    _gray_folder(tmp_path / "gray")
    big = tmp_path / "gray" / "train" / "class1" / "big.png"
    fx.write_image(str(big), np.random.default_rng(1), size=(60, 60), mode="L")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 28x28 images pass, 60x60 is over twice that
    with pytest.raises(TnasError, match="big.png: Image size .*decompression bomb") as raised:
        load_split("folder", "train", data_path=str(tmp_path / "gray"), cache_dir=str(tmp_path / "c"))
    assert str(big) in str(raised.value) and "\n" not in str(raised.value)


def test_folder_shape_choice_is_in_the_run_log_and_inspect_data(tmp_path, quick_search, capsys):
    from script_loader import load_script

    _gray_folder(tmp_path / "gray", per_class=4, classes=4)
    flags = [flag for flag in TINY if flag not in ("glyphs", "--dataset", "--img_size", "16")]
    result = run_in_process(search_main, flags + ["--dataset", "folder", "--data_path", str(tmp_path / "gray"),
                                                  "--out", str(tmp_path / "run"), "--epochs", "1",
                                                  "--tasks_per_epoch", "2", "--cache_dir", str(tmp_path / "c")],
                            capsys)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "folder images at 28px, 1 channel(s)" in log and "every image is grayscale" in log
    summary = json.loads((tmp_path / "run" / "search.json").read_text())
    assert summary["image_shape"] == [1, 28, 28]
    inspect = load_script("scripts/inspect_data.py")
    capsys.readouterr()
    inspect.main(["--dataset", "folder", "--data_path", str(tmp_path / "gray"), "--cache_dir", str(tmp_path / "c"),
                  "--split", "train", "--out", str(tmp_path / "inspect"), "--n_way", "2", "--k_shot", "1",
                  "--q_query", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["image_shape"] == [1, 28, 28] and "grayscale" in report["image_shape_chosen_because"]


def test_readme_promises_name_tests_that_exist():
    import re

    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("### What tnas promises"):]
    section = section[:section.index("\n## ")]
    named = re.findall(r"`(?:tests/(test_\w+)\.py::)?(test_\w+)`", section)
    assert len(named) >= 10
    for module, name in named:
        with open(os.path.join(REPO, "tests", f"{module or 'test_faults'}.py"), encoding="utf-8") as handle:
            assert f"def {name}(" in handle.read(), name


def test_a_run_saved_on_more_gpus_resumes_on_fewer(monkeypatch):
    """The CUDA RNG states of a checkpoint are one per GPU the saving process saw; resuming where fewer
    are visible (a torchrun run on 8 GPUs resumed on one) sets the states of the GPUs there are."""
    from tnas import engine

    state = engine.rng_state()
    state["cuda"] = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    applied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda new_state, device="cuda": applied.append((device, new_state)))
    engine.set_rng_state(state)
    assert [(device, int(value[0])) for device, value in applied] == [(0, 1)]


def _rng_rank(rank, world_size, init_file, run_dir, out_file):
    """One rank of a toy data-parallel run (:mod:`toy_trainer`) whose steps draw ``rank + 1`` numbers from the
    torch generator (a draw for the rank's own work alone sets the ranks' generators apart): trained 6
    iterations straight, then killed after the checkpoint of iteration 4 and resumed. Rank 0 saves each
    rank's (learner state + its next draw) of both runs."""
    from datetime import timedelta

    import torch.distributed as dist

    from toy_trainer import Killed, toy_trainer
    from tnas import engine
    from tnas.config import seed_everything
    from tnas.runlog import RunLogger

    def trainer(name, **kill):
        out = os.path.join(run_dir, name)
        logger = RunLogger(os.path.join(out, f"rank{rank}"), use_tensorboard=False, quiet=True)
        schedule = engine.Schedule(epochs=2, tasks_per_epoch=3, tasks_per_batch=1, log_every=0, checkpoint_every=2)
        return toy_trainer(out, logger, schedule, draws=rank + 1, is_main=rank == 0, **kill)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        seed_everything(0)
        straight, run = trainer("straight")
        run.run()
        after = [float(straight.total) + float(torch.rand(()))]
        seed_everything(0)
        _, run = trainer("killed", kill_iteration=4)
        try:
            run.run()
        except Killed:
            pass
        dist.barrier()  # rank 0's last.pt is on disk
        seed_everything(0)  # a new process
        resumed, run = trainer("killed")
        run.resume()
        run.run()
        after.append(float(resumed.total) + float(torch.rand(())))
        totals = distributed.gather_to_main(after, distributed.current_info())
        if rank == 0:
            torch.save(totals, out_file)
    finally:
        dist.barrier()
        distributed.destroy_process_group()  # torch 2.4's own can deadlock


def test_each_data_parallel_rank_resumes_with_its_own_random_state(tmp_path):
    """Ranks whose torch generators drifted apart (here each rank draws its own count of numbers) each get
    their own back from rank 0's checkpoint, so a killed data-parallel run resumes to the same state on
    every rank; a resume with another number of processes continues from rank 0's, saying so."""
    import torch.multiprocessing as mp

    from tnas import engine
    from tnas.checkpoints import load_checkpoint

    out_file = str(tmp_path / "totals.pt")
    mp.spawn(_rng_rank, args=(2, str(tmp_path / "init"), str(tmp_path), out_file), nprocs=2, join=True)
    totals = torch.load(out_file, weights_only=True)
    assert totals[0][0] != totals[1][0]  # the ranks' generators drifted apart
    assert [resumed for _, resumed in totals] == [straight for straight, _ in totals]
    state = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert len(state["rank_rngs"]) == 2 and torch.equal(state["rng"]["torch"], state["rank_rngs"][0]["torch"])
    rng, note = engine.rng_state_for_this_rank(state)  # this test's single process
    assert rng is state["rng"] and "2 process(es), this run has 1" in note
    assert engine.rng_state_for_this_rank({"rng": state["rng"]}) == (state["rng"], None)


def test_full_disk_on_an_episodes_file_or_a_genotype_keeps_the_previous_one(tmp_path, monkeypatch):
    """The test-episode index file and a genotype's JSON are written like every other file a later stage
    reads (tnas.files): a failed write is one line and leaves the previous file, and no temp file."""
    from tnas.data import FixedEpisodes, load_split
    from tnas.genotypes import load_genotype, resolve_genotype, save_genotype

    split = load_split("glyphs", "test", img_size=16)
    first, second = (FixedEpisodes.generate(split, 5, 1, 2, episodes=3, seed=seed) for seed in (0, 1))
    genotype_path = tmp_path / "genotype.json"
    save_genotype(resolve_genotype("auto_maml_1shot"), str(genotype_path))
    for name in ("episodes.npz", "episodes.json"):
        first.save(tmp_path / name)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    monkeypatch.setattr(os, "fsync", _enospc)
    for name in ("episodes.npz", "episodes.json"):
        with pytest.raises(TnasError, match=f"cannot write episodes file .*{name}: No space left on device; the prev"):
            second.save(tmp_path / name)
    with pytest.raises(TnasError, match="cannot write .*genotype.json: No space left on device; the previous"):
        save_genotype(resolve_genotype("auto_maml_5shot"), str(genotype_path))
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert load_genotype(str(genotype_path)) == resolve_genotype("auto_maml_1shot")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in handle)
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_decoding_workers_end_with_a_run_killed_outright(tmp_path):
    """A run SIGKILLed while its decoding workers are busy takes them with it: orphans would wait for work
    forever, holding their memory."""
    script = ("import os, sys, time\nfrom tnas.data.decode import parallel_map\n"
              "def job(i):\n"
              "    open(os.path.join(sys.argv[1], f'worker{i}'), 'w').write(str(os.getpid()))\n"
              "    time.sleep(120)\n"
              "parallel_map(job, [0, 1], num_workers=2, parallel=True)\n")
    run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=dict(os.environ, PYTHONPATH=REPO))
    workers = []
    try:
        deadline = time.time() + 60
        while (len(workers) < 2 or not all(workers)) and time.time() < deadline:
            time.sleep(0.1)
            workers = [int((tmp_path / f"worker{i}").read_text() or 0) for i in range(2)
                       if (tmp_path / f"worker{i}").exists()]
        assert len(workers) == 2 and all(workers), "the workers did not start"
        run.kill()
        run.wait(timeout=60)
        deadline = time.time() + 10
        while any(_running(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_running(pid) for pid in workers), "a decoding worker outlived its killed run"
    finally:
        for pid in workers:
            if _running(pid):
                os.kill(pid, 9)
