"""YAML config files as argparse defaults, device choice, seeding, and the saved run config.

A stage is configured by its argparse flags. ``--config x.yaml`` fills those flags'
defaults from a YAML mapping (keys are flag names, ``-`` or ``_``), and the command line
still wins over the file. Every problem with a file or flag is one :class:`TnasError`
line naming the file, key, flag or value, never a traceback or argparse's usage dump.
Each run saves its resolved arguments as ``config.yaml``, which ``--config`` accepts again
to repeat the run. Every script's parser formats ``--help`` with :class:`HelpFormatter`, which
shows each flag's default (a ``--config`` file's value where one is given).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import yaml

from tnas.errors import TnasError
from tnas.files import atomic_write_bytes

# Keys of a config file that are not flags: ``include`` pulls in another file, and
# ``config`` (present in saved configs) is the file's own path, which has no meaning there.
_INCLUDE_KEY = "include"
_IGNORED_KEYS = {"config", "help"}


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` of every tnas script: each flag's help ends with ``(default: VALUE)``, the value the
    run would use -- a ``--config`` file's when one is given, since :func:`parse_args` sets the file's
    values as defaults before ``--help`` is printed. Left out where the help already says its default
    (one that depends on something else, written out as ``(default: the checkpoint's)``) or where
    there is no value to show (None, a switch that is off, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "(default" in text or not action.option_strings
                or default is None or default is argparse.SUPPRESS or default is False or default == []):
            return text
        return text + " (default: %(default)s)"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags every stage shares: config file, data, run directory, device, seed."""
    from tnas.data import DATASETS

    group = parser.add_argument_group("common")
    group.add_argument("--config", default=None, metavar="PATH",
                       help="YAML file whose keys set defaults of these flags "
                            "(the command line overrides it)")
    group.add_argument("--dataset", default="glyphs",
                       help=f"dataset name: {', '.join(DATASETS)}")
    group.add_argument("--data_path", default=None, metavar="DIR",
                       help="where the raw dataset lives (not needed for the embedded glyphs)")
    group.add_argument("--cache_dir", default=None, metavar="DIR",
                       help="where the decoded uint8 cache is kept (default: $TNAS_CACHE_DIR, else ~/.cache/tnas)")
    group.add_argument("--out", default=None, metavar="DIR",
                       help="run directory (default: runs/<stage>_<dataset>_<n>w<k>s)")
    group.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N, or auto (cuda when available)")
    group.add_argument("--seed", type=int, default=0, help="random seed of the run")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice; 1 is often fastest for the "
                            "tiny CPU configs and on a busy machine)")


def set_flag(parser: argparse.ArgumentParser, dest: str, **changes) -> None:
    """Change an existing flag of ``parser`` (its help, default, metavar, ...) in place."""
    for action in parser._actions:
        if action.dest == dest:
            for key, value in changes.items():
                setattr(action, key, value)
    if "default" in changes:
        parser.set_defaults(**{dest: changes["default"]})


