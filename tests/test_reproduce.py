"""scripts/reproduce.py and tnas/reproduce: the table (pure), the plan's steps, skip/resume logic with the stage
launches stubbed (and stale steps redone after a step they read changed), one-line errors, and (slow) the whole
pipeline end to end on tiny glyphs with an interrupted step."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tnas.errors import TnasError
from tnas.reproduce import plan as plans
from tnas.reproduce import runner
from tnas.reproduce.table import build_table, render_markdown
from run_locks import held_run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "reproduce.py")


# -- the table -------------------------------------------------------------------------------------------
def _result(mean, ci, **extra):
    return dict({"accuracy_mean": mean, "ci95": ci, "episodes": 600}, **extra)


def _cells():
    return [{"method": "maml", "shot": 1, "steps": ["1/maml/train", "1/maml/evaluate"]},
            {"method": "tnas", "shot": 1, "steps": ["1/tnas/search", "1/tnas/protocol"]},
            {"method": "tnas++", "shot": 1, "steps": ["1/tnas/search", "1/tnas++/protocol"]}]


def _steps():
    return {
        "1/maml/train": {"kind": "train", "state": "done", "seconds": 3600.0, "devices": 1, "result": None},
        "1/maml/evaluate": {"kind": "evaluate", "state": "done", "seconds": 360.0, "devices": 1,
                            "result": _result(49.1234, 1.8, genotypes=None)},
        "1/tnas/search": {"kind": "search", "state": "done", "seconds": 1800.0, "devices": 2, "result": None},
        "1/tnas/protocol": {"kind": "protocol", "state": "done", "seconds": 7200.0, "devices": 1,
                            "result": _result(53.0, 1.4, distinct_genotypes=587)},
        "1/tnas++/protocol": {"kind": "protocol", "state": "running", "seconds": 900.0, "devices": 1,
                              "result": None},
    }


def test_table_rows_cells_costs_and_paper_figures():
    table = build_table(_cells(), _steps(), {"paper": "miniimagenet", "title": "T", "dataset": "miniimagenet",
                                             "commit": "abc123", "budget": False})
    assert [row["method"] for row in table["rows"]] == ["maml", "tnas", "tnas++"] and table["shots"] == [1]
    maml, tnas, plus = (row["cells"]["1"] for row in table["rows"])
    assert maml["state"] == "done" and maml["accuracy_mean"] == pytest.approx(49.1234)
    assert maml["distinct_genotypes"] is None and maml["device_hours"] == pytest.approx(1.1)
    assert maml["paper"] == {"accuracy_mean": 48.70, "ci95": 1.84}
    # the shared search (2 devices x 0.5 h) counts in both T-NAS cells, once in the total
    assert tnas["device_hours"] == pytest.approx(1.0 + 2.0) and tnas["distinct_genotypes"] == 587
    assert plus["state"] == "running: protocol (2/2)" and plus["accuracy_mean"] is None
    assert plus["device_hours"] == pytest.approx(1.25) and plus["paper"]["accuracy_mean"] == 54.11
    assert table["shared_steps"] == ["1/tnas/search"]
    assert table["device_hours_total"] == pytest.approx(1.0 + 0.1 + 1.0 + 2.0 + 0.25)
    assert table["rows"][2]["state"].startswith("running") and table["rows"][0]["state"] == "done"
    markdown = render_markdown(table)
    assert "| MAML (Conv-4) | 49.12 ± 1.80 | 48.70 ± 1.84 | 1.1 | — |" in markdown
    assert "| T-NAS | 53.00 ± 1.40 | 52.84 ± 1.41 | 3.0 | 587 |" in markdown
    assert "| T-NAS++ | running: protocol (2/2) | 54.11 ± 1.35 | 1.2 so far | — |" in markdown
    assert "abc123" in markdown and "Budget run" not in markdown


def test_table_without_paper_column_marks_budget_and_failures():
    steps = _steps()
    steps["1/maml/train"]["state"] = "failed"
    steps["1/maml/evaluate"].update(state="pending", result=None, seconds=0.0)
    table = build_table(_cells()[:1], steps, {"paper": None, "budget": True, "title": "demo"})
    cell = table["rows"][0]["cells"]["1"]
    assert cell["state"] == "failed: train (1/2)" and cell["paper"] is None
    markdown = render_markdown(table)
    assert "(paper)" not in markdown.splitlines()[4] and "Budget run" in markdown
    assert "| MAML (Conv-4) | failed: train (1/2) | 1.0 so far | — |" in markdown


# -- the plan and its steps -------------------------------------------------------------------------------
def test_paper_plan_steps_order_presets_and_shared_search(tmp_path):
    plan = plans.load_plan(os.path.join(REPO, "configs", "reproduce_paper.yaml"))
    settings = plans.Settings(out=str(tmp_path), shots=(1, 5), methods=plans.METHODS, budget=True, device="cuda",
                              data_path="/data/mini")
    steps, cells = plans.build_steps(plan, settings)
    names = [step.name for step in steps]
    assert names[:4] == ["1shot/maml/train", "1shot/maml/evaluate", "5shot/maml/train", "5shot/maml/evaluate"]
    assert names.count("1shot/tnas/search") == 1 and len(names) == 2 * (2 + 3 + 2 + 1)
    assert [cell.steps for cell in cells if cell.method == "tnas++" and cell.shot == 5] == \
        [("5shot/tnas/search", "5shot/tnas++/protocol")]
    by_name = {step.name: step for step in steps}
    train = by_name["5shot/maml/train"].argv
    assert train[train.index("--config") + 1].endswith("configs/maml_conv4_miniimagenet_5w5s.yaml")
    assert "--model" in train and train[train.index("--epochs") + 1] == "2"  # budget
    protocol = by_name["1shot/tnas++/protocol"].argv
    assert "--budget" in protocol and protocol[protocol.index("--episodes") + 1] == "600"
    assert protocol[protocol.index("--tasks_per_epoch") + 1] == "2000"  # the plan's budget, stated
    assert protocol[protocol.index("--checkpoint") + 1] == os.path.join(str(tmp_path), "1shot", "tnas", "search")
    evaluate = by_name["1shot/auto_maml/evaluate"]
    assert not evaluate.distributed and evaluate.argv[evaluate.argv.index("--episodes_file") + 1] == \
        protocol[protocol.index("--episodes_file") + 1]
    for step in steps:  # every preset a step names exists, and the stage flags it passes are the stage's
        assert step.argv[step.argv.index("--device") + 1] == "cuda"
    assert runner.step_command(by_name["1shot/tnas/search"], "resume", 4, "py")[:5] == \
        ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert runner.step_command(evaluate, "new", 4, "py")[:2] == ["py", evaluate.script]


def test_every_paper_and_demo_preset_parses_for_its_stage():
    """The presets the plans name are valid configs of the stages they are given to."""
    from tnas.config import parse_args
    from tnas.stages import protocol, search, train

    parsers = {"search": search.build_parser, "train": train.build_parser, "protocol": protocol.build_parser}
    for plan_file in ("reproduce_paper.yaml", "reproduce_demo.yaml"):
        plan = plans.load_plan(os.path.join(REPO, "configs", plan_file))
        for key in plans.PRESET_KEYS:
            stage = key.rsplit("_", 1)[1]
            for shot in plan.shots:
                args = parse_args(parsers[stage](), ["--config", plans.preset_path(plan, key, shot)])
                if key == "maml_train":
                    assert args.model == "conv4"


@pytest.mark.parametrize("argv, message", [
    (["--out", "X"], "--data_path DIR is required"),
    (["--demo", "--shots", "1,x"], "--shots must be"),
    (["--demo", "--methods", "maml,darts"], "unknown method(s) darts"),
    (["--demo", "--nproc", "0"], "--nproc must be >= 1"),
    (["--demo", "--bogus"], "unknown command-line argument(s): --bogus"),
    (["--dem", "--dry_run"], "unknown command-line argument(s): --dem (did you mean --demo?)"),  # never taken for --demo
    (["--plan", "nowhere.yaml"], "--plan nowhere.yaml: file not found"),
])
def test_bad_input_is_one_line_error(argv, message, tmp_path):
    result = subprocess.run([sys.executable, SCRIPT] + argv, capture_output=True, text=True, cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


# -- skip / resume with the stages stubbed ------------------------------------------------------------------
class FakeStages:
    """Stands in for the stage processes: writes what each would (a best.pt and a search's best_genotype.json
    that differ from run to run, evaluations scoring ``accuracy``), records the command lines, and can be made
    to 'crash' a given step halfway (a last.pt but not every epoch done)."""

    def __init__(self, crash=None, accuracy=50.0):
        self.calls = []
        self.crash = crash
        self.accuracy = accuracy
        self.runs = 0

    def __call__(self, command, tick):
        argv = command[2:]
        script = os.path.basename(command[1])
        out = argv[argv.index("--out") + 1]
        self.calls.append((script, out, "--resume" in argv))
        self.runs += 1
        os.makedirs(out, exist_ok=True)
        tick(7.2)
        if script in ("search.py", "train_from_scratch.py"):
            open(os.path.join(out, "last.pt"), "wb").close()
            if self.crash == out:
                self.crash = None
                with open(os.path.join(out, "search.json" if script == "search.py" else "train.json"), "w") as f:
                    json.dump({"epochs": 2, "epochs_done": 1}, f)
                return 1
            with open(os.path.join(out, "best.pt"), "w") as f:
                f.write(f"weights of run {self.runs}")
            if script == "search.py":
                with open(os.path.join(out, "best_genotype.json"), "w") as f:
                    json.dump({"normal": [], "run": self.runs}, f)
            with open(os.path.join(out, "search.json" if script == "search.py" else "train.json"), "w") as f:
                json.dump({"epochs": 2, "epochs_done": 2}, f)
            return 0
        record = {"accuracy_mean": self.accuracy, "ci95": 2.0, "episodes": 10, "genotypes": {"normal": []}}
        if script == "evaluate_tnas.py":
            record["distinct_genotypes"] = 9
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(record, f)
        return 0


def _demo_pipeline(tmp_path, methods=plans.METHODS, budget=False):
    plan = plans.load_plan(os.path.join(REPO, "configs", "reproduce_demo.yaml"))
    settings = plans.Settings(out=str(tmp_path / "out"), shots=(1,), methods=methods, budget=budget)
    steps, cells = plans.build_steps(plan, settings)
    return plan, settings, steps, cells


def test_rerun_skips_done_steps_and_resumes_the_interrupted_one(tmp_path):
    plan, settings, steps, cells = _demo_pipeline(tmp_path)
    crashed = os.path.join(settings.out, "1shot", "auto_maml", "train")
    fake = FakeStages(crash=crashed)
    with pytest.raises(TnasError, match="step 1shot/auto_maml/train failed"):
        runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=fake, log=lambda line: None)
    assert [call[1].split("/out/")[1] for call in fake.calls] == \
        ["1shot/maml/train", "1shot/maml/evaluate", "1shot/auto_maml/search", "1shot/auto_maml/train"]
    with open(os.path.join(settings.out, "table.json")) as handle:
        table = json.load(handle)
    states = {row["method"]: row["cells"]["1"]["state"] for row in table["rows"]}
    assert states == {"maml": "done", "auto_maml": "failed: train (2/3)", "tnas": "pending", "tnas++": "pending"}

    fake.calls.clear()
    lines = []
    table = runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=fake, log=lines.append)
    ran = [(call[1].split("/out/")[1], call[2]) for call in fake.calls]
    assert ran == [("1shot/auto_maml/train", True), ("1shot/auto_maml/evaluate", False),
                   ("1shot/tnas/search", False), ("1shot/tnas/protocol", False), ("1shot/tnas++/protocol", False)]
    assert sum("done, skipped" in line for line in lines) == 3
    cells_out = {row["method"]: row["cells"]["1"] for row in table["rows"]}
    assert all(cell["state"] == "done" for cell in cells_out.values())
    assert cells_out["tnas"]["distinct_genotypes"] == 9 and cells_out["auto_maml"]["distinct_genotypes"] == 1
    # the crashed training was launched twice: both attempts' seconds count
    ledger = json.load(open(os.path.join(settings.out, "ledger.json")))["steps"]
    assert ledger["1shot/auto_maml/train"]["attempts"] == 2
    assert ledger["1shot/auto_maml/train"]["seconds"] == pytest.approx(14.4)

    fake.calls.clear()
    runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=fake, log=lambda line: None)
    assert fake.calls == []  # everything done: nothing runs

    # another --budget into the same directory would mix schedules: refused
    _, budget_settings, budget_steps, budget_cells = _demo_pipeline(tmp_path, budget=True)
    with pytest.raises(TnasError, match="other settings \\(budget: False -> True\\)"):
        runner.run_pipeline(plan, budget_settings, budget_steps, budget_cells, {}, launch=fake, log=lambda l: None)


def test_a_killed_invocation_shows_as_interrupted_then_resumes(tmp_path):
    plan, settings, steps, cells = _demo_pipeline(tmp_path, methods=("maml",))

    def killed(command, tick):
        out = command[command.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "last.pt"), "wb").close()
        tick(3.0)
        raise runner.Interrupted("stopped by signal 15")

    with pytest.raises(runner.Interrupted):
        runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=killed, log=lambda line: None)
    table = json.load(open(os.path.join(settings.out, "table.json")))
    assert table["rows"][0]["cells"]["1"]["state"] == "interrupted: train (1/2)"
    assert "interrupted: train (1/2) | 0.001 so far" in open(os.path.join(settings.out, "table.md")).read()
    fake = FakeStages()
    runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=fake, log=lambda line: None)
    assert [(c[0], c[2]) for c in fake.calls] == [("train_from_scratch.py", True), ("evaluate.py", False)]


def test_a_second_reproduction_into_a_busy_out_is_refused_and_runs_nothing(tmp_path):
    """While one reproduction runs in OUT, a second would mark its running step interrupted and run it again
    beside it (or move a live run aside as stale): refused in one line; the first's files are left alone."""
    plan, settings, steps, cells = _demo_pipeline(tmp_path, methods=("maml",))
    fake = FakeStages()
    with held_run_lock(settings.out):
        with pytest.raises(TnasError, match=f"--out {settings.out} is in use by another run"):
            runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=fake, log=lambda line: None)
    assert fake.calls == [] and os.listdir(settings.out) == ["run.lock"]
    runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=fake, log=lambda line: None)
    assert len(fake.calls) == 2  # free again: it runs


