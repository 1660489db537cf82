"""The README's Python snippet runs as written, its quick-start commands stay true, the shell wrappers behave
as their headers say, and every flag and repository path the README and docs/ name exists: a flag written after
a script is that script's own, the Layout names every module and only real ones, and each test and `tnas.*` name
the docs give is there; the markers and the gpu test count the README states are pytest's."""
import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_text():
    with open(os.path.join(REPO, "README.md")) as handle:
        return handle.read()


def test_readme_notebook_snippet_runs(capsys):
    text = readme_text()
    marker = text.index("<!-- readme-snippet")
    snippet = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md snippet", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "normal:" in printed
    assert namespace["learner"].evaluate(namespace["task"]).query_accuracy.shape == (1,)


def test_readme_quick_start_commands_match_ci():
    text = readme_text()
    with open(os.path.join(REPO, ".ci", "run")) as handle:
        ci = handle.read()
    assert 'pip install -e ".[test]" && python -m pytest -q' in text
    assert 'pip install -q -e ".[test]" && python3 -m pytest -q' in ci
    assert "pip install -e . && bash train_tnas.sh" in text


WRAPPERS = ["train_tnas.sh", "train_auto_maml.sh", "train_auto_maml_from_scratch.sh", "train_tnas_from_scratch.sh",
            "evaluate.sh", "evaluate_tnas.sh", "reproduce_paper.sh"]


