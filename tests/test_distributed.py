"""Data parallelism over 2 gloo ranks on CPU equals one process on the same tasks (drop-path masks included)."""
import contextlib
import faulthandler
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tnas import distributed
from tnas.data import EpisodeSampler, synthetic_split
from tnas.genotypes import PUBLISHED
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.network import Network
from tnas.models.supernet import Supernet
from tnas.stages import common

TASKS = 4


def make_learner():
    torch.manual_seed(0)
    model = Supernet(n_way=3, C=4, layers=1, steps=2, multiplier=2, in_channels=1).double()
    return TNAS(model, TNASConfig(inner_steps=1, inner_lr_weights=0.1, inner_lr_alphas=3.0))


def make_sampler(task_slice=None, tasks=TASKS):
    split = synthetic_split(num_classes=6, images_per_class=6, img_size=8, channels=1)
    return EpisodeSampler(split, n_way=3, k_shot=1, q_query=2, tasks_per_batch=tasks, seed=5, augment="flip",
                          task_slice=task_slice)


def double(batch):
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    return batch


def meta_iterations(learner, sampler, iterations=2):
    for _ in range(iterations):
        learner.meta_step(double(sampler.sample()))
    return {name: p.detach().clone() for name, p in learner.model.named_parameters()}


@contextlib.contextmanager
def gloo_rank(rank, world_size, init_file):
    """This process as rank ``rank`` of a gloo group (one thread), left on the way out (through
    :func:`tnas.distributed.destroy_process_group`: torch 2.4's own teardown can deadlock). A collective
    that waits a minute fails the test instead of hanging the suite, and so does a rank stuck anywhere
    else for 3 minutes (it prints its threads' Python stacks and exits: mp.spawn then fails the test)."""
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(180, exit=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        if dist.is_initialized():
            distributed.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def rank_main(rank, world_size, init_file, out_file):
    with gloo_rank(rank, world_size, init_file):
        learner = make_learner()
        task_slice = common.data_parallel(learner, TASKS)
        params = meta_iterations(learner, make_sampler(task_slice))
        if rank == 0:
            torch.save(params, out_file)


DROP_TASKS = 3  # not a multiple of 2 ranks: rank 0 computes tasks 0-1, rank 1 task 2


def make_derived_learner():
    """The from-scratch stage's learner (MAML++: per-step BN, learned rates, a query loss per step) on a
    derived network with drop-path on."""
    torch.manual_seed(0)
    model = Network(PUBLISHED["auto_maml_1shot"], n_way=3, C=4, layers=1, in_channels=1, drop_path_prob=0.3)
    config = MAMLConfig(inner_steps=2, inner_steps_test=2, inner_lr=0.1, meta_lr=1e-2, per_step_bn=True,
                        learn_inner_lr=True, multi_step_loss=True)
    return MAMLPlusPlus(model.double(), config)


def drop_path_iterations(learner, sampler):
    """Two meta-iterations with a validation-style evaluation between them (eval mode, 2 tasks: as many
    as rank 0 holds, which must not take the training window); parameters, validation accuracy and the
    torch generator's state after them."""
    learner.meta_step(double(sampler.sample()))
    validation = learner.evaluate(double(make_sampler(tasks=2).sample()))
    learner.meta_step(double(sampler.sample()), track_steps=True)
    params = {name: p.detach().clone() for name, p in learner.model.named_parameters()}
    return params, validation.query_accuracy, torch.get_rng_state()


def drop_path_rank(rank, world_size, init_file, out_dir):
    with gloo_rank(rank, world_size, init_file):
        learner = make_derived_learner()
        task_slice = common.data_parallel(learner, DROP_TASKS)
        result = drop_path_iterations(learner, make_sampler(task_slice, DROP_TASKS))
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))