# -- staleness: a step run from an earlier output of the steps it reads is redone ----------------------------
def _run(plan, settings, steps, cells, fake):
    """One invocation; returns (its log lines, the steps it launched as (name, resumed))."""
    lines, first = [], len(fake.calls)
    table = runner.run_pipeline(plan, settings, steps, cells, {"paper": None}, launch=fake, log=lines.append)
    return lines, [(call[1].split("/out/")[1], call[2]) for call in fake.calls[first:]], table


def _accuracies(table):
    return {row["method"]: row["cells"]["1"]["accuracy_mean"] for row in table["rows"]}


def _sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_steps_name_the_upstream_files_they_read(tmp_path):
    from tnas.genotypes import BEST_GENOTYPE_FILE

    assert plans.GENOTYPE_FILES == (BEST_GENOTYPE_FILE, "genotype.json")  # as load_genotype tries them
    _, settings, steps, _ = _demo_pipeline(tmp_path)
    inputs = {step.name: [(i.step, [os.path.relpath(f, settings.out) for f in i.files]) for i in step.inputs]
              for step in steps}
    assert inputs == {
        "1shot/maml/train": [], "1shot/auto_maml/search": [], "1shot/tnas/search": [],
        "1shot/maml/evaluate": [("1shot/maml/train", ["1shot/maml/train/best.pt"])],
        "1shot/auto_maml/train": [("1shot/auto_maml/search", ["1shot/auto_maml/search/best_genotype.json",
                                                              "1shot/auto_maml/search/genotype.json"])],
        "1shot/auto_maml/evaluate": [("1shot/auto_maml/train", ["1shot/auto_maml/train/best.pt"])],
        "1shot/tnas/protocol": [("1shot/tnas/search", ["1shot/tnas/search/best.pt"])],
        "1shot/tnas++/protocol": [("1shot/tnas/search", ["1shot/tnas/search/best.pt"])]}