def run_wrapper(name, args, cwd):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", os.path.join(REPO, name)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["train_tnas.sh", "train_auto_maml.sh", "train_auto_maml_from_scratch.sh"])
def test_training_wrappers_read_relative_paths_from_the_callers_directory(tmp_path, name):
    """`bash ~/tnas/train_tnas.sh --config my.yaml` from elsewhere reads ./my.yaml (they used to cd into the
    checkout first, so it was 'config file not found' and a relative --out landed in the checkout)."""
    (tmp_path / "my.yaml").write_text("epochz: 1\n")
    done = run_wrapper(name, ["--config", "my.yaml", "--out", "run"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown key 'epochz' in config my.yaml")


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_help_says_what_the_wrapper_does_then_the_script_flags(tmp_path, name):
    done = run_wrapper(name, ["--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    header, _, usage = done.stdout.partition("\nusage: ")
    assert f"bash {name}" in header and "#" not in header.splitlines()[0]
    assert usage.split()[0].endswith(".py") and "with: --help" not in done.stdout


def _all_flags():
    """Every --flag of the stage parsers, the other scripts' and the benchmarks' (and its --no- form)."""
    from tnas.stages import decode, evaluate, protocol, search, train
    flags = {option for stage in (search, train, evaluate, decode, protocol)
             for action in stage.build_parser()._actions for option in action.option_strings}
    for path in ["scripts/genotype.py", "scripts/inspect_data.py", "scripts/reproduce.py"] + \
            glob.glob(os.path.join(REPO, "benchmarks", "*.py")):
        with open(os.path.join(REPO, path)) as handle:
            flags.update(re.findall(r'add_argument\(\s*"(--[\w-]+)"', handle.read()))
    return flags | {"--no-" + flag[2:] for flag in flags}


# flags of other programs (torchrun, tensorboard) and design.md's placeholder `--x` / `--no-x`; docs/fidelity.md
# is left out of the flag check, since it quotes the original code's flags (--train_portion, --test_freq, ...)
FOREIGN_FLAGS = {"--logdir", "--master_addr", "--master_port", "--nnodes", "--node_rank", "--nproc_per_node",
                 "--standalone", "--x", "--no-x"}


def _docs():
    return ["README.md"] + sorted(os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "docs", "*.md")))


def test_every_flag_the_docs_name_exists():
    flags = _all_flags()
    unknown = []
    for doc in [doc for doc in _docs() if doc != os.path.join("docs", "fidelity.md")]:
        with open(os.path.join(REPO, doc)) as handle:
            named = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", handle.read()))
        unknown += [f"{doc}: {flag}" for flag in sorted(named - flags - FOREIGN_FLAGS)]
    assert not unknown


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for doc in _docs():
        with open(os.path.join(REPO, doc)) as handle:
            text = handle.read()
        for path in set(re.findall(r"(?<![\w/.])((?:tnas|scripts|benchmarks|configs|docs|tests)/[\w./{},*-]*\w)", text)):
            path = path.split("::")[0]
            patterns = [path]
            while any("{" in pattern for pattern in patterns):  # configs/x_5w{1,5}s.yaml: each choice
                expanded = []
                for pattern in patterns:
                    brace = re.search(r"\{([^}]*)\}", pattern)
                    choices = brace.group(1).split(",") if brace else [""]
                    expanded += [pattern[:brace.start()] + choice + pattern[brace.end():] for choice in choices] \
                        if brace else [pattern]
                patterns = expanded
            missing += [f"{doc}: {pattern}" for pattern in patterns
                        if not glob.glob(os.path.join(REPO, pattern))]
    assert not missing


FAKE_PYTHON = '#!/usr/bin/env bash\necho "cwd=$PWD"\nprintf "%s\\n" "$@"\n'

DEMOS = {  # wrapper: (the demo's program and its first flags, the demo's run directory)
    "train_tnas.sh": (["scripts/search.py", "--method", "tnas", "--config", "configs/demo.yaml"], "runs/demo_tnas"),
    "train_auto_maml.sh": (["scripts/search.py", "--method", "auto_maml", "--config", "configs/demo_auto_maml.yaml"],
                           "runs/demo_auto_maml"),
    "train_auto_maml_from_scratch.sh": (["scripts/train_from_scratch.py", "--config", "configs/demo_scratch.yaml",
                                         "--genotype", "auto_maml_1shot"], "runs/demo_scratch"),
}


def _run_copied_wrapper(tmp_path, name, args=()):
    """Run a copy of wrapper ``name`` (and the shell code it sources) in a checkout-shaped ``tmp_path``, with a
    python that prints its working directory and arguments: what the wrapper runs, without running it."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    for path in [name] + [os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "scripts", "*.sh"))]:
        with open(os.path.join(REPO, path)) as source:
            (tmp_path / path).write_text(source.read())
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(tmp_path / name)] + list(args), cwd=tmp_path / "scripts",
                          env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    said, cwd = lines[0], lines[1]
    return said, cwd[len("cwd="):], lines[2:]


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_wrapper_without_arguments_runs_its_demo_from_the_checkout_and_resumes_it(tmp_path, name):
    command, out = DEMOS[name]
    said, cwd, argv = _run_copied_wrapper(tmp_path, name)
    assert said.startswith(f"{name}: no arguments, running the CPU demo") and said.endswith(f"into {out}")
    assert cwd == str(tmp_path) and argv[:len(command)] == command
    assert argv[argv.index("--out") + 1] == out and "--resume" not in argv
    (tmp_path / out).mkdir(parents=True)
    (tmp_path / out / "last.pt").write_bytes(b"")
    assert "--resume" in _run_copied_wrapper(tmp_path, name)[2]


def test_scratch_demo_trains_the_auto_maml_demos_genotype_when_there_is_one(tmp_path):
    (tmp_path / "runs" / "demo_auto_maml").mkdir(parents=True)
    (tmp_path / "runs" / "demo_auto_maml" / "genotype.json").write_text("{}")
    said, _, argv = _run_copied_wrapper(tmp_path, "train_auto_maml_from_scratch.sh")
    assert "genotype runs/demo_auto_maml" in said
    assert argv[argv.index("--genotype") + 1] == "runs/demo_auto_maml"
    assert argv[argv.index("--out") + 1] == "runs/demo_scratch_searched"


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_wrapper_with_arguments_says_what_it_runs_then_passes_them_on(tmp_path, name):
    said, cwd, argv = _run_copied_wrapper(tmp_path, name, ["--epochs", "2"])
    assert said.startswith(f"{name}: ") and said.endswith("with: --epochs 2")
    assert cwd == str(tmp_path / "scripts")  # the caller's directory, for relative paths in the flags
    assert argv[0] == str(tmp_path / DEMOS[name][0][0]) and argv[-2:] == ["--epochs", "2"]


def _parser_flags(path):
    """The --flags of one script or benchmark: a stage script's from its stage's parser, the others' from their
    own add_argument calls (and the --no- form of each, as _all_flags allows)."""
    from tnas.stages import decode, evaluate, protocol, search, train
    stages = {"scripts/search.py": search, "scripts/train_from_scratch.py": train, "scripts/evaluate.py": evaluate,
              "scripts/decode.py": decode, "scripts/evaluate_tnas.py": protocol}
    if path in stages:
        return {option for action in stages[path].build_parser()._actions for option in action.option_strings}
    with open(os.path.join(REPO, path)) as handle:
        source = handle.read()
    flags = set(re.findall(r'add_argument\(\s*"(--[\w-]+)"', source))
    if "add_cuda_graph_arg(" in source:  # the stages' one definition of --cuda_graph / --no-cuda_graph
        import argparse

        from tnas.stages.common import add_cuda_graph_arg
        parser = argparse.ArgumentParser()
        add_cuda_graph_arg(parser)
        flags |= {option for action in parser._actions for option in action.option_strings}
    if "from bench_meta_iter import" in source and "parse_args" in source:  # profile_meta_iter: bench's + its own
        flags |= _parser_flags("benchmarks/bench_meta_iter.py") | set(re.findall(r'"(--[a-z]\w*)"', source))
    return flags | {"--no-" + flag[2:] for flag in flags if not flag.startswith("--no-")}


# what each root wrapper runs (tests above pin the wrappers' own behaviour)
WRAPPED = {"train_tnas.sh": "scripts/search.py", "train_auto_maml.sh": "scripts/search.py",
           "train_auto_maml_from_scratch.sh": "scripts/train_from_scratch.py", "evaluate.sh": "scripts/evaluate.py",
           "evaluate_tnas.sh": "scripts/evaluate_tnas.py", "train_tnas_from_scratch.sh": "scripts/evaluate_tnas.py",
           "reproduce_paper.sh": "scripts/reproduce.py"}


def _commands(text):
    """Every command line the docs write out: each line of a fenced block (backslash continuations joined) and
    each inline code span, cut at `&&`, `;`, `|` and comments."""
    pieces = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, re.S):
        pieces += block.replace("\\\n", " ").splitlines()
    pieces += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [part for piece in pieces for part in re.split(r"&&|;|\||#", piece)]


def test_every_flag_written_after_a_script_is_that_scripts():
    """`scripts/X.py --flag`, `bash W.sh --flag` or `bench_meta_iter.py --flag` in README or docs/: the flag is
    one of that program's own (the test above only checks that some parser has it)."""
    programs = {os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "scripts", "*.py"))
                + glob.glob(os.path.join(REPO, "benchmarks", "*.py"))}
    wrong = []
    for doc in [doc for doc in _docs() if doc != os.path.join("docs", "fidelity.md")]:  # quotes the original's
        with open(os.path.join(REPO, doc)) as handle:
            commands = _commands(handle.read())
        for command in commands:
            match = re.search(r"(?<![\w/.-])((?:scripts/|benchmarks/)?[\w]+\.py|[\w]+\.sh)(?![\w.])", command)
            if not match:
                continue
            name = match.group(1)
            program = WRAPPED.get(name) or next((p for p in sorted(programs) if p == name
                                                 or os.path.basename(p) == name), None)
            if program is None:
                continue
            known = _parser_flags(program)
            named = re.findall(r"(?<![\w-])(--[a-z][\w-]*)", command[match.end():])
            wrong += [f"{doc}: {name} {flag}" for flag in named if flag not in known | {"--help"}]
    assert not wrong


