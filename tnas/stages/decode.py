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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict

from tnas.errors import TnasError
from tnas.stages import evaluate as evaluate_stage

GENOTYPES_FILE = "episode_genotypes.jsonl"
SUMMARY_FILE = "decode_summary.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Decode one genotype per fixed test episode from a T-NAS search checkpoint (adapt weights "
                    "and alphas on each task's support set, then the DARTS rule).")
    evaluate_stage.add_checkpoint_args(parser)
    evaluate_stage._set_flag(parser, "out", metavar="FILE",
                             help=f"JSON-lines output (default: <run_dir>/{GENOTYPES_FILE}); "
                                  f"{SUMMARY_FILE} is written beside it")
    return parser


def _check_tnas_search(summary: Dict[str, object], checkpoint: str) -> None:
    stage, method = summary.get("stage"), summary.get("method")
    if stage != "search" or method != "tnas":
        what = f"a '{stage}' checkpoint" + (f" of method '{method}'" if method else "")
        extra = (" (auto-MAML searches one genotype for all tasks: see the run's genotype.json)"
                 if method == "auto_maml" else "")
        raise TnasError(f"decode needs a T-NAS search checkpoint (stage 'search', method 'tnas'); "
                        f"{checkpoint} is {what}{extra}")


def run(args) -> Dict[str, object]:
    """Decode the per-episode genotypes described by ``args``; returns the summary (``decode_summary.json``)."""
    from tnas.diversity import diversity_line, write_task_choices
    from tnas.evaluate import genotype_counts
    from tnas.progress import TaskProgress
    from tnas.runlog import atomic_write_bytes, atomic_write_json

    started = time.time()
    if args.out and os.path.isdir(args.out):
        raise TnasError(f"--out {args.out} is a directory; give a file name "
                        f"(e.g. {os.path.join(args.out, GENOTYPES_FILE)})")
    prepared = evaluate_stage.prepare(args, check_summary=_check_tnas_search)
    learner, episodes = prepared.learner, prepared.episodes
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(prepared.checkpoint)), GENOTYPES_FILE)

    genotypes = []
    total = math.ceil(len(episodes) / args.batch_size)
    meter = TaskProgress("decode", len(episodes), total)
    for batch in meter.wrap(episodes.batches(args.batch_size, prepared.device)):
        decoded = learner.decode(batch, steps=args.update_step_test)
        genotypes.extend(genotype.to_dict() for genotype in decoded)
        meter.add(len(decoded))
    meta_genotype = learner.genotype().to_dict()
    counts = genotype_counts(genotypes)
    summary_path = os.path.join(os.path.dirname(os.path.abspath(out)), SUMMARY_FILE)
    summary = {
        "checkpoint": os.path.abspath(prepared.checkpoint),
        "method": prepared.summary.get("method"),
        "dataset": args.dataset, "n_way": args.n_way, "k_shot": args.k_shot, "q_query": args.q_query,
        "episodes": len(genotypes),
        "distinct": len(counts),
        "update_step_test": args.update_step_test,
        "seed": episodes.seed if episodes.seed is not None else args.seed,
        "episodes_file": os.path.abspath(args.episodes_file) if args.episodes_file else None,
        "split": prepared.split.name,
        "genotypes_file": os.path.abspath(out),
        "meta_genotype": meta_genotype,
        "episodes_with_meta_genotype": sum(group["count"] for group in counts if group["genotype"] == meta_genotype),
        "counts": counts,
        "wall_time_s": time.time() - started,
    }
    lines = "".join(json.dumps({"episode": index, "genotype": genotype}) + "\n"
                    for index, genotype in enumerate(genotypes))
    atomic_write_bytes(out, lines.encode("utf-8"))
    atomic_write_json(summary_path, summary)
    diversity = write_task_choices(os.path.dirname(summary_path), genotypes, meta_genotype)
    top = counts[0]
    print(f"{len(genotypes)} episodes -> {len(counts)} distinct genotype(s); most common ({top['count']} "
          f"episodes): {_short(top['genotype'])}; {summary['episodes_with_meta_genotype']} episode(s) keep the "
          f"meta-architecture")
    print(f"genotypes: {out}")
    print(f"summary: {summary_path}")
    print(f"what the tasks chose: {diversity_line(diversity)}; {os.path.dirname(summary_path)}/"
          f"{{genotype_diversity.json,op_frequency_normal.png,op_frequency_reduce.png}}")
    return summary


def _short(genotype: Dict[str, object]) -> str:
    from tnas.genotypes import genotype_from_dict

    return str(genotype_from_dict(genotype))
