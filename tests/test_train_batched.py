"""train_genotypes(..., genotypes_per_batch=G) (tnas.stages.batched_train) on tiny glyphs, on CPU.

Genotypes trained as one batch must write the run directories their solo runs write, with the
same per-epoch records and parameters (float32: rounding differences only), resume as a batch,
and fall back to solo runs (said in the log) where a batch cannot be formed or does not fit. The
batch validates its genotypes together (BatchedTrainer.validate): each genotype's validation record
must be the one its solo trainer computes (float64: exactly).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
import weakref

import pytest
import torch

from tnas.config import parse_args
from tnas.engine import MetaTrainer, Schedule
from tnas.errors import TnasError
from tnas.genotypes import PUBLISHED
from tnas.checkpoints import load_checkpoint
from tnas.stages import batched_train, restore, train
from tnas.stages.protocol_score import batch_learner

TINY = ["--dataset", "glyphs", "--img_size", "16", "--C", "4", "--layers", "1", "--n_way", "3", "--q_query", "2",
        "--tasks_per_batch", "2", "--tasks_per_epoch", "4", "--val_episodes", "4", "--val_batch_size", "4",
        "--inner_steps", "2", "--inner_steps_test", "3", "--inner_lr", "0.1", "--log_every", "1",
        "--checkpoint_every", "1", "--device", "cpu", "--threads", "1"]
MAML_PP = ["--method", "maml++", "--msl_epochs", "1", "--first_order_epochs", "1"]
TOLERANCE = 1e-5  # float32 on CPU: the batch sums in another order than a solo run


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return os.environ.get("TNAS_CACHE_DIR") or str(tmp_path_factory.mktemp("cache"))


def genotypes(count=3):
    """Published genotypes and a variant of the first (one op changed): the same shape, different choices."""
    found = [g.to_dict() for g in PUBLISHED.values()]
    variant = copy.deepcopy(found[0])
    variant["normal"][0] = ["sep_conv_3x3", 0]
    return (found + [variant])[:count]


def settings(cache_dir, *extra):
    return train.settings_from_args(parse_args(train.build_parser(), TINY + ["--cache_dir", cache_dir, *extra]))


def summary(run_dir):
    with open(os.path.join(run_dir, "train.json")) as handle:
        return json.load(handle)


def assert_same_run(solo_dir, batch_dir):
    """Same per-epoch records and best epoch; best.pt and last.pt hold the same solo-form learner state."""
    a, b = summary(solo_dir), summary(batch_dir)
    assert a["best_epoch"] == b["best_epoch"] and a["epochs_done"] == b["epochs_done"]
    assert a["model"] == b["model"] and a["learner"] == b["learner"]
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "val_accuracy", "val_ci95", "iteration", "meta_lr",
                    "first_order"):
            assert ra[key] == pytest.approx(rb[key], abs=TOLERANCE * 100), key
    for name in ("best.pt", "last.pt"):
        sa, sb = load_checkpoint(os.path.join(solo_dir, name)), load_checkpoint(os.path.join(batch_dir, name))
        assert (sa["epoch"], sa["iteration"]) == (sb["epoch"], sb["iteration"])
        assert sa["samplers"] == sb["samplers"] or str(sa["samplers"]) == str(sb["samplers"])
        for part in ("model", "inner_lrs"):
            ta, tb = sa["learner"][part], sb["learner"][part]
            assert sorted(ta) == sorted(tb), part
            for key in ta:
                assert torch.allclose(ta[key].double(), tb[key].double(), atol=TOLERANCE), (name, key)
        moments_a = sa["learner"]["optimizers"]["weights"]["state"]
        moments_b = sb["learner"]["optimizers"]["weights"]["state"]
        assert sorted(moments_a) == sorted(moments_b)
        for index in moments_a:
            assert torch.allclose(moments_a[index]["exp_avg"].double(), moments_b[index]["exp_avg"].double(),
                                  atol=TOLERANCE)


def test_batch_equals_solo_runs_resumes_as_a_batch_and_its_last_pt_resumes_alone(cache_dir, tmp_path, monkeypatch):
    chosen = genotypes(3)
    two = settings(cache_dir, *MAML_PP, "--epochs", "2")
    solo = [str(tmp_path / f"solo{i}") for i in range(3)]
    batch = [str(tmp_path / f"batch{i}") for i in range(3)]
    assert [r.status for r in train.train_genotypes(two, chosen, solo, log=lambda m: None)] == ["trained"] * 3
    # from here on: which runs validate alone, and how often a batch validates together
    alone_validated, together_validated = [], []
    solo_validate, batch_validate = MetaTrainer.validate, batched_train.BatchedTrainer.validate
    monkeypatch.setattr(MetaTrainer, "validate",
                        lambda self: alone_validated.append(self.run_dir) or solo_validate(self))
    monkeypatch.setattr(batched_train.BatchedTrainer, "validate",
                        lambda self: together_validated.append(self.learner.genotype_count) or batch_validate(self))

    lines = []
    one = settings(cache_dir, *MAML_PP, "--epochs", "1")
    # epoch 1 as a batch of 3, then (epochs 2) resumed as a batch
    started = time.time()
    first = train.train_genotypes(one, chosen, batch, log=lines.append, genotypes_per_batch=8)
    took = time.time() - started
    assert [r.status for r in first] == ["trained"] * 3
    # each run's wall time is its share of the batch's (the protocol's cost sums them), not all of it
    shares = [summary(run_dir)["wall_time_s"] for run_dir in batch]
    assert max(shares) < 0.5 * took and sum(shares) <= took
    alone = str(tmp_path / "alone")
    shutil.copytree(batch[0], alone)  # a batch-written last.pt, resumed by the solo path
    second = train.train_genotypes(two, chosen, batch, log=lines.append, genotypes_per_batch=3)
    assert [r.status for r in second] == ["resumed"] * 3
    assert not any("one at a time" in line or "out of device memory" in line for line in lines), lines
    assert alone_validated == [] and together_validated == [3, 3]  # epoch 1, then epoch 2 resumed
    for i in range(3):
        with open(os.path.join(batch[i], "log.txt")) as handle:
            log = handle.read()
        assert "trained in a batch of 3 genotypes" in log and "resumed from" in log and "epoch 2:" in log
        assert "validated together" in log
        # each genotype's progress lines (--log_every 1), as a solo run writes them
        assert "train epoch 1/1 iter 2/2" in log and "train epoch 2/2 iter 2/2" in log and "tasks/s" in log
        # --cuda_graph auto, resolved as for a solo run: eager on a CPU, saying why
        assert "cuda_graph auto: eager steps, not CUDA graphs: the device is cpu" in log and "), eagerly;" in log
        assert_same_run(solo[i], batch[i])
    assert train.train_genotypes(two, [chosen[0]], [alone], log=lambda m: None)[0].status == "resumed"
    assert alone_validated == [alone]
    assert_same_run(solo[0], alone)
    # best.pt restores as a solo learner, as the evaluate stage and the protocol read it
    learner, saved = restore.learner_from_checkpoint(os.path.join(batch[1], "best.pt"), torch.device("cpu"))
    assert restore.checkpoint_genotype(learner, saved).to_dict() == chosen[1]
    # a rerun skips every finished run
    again = train.train_genotypes(two, chosen, batch, log=lines.append, genotypes_per_batch=3)
    assert [r.status for r in again] == ["skipped"] * 3


def test_mixed_states_and_shapes_fall_back_to_solo_runs(cache_dir, tmp_path):
    chosen = genotypes(2)
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    train.train_genotypes(settings(cache_dir, "--epochs", "1"), chosen[:1], dirs[:1], log=lambda m: None)
    lines = []
    results = train.train_genotypes(settings(cache_dir, "--epochs", "2"), chosen, dirs, log=lines.append,
                                    genotypes_per_batch=2)
    assert [r.status for r in results] == ["resumed", "trained"]
    assert any("runs in different states" in line and "as 2 batch(es)" in line for line in lines), lines

    # two interrupted at one iteration and two new: a batch of each state, not four runs one at a time
    four = genotypes(3) + [copy.deepcopy(genotypes(3)[2])]
    four[3]["normal"][1] = ["sep_conv_3x3", 1]
    runs = [str(tmp_path / f"four{i}") for i in range(4)]
    train.train_genotypes(settings(cache_dir, "--epochs", "1"), four[:2], runs[:2], log=lambda m: None,
                          genotypes_per_batch=2)
    lines = []
    results = train.train_genotypes(settings(cache_dir, "--epochs", "2"), four, runs, log=lines.append,
                                    genotypes_per_batch=4)
    assert [r.status for r in results] == ["resumed", "resumed", "trained", "trained"]
    assert any("runs in different states" in line for line in lines), lines
    for run in runs:
        with open(os.path.join(run, "log.txt")) as handle:
            assert "trained in a batch of 2 genotypes" in handle.read().split("resumed from")[-1], run

    other = copy.deepcopy(chosen[1])
    other["normal_concat"] = [2, 3, 4]  # another concat length: another shape
    lines = []
    shaped = [str(tmp_path / "c"), str(tmp_path / "d")]
    results = train.train_genotypes(settings(cache_dir, "--epochs", "1"), [chosen[0], other], shaped,
                                    log=lines.append, genotypes_per_batch=2)
    assert [r.status for r in results] == ["trained", "trained"]
    assert any(line.startswith("cannot batch 2 genotypes") and "one at a time" in line for line in lines), lines
    assert summary(shaped[1])["epochs_done"] == 1


# -- validation together ----------------------------------------------------------------------------
class ValEpisodes:
    """Fixed float64 validation episodes (those of tests/test_protocol_score.py) with the FixedEpisodes
    calls a trainer makes: ``len``, ``batch(ids)``, ``batches(batch_size)``."""

    def __init__(self, count):
        from test_protocol_score import Episodes

        self.count, self.source = count, Episodes()

    def __len__(self):
        return self.count

    def batch(self, ids, device="cpu"):
        return self.source.batch(ids, device)

    def batches(self, batch_size, device="cpu"):
        for start in range(0, self.count, batch_size):
            yield self.batch(range(start, min(start + batch_size, self.count)), device)


class Lines:
    """A RunLogger stand-in keeping the lines."""

    def __init__(self):
        self.lines = []

    def log(self, line, echo=True):
        self.lines.append(line)


def solo_trainers(episodes, tmp_path, val_batch_size=2):
    """Three trained MAML++ genotypes (float64, learned rates and per-step BN moved), each in a solo
    MetaTrainer validating on ``episodes`` (3 adaptation steps), and their batch learner."""
    from test_protocol_score import trained

    learners = [trained(g) for g in range(3)]
    trainers = [MetaTrainer(learner, {}, None, episodes, str(tmp_path / f"run{g}"), Lines(),
                            Schedule(val_batch_size=val_batch_size), torch.device("cpu"), stage="train",
                            val_steps=3) for g, learner in enumerate(learners)]
    return trainers, batch_learner(learners)


def test_batched_validation_gives_each_genotype_its_solo_validation_in_float64(tmp_path):
    """5 episodes, 2 of each genotype per call (calls of 6, 6 and 3 tasks): each genotype's validation
    record equals its solo trainer's exactly; the same with one episode per call."""
    trainers, learner = solo_trainers(ValEpisodes(5), tmp_path)
    alone = [trainer.validate() for trainer in trainers]
    assert len({record["val_accuracy"] for record in alone}) == 3  # three different genotypes
    together = batched_train.BatchedTrainer(learner, trainers, print)
    assert together.val_per_genotype == 2
    assert together.validate() == alone
    together.val_per_genotype = 1
    assert together.validate() == alone
    assert all(trainer.logger.lines == [] for trainer in trainers)


