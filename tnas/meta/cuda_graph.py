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

Under torchrun data parallelism a meta-batch is split across processes, whose gradients are
summed between backward and step: :class:`DataParallelGraphedStep` then replays the gradients
of a step (zero-grad, adaptation, query loss, backward) as the graph and runs the all-reduce
and the optimisers' steps eagerly after each replay.

Whether a stage graphs is ``--cuda_graph auto|on|off`` (default auto), decided by the pure
function :func:`resolve_cuda_graph`: auto graphs on CUDA devices (one process, or torchrun
data parallelism with the step in three phases) and runs eagerly, saying why in one line, on
a CPU or with a setting that changes inside a graph; ``on`` where that is impossible is an
error. A capture that fails at run time falls back to eager steps
(``GraphedStep(on_failure=...)``).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Hashable, Iterable, Optional, Tuple, Union

import torch

from tnas.meta.optim_state import place_step_counters

BATCH_FIELDS = ("support_x", "support_y", "query_x", "query_y")
CUDA_GRAPH_MODES = ("auto", "on", "off")
_OLD_SPELLINGS = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}


def cuda_graph_mode(value: Union[str, bool]) -> str:
    """``auto``, ``on`` or ``off`` from a flag or config value; the old boolean spellings of the
    switch (``true``/``false`` in a saved config, a bare ``--cuda_graph``) mean ``on``/``off``.
    A ValueError names the value otherwise."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    text = _OLD_SPELLINGS.get(text, text)
    if text not in CUDA_GRAPH_MODES:
        raise ValueError(f"--cuda_graph must be one of {', '.join(CUDA_GRAPH_MODES)}, got {value!r}")
    return text


@dataclasses.dataclass(frozen=True)
class GraphDecision:
    """Whether a stage replays its steps as CUDA graphs, and the one log line that says why."""

    enabled: bool
    reason: str


def resolve_cuda_graph(mode: Union[str, bool], device: Union[str, torch.device], splits_meta_batches: bool = False,
                       blocker: Optional[str] = None, device_flag: Optional[str] = None) -> GraphDecision:
    """Decide ``--cuda_graph``: a pure function of the request and the run's circumstances.

    Args:
        mode: ``auto``, ``on`` or ``off`` (or an old boolean spelling, :func:`cuda_graph_mode`).
        device: the device the stage runs on; graphs need a CUDA one.
        splits_meta_batches: torchrun data parallelism splits each meta-batch across ranks: the
            gradients of each step are graphed, their all-reduce and the step run eagerly
            (:class:`DataParallelGraphedStep`); this only changes the line that says so.
        blocker: a setting of the stage that changes inside a graph, as the requirement it
            breaks (e.g. ``"--cosine_unit epoch (...), got --cosine_unit iteration"``), or None.
        device_flag: the ``--device`` value as given, for the error text.
    Returns the decision; ``on`` where graphs cannot run raises a ValueError whose one line says why.
    """
    mode = cuda_graph_mode(mode)
    if mode == "off":
        return GraphDecision(False, "cuda_graph off: eager steps (--cuda_graph off)")
    device = torch.device(device)
    if device.type != "cuda":
        need = f"a CUDA device; --device {device_flag or device} is {device}"
        why = f"the device is {device}"
    elif blocker is not None:
        need, why = blocker, f"it needs {blocker}"
    elif splits_meta_batches:
        return GraphDecision(True, f"cuda_graph {mode}: the gradients of each untracked step replayed as one CUDA "
                                   f"graph on {device}, summed across the torchrun processes and stepped eagerly")
    else:
        return GraphDecision(True, f"cuda_graph {mode}: each untracked step replayed as one CUDA graph on {device}")
    if mode == "on":
        raise ValueError(f"--cuda_graph needs {need}")
    return GraphDecision(False, f"cuda_graph auto: eager steps, not CUDA graphs: {why}")


def capture_failure_logger(log: Callable[[str], None]) -> Callable[[BaseException], None]:
    """An ``on_failure`` for :class:`GraphedStep`: one log line naming the error (eager steps follow)."""
    def on_failure(error: BaseException) -> None:
        first_line = (str(error).strip().splitlines() or [""])[0]
        log(f"cuda_graph: the capture failed ({type(error).__name__}: {first_line}); running eager steps instead")
    return on_failure


def make_optimizers_capturable(optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Switch optimisers (Adam, AdamW, SGD...) to their capturable form, in place.

    Sets ``capturable=True`` on every parameter group and moves any ``step`` counters
    already in the state (a resumed run) to their parameter's device, as float32
    (:func:`tnas.meta.optim_state.place_step_counters`). Eager steps stay valid; only the
    capturable form may be recorded in a CUDA graph.
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
        place_step_counters(optimizer)


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
        on_failure: called with the error when the capture fails; the step then runs eagerly
            from that call on (the stages log one line). None: the error propagates.
        capture_error_mode: ``torch.cuda.graph``'s: ``"global"`` (default) or ``"thread_local"``,
            which lets other threads (a process group's) call CUDA during the capture.

    ``last_call`` says what the latest call did: ``"eager"``, ``"captured"`` (recorded, then
    replayed) or ``"replayed"``.
    """

    def __init__(self, step: Callable[[Any], Any], warmup: int = 3,
                 on_failure: Optional[Callable[[BaseException], None]] = None, capture_error_mode: str = "global"):
        if warmup < 1:
            raise ValueError("warmup must be >= 1")
        self.step = step
        self.warmup = warmup
        self.on_failure = on_failure
        self.capture_error_mode = capture_error_mode
        self.failed = False
        self.last_call = "eager"
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
        self.last_call = "eager"
        if self.failed:
            return self.step(batch)
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(batch)
        if self.graph is None:
            try:
                self._capture(batch)
            except Exception as error:  # a driver or op that cannot be captured: eager from now on
                if self.on_failure is None:
                    raise
                self.failed, self.graph, self.static_output = True, None, None
                self.on_failure(error)
            if self.failed:  # outside the handler, whose traceback holds the failed recording's tensors
                return self.step(batch)  # nothing ran during the failed recording: this batch's step
            self.last_call = "captured"
        elif _shapes(batch) != self._shapes:
            return self.step(batch)
        else:
            for name in BATCH_FIELDS:
                getattr(self.static_batch, name).copy_(getattr(batch, name), non_blocking=True)
            self.last_call = "replayed"
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
        with torch.cuda.graph(graph, stream=self._stream(batch.support_x.device),
                              capture_error_mode=self.capture_error_mode):
            self.static_output = self.step(static)
        self.static_batch, self.graph, self._shapes = static, graph, _shapes(batch)


