"""Rebuild a trained learner from a checkpoint of any stage (search or from-scratch training).

A checkpoint (``best.pt`` / ``last.pt``, written by :class:`~tnas.engine.MetaTrainer`) holds
``{"stage": "search" | "train", "summary": {...}, "learner": learner.state_dict(), ...}``;
the summary says which model and learner to build:

- ``stage "search"``, ``method "tnas"``: ``Supernet(**summary["model"])`` with
  ``TNAS(TNASConfig.from_dict(summary["learner"]))`` (adapts weights and alphas);
- ``stage "search"``, ``method "auto_maml"``: the auto-MAML supernet learner
  (:func:`tnas.meta.auto_maml.build_auto_maml_learner`), which adapts the weights only;
- ``stage "train"``: :func:`tnas.stages.train.build_learner` (the derived network, or Conv-4,
  with MAML or MAML++).

Then ``learner.load_state_dict(state["learner"])``. Every problem (missing or corrupt file,
a checkpoint of an unknown stage or method, weights that do not fit the described model) is
one :class:`~tnas.errors.TnasError` line.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from tnas.errors import TnasError
from tnas.genotypes import Genotype, genotype_from_dict
from tnas.runlog import load_checkpoint

STAGES = ("search", "train")
SEARCH_METHODS = ("tnas", "auto_maml")


def resolve_checkpoint(path: str) -> str:
    """A ``.pt`` file as is; a run directory -> its ``best.pt`` (one-line error when it has none)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        best = os.path.join(path, "best.pt")
        if os.path.isfile(best):
            return best
        last = os.path.join(path, "last.pt")
        hint = f" (it has last.pt: pass --checkpoint {last} to use it)" if os.path.isfile(last) else ""
        raise TnasError(f"run directory {path} has no best.pt{hint}")
    return path


def load_state(path: str) -> Dict[str, Any]:
    """Load a checkpoint and check it has the layout every stage writes (stage, summary, learner)."""
    state = load_checkpoint(path)
    missing = [key for key in ("stage", "summary", "learner") if key not in state]
    if missing:
        raise TnasError(f"{path} is not a tnas run checkpoint: no {', '.join(repr(k) for k in missing)} entry")
    if not isinstance(state["summary"], Mapping):
        raise TnasError(f"{path}: the checkpoint's summary is a {type(state['summary']).__name__}, not a dict")
    return state


def _search_learner(summary: Mapping[str, Any], device: torch.device):
    from tnas.meta.tnas import TNAS, TNASConfig
    from tnas.models.supernet import Supernet

    method = summary.get("method")
    if method == "tnas":
        model = Supernet(**summary["model"]).to(device)
        return TNAS(model, TNASConfig.from_dict(summary.get("learner", {})))
    if method == "auto_maml":
        from tnas.meta.auto_maml import build_auto_maml_learner

        return build_auto_maml_learner(summary, device)
    raise TnasError(f"unknown search method {method!r} in the checkpoint (known: {', '.join(SEARCH_METHODS)})")


def build_learner(state: Mapping[str, Any], device, source: str = "checkpoint"):
    """An untrained learner of the model and learner ``state["summary"]`` describes."""
    stage, summary = state.get("stage"), state["summary"]
    device = torch.device(device)
    if "model" not in summary:
        raise TnasError(f"{source}: the checkpoint's summary has no 'model' entry (stage {stage!r})")
    try:
        if stage == "search":
            return _search_learner(summary, device)
        if stage == "train":
            from tnas.stages.train import build_learner as build_train_learner

            return build_train_learner(summary, device)
    except TnasError as error:
        raise TnasError(f"{source}: {error}") from None
    except (TypeError, ValueError, KeyError) as error:
        raise TnasError(f"{source}: cannot rebuild the {stage} model from the checkpoint's summary "
                        f"({type(error).__name__}: {error})") from None
    raise TnasError(f"{source}: unknown checkpoint stage {stage!r} (known: {', '.join(STAGES)})")


def learner_from_state(state: Mapping[str, Any], device, source: str = "checkpoint"):
    """:func:`build_learner` then ``load_state_dict(state["learner"])``, in one-line errors."""
    learner = build_learner(state, device, source)
    try:
        learner.load_state_dict(state["learner"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())
        if len(reason) > 300:
            reason = reason[:300] + " ..."
        raise TnasError(f"{source}: the saved weights do not fit the model its summary describes: {reason}") from None
    return learner


def learner_from_checkpoint(path: str, device="cpu") -> Tuple[Any, Dict[str, Any]]:
    """``(learner, summary)`` of a checkpoint file or run directory (its ``best.pt``).

    The summary is the checkpoint's ``state["summary"]`` with ``"stage"`` added.
    """
    path = resolve_checkpoint(path)
    state = load_state(path)
    learner = learner_from_state(state, device, source=path)
    summary = dict(state["summary"])
    summary["stage"] = state["stage"]
    return learner, summary


def checkpoint_genotype(learner, summary: Mapping[str, Any]) -> Optional[Genotype]:
    """The architecture a checkpoint scores: the derived network's genotype, for a supernet the
    genotype decoded from its (meta-learned) alphas, and None for a fixed network (Conv-4)."""
    if summary.get("model", {}).get("kind", "network") != "network":
        return None
    if summary.get("stage") == "train" or "genotype" in summary.get("model", {}):
        genotype = summary["model"]["genotype"]
        return genotype if isinstance(genotype, Genotype) else genotype_from_dict(genotype, "checkpoint genotype")
    return learner.model.genotype()
