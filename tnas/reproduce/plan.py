"""A reproduction plan: which preset each stage of each table cell uses, turned into ordered steps.

A plan file (``configs/reproduce_paper.yaml``, ``configs/reproduce_demo.yaml``) is YAML::

    title: ...                   # the table's title
    dataset: miniimagenet        # for the table's notes (the presets choose the data)
    paper: miniimagenet          # which paper figures go beside (omit: no paper column)
    shots: [1, 5]
    presets:                     # stage configs, "{shot}" replaced by the shot, relative to the repository
      maml_train: configs/maml_conv4_miniimagenet_5w{shot}s.yaml
      auto_maml_search: ...   auto_maml_train: ...   tnas_search: ...
      tnas_protocol: ...      tnas++_protocol: ...
    evaluate: {episodes: 600, seed: 0, update_step_test: 10, batch_size: 50}
    budget:                      # --budget: schedule flags for the search and from-scratch stages (the
                                 # protocol's too, with its own --budget label)
      search: {epochs: 2, tasks_per_epoch: 2000}
      train: {epochs: 2, tasks_per_epoch: 2000}

Each cell (method x shot) is a chain of steps; each step is one stage script's command line
with its own run directory under ``OUT/<shot>shot/<method>/<kind>``:

- MAML: ``train`` (Conv-4 from scratch) -> ``evaluate``;
- auto-MAML: ``search`` -> ``train`` (its genotype from scratch) -> ``evaluate``;
- T-NAS / T-NAS++: ``search`` (one T-NAS search, shared) -> ``protocol`` (``--method tnas`` / ``tnas++``).

Every evaluation of a shot reads the same fixed test tasks (``OUT/<shot>shot/test_episodes.npz``).
A step that reads another step's output names it in its ``inputs`` (:class:`Input`): the
from-scratch training reads the search's ``best_genotype.json``, an evaluation the training's
``best.pt``, a protocol the T-NAS search's ``best.pt``; the runner fingerprints them to tell a
result made from the current upstream from a stale one (:mod:`tnas.reproduce.freshness`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from tnas.errors import TnasError

METHODS = ("maml", "auto_maml", "tnas", "tnas++")
PRESET_KEYS = ("maml_train", "auto_maml_search", "auto_maml_train", "tnas_search", "tnas_protocol",
               "tnas++_protocol")
EVALUATE_KEYS = ("episodes", "seed", "update_step_test", "batch_size")
SCRIPTS = {"search": "scripts/search.py", "train": "scripts/train_from_scratch.py",
           "evaluate": "scripts/evaluate.py", "protocol": "scripts/evaluate_tnas.py"}
RESULT_FILES = {"search": "search.json", "train": "train.json", "evaluate": "results.json",
                "protocol": "results.json"}
GENOTYPE_FILES = ("best_genotype.json", "genotype.json")
"""What ``--genotype`` reads of a search's run directory, first found first (:func:`tnas.genotypes.load_genotype`;
spelled out here so that the runner does not import torch, and checked against it by a test)."""
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(frozen=True)
class Plan:
    path: str
    title: str
    dataset: str
    paper: Optional[str]
    shots: Tuple[int, ...]
    presets: Dict[str, str]
    evaluate: Dict[str, Any]
    budget: Dict[str, Dict[str, Any]]


@dataclass(frozen=True)
class Input:
    """A file a step reads from an upstream step's run directory: the first of ``files`` that exists
    (as the stage resolves a run directory: a search's ``best_genotype.json``, else the ``genotype.json``
    of a search made before that file existed)."""

    step: str  # the upstream step's name
    files: Tuple[str, ...]  # absolute paths, in the order the stage tries them


@dataclass(frozen=True)
class Step:
    """One stage run: ``script`` with ``argv`` (without ``--resume``), writing into ``out``."""

    name: str  # e.g. "1shot/auto_maml/search"
    kind: str  # search | train | evaluate | protocol
    script: str  # absolute path
    argv: Tuple[str, ...]
    out: str
    distributed: bool  # may run under torchrun (not the evaluate stage)
    inputs: Tuple[Input, ...] = ()  # what it reads of earlier steps' outputs

    @property
    def result(self) -> str:
        return os.path.join(self.out, RESULT_FILES[self.kind])


@dataclass(frozen=True)
class Cell:
    method: str
    shot: int
    steps: Tuple[str, ...]  # step names in order; the last one's results.json is the cell's result


@dataclass
class Settings:
    """What the command line chose (see ``scripts/reproduce.py``)."""

    out: str
    shots: Tuple[int, ...]
    methods: Tuple[str, ...]
    budget: bool = False
    device: Optional[str] = None
    data_path: Optional[str] = None
    cache_dir: Optional[str] = None


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TnasError(f"{where} must be a mapping, got {type(value).__name__}")
    return value


def load_plan(path: str) -> Plan:
    """Read and check a plan file (one-line errors naming the file and key)."""
    import yaml

    if not os.path.isfile(path):
        raise TnasError(f"--plan {path}: file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise TnasError(f"--plan {path}: cannot read it ({' '.join(str(error).split())[:200]})") from None
    data = _mapping(data, f"plan {path}")
    unknown = sorted(set(data) - {"title", "dataset", "paper", "shots", "presets", "evaluate", "budget"})
    if unknown:
        raise TnasError(f"plan {path}: unknown key(s) {', '.join(unknown)}")
    presets = _mapping(data.get("presets"), f"'presets' in plan {path}")
    missing = [key for key in PRESET_KEYS if not isinstance(presets.get(key), str)]
    if missing:
        raise TnasError(f"plan {path}: 'presets' lacks {', '.join(missing)}")
    evaluate = _mapping(data.get("evaluate"), f"'evaluate' in plan {path}")
    if set(evaluate) - set(EVALUATE_KEYS):
        raise TnasError(f"plan {path}: 'evaluate' takes only {', '.join(EVALUATE_KEYS)}")
    budget = _mapping(data.get("budget"), f"'budget' in plan {path}")
    for key, value in budget.items():
        if key not in ("search", "train") or not isinstance(value, dict):
            raise TnasError(f"plan {path}: 'budget' maps search and train to flag: value mappings")
    return Plan(path=os.path.abspath(path), title=str(data.get("title") or "Reproduction"),
                dataset=str(data.get("dataset") or "?"),
                paper=data.get("paper"), shots=parse_shots(data.get("shots", [1, 5]), f"'shots' in plan {path}"),
                presets=dict(presets), evaluate=dict(evaluate), budget={k: dict(v) for k, v in budget.items()})


def parse_shots(value, where: str = "--shots") -> Tuple[int, ...]:
    """``"1,5"`` or ``[1, 5]`` -> ``(1, 5)``; positive integers, no repeats."""
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        shots = tuple(int(str(item).strip()) for item in items)
    except ValueError:
        raise TnasError(f"{where} must be shots separated by commas, e.g. 1,5; got {value!r}") from None
    if not shots or any(shot < 1 for shot in shots) or len(set(shots)) != len(shots):
        raise TnasError(f"{where} must be distinct positive shots, e.g. 1,5; got {value!r}")
    return shots


def parse_methods(value: str) -> Tuple[str, ...]:
    """``"maml,tnas"`` -> ``("maml", "tnas")`` in the table's order; unknown names are a one-line error."""
    names = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise TnasError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'} "
                        f"(known: {','.join(METHODS)})")
    return tuple(method for method in METHODS if method in names)


