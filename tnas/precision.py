"""Float32 precision of a run: TF32 tensor-core arithmetic for CUDA matmuls and cuDNN convolutions.

TF32 keeps float32's range but rounds the inputs of a matmul or convolution to a 10-bit
mantissa, on the tensor cores of Ampere and later GPUs. It is off for matmuls and allowed for
cuDNN convolutions by PyTorch's own defaults; ``--tf32`` (:func:`hold_tf32`) turns it on for
both for the length of one run, so that the 1x1 convolutions the supernet computes as batched
matmuls (``ExecutionPlan.pointwise``) and the linear classifier use it too. The settings are
process-wide torch switches, so a run restores what it found when it ends: a stage called
from a notebook leaves the process as it was. On a CPU TF32 does not exist and the flag
changes nothing (the run's log says so).

The meta-gradient amplifies rounding (see the ``--amp`` tolerance test), so TF32 is an
option with a stated tolerance (``tests/test_precision.py``), not the default.

>>> with tf32(False):      # strict float32 inside, whatever the process had   # doctest: +SKIP
...     reference = meta_gradient()
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import torch

__all__ = ["TF32State", "tf32_state", "set_tf32_state", "tf32", "hold_tf32", "precision_name"]


@dataclass(frozen=True)
class TF32State:
    """Whether CUDA matmuls (cuBLAS) and cuDNN convolutions may use TF32."""

    matmul: bool
    cudnn: bool


def tf32_state() -> TF32State:
    """The process's current TF32 switches."""
    return TF32State(bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32))


def set_tf32_state(state: TF32State) -> None:
    torch.backends.cuda.matmul.allow_tf32 = state.matmul
    torch.backends.cudnn.allow_tf32 = state.cudnn


@contextlib.contextmanager
def tf32(enabled: bool = True) -> Iterator[TF32State]:
    """Within: TF32 on (``enabled``) or off for both CUDA matmuls and cuDNN convolutions; on exit the
    switches are as they were before (also after an exception). Yields the state inside."""
    previous = tf32_state()
    inside = TF32State(matmul=bool(enabled), cudnn=bool(enabled))
    set_tf32_state(inside)
    try:
        yield inside
    finally:
        set_tf32_state(previous)


_lock = threading.Lock()
_saved: List[TF32State] = []  # the switches before the first open run turned TF32 on (empty: no run holds it)
_holders = 0


def hold_tf32(enabled: bool, device: torch.device, log: Optional[Callable[[str], None]] = None) -> Callable[[], None]:
    """Turn TF32 on for a run (``--tf32``) and return the function that ends that run's hold.

    Runs that hold TF32 at the same time (a genotype batch opens one run per genotype and closes
    them in any order) share one hold: the first saves the process's switches, the last
    release restores them. ``enabled`` False changes nothing. ``log`` gets one line: TF32 on, or,
    on a device other than CUDA, that the flag has no effect there. The release is idempotent.
    """
    if not enabled:
        return lambda: None
    if device.type != "cuda":
        if log is not None:
            log(f"--tf32: no effect on {device.type} (TF32 is a CUDA tensor-core format); float32 as without it")
        return lambda: None
    global _holders
    with _lock:
        if _holders == 0:
            _saved.append(tf32_state())
        _holders += 1
        set_tf32_state(TF32State(matmul=True, cudnn=True))
    if log is not None:
        log("--tf32: CUDA matmuls and cuDNN convolutions in TF32 for this run (float32 range, 10-bit "
            "mantissa inputs; the process's settings come back when the run ends)")
    released = []

    def release() -> None:
        global _holders
        with _lock:
            if released:
                return
            released.append(True)
            _holders -= 1
            if _holders == 0:
                set_tf32_state(_saved.pop())

    return release


def precision_name(amp_dtype: Optional[torch.dtype], device: torch.device) -> str:
    """What a run's meta-training computes in, for its records: ``"bf16"`` (``--amp`` autocast),
    ``"tf32"`` (``--tf32``: CUDA matmuls in TF32; on a CUDA device only) or ``"fp32"``. Both flags
    change no run (a resume may switch them), so each epoch records the one it trained with."""
    if amp_dtype is not None:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))
    if device.type == "cuda" and tf32_state().matmul:
        return "tf32"
    return "fp32"
