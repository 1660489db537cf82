"""Where an optimiser's ``step`` counters live, and loading saved optimiser state into this run's optimisers.

torch keeps Adam's per-parameter ``step`` counter (a 0-d tensor) on the CPU, and on the
parameter's device only for a capturable or fused parameter group (a CUDA graph must read and
increment it on the GPU). A counter on the GPU of an eager group costs one host read per
parameter per step (Adam reads it as a Python number for its bias corrections), so a run saved
with capturable optimisers (CUDA graphs) and resumed eagerly must move its counters back to the
CPU, and the converse (an eager checkpoint resumed graphed) moves them to the GPU
(:func:`tnas.meta.cuda_graph.make_optimizers_capturable`). Both go through :func:`place_step`.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch


def keeps_step_on_device(group: Mapping[str, Any]) -> bool:
    """Whether torch keeps the ``step`` counters of parameter group ``group`` on its parameters'
    device (capturable or fused groups) rather than on the CPU."""
    return bool(group.get("capturable") or group.get("fused"))


def place_step(step: torch.Tensor, group: Mapping[str, Any], param: torch.Tensor) -> torch.Tensor:
    """A ``step`` counter (0-d tensor) where torch keeps it for ``param`` of parameter group ``group``:
    float32 on the parameter's device when the group is capturable or fused (as torch's own
    ``load_state_dict`` casts it), else on the CPU with its dtype (float32, as torch creates it).
    The tensor itself when it is already there."""
    if keeps_step_on_device(group):
        return step.to(device=param.device, dtype=torch.float32)
    return step.to(device="cpu")


def place_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Move the ``step`` counters already in ``optimizer``'s state to where its groups keep them
    (:func:`place_step`), in place."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = place_step(step, group, param)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)`` keeping ``optimizer``'s own hyper-parameters and placing
    the ``step`` counters where ``optimizer`` keeps them.

    The moments and counters come from ``saved``; the group settings (learning rate, weight decay,
    betas, ``capturable``, ``fused``...) stay ``optimizer``'s, so a resume with changed flags
    (``--resume_override``) trains with the new ones, and an exact resume is unchanged. torch's own
    loader places ``step`` by the *saved* groups' flags, so a checkpoint of a graphed run (capturable
    groups) would leave the counters of an eager resume on the GPU; here they go to the CPU before
    torch sees them (``saved`` itself is not changed). Errors are torch's (a ValueError when the
    groups or their sizes differ).
    """
    own = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    saved_groups = list(saved["param_groups"])
    groups = [dict(saved_group, **settings) for saved_group, settings in zip(saved_groups, own)]
    groups += saved_groups[len(own):]  # a count mismatch: torch's error names it
    where: Dict[Any, tuple] = {}  # saved parameter id -> (this optimiser's group settings, parameter)
    for saved_group, group, settings in zip(saved_groups, optimizer.param_groups, own):
        for param_id, param in zip(saved_group["params"], group["params"]):
            where[param_id] = (settings, param)
    state = {}
    for param_id, entry in saved["state"].items():
        if param_id in where and torch.is_tensor(entry.get("step")):
            entry = dict(entry, step=place_step(entry["step"], *where[param_id]))
        state[param_id] = entry
    optimizer.load_state_dict(dict(saved, state=state, param_groups=groups))
