"""Data parallelism over processes with ``torch.distributed`` (NCCL on GPU, gloo on CPU).

Launch any stage with ``torchrun --nproc_per_node=N scripts/<stage>.py ...``. Every rank
draws the same meta-batch indices (same sampler seed) and builds only its own slice of
the tasks; each rank's loss is scaled by ``local_tasks / total_tasks`` and the gradients
are summed across ranks, so the meta-gradient equals one process's on the whole batch.
Evaluation-style work (distinct genotypes, episodes) is sharded with :func:`shard` and
collected on rank 0 with :func:`gather_to_main`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from tnas.errors import TnasError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``is_main`` writes the files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_local_depth = 0


@contextlib.contextmanager
def local_process():
    """Inside this block the process acts alone even under torchrun: no gradient sums, no
    sharding of meta-batches, it writes its own files. Used when ranks split independent
    jobs (one distinct genotype each) rather than one meta-batch."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def splits_meta_batches() -> bool:
    """True when this process was launched by torchrun with other ranks and is not inside
    :func:`local_process`, i.e. its meta-batches will be shared across ranks (also before the
    process group is initialised)."""
    return _local_depth == 0 and launched_world_size() > 1


def _group_active() -> bool:
    return _local_depth == 0 and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_info() -> DistInfo:
    """This process's place in the running process group (a single process when none, or
    inside :func:`local_process`)."""
    if not _group_active():
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when launched as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device, timeout: Optional[timedelta] = None,
                     share_gpus: bool = False) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op for a single process.

    On CUDA each process uses ``cuda:LOCAL_RANK`` (see :func:`local_device`); the returned
    device must be used instead of the one asked for. The backend is NCCL for CUDA devices
    and gloo otherwise. NCCL needs a GPU of its own per process, so more processes per
    machine than GPUs is a one-line error, unless ``share_gpus``: then the processes are
    dealt to the GPUs round robin and talk over gloo (for jobs whose collectives only move
    small Python objects, such as the T-NAS protocol's independent genotype trainings).
    ``timeout`` bounds every collective (torch's default when None); jobs whose ranks wait
    hours for each other (the protocol's final gather) need a long one.
    """
    world_size = launched_world_size()
    if world_size <= 1 or _local_depth:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" and not share_gpus else "gloo"
        if device.type == "cuda":
            gpus = torch.cuda.device_count()
            if local_rank >= gpus and not share_gpus:
                raise TnasError(f"torchrun started process {local_rank} on a machine with {gpus} GPU(s); "
                                f"meta-training needs one GPU per process: use --nproc_per_node={gpus} or fewer")
            torch.cuda.set_device(local_rank % gpus)
        dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout is not None else {}))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """The device of this rank: ``cuda:(LOCAL_RANK mod GPUs)`` under torchrun with CUDA, else ``device``."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
    return device


def task_slice(total_tasks: int, info: DistInfo) -> slice:
    """The contiguous block of a meta-batch's tasks that this rank computes."""
    if info.world_size > total_tasks:
        raise TnasError(f"--tasks_per_batch {total_tasks} is smaller than the {info.world_size} processes; "
                        f"each process needs at least one task")
    base, extra = divmod(total_tasks, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return slice(start, start + base + (1 if info.rank < extra else 0))


def loss_scale(total_tasks: int, info: DistInfo) -> float:
    """Multiplier of a rank's mean task loss so that summed gradients equal the full batch's mean."""
    part = task_slice(total_tasks, info)
    return (part.stop - part.start) / total_tasks


def sum_gradients(params: Sequence[torch.Tensor]) -> None:
    """All-reduce (sum) the ``.grad`` of ``params`` across ranks in one flat buffer, written back
    into the same ``.grad`` tensors (a CUDA graph of the backward keeps writing those).

    Parameters without a gradient (unused by the model, e.g. ``alpha_normal`` with
    ``layers=1``) are unused on every rank alike and stay without one, so optimisers skip
    them exactly as in a single process.
    """
    if not _group_active():
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param in with_grad:
        count = param.grad.numel()
        param.grad.copy_(flat[offset:offset + count].view_as(param.grad))
        offset += count


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over ranks (returned; the input is left alone)."""
    if not _group_active():
        return value
    total = value.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_ranks_true(flag: bool, device: Optional[torch.device] = None) -> bool:
    """``flag`` AND-ed over ranks (so every rank takes the same branch)."""
    if not _group_active():
        return bool(flag)
    backend_device = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=backend_device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def min_across_ranks(value: int, info: DistInfo) -> int:
    """The smallest of the ranks' ``value`` on every rank (an object collective: any backend), for a
    choice each rank makes from what it measured that all ranks must share."""
    if not info.enabled:
        return value
    values: List[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return min(values)


_host_groups: List[Any] = []  # [(the default group it belongs to, a gloo group over the same ranks)]


def _host_group():
    """A gloo group over all ranks, for small host-side agreements that must not wait on a GPU stream
    (the default group itself when it is gloo); made once per default group, by every rank at its
    first call."""
    world = dist.group.WORLD
    if dist.get_backend() == "gloo":
        return world
    if not _host_groups or _host_groups[0][0] is not world:  # none yet, or the process group was re-made
        _host_groups[:] = [(world, dist.new_group(backend="gloo"))]
    return _host_groups[0][1]


def any_rank_stopping(requested: bool) -> bool:
    """``requested`` (this process's Ctrl-C / SIGTERM flag) OR-ed over the ranks that share
    meta-batches. Every rank calls it once per iteration, so all leave the loop at the same
    iteration and meet in the same collectives (a rank that stopped alone would save while the
    others all-reduced gradients, and the job would hang). A one-integer all-reduce over gloo on
    the host: no GPU sync."""
    if not _group_active():
        return bool(requested)
    flag = torch.tensor([1 if requested else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(flag.item())


def shard(items: Sequence[Any], info: DistInfo) -> List[Any]:
    """Every ``world_size``-th item starting at ``rank`` (round robin)."""
    return list(items[info.rank::info.world_size])


def gather_to_main(obj: Any, info: DistInfo) -> Optional[List[Any]]:
    """Collect a picklable object from every rank; the list on rank 0, ``None`` elsewhere."""
    if not info.enabled:
        return [obj]
    gathered: List[Any] = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def gather_to_main_on_host(obj: Any, info: DistInfo) -> Optional[List[Any]]:
    """:func:`gather_to_main` over a gloo group (:func:`_host_group`), for small host-side objects
    (RNG states at a checkpoint) that must not wait on a GPU stream; the list on rank 0, ``None``
    elsewhere. Every rank that shares meta-batches calls it (a single process gets ``[obj]``)."""
    if not info.enabled or not _group_active():
        return [obj]
    gathered: List[Any] = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0, group=_host_group())
    return gathered


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group (every rank calls it, after its last collective)."""
    if info.enabled and dist.is_initialized():
        destroy_process_group()


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` (every group) without torch 2.4's teardown deadlock.

    A gloo group runs each collective on a worker thread, which drops its reference to the
    collective's tensors only after the caller has been told the collective is done. When the
    caller has dropped the tensor by then (a temporary: a flag, a flat gradient buffer), the
    worker's drop frees its Python object and needs the GIL. In torch 2.4 (fixed upstream in
    mid-2025; 2.11 and 2.14 are fine) the Python wrapper of a process group frees the gloo
    backend with the GIL held, and the backend's destructor waits for its worker threads: a
    worker that was late (a busy machine) waits for the GIL forever and the rank never leaves
    (no collective timeout applies). The gloo backend's own
    Python handle frees it with the GIL released, so this keeps one handle per backend while
    torch tears the groups down and drops them afterwards: the last reference goes there.
    """
    groups = [dist.group.WORLD, *(host for _, host in _host_groups)] if dist.is_initialized() else []
    handles = [backend for group in groups for backend in _backends(group)]
    del groups  # no name here may keep a group: it would outlive the teardown
    _host_groups.clear()  # the host group goes with the default group (it held both alive past teardown)
    dist.destroy_process_group()
    del handles  # frees the backends with the GIL released: their late workers can finish


def _backends(group) -> List[Any]:
    """The Python handles of ``group``'s backends (its CPU and CUDA ones, where it has them)."""
    found = []
    for device in ("cpu", "cuda"):
        try:
            found.append(group._get_backend(torch.device(device)))
        except RuntimeError:  # no backend for that device in this group
            pass
    return found
