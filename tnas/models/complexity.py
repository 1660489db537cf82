"""Size of a network: multiply-accumulates per image (ptflops, checked against a count by hand)."""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn


def conv_linear_macs(model: nn.Module, input_shape: Tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions and linear layers per image (forward hooks, batch 2).

    ``input_shape``: ``(C, H, W)``. Batch 2 because batch-statistics BatchNorm needs more
    than one value per channel.
    """
    totals = []

    def hook(module, inputs, output):
        per_image = output.numel() // output.shape[0]
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            totals.append(per_image * (module.in_channels // module.groups) * kh * kw)
        else:
            totals.append(per_image * module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return int(sum(totals))


def _subclass_hooks(model: nn.Module, mapping: Dict[type, Any]) -> Dict[type, Any]:
    """ptflops hooks for subclasses of the layers it knows (it matches exact types), such as
    the task-folding ``Conv2d`` / ``BatchNorm2d`` / ``Linear``: each gets its parent's hook."""
    hooks = {}
    for kind in {type(module) for module in model.modules()} - set(mapping):
        parent = next((base for base in kind.__mro__[1:] if base in mapping), None)
        if parent is not None:
            hooks[kind] = mapping[parent]
    return hooks


def ptflops_macs(model: nn.Module, input_shape: Tuple[int, ...]) -> Optional[int]:
    """ptflops' MAC count per image (its output silenced); None when ptflops is missing or fails."""
    try:
        from ptflops import get_model_complexity_info
        from ptflops.pytorch_ops import MODULES_MAPPING
    except ImportError:
        return None
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            macs, _ = get_model_complexity_info(model, tuple(input_shape), as_strings=False,
                                                print_per_layer_stat=False, ost=sink, verbose=False,
                                                custom_modules_hooks=_subclass_hooks(model, MODULES_MAPPING))
    except Exception:  # ptflops reports its own failures by returning None; be as lenient with raises
        return None
    return int(macs) if macs else None


def count_macs(model: nn.Module, input_shape: Tuple[int, ...]) -> Dict[str, object]:
    """``{"macs", "macs_conv_linear", "macs_source"}`` per image, counted on a float32 CPU copy of ``model``
    (any device or dtype); ``input_shape``: ``(C, H, W)``, e.g. ``(1, 16, 16)``. The parameter count is
    ``sum(p.numel() for p in model.parameters())``.

    ptflops (which adds BatchNorm, pooling and elementwise ops) when its figure is sane:
    at least the convolution + linear count and at most twice it; otherwise that count.
    """
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape is one image's (channels, height, width), got {tuple(input_shape)}")
    model = copy.deepcopy(model).cpu().float()
    by_hand = conv_linear_macs(model, input_shape)
    by_ptflops = ptflops_macs(model, input_shape)
    if by_ptflops is not None and by_hand <= by_ptflops <= 2 * by_hand:
        return {"macs": by_ptflops, "macs_conv_linear": by_hand, "macs_source": "ptflops"}
    return {"macs": by_hand, "macs_conv_linear": by_hand, "macs_source": "conv+linear"}
