"""The package's floors (docs/design.md section 2): imports point down only.

Models know nothing of meta-learning, meta-learning nothing of files and runs, data nothing of models, and
no library module reaches up into the stages, the paper-table runner or the scripts. Lazy imports inside
functions count too: they are dependencies all the same.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "tnas")

ABOVE_THE_LIBRARY = ("tnas.stages", "tnas.reproduce", "scripts")
RUNS_AND_FILES = ("tnas.engine", "tnas.evaluate", "tnas.runlog", "tnas.run_dir", "tnas.config", "tnas.progress",
                  "tnas.hparams", "tnas.diversity", "tnas.visualize", "tnas.guard", "tnas.checkpoints")
# tnas.files (atomic writes; it imports only tnas.errors) is the ground floor: data and genotypes save
# files through it. Networks and meta-learning write no files at all.

# (modules, the modules they must not import)
FORBIDDEN = [
    (("tnas.models", "tnas.ops", "tnas.task_folding"),
     ABOVE_THE_LIBRARY + RUNS_AND_FILES + ("tnas.meta", "tnas.data", "tnas.files")),
    (("tnas.genotypes",), ABOVE_THE_LIBRARY + RUNS_AND_FILES + ("tnas.meta", "tnas.data", "tnas.models")),
    (("tnas.meta",), ABOVE_THE_LIBRARY + RUNS_AND_FILES + ("tnas.files",)),
    (("tnas.data",), ABOVE_THE_LIBRARY + RUNS_AND_FILES + ("tnas.meta", "tnas.models", "tnas.ops",
                                                           "tnas.task_folding", "tnas.genotypes")),
    (("tnas.errors", "tnas.checkpoints", "tnas.runlog", "tnas.config", "tnas.precision",
      "tnas.distributed"),
     ABOVE_THE_LIBRARY + ("tnas.engine", "tnas.evaluate", "tnas.meta", "tnas.models")),
    (("tnas.engine", "tnas.evaluate", "tnas.run_dir", "tnas.guard", "tnas.progress", "tnas.hparams",
      "tnas.diversity", "tnas.visualize"), ABOVE_THE_LIBRARY),
    (("tnas.stages",), ("tnas.reproduce", "scripts")),
    (("tnas.reproduce",), ("scripts",)),
]

# argparse lives at the edge: the stages' build_parser/settings_from_args and the config layer under them
ARGPARSE_ALLOWED = ("tnas.stages", "tnas.config")


def _module_name(path):
    parts = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """Every module ``path`` imports, at any depth of its code, with relative imports resolved."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    with open(path) as handle:
        tree = ast.parse(handle.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _package_modules():
    for folder, _, files in os.walk(PACKAGE):
        for file in sorted(files):
            if file.endswith(".py"):
                yield os.path.join(folder, file)


def _within(module, prefixes):
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_the_import_scan_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "tnas" / "meta"
    package.mkdir(parents=True)
    source = package / "probe.py"
    source.write_text("from . import maml\nfrom ..stages import train\n\ndef f():\n    import tnas.engine\n")
    global REPO
    saved, REPO = REPO, str(tmp_path)
    try:
        found = _imports(str(source))
    finally:
        REPO = saved
    assert {"tnas.meta.maml", "tnas.stages.train", "tnas.engine"} <= found


def test_imports_point_down_only():
    breaches = []
    for path in _package_modules():
        module = _module_name(path)
        for floor, forbidden in FORBIDDEN:
            if _within(module, floor):
                breaches += [f"{module} imports {target}" for target in sorted(_imports(path))
                             if _within(target, forbidden)]
    assert not breaches, "\n".join(breaches)


def test_the_ground_floor_imports_only_the_errors():
    """tnas.files is imported from every floor, so it may import nothing of tnas but its errors."""
    for name in ("files", "errors"):
        imported = {target for target in _imports(os.path.join(PACKAGE, f"{name}.py")) if _within(target, ("tnas",))}
        assert imported <= {"tnas.errors", "tnas.errors.TnasError"}, (name, imported)


def test_argparse_only_at_the_edge():
    users = [_module_name(path) for path in _package_modules()
             if "argparse" in _imports(path) and not _within(_module_name(path), ARGPARSE_ALLOWED)]
    assert not users


@pytest.mark.parametrize("floor", [floor for floor, _ in FORBIDDEN])
def test_every_floor_names_modules_that_exist(floor):
    """A rule about a module that was renamed away would pass forever."""
    modules = {_module_name(path) for path in _package_modules()}
    assert all(any(_within(module, (prefix,)) for module in modules) for prefix in floor)