def test_odd_ledger_records_count_as_not_recorded(tmp_path):
    """A hand-edited ledger's inputs (no file name, a string, a list) are 'not recorded', not a traceback."""
    from tnas.reproduce.freshness import changed_inputs

    _, _, steps, _ = _demo_pipeline(tmp_path)
    step = next(s for s in steps if s.name == "1shot/maml/evaluate")
    os.makedirs(os.path.dirname(step.inputs[0].files[0]), exist_ok=True)
    with open(step.inputs[0].files[0], "wb") as handle:
        handle.write(b"weights")
    upstream = step.inputs[0].step
    for recorded in ({upstream: {"sha256": "ab"}}, {upstream: "abc"}, [upstream], "x"):
        assert changed_inputs(step, recorded) == [f"{upstream}/best.pt was not recorded"]


def test_a_redone_search_makes_its_downstream_steps_stale_and_redone(tmp_path):
    plan, settings, steps, cells = _demo_pipeline(tmp_path)
    fake = FakeStages()
    _run(plan, settings, steps, cells, fake)
    out = settings.out

    # unchanged upstream: nothing runs; bytes count, not times (a touched best.pt is the same input)
    os.utime(os.path.join(out, "1shot", "tnas", "search", "best.pt"), (1, 1))
    lines, ran, _ = _run(plan, settings, steps, cells, fake)
    assert ran == [] and not any(": stale" in line for line in lines)

    # the auto-MAML search deleted by the user (searched again below), the T-NAS search's best.pt replaced (a
    # resumed, extended search found a better epoch)
    shutil.rmtree(os.path.join(out, "1shot", "auto_maml", "search"))
    with open(os.path.join(out, "1shot", "tnas", "search", "best.pt"), "w") as handle:
        handle.write("a better epoch")
    ledger = runner.Ledger(out)
    states = runner.step_states(steps, ledger)
    assert states["1shot/auto_maml/search"] == "new"
    assert states["1shot/auto_maml/train"] == "stale: 1shot/auto_maml/search/best_genotype.json is gone"
    assert states["1shot/auto_maml/evaluate"] == "stale: 1shot/auto_maml/train is stale and will be redone"
    assert states["1shot/tnas/protocol"].startswith("stale: 1shot/tnas/search/best.pt changed (sha256 ")
    assert states["1shot/maml/evaluate"] == "done"
    table = runner.current_table(steps, cells, ledger, {"paper": None})  # stale results are not listed
    assert _accuracies(table) == {"maml": 50.0, "auto_maml": None, "tnas": None, "tnas++": None}
    assert table["rows"][1]["cells"]["1"]["state"] == "stale: train (2/3)"
    assert table["rows"][2]["cells"]["1"]["state"] == "stale: protocol (2/2)"
    assert "| auto-MAML | stale: train (2/3) |" in render_markdown(table)

    fake.accuracy = 61.0
    lines, ran, table = _run(plan, settings, steps, cells, fake)
    assert ran == [("1shot/auto_maml/search", False), ("1shot/auto_maml/train", False),
                   ("1shot/auto_maml/evaluate", False), ("1shot/tnas/protocol", False),
                   ("1shot/tnas++/protocol", False)]
    stale = [line for line in lines if ": stale, redoing it from the start (" in line]
    assert len(stale) == 4
    assert "1shot/auto_maml/train: stale" in stale[0] and \
        "(1shot/auto_maml/search/best_genotype.json changed" in stale[0]
    assert "1shot/auto_maml/evaluate: stale" in stale[1] and "(1shot/auto_maml/train/best.pt changed" in stale[1]
    assert "1shot/tnas/protocol: stale" in stale[2] and "(1shot/tnas/search/best.pt changed" in stale[2]
    assert _accuracies(table) == {"maml": 50.0, "auto_maml": 61.0, "tnas": 61.0, "tnas++": 61.0}
    assert all(row["cells"]["1"]["state"] == "done" for row in table["rows"])
    # nothing lost: the old runs were moved aside, their cost with them
    train = os.path.join(out, "1shot", "auto_maml", "train")
    assert os.path.isfile(os.path.join(train + ".stale-1", "best.pt"))
    with open(os.path.join(out, "1shot", "auto_maml", "evaluate.stale-1", "results.json")) as handle:
        assert json.load(handle)["accuracy_mean"] == 50.0
    entry = runner.Ledger(out).steps["1shot/auto_maml/train"]
    assert entry["state"] == "done" and entry["attempts"] == 1 and entry["seconds"] == pytest.approx(7.2)
    [old] = entry["superseded"]
    assert old["run"] == train + ".stale-1" and old["seconds"] == pytest.approx(7.2) and old["devices"] == 1
    assert old["reason"].startswith("1shot/auto_maml/search/best_genotype.json changed") and \
        f"({old['reason']}); its old run is now {train}.stale-1" in stale[0]
    assert entry["inputs"] == {"1shot/auto_maml/search": {
        "file": "best_genotype.json",
        "sha256": _sha256(os.path.join(out, "1shot", "auto_maml", "search", "best_genotype.json"))}}
    search = runner.Ledger(out).steps["1shot/auto_maml/search"]  # deleted by the user: its time went with it
    assert search["superseded"] == [{"run": None, "reason": "its run directory was deleted", "seconds": 7.2,
                                     "devices": 1}]
    assert table["device_hours_total"] == pytest.approx(8 * 7.2 / 3600)  # the current runs' time

    lines, ran, _ = _run(plan, settings, steps, cells, fake)
    assert ran == [] and sum("done, skipped" in line for line in lines) == 8


