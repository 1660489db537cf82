"""Typed settings of the meta-training stages, built from the flags once, at the command-line layer.

A stage's ``run(settings)`` reads these dataclasses; argparse stays in the CLI layer
(``scripts/`` and each stage's ``build_parser`` / ``settings_from_args``). The field names are
the flag names, so a settings object flattens back into the flag mapping a run saves as
``config.yaml`` (:meth:`Settings.to_flags`) and is rebuilt from it (:meth:`Settings.from_flags`).

Fields marked ``rerun_free`` change no result of a run (where it runs, how often it logs or
saves, where the data lives, ...): two runs whose settings differ only in them are the same
run, which is what the protocol asks before it skips or resumes a genotype's training
(:func:`differences`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, TypeVar

S = TypeVar("S", bound="Settings")


def free(default: Any = None) -> Any:
    """A field whose value changes no result of the run (see the module docstring)."""
    return field(default=default, metadata={"rerun_free": True})


class Settings:
    """Mixin of the settings dataclasses: flat flag mapping in and out, nested parts allowed."""

    def to_flags(self) -> Dict[str, Any]:
        """The flat ``{flag: value}`` mapping of every field (nested settings flattened)."""
        flags: Dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Settings):
                flags.update(value.to_flags())
            else:
                flags[item.name] = value
        return flags

    @classmethod
    def from_flags(cls: Type[S], flags: Mapping[str, Any]) -> S:
        """The settings of a flat flag mapping (parsed flags or a saved config.yaml); keys that are
        no field are ignored, fields that are no key keep their defaults (a nested part's those of
        this class's default part: ``SearchSettings.from_flags({})`` is ``SearchSettings()``)."""
        values = {}
        for item in dataclasses.fields(cls):
            kind = item.type if isinstance(item.type, type) else _PARTS.get(item.type)
            if kind is not None and issubclass(kind, Settings):
                default = item.default if isinstance(item.default, Settings) else None
                values[item.name] = kind.from_flags({**default.to_flags(), **flags} if default else flags)
            elif item.name in flags:
                values[item.name] = flags[item.name]
        return cls(**values)

    def replace(self: S, **changes: Any) -> S:
        """A copy with flags changed by name, wherever they live (``settings.replace(epochs=2, out=...)``);
        a TypeError names a flag that is no field."""
        flags = self.to_flags()
        unknown = sorted(set(changes) - set(flags))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no flag {', '.join(unknown)}")
        return type(self).from_flags({**flags, **changes})


def differences(old: Settings, new: Settings) -> List[Tuple[str, Any, Any]]:
    """``(flag, old, new)`` of every field, nested parts included, that differs and is not rerun-free."""
    changed = []
    for item in dataclasses.fields(new):
        before, after = getattr(old, item.name), getattr(new, item.name)
        if isinstance(after, Settings):
            changed += differences(before, after)
        elif not item.metadata.get("rerun_free") and before != after:
            changed.append((item.name, before, after))
    return changed


@dataclass(frozen=True)
class DataSettings(Settings):
    """Which images and which task shape: the dataset's splits and the n-way k-shot episodes."""

    dataset: str = "glyphs"
    data_path: Optional[str] = free()
    cache_dir: Optional[str] = free()
    n_way: int = 5
    k_shot: int = 1
    q_query: int = 15
    img_size: Optional[int] = None
    augment: bool = False
    normalize: str = "split"
    resize: str = "lanczos"
    rotations: bool = False


@dataclass(frozen=True)
class ScheduleSettings(Settings):
    """How long and how the trainer runs: epochs of meta-batches, validation, logging, checkpoints."""

    epochs: int = 15
    tasks_per_epoch: int = 15000
    tasks_per_batch: int = 4
    task_pool: int = 0
    val_episodes: int = 200
    val_batch_size: int = free(50)
    log_every: int = free(50)
    checkpoint_every: int = free(200)


@dataclass(frozen=True)
class NetworkSettings(Settings):
    """Network dimensions: channels of the first cell and the number of cells."""

    C: int = 16
    layers: int = 2


@dataclass(frozen=True)
class RunSettings(Settings):
    """Where and how a run executes: run directory, device, seed, threads, resume, precision, graphs."""

    out: Optional[str] = free()
    device: str = free("auto")
    seed: int = 0
    threads: Optional[int] = free()
    resume: bool = free(False)
    resume_override: bool = free(False)
    amp: bool = free(False)
    tf32: bool = free(False)  # like amp: a precision choice; rounding differs, the run is the same
    cuda_graph: str = free("auto")  # auto | on | off: graphed or eager, the same steps


_PARTS = {cls.__name__: cls for cls in (DataSettings, ScheduleSettings, NetworkSettings, RunSettings)}


def rerun_free_flags() -> frozenset:
    """Every flag marked rerun-free in a settings part: what a ``--resume`` may change without notice."""
    return frozenset(item.name for part in _PARTS.values() for item in dataclasses.fields(part)
                     if item.metadata.get("rerun_free"))


def register_part(cls):
    """Make a settings dataclass usable as a nested part under ``from __future__ import annotations``
    (field types are then strings, looked up here)."""
    _PARTS[cls.__name__] = cls
    return cls