def test_batched_validation_out_of_memory_takes_fewer_episodes_per_call_then_validates_alone(tmp_path, monkeypatch):
    trainers, learner = solo_trainers(ValEpisodes(4), tmp_path)
    alone = [trainer.validate() for trainer in trainers]
    evaluate, limit = batched_train.GenotypeBatchLearner.evaluate, [3]

    def evaluate_within(self, batch, *args, **kwargs):  # (mocked) CUDA memory for `limit` tasks at once
        if batch.support_x.shape[0] > limit[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (mocked)")
        return evaluate(self, batch, *args, **kwargs)

    monkeypatch.setattr(batched_train.GenotypeBatchLearner, "evaluate", evaluate_within)
    together = batched_train.BatchedTrainer(learner, trainers, print)
    assert together.validate() == alone and together.val_per_genotype == 1
    retry = "out of device memory validating 3 genotypes at once; retrying with 1 episodes of each per call"
    assert all(trainer.logger.lines == [retry] for trainer in trainers)
    limit[0] = 2  # not even one episode of each: every genotype validated alone, from then on
    assert together.validate() == [None] * 3 and together.val_per_genotype == 0
    assert trainers[0].logger.lines[-1] == "out of device memory validating 3 genotypes at once; validating each " \
                                           "genotype alone"
    assert together.validate() == [None] * 3 and len(trainers[0].logger.lines) == 2

    def broken(self, *args, **kwargs):
        raise RuntimeError("not memory")

    monkeypatch.setattr(batched_train.GenotypeBatchLearner, "evaluate", broken)
    with pytest.raises(RuntimeError, match="^not memory$"):  # any other error goes through
        batched_train.BatchedTrainer(learner, trainers, print).validate()


def test_genotypes_with_other_validation_episodes_are_validated_alone(tmp_path):
    trainers, learner = solo_trainers(ValEpisodes(3), tmp_path)
    trainers[2].val_episodes = ValEpisodes(4)
    together = batched_train.BatchedTrainer(learner, trainers, print)
    assert together.val_per_genotype == 0 and together.validate() == [None] * 3
    assert trainers[1].logger.lines == ["the genotypes of this batch have different validation episodes or steps; "
                                        "each is validated alone"]


def test_out_of_memory_halves_the_batch_and_retries(cache_dir, tmp_path, monkeypatch):
    """A (mocked) CUDA out-of-memory error in a batch's meta-step: halved to 2 + 1, then 1 + 1, same results.
    The failed batch's learner (its device memory) is gone before the halves start."""
    chosen = genotypes(3)
    solo = [str(tmp_path / f"solo{i}") for i in range(3)]
    train.train_genotypes(settings(cache_dir, "--epochs", "1"), chosen, solo, log=lambda m: None)
    step = batched_train.GenotypeBatchLearner.meta_step
    failed = []

    def meta_step(self, batch, *args, **kwargs):
        if self.genotype_count > 1:
            assert all(learner() is None for learner in failed), "a failed batch is still alive at its retry"
            failed.append(weakref.ref(self))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (mocked)")
        return step(self, batch, *args, **kwargs)

    monkeypatch.setattr(batched_train.GenotypeBatchLearner, "meta_step", meta_step)
    lines = []
    dirs = [str(tmp_path / f"batch{i}") for i in range(3)]
    results = train.train_genotypes(settings(cache_dir, "--epochs", "1"), chosen, dirs, log=lines.append,
                                    genotypes_per_batch=3)
    assert [r.status for r in results] == ["trained"] * 3
    assert "out of device memory with a batch of 3 genotypes; retrying with batches of 2" in lines
    assert "out of device memory with a batch of 2 genotypes; retrying with batches of 1" in lines
    assert len(failed) == 2
    for a, b in zip(solo, dirs):
        assert_same_run(a, b)


def test_cuda_graph_on_without_cuda_is_a_one_line_error_before_anything_is_written(cache_dir, tmp_path):
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(TnasError, match=r"^--cuda_graph needs a CUDA device; --device cpu is cpu$"):
        train.train_genotypes(settings(cache_dir, "--cuda_graph", "on"), genotypes(2), dirs, log=lambda m: None,
                              genotypes_per_batch=2)
    assert not any(os.path.exists(d) for d in dirs)


def test_genotypes_per_batch_below_one_is_an_error(cache_dir, tmp_path):
    with pytest.raises(TnasError, match=r"^--genotypes_per_batch must be >= 1, got 0$"):
        train.train_genotypes(settings(cache_dir), genotypes(1), [str(tmp_path / "a")], genotypes_per_batch=0)
    assert not os.path.exists(tmp_path / "a")


def test_automatic_genotypes_per_batch_from_measured_memory(monkeypatch):
    from tnas.stages.protocol_train import GIB, fit_genotypes_per_batch, genotypes_per_batch

    lines = []
    assert genotypes_per_batch(None, torch.device("cpu"), lines.append) == 1 and lines == []
    assert genotypes_per_batch(3, torch.device("cpu"), lines.append) == 3
    with pytest.raises(TnasError, match="--genotypes_per_batch must be >= 1, got -1"):
        genotypes_per_batch(-1, torch.device("cpu"), lines.append)
    # the fit: 2 GiB + 0.5 GiB per genotype, 0.8 of 40 GiB over 2 processes = 16 GiB -> 28
    fit = fit_genotypes_per_batch(int(2.5 * GIB), 3 * GIB, 40 * GIB, sharing=2)
    assert (fit.chosen, fit.base, fit.per_genotype, fit.budget) == (28, 2 * GIB, 0.5 * GIB, 16 * GIB)
    assert fit_genotypes_per_batch(GIB, 2 * GIB, 1000 * GIB).chosen == 64                # the cap
    assert fit_genotypes_per_batch(GIB, 2 * GIB, 1000 * GIB, count=5).chosen == 5       # the genotypes there are
    assert fit_genotypes_per_batch(10 * GIB, 20 * GIB, 5 * GIB).chosen == 1             # not even one: 1
    assert fit_genotypes_per_batch(2 * GIB, 2 * GIB, 10 * GIB).chosen == 4              # no growth: 2 GiB each

    # on (mocked) CUDA: 40 GiB free on one GPU shared by 2 processes, peaks measured at G = 1 and 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GIB, 141 * GIB))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    measured = []

    def measure(count):
        measured.append(count)
        return int((2 + 0.5 * count) * GIB)

    cuda = torch.device("cuda")
    assert genotypes_per_batch(None, cuda, lines.append, count=100, measure=measure) == 28 and measured == [1, 2]
    assert lines[-1] == ("--genotypes_per_batch 28: a batch's training (meta-steps, validation) measured at "
                         "2.500 GiB for 1 genotype and 3.000 GiB for 2 (base 2.000 + 0.500 GiB per genotype); 80% of "
                         "40.0 GiB free device memory shared by 2 processes fits 28, at most 100 (the genotypes per "
                         "process)")
    assert genotypes_per_batch(None, cuda, lines.append, count=3, measure=measure) == 3
    measured.clear()
    assert genotypes_per_batch(None, cuda, lines.append, count=1, measure=measure) == 1 and measured == []

    def too_big(count):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (mocked)")

    assert genotypes_per_batch(None, cuda, lines.append, count=10, measure=too_big) == 1
    assert "do not fit" in lines[-1]

    def no_reading(device=None):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_reading)
    assert genotypes_per_batch(None, cuda, lines.append, count=20, measure=measure) == 8 and "8 genotypes" in lines[-1]