def test_a_started_step_whose_upstream_changed_is_not_resumed(tmp_path):
    plan, settings, steps, cells = _demo_pipeline(tmp_path, methods=("auto_maml",))
    train = os.path.join(settings.out, "1shot", "auto_maml", "train")
    fake = FakeStages(crash=train)
    with pytest.raises(TnasError, match="step 1shot/auto_maml/train failed"):
        _run(plan, settings, steps, cells, fake)
    genotype = os.path.join(settings.out, "1shot", "auto_maml", "search", "best_genotype.json")
    with open(genotype, "w") as handle:
        json.dump({"normal": [], "edited": True}, handle)
    lines, ran, table = _run(plan, settings, steps, cells, fake)
    assert ran == [("1shot/auto_maml/train", False), ("1shot/auto_maml/evaluate", False)]  # no --resume
    assert os.path.isfile(os.path.join(train + ".stale-1", "last.pt"))
    [line] = [line for line in lines if ": stale" in line]
    assert "1shot/auto_maml/train: stale, redoing it from the start (1shot/auto_maml/search/best_genotype.json " \
           "changed (sha256 " in line and line.endswith(f"its old run is now {train}.stale-1")
    assert table["rows"][0]["cells"]["1"]["state"] == "done"


def test_steps_without_a_record_are_taken_as_current_unless_their_upstream_runs_again(tmp_path):
    """A ledger from a tnas before these records: its finished steps are kept (and recorded from then on),
    unless a step they read is run again in this invocation."""
    plan, settings, steps, cells = _demo_pipeline(tmp_path)
    fake = FakeStages()
    _run(plan, settings, steps, cells, fake)
    ledger_path = os.path.join(settings.out, "ledger.json")

    def forget_inputs():
        with open(ledger_path) as handle:
            ledger = json.load(handle)
        for entry in ledger["steps"].values():
            entry.pop("inputs")
        with open(ledger_path, "w") as handle:
            json.dump(ledger, handle)

    forget_inputs()
    states = runner.step_states(steps, runner.Ledger(settings.out))
    assert not any(state.startswith("stale") for state in states.values())
    lines, ran, table = _run(plan, settings, steps, cells, fake)
    assert ran == [] and all(row["cells"]["1"]["state"] == "done" for row in table["rows"])
    notes = [line.split(": ")[1] for line in lines if "no record of what it read" in line]
    assert notes == ["[2/8] 1shot/maml/evaluate", "[4/8] 1shot/auto_maml/train", "[5/8] 1shot/auto_maml/evaluate",
                     "[7/8] 1shot/tnas/protocol", "[8/8] 1shot/tnas++/protocol"]
    assert all("inputs" in entry for entry in runner.Ledger(settings.out).steps.values())
    # recorded now: a later change is seen
    with open(os.path.join(settings.out, "1shot", "auto_maml", "search", "best_genotype.json"), "w") as handle:
        handle.write("{}")
    _, ran, _ = _run(plan, settings, steps, cells, fake)
    assert ran == [("1shot/auto_maml/train", False), ("1shot/auto_maml/evaluate", False)]

    # no record, and the T-NAS search is searched again: the protocols cannot have read it
    forget_inputs()
    shutil.rmtree(os.path.join(settings.out, "1shot", "tnas", "search"))
    states = runner.step_states(steps, runner.Ledger(settings.out))
    assert states["1shot/tnas/protocol"] == \
        "stale: no record of what it read (run by an older tnas) and 1shot/tnas/search ran again"
    lines, ran, _ = _run(plan, settings, steps, cells, fake)
    assert ran == [("1shot/tnas/search", False), ("1shot/tnas/protocol", False), ("1shot/tnas++/protocol", False)]
    assert sum("stale, redoing it from the start (no record of what it read" in line for line in lines) == 2


