"""The decode stage (scripts/decode.py): one genotype per fixed test episode from a T-NAS search."""
import json
import os
import shutil

import pytest

from tnas.diversity import op_counts
from tnas.genotypes import genotype_counts, genotype_from_dict
from script_loader import load_script
from tb_events import summary_values

try:
    from test_evaluate import assert_one_line_error, run_in_process
except ImportError:  # run from elsewhere
    from tests.test_evaluate import assert_one_line_error, run_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "decode.py")
FAST = ["--episodes", "5", "--batch_size", "3", "--update_step_test", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


@pytest.fixture
def decode(script, capsys):
    return lambda *argv: run_in_process(script.main, argv, capsys)


def read_lines(path):
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()]


def test_genotype_counts():
    a, b, c = {"normal": [["skip_connect", 0]]}, {"normal": [["sep_conv_3x3", 1]]}, {"normal": []}
    counts = genotype_counts([a, b, b, c, a, b])
    assert [(group["genotype"], group["count"], group["episodes"]) for group in counts] == \
        [(b, 3, [1, 2, 5]), (a, 2, [0, 4]), (c, 1, [3])]


def test_decode_writes_one_genotype_per_episode(runs, decode, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("best.pt", "config.yaml"):
        shutil.copy(runs["search"] / name, run_dir / name)
    result = decode("--checkpoint", str(run_dir), *FAST)
    assert result.returncode == 0, result.stderr
    lines = read_lines(run_dir / "episode_genotypes.jsonl")  # the default output
    assert [line["episode"] for line in lines] == list(range(5))
    genotypes = [genotype_from_dict(line["genotype"]) for line in lines]  # valid genotypes
    assert all(len(g.normal) == len(g.reduce) == 8 for g in genotypes)
    summary = json.loads((run_dir / "decode_summary.json").read_text())
    assert summary["episodes"] == 5 and summary["seed"] == 0 and summary["update_step_test"] == 1
    assert sum(group["count"] for group in summary["counts"]) == 5
    assert summary["distinct"] == len(summary["counts"]) == len({json.dumps(l["genotype"]) for l in lines})
    assert sorted(i for group in summary["counts"] for i in group["episodes"]) == list(range(5))
    assert [group["count"] for group in summary["counts"]] == sorted((g["count"] for g in summary["counts"]),
                                                                      reverse=True)
    assert f"5 episodes -> {summary['distinct']} distinct genotype(s)" in result.stdout
    # what the tasks chose, beside the summary: the counts of these very genotypes
    diversity = json.loads((run_dir / "genotype_diversity.json").read_text())
    assert diversity["tasks"] == 5 and diversity["distinct_genotypes"] == summary["distinct"]
    assert diversity["most_common_count"] == summary["counts"][0]["count"]
    assert diversity["tasks_with_meta_genotype"] == summary["episodes_with_meta_genotype"]
    for cell in ("normal", "reduce"):
        assert diversity["cells"][cell]["op_counts"] == op_counts(genotypes, cell).tolist()
        assert (run_dir / f"op_frequency_{cell}.png").read_bytes().startswith(b"\x89PNG")
    assert "tasks/op_frequency_normal" in {tag for tag, _, _ in summary_values(run_dir / "tb")}
    assert "decode tasks 5/5 | " in result.stdout and "what the tasks chose: 5 tasks -> " in result.stdout


def test_same_tasks_as_evaluate_and_batching_does_not_matter(runs, decode, tmp_path):
    """Episode i is the task of the episodes file, decoded alone or in a batch of three."""
    from tnas.data import FixedEpisodes, load_split
    from tnas.stages.restore import learner_from_checkpoint

    episodes_file = tmp_path / "episodes.npz"
    out = tmp_path / "g.jsonl"
    result = decode("--checkpoint", str(runs["search"]), "--episodes_file", str(episodes_file), "--out", str(out),
                    "--seed", "3", *FAST)
    assert result.returncode == 0, result.stderr
    batched = [line["genotype"] for line in read_lines(out)]
    assert json.loads((tmp_path / "decode_summary.json").read_text())["seed"] == 3
    test = load_split("glyphs", "test", img_size=16, cache_dir=runs["cache_dir"])
    episodes = FixedEpisodes.load(episodes_file, test)
    assert episodes.seed == 3
    learner, _ = learner_from_checkpoint(runs["search"], "cpu")
    for index in (0, 4):
        alone = learner.decode(episodes.batch([index]), steps=1)[0].to_dict()
        assert alone == batched[index]


def test_decode_refuses_other_checkpoints(runs, decode, tmp_path):
    out = tmp_path / "g.jsonl"
    result = decode("--checkpoint", str(runs["train"]), "--out", str(out), *FAST)
    assert_one_line_error(result, "T-NAS search checkpoint", "'train' checkpoint of method 'maml'")
    assert not out.exists()


def test_decode_errors(runs, decode, tmp_path):
    assert_one_line_error(decode("--checkpoint", str(tmp_path / "none.pt"), *FAST), "checkpoint not found")
    assert_one_line_error(decode("--checkpoint", str(runs["search"]), "--out", str(tmp_path), *FAST),
                          "is a directory")
    assert_one_line_error(decode("--checkpoint", str(runs["search"]), "--n_way", "3", "--out",
                                 str(tmp_path / "g.jsonl"), *FAST), "--n_way 3", "5-way")
    assert not (tmp_path / "g.jsonl").exists() and not (tmp_path / "decode_summary.json").exists()


def test_an_auto_maml_checkpoint_is_refused_pointing_at_the_genotype_to_train():
    """auto-MAML has no per-task genotypes: the one-line error names the file a run directory's --genotype reads."""
    from tnas.errors import TnasError
    from tnas.stages.decode import check_tnas_search
    with pytest.raises(TnasError) as info:
        check_tnas_search({"stage": "search", "method": "auto_maml"}, "runs/am/best.pt")
    message = str(info.value)
    assert "\n" not in message and "runs/am/best.pt" in message
    assert "best_genotype.json" in message and "--genotype RUN_DIR" in message
    check_tnas_search({"stage": "search", "method": "tnas"}, "runs/t/best.pt")  # a T-NAS search passes
