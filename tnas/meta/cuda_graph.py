"""Replay a whole meta-iteration as one CUDA graph.

A meta-iteration at the paper setting is tens of thousands of small kernels (docs/design.md
section 3): the GPU waits on the host that launches them. A CUDA graph records the
kernels of one call once and replays them with a single launch, so the host cost goes
away. Everything a meta-step does is capturable: the batched inner loop (tasks folded
into channel groups, or vmap; ``torch.autograd.grad``), the backward pass and Adam,
provided the optimisers are made capturable (:func:`make_optimizers_capturable`) and
nothing syncs with the host.

Use::

    make_optimizers_capturable(learner.optimizers.values())
    step = GraphedStep(lambda batch: learner.meta_step(batch))
    for batch in batches:          # same shapes every call
        stats = step(batch)

The first ``warmup`` calls run eagerly on a side stream (as torch's capture recipe asks),
the next one captures and replays, every later one copies the batch into the captured
input tensors and replays. Every call is a real step on its own batch, so a graphed run
takes the same steps as an eager one. A batch of other shapes runs eagerly. Python-side
values the step reads (an epoch-dependent loss weight or learning rate) are frozen at
capture: graph only steps whose settings do not change between calls, or use
:class:`KeyedGraphedStep`, which captures again whenever a key of those settings changes
(MAML++'s per-epoch schedules).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Hashable, Iterable, Optional, Tuple

import torch

BATCH_FIELDS = ("support_x", "support_y", "query_x", "query_y")


def make_optimizers_capturable(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Switch optimisers (Adam, AdamW, SGD...) to their capturable form, in place.

    Sets ``capturable=True`` on every parameter group and moves any ``step`` counters
    already in the state (a resumed run) to their parameter's device. Eager steps stay
    valid; only the capturable form may be recorded in a CUDA graph.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if "capturable" not in group:
                raise ValueError(f"{type(optimizer).__name__} has no capturable form")
            devices = {param.device.type for param in group["params"]}
            if devices != {"cuda"}:
                raise ValueError(f"capturable optimisers need every parameter on a CUDA device, "
                                 f"found {', '.join(sorted(devices))}")
            group["capturable"] = True
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                step = state.get("step")
                if torch.is_tensor(step) and step.device != param.device:
                    state["step"] = step.to(param.device, torch.float32)


def _shapes(batch) -> Tuple[Tuple[Tuple[int, ...], torch.dtype], ...]:
    return tuple((tuple(getattr(batch, name).shape), getattr(batch, name).dtype) for name in BATCH_FIELDS)


def _clone_outputs(value: Any) -> Any:
    """A copy of the tensors of ``value`` (a tensor, a dataclass of tensors, or a tuple/list of them):
    replays overwrite the captured outputs, so callers get copies they may keep."""
    if torch.is_tensor(value):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _clone_outputs(getattr(value, f.name))
                                             for f in dataclasses.fields(value)})
    if isinstance(value, (tuple, list)):
        return type(value)(_clone_outputs(item) for item in value)
    return value


class GraphedStep:
    """``step(batch)`` run as a replayed CUDA graph after ``warmup`` eager calls.

    Args:
        step: one training (or evaluation) step of a batch with ``support_x [T, N, C, H, W]``,
            ``support_y [T, N]``, ``query_x [T, M, C, H, W]``, ``query_y [T, M]`` on a CUDA
            device; it must not sync with the host (no ``.item()``, no printing of values).
            It returns tensors, or a dataclass / tuple of them (e.g. ``StepStats``).
        warmup: eager calls before the capture (at least 1; torch's recipe uses a few so
            that lazily created state, such as Adam's moments, exists before recording).
    """

    def __init__(self, step: Callable[[Any], Any], warmup: int = 3):
        if warmup < 1:
            raise ValueError("warmup must be >= 1")
        self.step = step
        self.warmup = warmup
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_batch: Any = None
        self.static_output: Any = None
        self._shapes = None
        self._side_stream: Optional[torch.cuda.Stream] = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, batch) -> Any:
        device = batch.support_x.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the batch is on {device}")
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(batch)
        if self.graph is None:
            self._capture(batch)
        elif _shapes(batch) != self._shapes:
            return self.step(batch)
        else:
            for name in BATCH_FIELDS:
                getattr(self.static_batch, name).copy_(getattr(batch, name), non_blocking=True)
        self.graph.replay()
        return _clone_outputs(self.static_output)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        # Warm-up and capture share one stream, so per-stream library handles (cuBLAS,
        # cuDNN workspaces) are created before recording, never during it.
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        return self._side_stream

    def _eager_on_side_stream(self, batch) -> Any:
        side = self._stream(batch.support_x.device)
        current = torch.cuda.current_stream(batch.support_x.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            output = self.step(batch)
        current.wait_stream(side)
        return output

    def _capture(self, batch) -> None:
        static = copy.copy(batch)
        for name in BATCH_FIELDS:
            setattr(static, name, getattr(batch, name).clone())
        torch.cuda.synchronize(batch.support_x.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream(batch.support_x.device)):
            self.static_output = self.step(static)
        self.static_batch, self.graph, self._shapes = static, graph, _shapes(batch)


class KeyedGraphedStep:
    """A :class:`GraphedStep` that starts over (warm-up, capture) whenever ``key()`` changes.

    For steps whose Python-side settings change now and then, e.g. MAML++ per epoch (the
    derivative order, the multi-step loss weights, a cosine learning rate): ``key()`` returns
    those settings, and each new value gets a graph of its own; the previous graph is
    released. Re-capturing once per epoch costs a few eager iterations out of thousands.
    """

    def __init__(self, step: Callable[[Any], Any], key: Callable[[], Hashable], warmup: int = 3):
        self.step, self.key, self.warmup = step, key, warmup
        self.current: Optional[GraphedStep] = None
        self._key: Any = None
        self.graphs = 0  # graphs started so far (one per distinct run of equal keys)

    def __call__(self, batch) -> Any:
        key = self.key()
        if self.current is None or key != self._key:
            self.current = None  # release the old graph and its memory pool before recording anew
            self.current = GraphedStep(self.step, warmup=self.warmup)
            self._key = key
            self.graphs += 1
        return self.current(batch)