def test_source_version_names_the_commit(tmp_path):
    """In a git checkout: its HEAD commit (``+dirty`` with uncommitted changes to tracked files); elsewhere the
    package version. Either branch alone passing (the old check) would hide the wrong one being taken."""
    import tnas

    git = lambda *args: subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)  # noqa: E731
    try:
        head = git("rev-parse", "HEAD")
    except OSError:
        head = None  # no git program: the fallback is all there is
    if head is not None and head.returncode == 0:
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        assert runner.source_version() == head.stdout.strip() + ("+dirty" if dirty else "")
    assert runner.source_version(str(tmp_path)) == f"tnas {tnas.__version__} (no git checkout)"


# -- the whole pipeline, tiny ---------------------------------------------------------------------------------
TINY_COMMON = {"dataset": "glyphs", "device": "cpu", "threads": 1, "img_size": 16, "n_way": 3, "q_query": 2,
               "tasks_per_batch": 2, "epochs": 1, "tasks_per_epoch": 4, "val_episodes": 3, "val_batch_size": 3,
               "log_every": 0, "checkpoint_every": 1, "inner_steps": 1, "inner_steps_test": 2}


def write_tiny_plan(directory):
    """A plan of tiny presets (16x16 glyphs, 3-way, one epoch of 4 tasks) in ``directory``."""
    presets = {
        "search_tnas.yaml": dict(TINY_COMMON, C=2, layers=1, inner_lr_weights=0.1, inner_lr_alphas=3.0),
        "search_auto.yaml": dict(TINY_COMMON, C=2, layers=1, inner_lr_weights=0.1),
        "scratch.yaml": dict(TINY_COMMON, C=2, layers=1, inner_lr=0.1, genotype="auto_maml_1shot"),
        "maml.yaml": dict(TINY_COMMON, model="conv4", filters=4, inner_lr=0.1),
        "protocol.yaml": {"method": "tnas", "device": "cpu", "train_config": str(directory / "scratch.yaml"),
                          "epochs": 1, "tasks_per_epoch": 4, "val_episodes": 3, "val_batch_size": 3,
                          "log_every": 0, "checkpoint_every": 1},
    }
    presets["protocol_pp.yaml"] = dict(presets["protocol.yaml"], method="tnas++",
                                       train_args="--first_order_epochs 1 --msl_epochs 1")
    for name, values in presets.items():
        (directory / name).write_text(yaml.safe_dump(values))
    plan = {"title": "tiny", "dataset": "glyphs", "shots": [1],
            "presets": {"maml_train": "maml.yaml", "auto_maml_search": "search_auto.yaml",
                        "auto_maml_train": "scratch.yaml", "tnas_search": "search_tnas.yaml",
                        "tnas_protocol": "protocol.yaml", "tnas++_protocol": "protocol_pp.yaml"},
            "evaluate": {"episodes": 3, "seed": 0, "update_step_test": 2, "batch_size": 3}}
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_with_an_interrupted_training(tmp_path):
    """Every row through the real stage scripts; the MAML training is first left halfway (one of two epochs,
    as a killed run leaves it) and must be resumed, not restarted; a rerun then runs nothing."""
    from tnas.config import parse_args
    from tnas.stages import train

    plan = write_tiny_plan(tmp_path)
    out = tmp_path / "out"
    maml_dir = out / "1shot" / "maml" / "train"
    maml_preset = yaml.safe_load((tmp_path / "maml.yaml").read_text())
    maml_preset["epochs"] = 2
    (tmp_path / "maml.yaml").write_text(yaml.safe_dump(maml_preset))
    train.run(parse_args(train.build_parser(), ["--config", str(tmp_path / "maml.yaml"), "--k_shot", "1",
                                                "--out", str(maml_dir), "--model", "conv4", "--epochs", "1"]))
    summary_path = maml_dir / "train.json"  # as a run of 2 epochs killed after its first leaves it
    summary = json.loads(summary_path.read_text())
    summary["epochs"] = 2
    summary_path.write_text(json.dumps(summary))
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", TNAS_PROGRESS="0")
    command = [sys.executable, SCRIPT, "--plan", plan, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert "1shot/maml/train: resuming" in result.stdout
    summary = json.load(open(maml_dir / "train.json"))
    assert summary["epochs_done"] == 2 and [r["iteration"] for r in summary["history"]] == [2, 4]
    table = json.load(open(out / "table.json"))
    assert [row["method"] for row in table["rows"]] == list(plans.METHODS)
    for row in table["rows"]:
        cell = row["cells"]["1"]
        assert cell["state"] == "done" and 0.0 <= cell["accuracy_mean"] <= 100.0 and cell["episodes"] == 3
        assert cell["device_hours"] > 0 and cell["paper"] is None
    assert table["rows"][0]["cells"]["1"]["distinct_genotypes"] is None
    assert table["rows"][1]["cells"]["1"]["distinct_genotypes"] == 1
    assert table["rows"][2]["cells"]["1"]["distinct_genotypes"] >= 1
    assert table["commit"] and table["settings"]["plan"]
    markdown = (out / "table.md").read_text()
    assert "| T-NAS++ |" in markdown and "(paper)" not in markdown and "3 fixed test tasks (glyphs, 3-way)" in markdown
    # every method scored the same test tasks
    results = [json.load(open(out / "1shot" / owner / kind / "results.json"))
               for owner, kind in (("maml", "evaluate"), ("auto_maml", "evaluate"), ("tnas", "protocol"),
                                   ("tnas++", "protocol"))]
    assert len({r["episodes_file"] for r in results}) == 1
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0 and rerun.stdout.count("done, skipped") == 8, rerun.stdout[-2000:]


def test_shell_wrapper_runs_the_demo_unless_a_dataset_is_named(tmp_path):
    """``reproduce_paper.sh --out DIR`` is the demo into DIR; with --data_path it is the paper's plan."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    wrapper = os.path.join(REPO, "reproduce_paper.sh")
    demo = subprocess.run(["bash", wrapper, "--out", str(tmp_path / "d"), "--dry_run"], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path))
    assert demo.returncode == 0, demo.stderr
    assert "configs/reproduce_demo_maml.yaml" in demo.stdout and "| T-NAS++ | pending |" in demo.stdout
    assert not (tmp_path / "d").exists()  # a dry run writes nothing
    paper = subprocess.run(["bash", wrapper, "--data_path", str(tmp_path), "--out", str(tmp_path / "p"),
                            "--shots", "5", "--budget", "--dry_run"], capture_output=True, text=True, env=env)
    assert paper.returncode == 0, paper.stderr
    assert "configs/maml_conv4_miniimagenet_5w5s.yaml" in paper.stdout and "1shot" not in paper.stdout
    assert "48.70 ± 1.84" not in paper.stdout and "63.11 ± 0.92" in paper.stdout and "Budget run" in paper.stdout