def _layout_entries():
    """The README's Layout block as {folder or file it starts with: its text, continuation lines included}."""
    text = readme_text()
    block = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S).group(1)
    entries, key = {}, None
    for line in block.splitlines():
        if line and not line[0].isspace():
            key = line.split()[0]
            entries[key] = line[len(key):]
        elif key is not None:
            entries[key] += "\n" + line
    return entries


def test_the_layout_names_every_module_and_script_and_only_real_ones():
    """Each tnas/, scripts/ and benchmarks/ file is named in the Layout block: by its path anywhere, or by its
    name in its folder's entry (scripts also by their name without .py); each file name an entry gives exists."""
    entries = _layout_entries()
    block = "\n".join(key + text for key, text in entries.items())
    files = [os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "tnas", "**", "*.py"), recursive=True)
             + glob.glob(os.path.join(REPO, "scripts", "*")) + glob.glob(os.path.join(REPO, "benchmarks", "*"))]
    unlisted = []
    for path in sorted(files):
        folder, name = os.path.split(path)
        if name == "__init__.py" or "__pycache__" in path or os.path.isdir(os.path.join(REPO, path)):
            continue
        names = [name] + ([os.path.splitext(name)[0]] if folder == "scripts" else [])
        listed = re.search(rf"(?<![\w/]){re.escape(path)}\b", block) or any(
            re.search(rf"(?<![\w/.]){re.escape(n)}(?![\w])", entries.get(folder + "/", "")) for n in names)
        if not listed:
            unlisted.append(path)
    assert not unlisted, f"files the README's Layout does not name: {unlisted}"
    missing = [folder + name for folder, text in entries.items() if folder.endswith("/")
               for name in re.findall(r"(?<![\w/.*])(\w+\.(?:py|sh))\b", text)
               if not os.path.exists(os.path.join(REPO, folder, name))]
    assert not missing, f"files the README's Layout names that are not there: {missing}"


