"""The T-NAS protocol's scoring: each test episode adapted on its support set and scored on its query
set by its own genotype's trained network (``best.pt``), one genotype alone or a genotype batch at once.

A batch of genotypes (the protocol's ``--genotypes_per_batch``) is scored by one
:class:`~tnas.meta.genotype_batch.GenotypeBatchLearner` holding their trained networks: every call
adapts T episodes of each genotype in the same forward, genotype g's episodes in its channel groups.
Genotypes have different episode counts, so the genotypes of a batch are grouped by count
(:func:`count_groups`): within a group every genotype has the same number of episodes, so each call
takes the same number of episodes from each, nothing is padded or masked, and each episode gets
exactly the computation it gets alone (per-task batch statistics, per-task fast weights). A group of
one genotype is scored alone, as at ``--genotypes_per_batch 1``. With k genotypes in a group, a call
holds ``max(1, batch_size // k)`` episodes of each (``--batch_size`` tasks at once, at least one
per genotype): :func:`tnas.evaluate.evaluate_together`, which the validation of a genotype batch in
training uses too.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import torch

from tnas.errors import TnasError
from tnas.evaluate import chunks, evaluate_together, percent
from tnas.genotypes import canonical_key
from tnas.meta.genotype_batch import GenotypeBatchLearner
from tnas.models.factory import network_from_config
from tnas.models.genotype_batch import GenotypeBatchNetwork
from tnas.progress import TaskProgress
from tnas.stages import restore
from tnas.stages.batched_train import free_device_memory, out_of_memory
from tnas.stages.protocol_train import scratch_steps_test

Log = Callable[[str], None]


# -- the plan (pure) ------------------------------------------------------------------------------
def count_groups(counts: Sequence[int]) -> List[List[int]]:
    """Positions of ``counts`` grouped by equal count, groups in order of first occurrence:
    ``[1, 3, 1, 2, 3] -> [[0, 2], [1, 4], [3]]``."""
    groups: Dict[int, List[int]] = {}
    for position, count in enumerate(counts):
        groups.setdefault(int(count), []).append(position)
    return list(groups.values())


def scoring_calls(batches: Sequence[Sequence[int]], batch_size: int) -> int:
    """How many scoring calls ``batches`` (each a list of the episode counts of its genotypes) take."""
    return sum(len(chunks(counts[group[0]], len(group), batch_size))
               for counts in batches for group in count_groups(counts))


# -- one genotype ---------------------------------------------------------------------------------
def load_genotype_learner(run, device: torch.device):
    """The solo learner of ``run``'s ``best.pt`` (a :class:`~tnas.stages.protocol_train.GenotypeRun`); a
    one-line error when the checkpoint holds another genotype."""
    checkpoint = os.path.join(run.run_dir, "best.pt")
    learner, summary = restore.learner_from_checkpoint(checkpoint, device)
    actual = restore.checkpoint_genotype(learner, summary).to_dict()
    if canonical_key(actual) != canonical_key(run.genotype):
        raise TnasError(f"{checkpoint} is a network of another genotype than {run.id}; choose another --out")
    return learner


def _percent(accuracy: torch.Tensor) -> List[float]:
    # float32 fractions: round away their last-bit noise, as the evaluate stage does
    return [round(float(value), 4) for value in percent(accuracy)]


def score_learner(learner, episode_ids: Sequence[int], episodes, batch_size: int, steps: int, device,
                  meter=None) -> Dict[int, float]:
    """Episode index -> accuracy (percent) of one solo learner, ``batch_size`` episodes per call."""
    accuracies: Dict[int, float] = {}
    for start, size in chunks(len(episode_ids), 1, batch_size):
        chosen = list(episode_ids[start:start + size])
        stats = learner.evaluate(episodes.batch(chosen, device), steps=steps)
        accuracies.update(zip(chosen, _percent(stats.query_accuracy)))
        if meter is not None:
            meter.add(len(chosen), stats.query_accuracy)
    return accuracies


def score_genotype(run, episodes, args, device: torch.device, meter=None) -> Dict[int, float]:
    """Episode index -> accuracy (percent) of the genotype's best.pt, adapted on each episode's support set
    for the from-scratch networks' test steps (:func:`~tnas.stages.protocol_train.scratch_steps_test`).
    ``meter`` (a :class:`tnas.progress.TaskProgress`), when given, counts the scored batches."""
    return score_learner(load_genotype_learner(run, device), run.episodes, episodes, args.batch_size,
                         scratch_steps_test(args), device, meter)


# -- a batch of genotypes -------------------------------------------------------------------------
def batch_learner(learners: Sequence) -> GenotypeBatchLearner:
    """One :class:`GenotypeBatchLearner` holding the trained networks and learned rates of solo learners
    (:class:`~tnas.meta.maml_pp.MAMLPlusPlus` of derived networks, one settings); a ValueError naming
    the difference when they cannot share a batch."""
    first = learners[0]
    for g, learner in enumerate(learners[1:], 1):
        if learner.config != first.config:
            raise ValueError(f"genotype {g} was trained with other learner settings than genotype 0")
    reference = next(first.model.parameters())
    with torch.random.fork_rng(devices=[]):  # fresh layers, overwritten below: no draw moves the generator
        networks = [network_from_config(learner.model.config, getattr(learner.model, "drop_path_prob", 0.0)).to(
            dtype=reference.dtype, device=reference.device) for learner in learners]
    batch = GenotypeBatchLearner(GenotypeBatchNetwork.from_networks(networks), first.config)
    for g, learner in enumerate(learners):
        state = learner.state_dict()
        batch.load_genotype_state_dict(g, {"model": state["model"], "inner_lrs": state["inner_lrs"]})
    return batch


def score_batch(runs: Sequence, episodes, args, device: torch.device, meter=None,
                log: Optional[Log] = None) -> Dict[int, float]:
    """Episode index -> accuracy (percent) for every episode of ``runs`` (a genotype batch), each scored by
    its own genotype's ``best.pt``: genotypes with equal episode counts in one batch, the others alone.
    One genotype: :func:`score_genotype`. Genotypes that cannot share a batch (other shapes or settings),
    or a group that runs out of CUDA memory, are scored one at a time (said in ``log``)."""
    if len(runs) == 1:
        return score_genotype(runs[0], episodes, args, device, meter)
    learners = [load_genotype_learner(run, device) for run in runs]
    accuracies: Dict[int, float] = {}
    for group in count_groups([len(run.episodes) for run in runs]):
        if len(group) > 1:
            reason = None
            try:
                together = batch_learner([learners[i] for i in group])
                scored = evaluate_together(together, [runs[i].episodes for i in group], episodes, args.batch_size,
                                           scratch_steps_test(args), device, meter)
            except ValueError as error:  # other shapes or settings: refused by the batch before any step
                reason = " ".join(str(error).split())
            except RuntimeError as error:
                if not out_of_memory(error):
                    raise
                reason = "out of device memory"
            if reason is None:
                for i, (accuracy, _) in zip(group, scored):
                    accuracies.update(zip(runs[i].episodes, _percent(accuracy)))
                continue
            together = scored = None
            free_device_memory()
            if log is not None:
                log(f"scoring genotypes {', '.join(runs[i].id for i in group)} one at a time ({reason})")
        for i in group:
            accuracies.update(score_learner(learners[i], runs[i].episodes, episodes, args.batch_size,
                                            scratch_steps_test(args), device, meter))
    return accuracies


def scoring_progress(batches: Sequence[Sequence], batch_size: int, logger) -> TaskProgress:
    """Progress lines over this rank's scoring: every episode of every genotype in ``batches`` (lists of
    :class:`~tnas.stages.protocol_train.GenotypeRun`, each scored by :func:`score_batch`)."""
    counts = [[len(run.episodes) for run in batch] for batch in batches]
    meter = TaskProgress("score", sum(map(sum, counts)), scoring_calls(counts, batch_size), log=logger)
    meter.wrap(None)  # a bar that meter.add advances: the loop runs over genotypes, then their batches
    return meter
