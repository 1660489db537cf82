"""scripts/genotype.py: real subprocess runs, the same entry point in process, and its helpers.

Starting Python with torch costs seconds of CPU, so two real ``python scripts/genotype.py``
runs (one success with --plot, one error) start together once per module; the remaining
cases go through the same ``cli_entry(main)`` in process.
"""
import json
import os
import subprocess
import sys

import pytest

from tnas.errors import TnasError, cli_entry
from tnas.genotypes import PUBLISHED
from script_loader import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "genotype.py")
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("genotype_cli")
    (directory / "my_genotype.json").write_text(PUBLISHED["auto_maml_5shot"].to_json())
    (directory / "bad.json").write_text('{"normal": [["sep_conv_3x3", 0], ["conv_9x9", 1]],')
    (directory / "bad_op.json").write_text(json.dumps(
        {**PUBLISHED["auto_maml_1shot"].to_dict(), "reduce": [["conv_9x9", 0]] * 8}))
    return directory


@pytest.fixture(scope="module")
def script():
    """The script imported as a module, for the in-process runs."""
    return load_script(SCRIPT)


SUBPROCESS_RUNS = {
    "1shot_plot": lambda workdir: ["auto_maml_1shot", "--plot", str(workdir / "plots")],
    "bad_json": lambda workdir: [str(workdir / "bad.json")],
}


