"""Batched scoring of the protocol's test episodes (tnas.stages.protocol_score): the genotypes of a batch
adapted and scored together give every episode the accuracy (and loss) it gets alone (float64)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tnas.data.episodes import EpisodeBatch
from tnas.meta.genotype_batch import stack_batches
from tnas.meta.maml_pp import MAMLPlusPlus
from tnas.progress import TaskProgress
from tnas.stages import protocol_score
from tnas.stages.protocol_score import (batch_learner, chunks, count_groups, evaluate_together, score_batch,
                                        scoring_calls)
from test_genotype_batch import GENOTYPES, K_SHOT, N_WAY, Q_QUERY, SIDE, TOLERANCE, learner_settings, \
    solo_network, stream


class Episodes:
    """Fixed float64 test episodes: episode i is one task drawn from a generator seeded with i
    (``batch(ids)``: ``support_x [len(ids), N*K, 1, SIDE, SIDE]``, ..., as FixedEpisodes.batch)."""

    def batch(self, ids, device="cpu"):
        return stack_batches([self.episode(i) for i in ids]).to(device)

    @staticmethod
    def episode(i):
        generator = torch.Generator().manual_seed(5000 + int(i))
        images = lambda n: torch.randn(1, n, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)  # noqa: E731
        labels = lambda per: torch.randperm(N_WAY, generator=generator).repeat_interleave(per)[None]  # noqa: E731
        return EpisodeBatch(images(N_WAY * K_SHOT), labels(K_SHOT), images(N_WAY * Q_QUERY), labels(Q_QUERY))


def trained(g, name="maml_pp", genotype=None):
    """Genotype g's solo learner after two meta-steps (learned rates and per-step BN sets moved)."""
    network = solo_network(g)
    if genotype is not None:
        torch.manual_seed(g)
        network = type(network)(genotype, **{k: network.config[k] for k in ("n_way", "C", "layers", "in_channels")}
                                ).double()
    learner = MAMLPlusPlus(network, learner_settings(name))
    for iteration in range(2):
        learner.set_progress(iteration, 1, 2)
        learner.meta_step(stream(g, iteration))
    return learner


# -- the plan ---------------------------------------------------------------------------------------
def test_genotypes_are_grouped_by_episode_count_and_calls_counted():
    assert count_groups([1, 3, 1, 2, 3]) == [[0, 2], [1, 4], [3]]
    assert chunks(5, 1, 2) == [(0, 2), (2, 2), (4, 1)]
    assert chunks(5, 3, 7) == [(0, 2), (2, 2), (4, 1)]  # 7 tasks at once over 3 genotypes: 2 of each
    assert chunks(2, 64, 50) == [(0, 1), (1, 1)]        # at least one episode of each genotype per call
    # batch [1, 1, 3] at --batch_size 4: the two 1-episode genotypes in one call, the other alone in 1;
    # batch [5]: alone, 2 calls
    assert scoring_calls([[1, 1, 3], [5]], 4) == 1 + 1 + 2


# -- batched equals alone --------------------------------------------------------------------------
@pytest.mark.parametrize("name,batch_size", [("first_order", 4), ("maml_pp", 6)])
def test_batched_scoring_equals_scoring_alone_per_episode(name, batch_size):
    learners = [trained(g, name) for g in range(3)]
    episodes, ids = Episodes(), [[0, 1, 2], [3, 4, 5], [2, 7, 8]]  # genotypes 0 and 2 share episode 2
    calls = scoring_calls([[3, 3, 3]], batch_size)
    meter = TaskProgress("score", 9, calls, log=SimpleNamespace(log=lambda *a, **k: None))
    scored = evaluate_together(batch_learner(learners), ids, episodes, batch_size, 3, "cpu", meter)
    assert (meter.tasks, meter.batches) == (9, calls) and calls == (3 if batch_size == 4 else 2)
    for g, learner in enumerate(learners):
        accuracy, loss = scored[g]
        for position, episode in enumerate(ids[g]):
            alone = learner.evaluate(episodes.batch([episode]), steps=3)
            assert abs(float(loss[position]) - float(alone.query_loss[0])) <= TOLERANCE, (g, episode)
            assert float(accuracy[position]) == float(alone.query_accuracy[0]), (g, episode)