def test_synthetic_batch_has_the_run_shape(cache_dir):
    batch = batched_train.synthetic_batch(settings(cache_dir), (1, 16, 16), genotypes=3)
    assert tuple(batch.support_x.shape) == (6, 3, 1, 16, 16) and tuple(batch.query_x.shape) == (6, 6, 1, 16, 16)
    assert batch.support_y.tolist()[0] == [0, 1, 2] and batch.query_y.tolist()[5] == [0, 0, 1, 1, 2, 2]


# -- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_graphed_batch_step_equals_eager_in_float64():
    """The train stage's batch step (batched_train.batch_step) replayed as a CUDA graph: the same
    parameters and statistics as eager steps, float64, MAML++ (per-step BN, learned rates, multi-step
    loss) across an epoch change that captures a second graph."""
    from test_genotype_batch import learner_settings, solo_network, stream
    from tnas.meta.cuda_graph import make_optimizers_capturable
    from tnas.meta.genotype_batch import GenotypeBatchLearner, stack_batches
    from tnas.models.genotype_batch import GenotypeBatchNetwork

    config = learner_settings("maml_pp")
    config.cosine_lr = False  # a graph freezes the outer learning rate until the next capture (per epoch)

    def learner():
        return GenotypeBatchLearner(GenotypeBatchNetwork.from_networks([solo_network(g).cuda() for g in range(3)]),
                                    config)

    eager, graphed = learner(), learner()
    # both capturable (batch_step makes the graphed one so): plain Adam's bias correction, a Python float,
    # differs from capturable Adam's float32 step tensor by ~1e-7 relative per step (test_gpu.graphed_and_eager)
    make_optimizers_capturable(eager.optimizers.values())
    eager_step, lines = batched_train.batch_step(eager, False), []
    graphed_step = batched_train.batch_step(graphed, True, lines.append)
    per_epoch, epochs = 6, 2
    for iteration in range(per_epoch * epochs):
        batch = stack_batches([stream(g, iteration) for g in range(3)]).to("cuda")
        for one in (eager, graphed):
            one.set_progress(iteration, per_epoch, epochs)
        track = iteration == 1  # a tracked step runs eagerly between replays
        want, got = eager_step(batch, track), graphed_step(batch, track)
        torch.testing.assert_close(got.query_loss, want.query_loss, rtol=1e-9, atol=1e-12)
    assert lines == [] and graphed_step.graphed.graphs == 2 and graphed_step.graphed.current.captured
    for g in range(3):
        want, got = eager.genotype_state_dict(g), graphed.genotype_state_dict(g)
        for part in ("model", "inner_lrs"):
            for key, value in want[part].items():
                torch.testing.assert_close(got[part][key], value, rtol=1e-9, atol=1e-11, msg=f"{g} {part} {key}")