@pytest.fixture(scope="module", autouse=True)
def started(workdir):
    """Start the real ``python scripts/genotype.py`` processes with the module's first test.

    Each costs seconds of CPU just to import torch (and torchvision, through ptflops), so
    only one success and one failure run as subprocesses, and they overlap the in-process
    tests; the subprocess tests come last in this file and collect the results.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    processes = {key: subprocess.Popen([sys.executable, SCRIPT, *args(workdir)], cwd=REPO, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for key, args in SUBPROCESS_RUNS.items()}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def runs(started):
    """``{key: CompletedProcess}`` of the subprocess runs (waits for them)."""
    results = {}
    for key, process in started.items():
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[key] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


@pytest.fixture
def run_cli(script, capsys):
    """Run ``cli_entry(main)`` in process, as ``__main__`` does: a CompletedProcess-like result."""
    def run(*argv):
        capsys.readouterr()
        try:
            cli_entry(lambda: script.main(list(argv)))
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, captured.out, captured.err)
    return run


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def macs_in(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("MACs: "))
    return int(line.split()[1].replace(",", ""))


def assert_one_line_error(result, message):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert result.stdout == ""


# --------------------------------------------------------------------------- in process, through cli_entry

def test_published_5shot_json(run_cli):
    result = run_cli("auto_maml_5shot", "--json")
    assert_ok(result)
    data = json.loads(result.stdout)
    assert data["parameters"] == 26_061
    assert data["genotype"] == PUBLISHED["auto_maml_5shot"].to_dict()
    assert isinstance(data["macs"], int) and data["macs"] >= data["macs_conv_linear"]
    assert data["macs_conv_linear"] == 27_713_488  # counted by hand: convolutions + linear, per 84x84 image
    assert data["config"] == {"n_way": 5, "C": 16, "layers": 2, "img_size": 84, "in_channels": 3}


def test_published_5shot_text(run_cli):
    result = run_cli("auto_maml_5shot")
    assert_ok(result)
    assert "parameters: 26,061 (26.1K)" in result.stdout
    assert macs_in(result.stdout) > 20e6


def test_genotype_json_file_and_run_dir(run_cli, workdir, tmp_path):
    result = run_cli(str(workdir / "my_genotype.json"), "--C", "8", "--img_size", "32")
    assert_ok(result)
    assert "sep_conv_5x5" in result.stdout and "parameters: " in result.stdout and "MACs: " in result.stdout
    (tmp_path / "genotype.json").write_text(PUBLISHED["auto_maml_5shot"].to_json())
    from_dir = run_cli(str(tmp_path), "--C", "8", "--img_size", "32")
    assert_ok(from_dir)
    assert from_dir.stdout.split("parameters:")[1] == result.stdout.split("parameters:")[1]


@pytest.mark.parametrize("key, message", [
    ("bad_json", "bad.json: invalid JSON"),
    ("bad_op", "unknown op 'conv_9x9' in reduce cell"),
    ("unknown", "unknown genotype 'no_such_genotype'"),
])
def test_errors_are_one_line(run_cli, workdir, key, message):
    argv = {"bad_json": str(workdir / "bad.json"), "bad_op": str(workdir / "bad_op.json"),
            "unknown": "no_such_genotype"}[key]
    assert_one_line_error(run_cli(argv), message)


@pytest.mark.parametrize("argv, message", [
    (["auto_maml_1shot", "--jso"], "unknown command-line argument(s): --jso (did you mean --json?)"),
    (["auto_maml_1shot", "--C", "x"], "argument --C: invalid int value: 'x'"),
    ([], "the following arguments are required: NAME_OR_JSON"),
])
def test_bad_flags_are_one_line_errors(run_cli, argv, message):
    """A bad, unknown or shortened flag is one `error:` line (tnas.config.parse_flags), not argparse's usage
    block; a shortened flag is never taken for the one it starts."""
    assert_one_line_error(run_cli(*argv), message)


# --------------------------------------------------------------------------- main() and helpers

def test_small_image_is_rejected(script):
    with pytest.raises(TnasError, match="--img_size 8 is too small for --layers 3: need at least 16"):
        script.main(["auto_maml_1shot", "--layers", "3", "--img_size", "8"])
    with pytest.raises(TnasError, match="--C must be >= 1"):
        script.main(["auto_maml_1shot", "--C", "0"])


def test_inline_json_and_small_config(script, capsys):
    inline = PUBLISHED["auto_maml_1shot"].to_json()
    assert script.main([inline, "--C", "4", "--img_size", "28", "--in_channels", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["genotype"] == PUBLISHED["auto_maml_1shot"].to_dict()
    assert data["config"]["in_channels"] == 1 and data["parameters"] > 0
    with pytest.raises(TnasError, match="inline genotype: invalid JSON"):
        script.main(['{"normal": '])


def test_binary_file_is_a_one_line_error(script, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bytes(range(128, 256)))
    with pytest.raises(TnasError, match="not a genotype JSON file"):
        script.main([str(path)])


def test_macs_are_sane(script):
    from tnas.models.network import Network
    model = Network(PUBLISHED["auto_maml_5shot"], n_way=5, C=4, layers=2, in_channels=3)
    from tnas.models.complexity import count_macs
    counted = count_macs(model, (3, 28, 28))
    assert counted["macs_source"] == "ptflops"
    assert counted["macs_conv_linear"] <= counted["macs"] <= 2 * counted["macs_conv_linear"]
    assert model.training  # counted on a copy: ptflops' eval() does not touch the model


def test_conv_linear_count_by_hand(script):
    import torch.nn as nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    expected = 8 * 10 * 10 * 3 * 9 + 8 * 10 * 10 * 9 + 8 * 5
    from tnas.models.complexity import conv_linear_macs
    assert conv_linear_macs(model, (3, 10, 10)) == expected


def test_human_units(script):
    assert script.human(23_213) == "23.2K" and script.human(26_061) == "26.1K"
    assert script.human(27_598_261) == "27.60M" and script.human(999) == "999"


# --------------------------------------------------------------------------- real subprocesses (last: they
# had the in-process tests' time to finish)

def test_subprocess_published_1shot_text_and_plots(runs, workdir):
    result = runs["1shot_plot"]
    assert_ok(result)
    assert "parameters: 23,213 (23.2K)" in result.stdout
    assert "avg_pool_3x3" in result.stdout and "dil_conv_5x5" in result.stdout
    macs = macs_in(result.stdout)
    assert 20e6 < macs < 40e6  # ~27.6M MACs per 84x84 image at C 16
    for cell in ("normal", "reduce"):
        for ext in ("dot", "png"):
            path = workdir / "plots" / f"{cell}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
            assert str(path) in result.stdout
        assert (workdir / "plots" / f"{cell}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_subprocess_bad_json_is_one_line_error(runs):
    assert_one_line_error(runs["bad_json"], "bad.json: invalid JSON")
