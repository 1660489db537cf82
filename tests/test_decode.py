"""The decode stage (scripts/decode.py): one genotype per fixed test episode from a T-NAS search."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
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


def test_torchrun_ranks_share_the_batches_and_rank_0_writes_the_one_process_files(runs, decode, tmp_path):
    """5 episodes in batches of 2 over 2 gloo ranks (batches 0 and 2 on rank 0, batch 1 on rank 1): rank 0
    writes the episodes file before rank 1 reads it, and alone writes and prints what one process does."""
    two, one = tmp_path / "two", tmp_path / "one"
    episodes_file = two / "episodes.npz"
    flags = ["--checkpoint", str(runs["search"]), "--episodes", "5", "--batch_size", "2", "--update_step_test", "1",
             "--device", "cpu", "--episodes_file", str(episodes_file)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TNAS_PROGRESS="0")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             SCRIPT, *flags, "--out", str(two / "g.jsonl")], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=180)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    alone = decode(*flags, "--out", str(one / "g.jsonl"))  # reads the episodes file the ranks wrote
    assert alone.returncode == 0, alone.stderr
    assert (two / "g.jsonl").read_bytes() == (one / "g.jsonl").read_bytes()
    assert [line["episode"] for line in read_lines(two / "g.jsonl")] == list(range(5))
    for name in ("op_frequency_normal.png", "op_frequency_reduce.png"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    diversity = [json.loads((path / "genotype_diversity.json").read_text()) for path in (two, one)]
    for path, record in zip((two, one), diversity):
        for cell in ("normal", "reduce"):
            assert record["cells"][cell].pop("picture") == str(path / f"op_frequency_{cell}.png")
    assert diversity[0] == diversity[1]
    summaries = [json.loads((path / "decode_summary.json").read_text()) for path in (two, one)]
    for summary in summaries:
        assert summary.pop("genotypes_file").endswith("g.jsonl") and summary.pop("wall_time_s") >= 0
    assert summaries[0] == summaries[1] and summaries[0]["episodes"] == 5
    assert sorted(os.listdir(two)) == sorted(os.listdir(one) + ["episodes.npz"])  # nothing from rank 1
    assert result.stdout.count("5 episodes -> ") == 1 and result.stdout.count("genotypes: ") == 1
    assert "decode tasks 3/3 | " in result.stdout and "decode tasks 2/2" not in result.stdout  # rank 0's share


def test_decode_cache_key_is_pinned_so_existing_caches_stay_valid(tmp_path):
    """The protocol reuses a decoding whose summary holds the same key: the key must not change with the
    code (its episodes hash is FixedEpisodes.indices_sha256, as the key's own hashing once was)."""
    import hashlib

    from tnas.data.episodes import FixedEpisodes
    from tnas.stages.protocol_decode import decode_cache_key

    class Split:
        name, image_shape = "test", (1, 16, 16)

        def __len__(self):
            return 100

    indices = np.asfortranarray((np.arange(24).reshape(3, 2, 4) * 7) % 100)  # not C-contiguous: bytes in C order
    episodes = FixedEpisodes(Split(), indices, n_way=2, k_shot=1, q_query=3, seed=0)
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"a checkpoint")
    from tnas.files import sha256_file

    prepared = SimpleNamespace(checkpoint=str(checkpoint), episodes=episodes, split=Split(),
                               provenance={"checkpoint_sha256": sha256_file(checkpoint)},  # as evaluate.prepare hashes it
                               learner=SimpleNamespace(inner_lrs={"weights": 0.4, "alphas": 0.5}))
    args = SimpleNamespace(dataset="glyphs", n_way=2, k_shot=1, q_query=3, update_step_test=10)
    key = decode_cache_key(prepared, args)
    assert key["episodes_sha256"] == hashlib.sha256(indices.astype("int64").tobytes()).hexdigest()  # the old hash
    assert json.dumps(key) == (
        '{"checkpoint_sha256": "8c51bcbcf387d1f00d73035db73bc8d356a5ad7b123e0af1d8cecb8107c58cd7", '
        '"episodes_sha256": "2a185aa6ee29c649b231295d3e5f27ce193aad44852c84badb8b5b334ed5b8b2", "episodes": 3, '
        '"split": "test", "dataset": "glyphs", "image_shape": [1, 16, 16], "n_way": 2, "k_shot": 1, "q_query": 3, '
        '"update_step_test": 10, "inner_lrs": {"alphas": 0.5, "weights": 0.4}}')


def test_decoded_shares_merge_into_episode_order_each_episode_once():
    """The genotypes of the ranks' shares (batches of 2 of 5 episodes dealt to 2 ranks) fall into place
    whatever the order of the ranks; a share whose genotypes do not fill its batches is refused."""
    from tnas.distributed import DistInfo, shard
    from tnas.evaluate import batch_starts, merge_batches

    genotypes = [{"normal": [["skip_connect", i]]} for i in range(5)]
    parts = []
    for rank in range(2):
        mine = shard(batch_starts(5, 2), DistInfo(rank=rank, world_size=2))
        parts.append({"starts": mine, "genotypes": [genotypes[i] for s in mine for i in range(s, min(s + 2, 5))]})
    assert [part["starts"] for part in parts] == [[0, 4], [2]]
    assert merge_batches(parts[::-1], 5, 2, ("genotypes",))["genotypes"] == genotypes
    with pytest.raises(ValueError, match="holds 2 'genotypes' items for 3 episodes"):
        merge_batches([dict(parts[0], genotypes=genotypes[:2]), parts[1]], 5, 2, ("genotypes",))