def parse_args(parser: argparse.ArgumentParser, argv=None,
               namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
    """Parse ``argv`` with defaults taken from ``--config`` (if given); see module docstring.

    ``namespace``: parse onto these values (flags not in ``argv`` keep them, as argparse does).
    """
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument("--config", default=None)
    known, _ = pre_parser.parse_known_args(argv)
    if not any(action.dest == "config" for action in parser._actions):
        parser.add_argument("--config", default=None, metavar="PATH",
                            help="YAML file of default flag values")
    if known.config is not None:
        values = load_config(known.config)
        defaults = _config_to_defaults(parser, values, known.config)
        for action in parser._actions:
            if action.dest in defaults and action.required:
                action.required = False  # the file supplies it
        parser.set_defaults(**defaults)
    return parse_flags(parser, argv, namespace)


def parse_flags(parser: argparse.ArgumentParser, argv=None,
                namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
    """Parse ``argv`` strictly, without config files (:func:`parse_args` for the stages; scripts with
    no ``--config`` call this): no prefix matching, so a mistyped or shortened flag (``--epoch``) is
    refused, never taken for another (``--epochs``); an unknown flag or bad value is one
    :class:`TnasError` line naming it (with close flag names), not argparse's usage block."""
    parser.allow_abbrev = False
    with _errors_as_tnas(parser, lambda message: message):
        args, unknown = parser.parse_known_args(argv, namespace)
    if unknown:
        raise TnasError(_unknown_flags_message(parser, unknown))
    return args


def load_config(path) -> dict:
    """Read a YAML config mapping, following ``include:`` (relative to the including file).

    Values of an included file are overridden by the file that includes it.
    """
    return _load_with_includes(Path(path), chain=())


def save_config(args: argparse.Namespace | dict, path) -> None:
    """Write the resolved arguments as YAML (sorted keys, plain types) atomically."""
    mapping = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    plain = {str(key): to_plain(value) for key, value in mapping.items()}
    text = yaml.safe_dump(plain, sort_keys=True, default_flow_style=False, allow_unicode=True)
    atomic_write_bytes(path, text.encode("utf-8"))


def resolve_device(name) -> "torch.device":
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` into a ``torch.device``, checking it exists."""
    import torch

    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise TnasError(f"unknown --device '{name}' (use cpu, cuda, cuda:N or auto)")
    if not torch.cuda.is_available():
        raise TnasError(f"--device {name} requested but no CUDA GPU is available")
    if match.group(1) is None:
        return torch.device("cuda")
    index = int(match.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise TnasError(f"--device {name} requested but only {count} CUDA GPU(s) are visible "
                        f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def set_threads(threads) -> None:
    """Apply ``--threads`` (None keeps torch's default); a value below 1 is a one-line error."""
    if threads is None:
        return
    if threads < 1:
        raise TnasError(f"--threads must be >= 1, got {threads}")
    import torch
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and every GPU)."""
    import torch

    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _read_yaml_mapping(path: Path) -> dict:
    """Load one YAML file that must hold a mapping (an empty file is an empty mapping)."""
    if not path.is_file():
        raise TnasError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TnasError(f"invalid YAML in config {path}{where}: {problem}") from error
    except (OSError, UnicodeDecodeError) as error:
        raise TnasError(f"cannot read config {path}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TnasError(f"config {path} must be a mapping of flag: value, "
                        f"found {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise TnasError(f"config {path} has a non-text key {key!r}")
    return data


def _load_with_includes(path: Path, chain: tuple) -> dict:
    """Merge the files named by ``include`` (in order) under the values of ``path`` itself."""
    resolved = path.resolve()
    if resolved in chain:
        raise TnasError(f"config {path} includes itself (through {' -> '.join(map(str, chain))})")
    data = _read_yaml_mapping(path)
    includes = data.pop(_INCLUDE_KEY, None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(item, str) for item in includes):
        raise TnasError(f"'include' in config {path} must be a file name or a list of them")
    merged: dict = {}
    for item in includes:
        merged.update(_load_with_includes(path.parent / item, chain + (resolved,)))
    merged.update(data)
    return merged


def _config_to_defaults(parser: argparse.ArgumentParser, values: dict, path) -> dict:
    """Map config keys to parser dests; each key must be a flag, and argparse itself parses each
    value (as the command-line tokens :func:`_value_tokens` writes for it), so a value is valid
    in a file exactly when it is valid on the command line."""
    actions: dict = {}
    for action in parser._actions:  # a dest's first flag is its spelling (--cuda_graph, not --no-cuda_graph)
        if action.dest not in _IGNORED_KEYS and action.dest is not argparse.SUPPRESS:
            actions.setdefault(action.dest, action)
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest in _IGNORED_KEYS:
            continue
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise TnasError(f"unknown key '{key}' in config {path} "
                            f"({hint}known: {', '.join(sorted(actions))})")
        where = f"key '{key}' in config {path}"
        if value is None:  # a flag left unset (saved configs write null for it)
            defaults[dest] = None
            continue
        tokens = _value_tokens(actions[dest], value, where)
        defaults[dest] = getattr(_parse_strictly(parser, tokens, where), dest)
    return defaults


def _value_tokens(action: argparse.Action, value: Any, where: str) -> list:
    """The command-line tokens that give ``action`` the config ``value``.

    A switch (``store_true``, ``--x/--no-x``) takes true or false; a flag of several values
    (``nargs``) a list or one value; any other flag one value, written ``--flag=value``.
    """
    options = [option for option in action.option_strings if option.startswith("--")
               and not option.startswith("--no-")] or list(action.option_strings)
    if not options:
        raise TnasError(f"{where}: the positional argument '{action.dest}' cannot be set from a config file")
    option = options[0]
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise TnasError(f"{where} must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if value else "--no-" + option[2:]]
        return [option] if value == action.const else []
    if isinstance(value, dict):
        raise TnasError(f"{where} takes a value or a list of values, got a mapping {value!r}")
    takes_list = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if takes_list:
        items = value if isinstance(value, list) else [value]
        return [option] + [_token(item) for item in items]
    if isinstance(value, list):
        raise TnasError(f"{where} takes a single value, got {value!r}")
    return [f"{option}={_token(value)}"]


def _token(value: Any) -> str:
    """A YAML scalar as command-line text (``true`` becomes ``True``, which an int or float flag refuses)."""
    return str(value)


def _parse_strictly(parser: argparse.ArgumentParser, tokens: list, where: str) -> argparse.Namespace:
    """``parser`` on ``tokens`` alone, its errors raised as one :class:`TnasError` line naming ``where``
    (no flag is required here: a config file sets some flags, the command line the others)."""
    required = [(action, action.required) for action in parser._actions]
    try:
        for action, _ in required:
            action.required = False
        with _errors_as_tnas(parser, lambda message: f"{where}: {message}"):
            namespace, unknown = parser.parse_known_args(tokens, argparse.Namespace())
    finally:
        for action, was_required in required:
            action.required = was_required
    if unknown:
        raise TnasError(f"{where}: cannot use {' '.join(unknown)}")
    return namespace


@contextlib.contextmanager
def _errors_as_tnas(parser: argparse.ArgumentParser, phrase: Callable[[str], str]):
    """While inside, a parse problem of ``parser`` raises :class:`TnasError` (``phrase(message)``) instead
    of argparse's usage block and exit; argparse reports every one through ``parser.error``."""
    had_own = "error" in vars(parser)
    previous = vars(parser).get("error")

    def fail(message: str):
        raise TnasError(phrase(message))

    parser.error = fail
    try:
        yield
    finally:
        if had_own:
            parser.error = previous
        else:
            del parser.error


def _unknown_flags_message(parser: argparse.ArgumentParser, unknown: list) -> str:
    """One line naming the unrecognised command-line arguments, with close flag names."""
    options = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for item in unknown:
        if item.startswith("-"):
            flag = item.split("=", 1)[0]
            longer = ([option for option in options if option.startswith(flag)]  # --inner_lr: shortened
                      if flag.startswith("--") and len(flag) > 2 else [])
            hints.extend(longer or difflib.get_close_matches(flag, options, n=1, cutoff=0.75))
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    return f"unknown command-line argument(s): {' '.join(unknown)}{hint}"


def to_plain(value: Any) -> Any:
    """Make a value YAML-safe: paths and devices become text, tuples lists, numpy scalars numbers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [to_plain(item) for item in items]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)  # Path, torch.device, dtype, enums: their text is what a user would type
