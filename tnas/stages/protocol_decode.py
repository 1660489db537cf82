"""The protocol's decoding step: per-episode genotypes decoded across ranks, and their cache.

The per-episode genotypes depend only on the checkpoint's bytes, the test episodes and the
adaptation settings (:func:`decode_cache_key`); the protocol writes them in the decode stage's
format (``episode_genotypes.jsonl`` and ``decode_summary.json``, the latter with the key) and
reuses them when a later invocation asks for the same key.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from tnas import distributed
from tnas.errors import TnasError
from tnas.files import atomic_write_json
from tnas.genotypes import genotype_from_dict
from tnas.stages.decode import GENOTYPES_FILE, SUMMARY_FILE, decode_record, write_genotype_lines
from tnas.stages.decode import decode_episodes as decode_to_main


def decode_cache_key(prepared, args) -> Dict[str, Any]:
    """What the per-episode genotypes depend on: the checkpoint's bytes, the episodes, the adaptation.
    Caches written before stay valid only while this stays byte-identical (tests pin it): the hashes are
    results.json's, the checkpoint's that of the bytes the supernet was read from (hashing the file again
    now could name a newer best.pt than the one decoded) and the episodes'
    :meth:`~tnas.data.episodes.FixedEpisodes.indices_sha256`."""
    episodes = prepared.episodes
    return {"checkpoint_sha256": prepared.provenance["checkpoint_sha256"],
            "episodes_sha256": episodes.indices_sha256(),
            "episodes": len(episodes), "split": prepared.split.name, "dataset": args.dataset,
            "image_shape": list(prepared.split.image_shape), "n_way": args.n_way, "k_shot": args.k_shot,
            "q_query": args.q_query, "update_step_test": args.update_step_test,
            "inner_lrs": {name: float(value) for name, value in sorted(prepared.learner.inner_lrs.items())}}


def read_decode_cache(out_dir: str, key: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """The cached per-episode genotypes when they were decoded with ``key``, else None."""
    summary_path, lines_path = os.path.join(out_dir, SUMMARY_FILE), os.path.join(out_dir, GENOTYPES_FILE)
    try:
        with open(summary_path, encoding="utf-8") as handle:
            if json.load(handle).get("cache_key") != key:
                return None
        with open(lines_path, encoding="utf-8") as handle:
            lines = [json.loads(line) for line in handle if line.strip()]
        if [line.get("episode") for line in lines] != list(range(key["episodes"])):
            return None
        return [genotype_from_dict(line["genotype"], lines_path).to_dict() for line in lines]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TnasError):
        return None


def decode_episodes(prepared, args, info: distributed.DistInfo, log=None) -> List[Dict[str, Any]]:
    """Per-episode genotypes on every rank: the decode stage's batches dealt round robin to the ranks and
    gathered on rank 0 (:func:`tnas.stages.decode.decode_episodes`: the same genotypes as one process),
    then sent back to every rank (each groups them into the genotypes it trains). ``log`` gets progress
    lines (this rank's share)."""
    return distributed.broadcast_from_main(decode_to_main(prepared, args, info, log=log), info)


def write_decode_files(out_dir: str, genotypes: List[Dict[str, Any]], ids: List[str], key: Dict[str, Any],
                       prepared, args, meta_genotype: Dict[str, Any], wall_time_s: float) -> None:
    """``episode_genotypes.jsonl`` (with each episode's genotype id) and ``decode_summary.json`` in the
    decode stage's format, plus the cache key."""
    lines_path = os.path.join(out_dir, GENOTYPES_FILE)
    write_genotype_lines(lines_path, genotypes, ids)
    record = decode_record(prepared, args, genotypes, lines_path, meta_genotype, wall_time_s)
    record["cache_key"] = key
    atomic_write_json(os.path.join(out_dir, SUMMARY_FILE), record)
