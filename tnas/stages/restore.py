"""Rebuild a trained learner from a checkpoint of any stage (search or from-scratch training).

A checkpoint (``best.pt`` / ``last.pt``, written by :class:`~tnas.engine.MetaTrainer`) holds
``{"stage": "search" | "train", "summary": {...}, "learner": learner.state_dict(), ...}``;
the summary says which model and learner to build:

- ``stage "search"``, ``method "tnas"``: ``Supernet(**summary["model"])`` with
  ``TNAS(TNASConfig.from_dict(summary["learner"]))`` (adapts weights and alphas);
- ``stage "search"``, ``method "auto_maml"``: the auto-MAML supernet learner
  (:func:`tnas.meta.auto_maml.build_auto_maml_learner`), which adapts the weights only;
- ``stage "train"``: the derived network, or Conv-4 (:func:`tnas.models.factory.network_from_config`),
  with MAML or MAML++.

:data:`LEARNERS` maps ``(stage, method)`` to the function that builds it (method None: any);
every place that rebuilds a learner (restore, evaluate, decode, the protocol) goes through it.

Then ``learner.load_state_dict(state["learner"])``. Every problem (missing or corrupt file,
a checkpoint of an unknown stage or method, weights that do not fit the described model) is
one :class:`~tnas.errors.TnasError` line.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from tnas.config import resolve_device
from tnas.errors import TnasError
from tnas.genotypes import Genotype, genotype_from_dict
from tnas.meta.auto_maml import build_auto_maml_learner
from tnas.meta.maml_pp import MAMLConfig, MAMLPlusPlus
from tnas.meta.tnas import TNAS, TNASConfig
from tnas.models.factory import model_kind, network_from_config
from tnas.models.supernet import Supernet
from tnas.checkpoints import read_checkpoint


# -- the learner registry ------------------------------------------------------------------------
def _tnas_learner(summary: Mapping[str, Any], device: torch.device) -> TNAS:
    return TNAS(Supernet(**summary["model"]).to(device), TNASConfig.from_dict(summary.get("learner", {})))


def _scratch_learner(summary: Mapping[str, Any], device: torch.device) -> MAMLPlusPlus:
    model = network_from_config(summary["model"], float(summary.get("drop_path_prob", 0.0))).to(device)
    return MAMLPlusPlus(model, MAMLConfig.from_dict(summary["learner"]))


LEARNERS: Dict[Tuple[str, Any], Callable[[Mapping[str, Any], torch.device], Any]] = {
    ("search", "tnas"): _tnas_learner,
    ("search", "auto_maml"): build_auto_maml_learner,
    ("train", None): _scratch_learner,  # MAML or MAML++: the summary's learner settings say which
}
STAGES = tuple(dict.fromkeys(stage for stage, _ in LEARNERS))


def learner_builder(stage: Any, method: Any) -> Callable[[Mapping[str, Any], torch.device], Any]:
    """The registered builder of a ``(stage, method)`` checkpoint; a one-line error for unknown ones."""
    builder = LEARNERS.get((stage, method)) or LEARNERS.get((stage, None))
    if builder is not None:
        return builder
    if stage in STAGES:
        known = ", ".join(str(m) for s, m in LEARNERS if s == stage)
        raise TnasError(f"unknown {stage} method {method!r} in the checkpoint (known: {known})")
    raise TnasError(f"unknown checkpoint stage {stage!r} (known: {', '.join(STAGES)})")


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
    return load_state_and_sha256(path)[0]


def load_state_and_sha256(path: str) -> Tuple[Dict[str, Any], str]:
    """:func:`load_state` and the SHA-256 of the very bytes it read (:func:`tnas.checkpoints.read_checkpoint`:
    one read), for a record that names the weights it scored: a hash taken later (after the test data
    loaded, say) could name a newer ``best.pt`` of a run still training."""
    state, sha256 = read_checkpoint(path)
    missing = [key for key in ("stage", "summary", "learner") if key not in state]
    if missing:
        raise TnasError(f"{path} is not a tnas run checkpoint: no {', '.join(repr(k) for k in missing)} entry")
    if not isinstance(state["summary"], Mapping):
        raise TnasError(f"{path}: the checkpoint's summary is a {type(state['summary']).__name__}, not a dict")
    _check_summary_types(state["summary"], path)
    return state, sha256


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SUMMARY_TYPES: Tuple[Tuple[str, str, Callable[[Any], bool]], ...] = (
    ("model", "a dict", lambda value: isinstance(value, Mapping)),
    ("learner", "a dict", lambda value: isinstance(value, Mapping)),
    ("dataset", "a name", lambda value: isinstance(value, str)),
    ("method", "a name", lambda value: isinstance(value, str)),
    ("n_way", "an integer", _is_int),
    ("k_shot", "an integer", _is_int),
    ("q_query", "an integer", _is_int),
    ("image_shape", "[channels, height, width]",
     lambda value: isinstance(value, (list, tuple)) and len(value) == 3 and all(map(_is_int, value))),
)
"""The summary entries the stages read before rebuilding the learner (evaluate fills and checks its flags
from them), with the type each must have when present; a checkpoint written by tnas always has them so."""


def _check_summary_types(summary: Mapping[str, Any], path: str) -> None:
    """One line naming the entry of a checkpoint's summary that has the wrong type (a crafted or foreign
    checkpoint), instead of a traceback from the first stage that reads it."""
    for key, wanted, fits in _SUMMARY_TYPES:
        value = summary.get(key)
        if value is not None and not fits(value):
            shown = repr(value) if len(repr(value)) <= 60 else f"a {type(value).__name__}"
            raise TnasError(f"{path}: the checkpoint's summary has {key} {shown}, not {wanted}; "
                            f"it was not written by tnas")


def build_learner(state: Mapping[str, Any], device, source: str = "checkpoint"):
    """An untrained learner of the model and learner ``state["summary"]`` describes (``state``: a
    checkpoint's ``{"stage", "summary", ...}``)."""
    stage, summary = state.get("stage"), state["summary"]
    if "model" not in summary:
        raise TnasError(f"{source}: the checkpoint's summary has no 'model' entry (stage {stage!r})")
    try:
        return learner_builder(stage, summary.get("method"))(summary, torch.device(device))
    except TnasError as error:
        raise TnasError(f"{source}: {error}") from None
    except (TypeError, ValueError, KeyError) as error:
        raise TnasError(f"{source}: cannot rebuild the {stage} model from the checkpoint's summary "
                        f"({type(error).__name__}: {error})") from None


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

    ``device``: a ``torch.device``, or a name as the stages' ``--device`` takes it (``cpu``, ``cuda``,
    ``cuda:N``, ``auto``: the GPU when there is one), checked first (a TnasError for a GPU that is not
    there). The summary is the checkpoint's ``state["summary"]`` with ``"stage"`` added.
    """
    if isinstance(device, str):
        device = resolve_device(device)
    path = resolve_checkpoint(path)
    state = load_state(path)
    learner = learner_from_state(state, device, source=path)
    summary = dict(state["summary"])
    summary["stage"] = state["stage"]
    return learner, summary


def checkpoint_genotype(learner, summary: Mapping[str, Any]) -> Optional[Genotype]:
    """The architecture a checkpoint scores: the derived network's genotype, for a supernet the
    genotype decoded from its (meta-learned) alphas, and None for a fixed network (Conv-4)."""
    if model_kind(summary.get("model", {})) != "network":
        return None
    if summary.get("stage") == "train" or "genotype" in summary.get("model", {}):
        genotype = summary["model"]["genotype"]
        return genotype if isinstance(genotype, Genotype) else genotype_from_dict(genotype, "checkpoint genotype")
    return learner.model.genotype()
