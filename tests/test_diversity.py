"""What the tasks chose (tnas/diversity.py): exact op counts and entropies on hand-made genotypes, the
genotype_diversity.json record, and the pictures and tensorboard events written beside it."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from tnas.diversity import (DIVERSITY_FILE, edge_entropy, genotype_diversity, meta_choice, op_counts,
                            write_task_choices)
from tnas.errors import TnasError
from tnas.genotypes import PRIMITIVES, Genotype
from tb_events import summary_values

# Cells of two nodes: edges (alpha rows) 0 <- c_{k-2}, 0 <- c_{k-1}, 1 <- c_{k-2}, 1 <- c_{k-1}, 1 <- 0.
REDUCE = (("avg_pool_3x3", 0), ("avg_pool_3x3", 1), ("skip_connect", 1), ("dil_conv_3x3", 2))
A = Genotype(normal=(("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 0), ("sep_conv_3x3", 2)),
             reduce=REDUCE, normal_concat=(2, 3), reduce_concat=(2, 3))
B = Genotype(normal=(("sep_conv_3x3", 0), ("skip_connect", 1), ("skip_connect", 1), ("sep_conv_3x3", 2)),
             reduce=REDUCE, normal_concat=(2, 3), reduce_concat=(2, 3))
H_3_1 = 2.0 - 0.75 * math.log2(3.0)  # entropy of (3/4, 1/4) in bits


def row(**ops):
    values = np.zeros(len(PRIMITIVES), dtype=np.int64)
    for op, count in ops.items():
        values[PRIMITIVES.index(op)] = count
    return values.tolist()


def test_op_counts_exact_with_none_for_dropped_edges():
    tasks = [A, A, B.to_dict(), A]  # Genotype objects and their JSON form alike
    assert op_counts(tasks, "normal").tolist() == [
        row(sep_conv_3x3=4), row(skip_connect=4), row(max_pool_3x3=3, none=1), row(none=3, skip_connect=1),
        row(sep_conv_3x3=4)]
    assert op_counts(tasks, "reduce").tolist() == [
        row(avg_pool_3x3=4), row(avg_pool_3x3=4), row(none=4), row(skip_connect=4), row(dil_conv_3x3=4)]
    assert (op_counts(tasks, "normal").sum(axis=1) == 4).all()


def test_edge_entropy_bits():
    assert edge_entropy(op_counts([A, A, B, A], "normal")) == pytest.approx([0.0, 0.0, H_3_1, H_3_1, 0.0], abs=1e-12)
    ops = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    even = [Genotype(normal=((op, 0),) + A.normal[1:], reduce=REDUCE, normal_concat=(2, 3), reduce_concat=(2, 3))
            for op in ops]
    assert edge_entropy(op_counts(even, "normal"))[0] == pytest.approx(2.0, abs=1e-12)  # four even choices
    assert edge_entropy(np.zeros((2, 8))).tolist() == [0.0, 0.0]


def test_diversity_record():
    record = genotype_diversity([A, A, B, A], meta_genotype=A)
    assert (record["tasks"], record["distinct_genotypes"], record["most_common_count"]) == (4, 2, 3)
    assert record["most_common_fraction"] == 0.75 and record["most_common_genotype"] == A.to_dict()
    assert record["tasks_with_meta_genotype"] == 3 and record["ops"] == list(PRIMITIVES)
    normal = record["cells"]["normal"]
    assert normal["edges"] == ["0 <- c_{k-2}", "0 <- c_{k-1}", "1 <- c_{k-2}", "1 <- c_{k-1}", "1 <- 0"]
    assert normal["op_counts"] == op_counts([A, A, B, A], "normal").tolist()
    assert normal["edge_entropy_bits"] == pytest.approx([0.0, 0.0, H_3_1, H_3_1, 0.0], abs=1e-12)
    assert normal["mean_edge_entropy_bits"] == pytest.approx(2 * H_3_1 / 5, abs=1e-12)
    assert normal["meta_ops"] == ["sep_conv_3x3", "skip_connect", "max_pool_3x3", None, "sep_conv_3x3"]
    assert record["cells"]["reduce"]["mean_edge_entropy_bits"] == 0.0
    json.dumps(record)  # plain JSON
    # ties: the first seen wins; no meta-architecture, no meta fields
    tie = genotype_diversity([B, A])
    assert tie["most_common_genotype"] == B.to_dict() and tie["most_common_count"] == 1
    assert "tasks_with_meta_genotype" not in tie and "meta_ops" not in tie["cells"]["normal"]


def test_meta_choice_is_one_hot():
    assert meta_choice(A, "normal").tolist() == op_counts([A], "normal").tolist()
    assert (meta_choice(A, "normal").sum(axis=1) == 1).all()


def test_bad_input():
    with pytest.raises(TnasError, match="no genotypes"):
        genotype_diversity([])
    other = Genotype(normal=A.normal[:2], reduce=REDUCE[:2], normal_concat=(2,), reduce_concat=(2,))
    with pytest.raises(TnasError, match="different cell sizes"):
        op_counts([A, other])


def test_write_task_choices(tmp_path):
    record = write_task_choices(str(tmp_path), [A, A, B, A], A.to_dict(), step=3)
    saved = json.loads((tmp_path / DIVERSITY_FILE).read_text())
    assert saved == record and saved["distinct_genotypes"] == 2
    for cell in ("normal", "reduce"):
        path = tmp_path / f"op_frequency_{cell}.png"
        assert saved["cells"][cell]["picture"] == str(path)
        with Image.open(path) as picture:  # two heatmaps side by side
            assert picture.format == "PNG" and picture.mode == "RGB" and picture.width > 1.5 * picture.height
    values = {(tag, step): value for tag, step, value in summary_values(tmp_path / "tb")}
    assert ("tasks/op_frequency_normal", 3) in values and ("tasks/op_frequency_reduce", 3) in values
    assert values[("tasks/op_frequency_normal", 3)].image.encoded_image_string.startswith(b"\x89PNG")
    assert values[("tasks/distinct_genotypes", 3)].simple_value == 2.0
    assert values[("tasks/most_common_count", 3)].simple_value == 3.0


def test_write_task_choices_again_replaces_its_tensorboard_points(tmp_path):
    """Each protocol invocation (a rerun, a resume after a kill) writes what the tasks chose again: the
    points replace those written before instead of showing once per invocation, and event files of
    others in the same tb/ (a run's own) are left alone."""
    from tnas.runlog import RunLogger

    with RunLogger(tmp_path, quiet=True) as logger:
        logger.scalar("meta_train/loss", 1.0, 0)
    write_task_choices(str(tmp_path), [A, A, B, A], A.to_dict())
    write_task_choices(str(tmp_path), [A, B, B, A], A.to_dict())  # within the same second too
    points = [(tag, step) for tag, step, _ in summary_values(tmp_path / "tb")]
    assert len(points) == len(set(points)) and ("meta_train/loss", 0) in points
    values = {(tag, step): value for tag, step, value in summary_values(tmp_path / "tb")}
    assert values[("tasks/most_common_count", 0)].simple_value == 2.0  # the second call's