def test_score_batch_groups_by_count_and_falls_back_for_other_shapes(monkeypatch):
    other = copy.deepcopy(GENOTYPES[1])
    other = type(other)(other.normal, other.reduce, (1, 2, 3), other.reduce_concat)  # another concat length
    learners = {"a": trained(0), "b": trained(1), "c": trained(2), "d": trained(1, genotype=other)}
    monkeypatch.setattr(protocol_score, "load_genotype_learner", lambda run, device: learners[run.id])
    batched = []
    together = protocol_score.evaluate_together

    def spy(learner, episode_ids, *args, **kwargs):
        batched.append(learner.genotype_count)
        return together(learner, episode_ids, *args, **kwargs)

    monkeypatch.setattr(protocol_score, "evaluate_together", spy)
    runs = [SimpleNamespace(id=i, episodes=e) for i, e in (("a", [0, 1]), ("b", [2]), ("c", [3, 4]), ("d", [5]))]
    args = SimpleNamespace(batch_size=4, update_step_test=3)
    lines = []
    got = score_batch(runs, Episodes(), args, "cpu", log=lines.append)
    # a and c (2 episodes each) together; b and d (1 each) refused as a batch: one at a time, said once
    assert batched == [2]
    assert len(lines) == 1 and lines[0].startswith("scoring genotypes b, d one at a time (") and "concat" in lines[0]
    expected = {}
    for run in runs:
        expected.update(protocol_score.score_learner(learners[run.id], run.episodes, Episodes(), 4, 3, "cpu"))
    assert got == expected and sorted(got) == list(range(6))


# -- the record -------------------------------------------------------------------------------------
def _protocol_results(parts, episodes=5):
    """:func:`tnas.stages.protocol.results` of the ranks' ``parts`` for ``episodes`` test episodes, the
    other inputs stand-ins (two genotypes: even and odd episodes)."""
    from tnas.distributed import DistInfo
    from tnas.stages import protocol

    provenance = {"checkpoint": "/runs/search/best.pt", "checkpoint_sha256": "ab" * 32, "checkpoint_epoch": 3,
                  "checkpoint_iteration": 30, "episodes_sha256": "cd" * 32}
    prepared = SimpleNamespace(checkpoint="/runs/search/best.pt", provenance=provenance, episodes=SimpleNamespace(seed=0),
                               split=SimpleNamespace(name="glyphs/test", image_shape=(1, 16, 16)))
    args = SimpleNamespace(method="tnas", dataset="glyphs", n_way=5, k_shot=1, q_query=2, budget=False, seed=0,
                           episodes_file=None, update_step_test=1, batch_size=2)
    p = SimpleNamespace(args=args, prepared=prepared, schedule={}, decode_inner_lrs={}, info=DistInfo())
    ids = [f"g{e % 2:04d}" for e in range(episodes)]
    episodes_of = {gid: [e for e in range(episodes) if ids[e] == gid] for gid in dict.fromkeys(ids)}
    runs = {gid: {"best_val_accuracy": 50.0, "best_epoch": 1, "parameters": 10, "status": "trained", "run_dir": gid}
            for gid in episodes_of}
    return protocol.results(p, parts, [{}] * episodes, ids, {gid: {} for gid in episodes_of}, episodes_of, runs,
                            {"wall_time_s": 1.0})


def test_protocol_record_averages_every_episode_once_and_names_checkpoint_and_tasks():
    parts = [{"accuracies": {0: 20.0, 2: 40.0, 4: 60.0}}, {"accuracies": {1: 80.0, 3: 100.0}}]  # two ranks
    record = _protocol_results(parts)
    assert record["per_episode"] == [20.0, 80.0, 40.0, 100.0, 60.0] and record["episodes"] == 5
    assert record["accuracy_mean"] == pytest.approx(60.0)
    assert (record["checkpoint"], record["checkpoint_epoch"], record["checkpoint_iteration"]) == (
        "/runs/search/best.pt", 3, 30)
    assert record["checkpoint_sha256"] == "ab" * 32 and record["episodes_sha256"] == "cd" * 32
    from tnas.errors import TnasError
    with pytest.raises(TnasError, match=r"no accuracy for episode\(s\) \[3\]"):
        _protocol_results([parts[0], {"accuracies": {1: 80.0}}])