def test_the_markers_and_the_gpu_test_count_the_readme_gives_are_pytests():
    """The README runs `python -m pytest -m M` for each marker pytest.ini declares (and no other), and the
    number of `gpu` tests it says are collected now is what pytest collects with -m gpu."""
    import configparser

    ini = configparser.ConfigParser()
    ini.read(os.path.join(REPO, "pytest.ini"))
    markers = {line.split(":")[0].strip() for line in ini["pytest"]["markers"].strip().splitlines()}
    text = readme_text()
    assert set(re.findall(r"python -m pytest -m (\w+)", text)) == markers
    said = int(re.search(r"\((\d+) are collected now", text).group(1))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                           "-p", "no:cacheprovider"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
    collected = re.search(r"(\d+)/\d+ tests collected", done.stdout)
    assert collected, done.stdout[-2000:] + done.stderr[-2000:]
    assert said == int(collected.group(1))


def test_every_test_the_docs_name_exists_where_they_say():
    """A `test_name` (or `tests/file.py::test_name`) named in README or docs/ is a test function of tests/ (of
    that file when one is given), so a renamed or removed test does not leave a promise without its proof."""
    defined = {}
    for path in glob.glob(os.path.join(REPO, "tests", "test_*.py")):
        with open(path) as handle:
            for name in re.findall(r"^def (test_\w+)", handle.read(), re.M):
                defined.setdefault(name, set()).add(os.path.relpath(path, REPO))
    wrong = []
    for doc in _docs():
        with open(os.path.join(REPO, doc)) as handle:
            named = re.findall(r"`(?:(tests/\w+\.py)::)?(test_\w+)`", handle.read())
        wrong += [f"{doc}: {file}::{name}" for file, name in named
                  if name not in defined or (file and file not in defined[name])]
    assert not wrong


def test_every_dotted_tnas_name_the_docs_give_resolves():
    """`tnas.pkg.module.name` in README or docs/ (call arguments aside) imports and has that attribute, so a
    moved or renamed function does not stay in the prose."""
    import importlib

    wrong = []
    for doc in _docs():
        with open(os.path.join(REPO, doc)) as handle:
            spans = re.findall(r"`([^`\n]+)`", handle.read())
        for name in {n for span in spans for n in re.findall(r"(?<![\w.])tnas(?:\.\w+)+", span)}:
            parts = name.split(".")
            if parts[-1] == "py":  # a file name (tnas.py, the original's), not a module path
                continue
            for cut in range(len(parts), 0, -1):
                try:
                    found = importlib.import_module(".".join(parts[:cut]))
                    break
                except ImportError:
                    continue
            for part in parts[cut:]:
                found = getattr(found, part, None)
            if found is None:
                wrong.append(f"{doc}: {name}")
    assert not wrong