def preset_path(plan: Plan, key: str, shot: int) -> str:
    """The preset file of ``key`` for ``shot``, absolute (relative names are the repository's)."""
    name = plan.presets[key].replace("{shot}", str(shot))
    path = name if os.path.isabs(name) else os.path.join(REPO, name)
    if not os.path.isfile(path):
        plan_dir = os.path.join(os.path.dirname(plan.path), name)
        if os.path.isfile(plan_dir):
            return plan_dir
        raise TnasError(f"plan {plan.path}: preset {key} for {shot}-shot: {name} not found")
    return path


def _flags(values: Mapping[str, Any]) -> List[str]:
    argv: List[str] = []
    for key, value in values.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False and value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def build_steps(plan: Plan, settings: Settings) -> Tuple[List[Step], List[Cell]]:
    """The steps in the order they run (each once) and the cells of the table, methods outer, shots inner."""
    common = _flags({"device": settings.device, "data_path": settings.data_path, "cache_dir": settings.cache_dir})
    evaluate = _flags(plan.evaluate)
    budget = {kind: _flags(plan.budget.get(kind, {})) if settings.budget else [] for kind in ("search", "train")}
    steps: Dict[str, Step] = {}
    cells: List[Cell] = []

    def add(name: str, kind: str, argv: List[str], out: str, inputs: Sequence[Input] = ()) -> str:
        if name not in steps:
            steps[name] = Step(name, kind, os.path.join(REPO, SCRIPTS[kind]), tuple(argv), out, kind != "evaluate",
                               tuple(inputs))
        return name

    for method in settings.methods:
        for shot in settings.shots:
            base = os.path.join(settings.out, f"{shot}shot")
            episodes = ["--episodes_file", os.path.join(base, "test_episodes.npz")]

            def stage_dir(owner: str, kind: str) -> str:
                return os.path.join(base, owner, kind)

            def best_pt(owner: str, kind: str) -> Input:  # a run directory as --checkpoint: its best.pt
                return Input(f"{shot}shot/{owner}/{kind}", (os.path.join(stage_dir(owner, kind), "best.pt"),))

            def evaluate_step(owner: str, checkpoint_dir: str) -> str:
                out = stage_dir(owner, "evaluate")
                return add(f"{shot}shot/{owner}/evaluate", "evaluate",
                           ["--checkpoint", checkpoint_dir, "--out", out] + episodes + evaluate + common, out,
                           [best_pt(owner, "train")])

            def search_step(owner: str, search_method: str) -> str:
                out = stage_dir(owner, "search")
                return add(f"{shot}shot/{owner}/search", "search",
                           ["--config", preset_path(plan, f"{owner}_search", shot), "--method", search_method,
                            "--k_shot", str(shot), "--out", out] + budget["search"] + common, out)

            def train_step(owner: str, extra: List[str], inputs: Sequence[Input] = ()) -> str:
                out = stage_dir(owner, "train")
                return add(f"{shot}shot/{owner}/train", "train",
                           ["--config", preset_path(plan, f"{owner}_train", shot), "--k_shot", str(shot),
                            "--out", out] + extra + budget["train"] + common, out, inputs)

            if method == "maml":
                names = [train_step("maml", ["--model", "conv4"]), evaluate_step("maml", stage_dir("maml", "train"))]
            elif method == "auto_maml":
                search_dir = stage_dir("auto_maml", "search")
                genotype = Input(f"{shot}shot/auto_maml/search",
                                 tuple(os.path.join(search_dir, name) for name in GENOTYPE_FILES))
                names = [search_step("auto_maml", "auto_maml"),
                         train_step("auto_maml", ["--genotype", search_dir], [genotype]),
                         evaluate_step("auto_maml", stage_dir("auto_maml", "train"))]
            else:
                search = search_step("tnas", "tnas")
                out = stage_dir(method, "protocol")
                protocol = add(f"{shot}shot/{method}/protocol", "protocol",
                               ["--config", preset_path(plan, f"{method}_protocol", shot), "--method", method,
                                "--checkpoint", stage_dir("tnas", "search"), "--out", out] + episodes + evaluate +
                               (["--budget"] + budget["train"] if settings.budget else []) + common, out,
                               [best_pt("tnas", "search")])
                names = [search, protocol]
            cells.append(Cell(method, shot, tuple(names)))
    return list(steps.values()), cells


def step_summary(steps: Sequence[Step]) -> List[Dict[str, Any]]:
    """The steps as JSON (name, kind, command line relative to the repository, run directory)."""
    return [{"name": s.name, "kind": s.kind, "command": ["python", os.path.relpath(s.script, REPO)] + list(s.argv),
             "out": s.out} for s in steps]