def test_two_gloo_ranks_draw_the_drop_path_masks_of_one_process(tmp_path):
    """With drop-path on and 3 tasks on 2 ranks, every rank ends with one process's parameters and
    generator state: each draws the masks of the whole meta-batch and keeps its tasks' (float64)."""
    mp.spawn(drop_path_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    params, accuracy, rng = drop_path_iterations(make_derived_learner(), make_sampler(tasks=DROP_TASKS))
    for rank in range(2):
        rank_params, rank_accuracy, rank_rng = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        for name, value in params.items():
            torch.testing.assert_close(rank_params[name], value, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")
        assert torch.equal(rank_accuracy, accuracy)
        assert torch.equal(rank_rng, rng), f"rank {rank}'s generator drew other masks than one process"


def late_worker_rank(rank, world_size, init_file):
    """Rank 0 leaves the group while its gloo worker thread still holds the only reference to a collective's
    tensor (rank 0 dropped it; rank 1 comes a second late, so the collective still runs). A worker thread
    that a busy machine delays after a synchronous collective leaves the same behind; torch 2.4's own
    teardown then deadlocks (it waits for the worker while holding the GIL the worker needs)."""
    with gloo_rank(rank, world_size, init_file):
        if rank == 0:
            dist.all_reduce(torch.ones(3), async_op=True)  # the tensor and the work dropped at once
        else:
            time.sleep(1)
            dist.all_reduce(torch.ones(3))


def test_a_rank_leaves_the_group_while_its_gloo_worker_still_holds_a_dropped_tensor(tmp_path):
    mp.spawn(late_worker_rank, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def agreement_rank(rank, world_size, init_file, fake_nccl):
    """The host-side agreements of ``tnas.distributed`` on 2 gloo ranks (``fake_nccl``: the default group
    says it is NCCL, so the agreement goes through a gloo group of its own, as on GPUs)."""
    get_backend = dist.get_backend
    with gloo_rank(rank, world_size, init_file):
        try:
            if fake_nccl:
                dist.get_backend = lambda group=None: "nccl"
            info = distributed.current_info()
            assert distributed.min_across_ranks(5 if rank == 0 else 3, info) == 3
            assert distributed.any_rank_stopping(rank == 1) is True
            assert distributed.any_rank_stopping(False) is False
            assert distributed.any_rank_stopping(rank == 0) is True
            assert (distributed._host_group() is dist.group.WORLD) is not fake_nccl
            with distributed.local_process():  # a rank acting alone agrees with itself only
                assert distributed.any_rank_stopping(rank == 1) is (rank == 1)
        finally:
            dist.get_backend = get_backend  # the teardown asks the real backend (gloo)
            dist.barrier()  # neither rank leaves the group while the other still talks in it


@pytest.mark.parametrize("fake_nccl", [False, True])
def test_ranks_agree_on_a_stop_and_on_the_smallest_choice(tmp_path, fake_nccl):
    mp.spawn(agreement_rank, args=(2, str(tmp_path / "init"), fake_nccl), nprocs=2, join=True)


def test_leaving_tears_down_the_host_group_too(tmp_path):
    """A default group that says it is NCCL has a gloo host group of its own; leaving destroys both and
    forgets the host group (kept, it would hold both groups alive past the teardown)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    get_backend = dist.get_backend
    try:
        dist.get_backend = lambda group=None: "nccl"
        assert distributed._host_group() is not dist.group.WORLD and distributed._host_groups
    finally:
        dist.get_backend = get_backend
        distributed.destroy_process_group()
    assert not dist.is_initialized() and distributed._host_groups == []


SEARCH = ["--dataset", "glyphs", "--img_size", "16", "--device", "cpu", "--n_way", "3", "--q_query", "2",
          "--tasks_per_batch", "4", "--C", "4", "--layers", "1", "--inner_steps", "1", "--inner_steps_test", "1",
          "--val_episodes", "4", "--epochs", "1", "--tasks_per_epoch", "40", "--log_every", "2",
          "--checkpoint_every", "100", "--seed", "1"]


def stopping_rank(rank, world_size, init_file, out, cache_dir):
    """scripts/search.py as torchrun's rank ``rank`` runs it; only rank 1 gets a stop request, after its
    fourth iteration (as when torchrun's SIGTERM reaches the ranks one after another)."""
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), TNAS_PROGRESS="0",
                      TNAS_CACHE_DIR=cache_dir)
    from tnas import engine
    from tnas.config import parse_args
    from tnas.stages import search

    class LateStop(engine.StopRequest):
        checks = 0

        @property
        def requested(self):
            LateStop.checks += 1
            return rank == 1 and LateStop.checks >= 4

        @requested.setter
        def requested(self, value):
            pass

    engine.StopRequest = LateStop
    with gloo_rank(rank, world_size, init_file):
        try:
            search.run(search.settings_from_args(parse_args(search.build_parser(), [*SEARCH, "--out", out])))
            raise AssertionError("the run was not stopped")
        except KeyboardInterrupt:
            pass


def test_a_stop_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    """Ctrl-C / SIGTERM reaching rank 1 alone: both ranks leave after the same iteration, rank 0 saves that
    iteration's last.pt, and nobody hangs in mismatched collectives."""
    out = str(tmp_path / "run")
    cache_dir = os.environ.get("TNAS_CACHE_DIR", str(tmp_path / "cache"))
    mp.spawn(stopping_rank, args=(2, str(tmp_path / "init"), out, cache_dir), nprocs=2, join=True)
    lines = [open(os.path.join(out, *part, "log.txt")).read() for part in ((), ("rank1",))]
    stopped = [line for text in lines for line in text.splitlines() if "interrupted at iteration" in line]
    assert len(stopped) == 2 and all("interrupted at iteration 4;" in line for line in stopped), stopped
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["iteration"] == 4


def test_task_slices_cover_the_batch_once():
    for world in (1, 2, 3, 4):
        slices = [distributed.task_slice(7 if world < 4 else 4, distributed.DistInfo(rank, world)) for rank in range(world)]
        covered = [i for s in slices for i in range(s.start, s.stop)]
        assert covered == list(range(7 if world < 4 else 4))
    with pytest.raises(Exception, match="tasks_per_batch 2"):
        distributed.task_slice(2, distributed.DistInfo(0, 3))


def test_sliced_sampler_gives_the_matching_tasks_of_the_full_batch():
    full = make_sampler().sample()
    part = make_sampler(slice(1, 3)).sample()
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(full, name)[1:3], getattr(part, name)), name


def test_two_gloo_ranks_match_one_process(tmp_path):
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), out_file), nprocs=2, join=True)
    parallel = torch.load(out_file, weights_only=True)
    single = meta_iterations(make_learner(), make_sampler())
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_torchrun_search_with_two_ranks_matches_one_process(tmp_path):
    """scripts/search.py under torchrun (2 gloo ranks) ends with the parameters of a single process."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = ["--dataset", "glyphs", "--img_size", "16", "--device", "cpu", "--n_way", "3", "--q_query", "2",
            "--tasks_per_batch", "4", "--C", "4", "--layers", "1", "--inner_steps", "1", "--inner_steps_test", "1",
            "--val_episodes", "4", "--epochs", "1", "--tasks_per_epoch", "8", "--log_every", "1", "--seed", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TNAS_PROGRESS="0")
    script = os.path.join(repo, "scripts", "search.py")
    single = subprocess.run([sys.executable, script, *tiny, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    parallel = subprocess.run([*launcher, script, *tiny, "--out", str(tmp_path / "two")], env=env,
                              capture_output=True, text=True, timeout=300)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    for name, value in one["learner"]["model"].items():
        torch.testing.assert_close(two["learner"]["model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert one["history"][0]["train_accuracy"] == pytest.approx(two["history"][0]["train_accuracy"], abs=1e-6)
    assert (tmp_path / "two" / "rank1" / "log.txt").is_file()
    assert not (tmp_path / "two" / "rank1" / "last.pt").exists()


class FakeCuda:
    """Stands in for ``torch.cuda`` and ``dist.init_process_group`` on a machine with ``gpus`` GPUs."""

    def __init__(self, monkeypatch, gpus, local_rank, world_size=8):
        self.current, self.backend = None, None
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: setattr(self, "current", index))
        monkeypatch.setattr(dist, "is_initialized", lambda: False)
        monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: setattr(self, "backend", backend))


def test_meta_training_needs_a_gpu_per_process(monkeypatch):
    fake = FakeCuda(monkeypatch, gpus=2, local_rank=3)
    with pytest.raises(distributed.TnasError, match=r"process 3 .* 2 GPU\(s\).*--nproc_per_node=2"):
        distributed.init_distributed(torch.device("cuda"))
    assert fake.backend is None
    fake = FakeCuda(monkeypatch, gpus=2, local_rank=1)
    info = distributed.init_distributed(torch.device("cuda"))
    assert (fake.backend, fake.current) == ("nccl", 1)
    assert distributed.local_device(torch.device("cuda"), info) == torch.device("cuda", 1)


def test_shared_gpus_deal_processes_round_robin_over_gloo(monkeypatch):
    for local_rank, gpu in ((0, 0), (1, 1), (2, 0), (5, 1)):
        fake = FakeCuda(monkeypatch, gpus=2, local_rank=local_rank)
        info = distributed.init_distributed(torch.device("cuda"), share_gpus=True)
        assert (fake.backend, fake.current) == ("gloo", gpu)
        assert distributed.local_device(torch.device("cuda"), info) == torch.device("cuda", gpu)


def test_the_protocol_lets_processes_share_gpus(monkeypatch, tmp_path):
    from tnas.stages import protocol

    seen = {}

    class Joined(Exception):
        pass

    def fake_init(device, **kwargs):
        seen.update(kwargs)
        raise Joined

    monkeypatch.setattr(distributed, "init_distributed", fake_init)
    args = protocol.build_parser().parse_args(["--checkpoint", str(tmp_path), "--device", "cpu"])
    with pytest.raises(Joined):
        protocol.run(protocol.settings_from_args(args))
    assert seen["share_gpus"] is True


# -- a rank that fails under torchrun: one line from it, one from each rank it leaves stranded -------------------
PEER_GONE = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
             "[127.0.0.1]:28592. This is typically caused by a remote worker crashing.")


def run_cli_entry(main, capsys):
    from tnas.errors import cli_entry

    with pytest.raises(SystemExit) as stopped:
        cli_entry(main)
    return stopped.value.code, capsys.readouterr().err


def test_a_rank_stranded_by_a_failed_peer_says_so_in_one_line(monkeypatch, capsys):
    from tnas.errors import TnasError

    def collective_lost():
        raise RuntimeError(PEER_GONE)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    code, err = run_cli_entry(collective_lost, capsys)
    assert code == 1
    assert err == ("error: rank 0: stopped: another rank ended (its error is above or in its log): "
                   "Connection closed by peer [127.0.0.1]:28592\n")
    monkeypatch.setenv("RANK", "1")

    def bad_input():
        raise TnasError("no such file: /data/x.pkl")

    assert run_cli_entry(bad_input, capsys) == (2, "error: rank 1: no such file: /data/x.pkl\n")
    # any other RuntimeError stays a traceback (a bug must not hide behind a line), and so does a lost peer
    # outside a process group
    with pytest.raises(RuntimeError, match="shape mismatch"):
        from tnas.errors import cli_entry
        cli_entry(lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="closed by peer"):
        cli_entry(collective_lost)
    # a single process keeps the plain line
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_cli_entry(bad_input, capsys) == (2, "error: no such file: /data/x.pkl\n")


def test_a_lost_peer_after_the_group_was_left_is_still_one_line(monkeypatch, capsys):
    """The evaluate and protocol stages leave the process group in a ``finally``, so the group is gone when
    cli_entry sees the collective's error: raised by torch.distributed it is still the lost peer's one line;
    the same words raised elsewhere with no group (not a collective) keep their traceback; a WORLD_SIZE that
    is no integer leaves the line untagged instead of breaking it."""
    from tnas.errors import TnasError

    def raised_in(directory):
        def collective_lost():  # the error as work.wait() raises it, from a frame of that directory's file
            exec(compile(f"raise RuntimeError({PEER_GONE!r})", os.path.join(directory, "distributed_c10d.py"),
                         "exec"))
        return collective_lost

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    code, err = run_cli_entry(raised_in(os.path.dirname(dist.__file__)), capsys)
    assert (code, err) == (1, "error: rank 0: stopped: another rank ended (its error is above or in its log): "
                              "Connection closed by peer [127.0.0.1]:28592\n")
    from tnas.errors import cli_entry
    with pytest.raises(RuntimeError, match="closed by peer"):
        cli_entry(raised_in(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert run_cli_entry(lambda: (_ for _ in ()).throw(TnasError("bad flag")), capsys) == (2, "error: bad flag\n")


@pytest.mark.parametrize("leave_group", [False, True], ids=["group_kept", "group_left_in_finally"])
def test_torchrun_rank_failure_leaves_one_line_per_rank_and_no_traceback(tmp_path, leave_group):
    """A real 2-rank gloo torchrun: rank 1 stops with a TnasError while rank 0 waits in an all-reduce. Rank 1's
    line names it; rank 0 either reports the lost peer in one line or is ended by torchrun first (a race
    torchrun decides); neither prints a traceback. ``group_left_in_finally``: the main leaves the process group
    in a ``finally`` before cli_entry sees the error, as the evaluate and protocol stages do."""
    import subprocess
    import sys

    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "import time, torch\n"
        "from tnas import distributed\n"
        "from tnas.errors import TnasError, cli_entry\n"
        "def main():\n"
        "    info = distributed.init_distributed(torch.device('cpu'))\n"
        "    try:\n"
        "        if info.rank == 1:\n"
        "            time.sleep(1)\n"
        "            raise TnasError('bad file: /data/x.pkl')\n"
        "        distributed.sum_across_ranks(torch.ones(()))\n"
        "    finally:\n"
        f"        if {leave_group}:\n"
        "            distributed.shutdown(info)\n"
        "cli_entry(main)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert "error: rank 1: bad file: /data/x.pkl" in lines, result.stderr
    assert not [line for line in lines if line.startswith("[rank")], result.stderr  # no rank's traceback
    stranded = [line for line in lines if line.startswith("error: rank 0: ")]
    assert all(line.startswith("error: rank 0: stopped: another rank ended") for line in stranded), result.stderr