def test_a_batch_training_peak_adds_validation_to_what_a_graph_keeps():
    """Graphed, a captured step's pool (its peak above the resident learner) stays reserved while
    validation runs, so the peaks add up; eager, the larger one is the run's."""
    assert batched_train.training_peak(10, 7, 4, graphed=True) == 13    # 4 resident + 6 pool + 3 validation
    assert batched_train.training_peak(10, 7, 4, graphed=False) == 10
    assert batched_train.training_peak(10, 25, 4, graphed=False) == 25
    assert batched_train.training_peak(10, 25, 4, graphed=True) == 31


def test_a_synthetic_batch_has_the_run_shape_or_the_validation_calls(cache_dir):
    tiny = settings(cache_dir, "--val_batch_size", "7")
    meta = batched_train.synthetic_batch(tiny, (1, 16, 16), 3)
    tasks = tiny.schedule.tasks_per_batch
    assert meta.support_x.shape == (3 * tasks, tiny.data.n_way * tiny.data.k_shot, 1, 16, 16)
    assert meta.query_y.shape == (3 * tasks, tiny.data.n_way * tiny.data.q_query)
    validation = batched_train.synthetic_batch(tiny, (1, 16, 16), 3, tiny.schedule.val_batch_size)
    assert validation.support_x.shape[0] == validation.query_x.shape[0] == 21
    assert torch.equal(validation.support_y[0], torch.arange(tiny.data.n_way).repeat_interleave(tiny.data.k_shot))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_memory_of_a_batch_is_measured_and_freed(cache_dir):
    """measure_peak_memory: a positive peak that grows with G, everything freed afterwards, no global draw."""
    tiny = settings(cache_dir).replace(device="cuda")
    device = torch.device("cuda")
    # once first: cuBLAS / cuDNN keep their workspaces in torch's allocator from their first use on
    batched_train.measure_peak_memory(tiny, genotypes(1), (1, 16, 16), device)
    before = torch.cuda.memory_allocated(device)
    torch.manual_seed(3)
    peaks = [batched_train.measure_peak_memory(tiny, genotypes(g), (1, 16, 16), device) for g in (1, 2, 3)]
    drawn = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(2))
    assert 0 < peaks[0] < peaks[1] < peaks[2], peaks
    assert torch.cuda.memory_allocated(device) == before
    # validation counts: many episodes per call raise the peak; a graph's kept step adds to it
    eager = [batched_train.measure_peak_memory(settings(cache_dir, "--val_batch_size", str(size), "--cuda_graph",
                                                        "off").replace(device="cuda"), genotypes(2), (1, 16, 16),
                                               device) for size in (1, 256)]
    graphed = batched_train.measure_peak_memory(settings(cache_dir, "--val_batch_size", "256", "--cuda_graph",
                                                         "on").replace(device="cuda"), genotypes(2), (1, 16, 16),
                                                device)
    assert eager[0] < eager[1] < graphed, (eager, graphed)
    assert torch.cuda.memory_allocated(device) == before
