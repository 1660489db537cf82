"""The decode stage: one architecture per test task from a T-NAS search checkpoint.

For each fixed test episode (the same episodes as the evaluate stage for the same
``--seed`` / ``--episodes`` / ``--episodes_file``, so episode i is the same task in both),
the meta-learned supernet adapts its weights and alphas on the task's support set with the
meta-test inner learning rates for ``--update_step_test`` steps (``--batch_size`` tasks at
once), and the adapted alphas are decoded by the DARTS rule
(:meth:`tnas.meta.tnas.TNAS.decode`).

Outputs: ``--out FILE`` (default ``<run_dir>/episode_genotypes.jsonl``), one line
``{"episode": i, "genotype": {...}}`` per episode, and ``decode_summary.json`` beside it:
how many episodes and distinct genotypes, and each distinct genotype with its count and
episodes, most frequent first. Both files are written atomically after success. Beside them,
what the tasks chose (:mod:`tnas.diversity`): ``op_frequency_{normal,reduce}.png`` (per edge, the
fraction of tasks keeping each op, beside the meta-architecture's choice) and
``genotype_diversity.json`` (distinct genotypes, tasks sharing the most common one, per-edge
entropy), also logged to tensorboard under ``tb/``.

Under torchrun the batches of episodes are dealt to the ranks as in the evaluate stage, and rank 0
alone writes and prints the same files and lines as one process (:func:`run`).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from tnas import distributed
from tnas.config import HelpFormatter, set_flag
from tnas.diversity import diversity_line, write_task_choices
from tnas.errors import TnasError
from tnas.evaluate import batch_starts, merge_batches, tasks_in
from tnas.files import atomic_write_bytes, atomic_write_json
from tnas.genotypes import genotype_counts, genotype_from_dict
from tnas.progress import StdoutLog, TaskProgress, progress_bar
from tnas.stages import evaluate as evaluate_stage

GENOTYPES_FILE = "episode_genotypes.jsonl"
SUMMARY_FILE = "decode_summary.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Decode one genotype per fixed test episode from a T-NAS search checkpoint (adapt weights "
                    "and alphas on each task's support set, then the DARTS rule).",
        formatter_class=HelpFormatter)
    evaluate_stage.add_checkpoint_args(parser)
    set_flag(parser, "out", metavar="FILE",
             help=f"JSON-lines output (default: <run_dir>/{GENOTYPES_FILE}); {SUMMARY_FILE} is written beside it")
    return parser


def settings_from_args(args: argparse.Namespace) -> evaluate_stage.CheckpointSettings:
    """The typed settings of the parsed flags (the CLI layer's only conversion)."""
    return evaluate_stage.CheckpointSettings.from_flags(vars(args))


def check_tnas_search(summary: Dict[str, object], checkpoint: str, user: str = "decode") -> None:
    """A one-line error unless the checkpoint is a T-NAS search (``user``: who needs one, for the message)."""
    stage, method = summary.get("stage"), summary.get("method")
    if stage != "search" or method != "tnas":
        what = f"a '{stage}' checkpoint" + (f" of method '{method}'" if method else "")
        extra = (" (auto-MAML searches one genotype for all tasks: train its run directory's best_genotype.json "
                 "with train_from_scratch.py --genotype RUN_DIR)" if method == "auto_maml" else "")
        raise TnasError(f"{user} needs a T-NAS search checkpoint (stage 'search', method 'tnas'); "
                        f"{checkpoint} is {what}{extra}")


def write_genotype_lines(path: str, genotypes: Sequence[Dict[str, Any]], ids: Optional[Sequence[str]] = None) -> None:
    """``{"episode": i, "genotype": {...}}`` per line (plus ``"genotype_id"`` when ``ids`` are given), atomically."""
    lines = []
    for index, genotype in enumerate(genotypes):
        line = {"episode": index, "genotype": genotype}
        if ids is not None:
            line["genotype_id"] = ids[index]
        lines.append(json.dumps(line) + "\n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def decode_record(prepared, args, genotypes: List[Dict[str, Any]], genotypes_file: str,
                  meta_genotype: Dict[str, Any], wall_time_s: float) -> Dict[str, Any]:
    """The ``decode_summary.json`` record (the decode stage's and the protocol's): the set-up, the
    distinct genotypes with their counts and episodes (most frequent first), and how many episodes
    keep the meta-architecture."""
    counts = genotype_counts(genotypes)
    return {
        "checkpoint": os.path.abspath(prepared.checkpoint), "method": prepared.summary.get("method"),
        "dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query,
        "episodes": len(genotypes), "distinct": len(counts), "update_step_test": args.update_step_test,
        "seed": evaluate_stage.episodes_seed(prepared, args),
        "episodes_file": os.path.abspath(args.episodes_file) if args.episodes_file else None,
        "split": prepared.split.name, "genotypes_file": os.path.abspath(genotypes_file),
        "meta_genotype": meta_genotype,
        "episodes_with_meta_genotype": sum(group["count"] for group in counts if group["genotype"] == meta_genotype),
        "counts": counts, "wall_time_s": wall_time_s,
    }


def decode_episodes(prepared, args, info: distributed.DistInfo, log=None) -> Optional[List[Dict[str, Any]]]:
    """The per-episode genotype dicts, in episode order, on rank 0 (None on the other ranks).

    The batches of ``args.batch_size`` episodes (the same batches as one process cuts,
    :func:`tnas.evaluate.batch_starts`) are dealt round robin to the ranks; each rank adapts and decodes
    its share (``args.update_step_test`` steps) and rank 0 gathers the shares and puts every episode in
    its place once (:func:`tnas.evaluate.merge_batches`): the same genotypes as one process. ``log``
    (a RunLogger or :class:`tnas.progress.StdoutLog`) gets about ten progress lines of this rank's
    share; without one, only a bar on a terminal.
    """
    episodes, learner, size = prepared.episodes, prepared.learner, args.batch_size
    mine = distributed.shard(batch_starts(len(episodes), size), info)
    meter = TaskProgress("decode", tasks_in(mine, len(episodes), size), len(mine), log=log) if log is not None else None
    genotypes: List[Dict[str, Any]] = []
    for start in meter.wrap(mine) if meter else progress_bar(mine, total=len(mine), desc="decode"):
        decoded = learner.decode(episodes.batch(slice(start, start + size), prepared.device),
                                 steps=args.update_step_test)
        genotypes.extend(genotype.to_dict() for genotype in decoded)
        if meter:
            meter.add(len(decoded))
    parts = distributed.gather_to_main({"starts": mine, "genotypes": genotypes}, info)
    if not info.is_main:
        return None
    return merge_batches(parts, len(episodes), size, ("genotypes",))["genotypes"]


def run(args: evaluate_stage.CheckpointSettings) -> Optional[Dict[str, object]]:
    """Decode the per-episode genotypes the settings describe; returns the summary (``decode_summary.json``),
    None on the other ranks under torchrun.

    Under torchrun the batches of episodes are dealt to the ranks (:func:`decode_episodes`), each on its
    own device (``cuda:LOCAL_RANK`` mod the GPUs; the ranks talk over gloo, only genotypes travel);
    rank 0 writes ``--episodes_file`` before the others read it, and alone writes the files and prints:
    the same files as one process.
    """
    started = time.time()
    if args.out and os.path.isdir(args.out):
        raise TnasError(f"--out {args.out} is a directory; give a file name "
                        f"(e.g. {os.path.join(args.out, GENOTYPES_FILE)})")
    with evaluate_stage.prepared_on_ranks(args, check_summary=check_tnas_search) as (info, prepared):
        genotypes = decode_episodes(prepared, args, info, log=StdoutLog() if info.is_main else None)
        return _write(args, prepared, genotypes, started) if info.is_main else None


def _write(args, prepared, genotypes: List[Dict[str, Any]], started: float) -> Dict[str, object]:
    """Write the genotypes, the summary and what the tasks chose (rank 0), print where; the summary."""
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(prepared.checkpoint)), GENOTYPES_FILE)
    meta_genotype = prepared.learner.genotype().to_dict()
    summary = decode_record(prepared, args, genotypes, out, meta_genotype, time.time() - started)
    summary_path = os.path.join(os.path.dirname(os.path.abspath(out)), SUMMARY_FILE)
    write_genotype_lines(out, genotypes)
    atomic_write_json(summary_path, summary)
    diversity = write_task_choices(os.path.dirname(summary_path), genotypes, meta_genotype)
    top = summary["counts"][0]
    print(f"{len(genotypes)} episodes -> {summary['distinct']} distinct genotype(s); most common ({top['count']} "
          f"episodes): {genotype_from_dict(top['genotype'])}; {summary['episodes_with_meta_genotype']} episode(s) "
          f"keep the meta-architecture")
    print(f"genotypes: {out}")
    print(f"summary: {summary_path}")
    print(f"what the tasks chose: {diversity_line(diversity)}; {os.path.dirname(summary_path)}/"
          f"{{genotype_diversity.json,op_frequency_normal.png,op_frequency_reduce.png}}")
    return summary