class KeyedGraphedStep:
    """A :class:`GraphedStep` that starts over (warm-up, capture) whenever ``key()`` changes.

    For steps whose Python-side settings change now and then, e.g. MAML++ per epoch (the
    derivative order, the multi-step loss weights, a cosine learning rate): ``key()`` returns
    those settings, and each new value gets a graph of its own; the previous graph is
    released. Re-capturing once per epoch costs a few eager iterations out of thousands.
    """

    def __init__(self, step: Callable[[Any], Any], key: Callable[[], Hashable], warmup: int = 3,
                 on_failure: Optional[Callable[[BaseException], None]] = None, capture_error_mode: str = "global"):
        self.step, self.key, self.warmup, self.on_failure = step, key, warmup, on_failure
        self.capture_error_mode = capture_error_mode
        self.failed = False
        self.last_call = "eager"  # as GraphedStep's
        self.current: Optional[GraphedStep] = None
        self._key: Any = None
        self.graphs = 0  # graphs started so far (one per distinct run of equal keys)

    def __call__(self, batch) -> Any:
        self.last_call = "eager"
        if self.failed:  # one capture failed: do not try again at every key
            return self.step(batch)
        key = self.key()
        if self.current is None or key != self._key:
            self.current = None  # release the old graph and its memory pool before recording anew
            self.current = GraphedStep(self.step, warmup=self.warmup, on_failure=self.on_failure,
                                       capture_error_mode=self.capture_error_mode)
            self._key = key
            self.graphs += 1
        output = self.current(batch)
        self.failed = getattr(self.current, "failed", False)
        self.last_call = getattr(self.current, "last_call", "eager")
        return output


class GraphGradients:
    """A graphed step (:class:`GraphedStep` or :class:`KeyedGraphedStep`) after whose every call the
    ``.grad`` of ``params`` are the gradients that call computed.

    A capture leaves the ``.grad`` of the parameters as tensors of the graph, and every replay writes
    those tensors in place; an eager call in between (a tracked step, with per-step statistics)
    points the ``.grad`` at new tensors, and a replay cannot point them back (it runs no Python).
    So after each replay they are pointed at the graph's again, and what reads ``.grad`` after a
    step (the finite-gradient guard, an all-reduce) sees this step's. The rest (``failed``,
    ``last_call``, ``graphs``, ``current``) is the graphed step's.
    """

    def __init__(self, graphed, params: Iterable[torch.Tensor]):
        self.graphed, self.params = graphed, list(params)
        self._graph_grads: list = []  # the .grad tensors the current graph writes

    def __call__(self, batch) -> Any:
        output = self.graphed(batch)
        if self.graphed.last_call == "captured":
            self._graph_grads = [param.grad for param in self.params]
        elif self.graphed.last_call == "replayed":
            for param, grad in zip(self.params, self._graph_grads):
                param.grad = grad
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["graphed"], name)


class DataParallelGraphedStep:
    """A meta-step under torchrun data parallelism in three phases, the first replayed as a CUDA graph.

    Each rank holds part of a meta-batch, so the gradients must be summed across ranks between
    backward and step; a collective inside a graph would tie the graph to the process group,
    so it stays outside:

    1. ``gradients(batch)``: zero-grad, adaptation, query loss, backward, returning the step's
       statistics; a :class:`GraphedStep` (a :class:`KeyedGraphedStep` with ``key``) replays it,
       and :class:`GraphGradients` leaves the ``.grad`` of ``params`` as the tensors it wrote.
    2. ``reduce(params)``: the all-reduce of those ``.grad`` in place (NCCL or gloo), eagerly.
    3. ``apply()``: the optimisers' steps, eagerly (a few fused kernels per parameter group).

    So phases 2 and 3 read what the replay wrote, also after an eager (tracked) step in between.
    Warm-up, failed captures (one ``on_failure`` call, then eager gradients) and other shapes run
    phase 1 eagerly; phases 2 and 3 are the same every call.
    The capture uses ``capture_error_mode="thread_local"``: the process group's own threads may
    call CUDA while this one records.
    """

    def __init__(self, gradients: Callable[[Any], Any], params: Iterable[torch.Tensor],
                 reduce: Callable[[list], None], apply: Callable[[], None], key: Optional[Callable[[], Hashable]] = None,
                 warmup: int = 3, on_failure: Optional[Callable[[BaseException], None]] = None):
        self.params = list(params)
        self.reduce, self.apply = reduce, apply
        options = dict(warmup=warmup, on_failure=on_failure, capture_error_mode="thread_local")
        self.graphed = GraphGradients(GraphedStep(gradients, **options) if key is None
                                      else KeyedGraphedStep(gradients, key, **options), self.params)

    @property
    def failed(self) -> bool:
        return self.graphed.failed

    def __call__(self, batch) -> Any:
        stats = self.graphed(batch)
        self.reduce(self.params)
        self.apply()
        return stats
