"""Cell diagrams (DOT text, PNG with and without the `dot` program) and alpha heatmaps."""
import os
import re
import shutil
import stat
import sys

import matplotlib
import numpy as np
import pytest
import torch

from tnas import visualize
from tnas.errors import TnasError
from tnas.genotypes import PRIMITIVES, PUBLISHED, Genotype, num_edges
from tnas.visualize import edge_labels, genotype_to_dot, plot_genotype, render_cell, render_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELLS = ("normal", "reduce")


def dot_edges(text):
    """``[(source, target, label or None)]`` of the DOT text."""
    pattern = re.compile(r'^\s*"([^"]+)" -> "([^"]+)"(?: \[(.*)\])?;\s*$')
    edges = []
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            label = re.search(r'label="([^"]*)"', match.group(3) or "")
            edges.append((match.group(1), match.group(2), label.group(1) if label else None))
    return edges


def assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 1000


# --------------------------------------------------------------------------- DOT

@pytest.mark.parametrize("name", sorted(PUBLISHED))
@pytest.mark.parametrize("cell", CELLS)
def test_dot_contains_every_op_and_node(name, cell):
    genotype = PUBLISHED[name]
    text = genotype_to_dot(genotype, cell)
    assert text.startswith(f"digraph {cell} {{") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    for op, _ in getattr(genotype, cell):
        assert f'label="{op}"' in text
    for node in ("c_{k-2}", "c_{k-1}", "0", "1", "2", "3", "c_{k}"):
        assert f'"{node}" [fillcolor=' in text

    edges = dot_edges(text)
    names = {0: "c_{k-2}", 1: "c_{k-1}", 2: "0", 3: "1", 4: "2", 5: "3"}
    pairs = getattr(genotype, cell)
    expected = [(names[source], str(position // 2), op) for position, (op, source) in enumerate(pairs)]
    expected += [(names[index], "c_{k}", None) for index in getattr(genotype, f"{cell}_concat")]
    assert edges == expected


def test_dot_follows_concat_and_steps():
    genotype = Genotype(normal=(("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 0)),
                        reduce=(("avg_pool_3x3", 0), ("skip_connect", 1), ("sep_conv_5x5", 2), ("skip_connect", 1)),
                        normal_concat=(3,), reduce_concat=(1, 2, 3))
    normal = dot_edges(genotype_to_dot(genotype, "normal"))
    assert [edge for edge in normal if edge[1] == "c_{k}"] == [("1", "c_{k}", None)]
    assert '"2"' not in genotype_to_dot(genotype, "normal")  # only nodes 0 and 1 exist
    reduce = dot_edges(genotype_to_dot(genotype, "reduce"))
    assert [edge[0] for edge in reduce if edge[1] == "c_{k}"] == ["c_{k-1}", "0", "1"]


def test_dot_rejects_bad_cell_and_invalid_genotype():
    with pytest.raises(ValueError, match="cell must be 'normal' or 'reduce'"):
        genotype_to_dot(PUBLISHED["auto_maml_1shot"], "reduction")
    bad = Genotype(normal=(("conv_9x9", 0), ("skip_connect", 1)), reduce=(("skip_connect", 0), ("skip_connect", 1)))
    with pytest.raises(TnasError, match="unknown op 'conv_9x9'"):
        genotype_to_dot(bad, "normal")


# --------------------------------------------------------------------------- PNG

def test_render_cell_without_dot_uses_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    backend = matplotlib.rcParams["backend"]
    paths = render_cell(PUBLISHED["auto_maml_5shot"], "normal", str(tmp_path / "sub" / "cell"))
    assert paths == [str(tmp_path / "sub" / "cell.dot"), str(tmp_path / "sub" / "cell.png")]
    assert (tmp_path / "sub" / "cell.dot").read_text() == genotype_to_dot(PUBLISHED["auto_maml_5shot"], "normal")
    assert_png(paths[1])
    assert matplotlib.rcParams["backend"] == backend  # no global backend change


def write_fake_dot(directory, exit_code=0):
    """A stand-in ``dot`` program: checks its arguments and stdin, then prints a known PNG."""
    reference = directory / "reference.png"
    reference.write_bytes(PNG_MAGIC + b"fake dot output" * 100)
    program = directory / "dot"
    program.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "assert sys.argv[1:] == ['-Tpng'], sys.argv\n"
        "assert sys.stdin.read().startswith('digraph')\n"
        f"if {exit_code}:\n"
        f"    sys.exit({exit_code})\n"
        f"sys.stdout.buffer.write(open({str(reference)!r}, 'rb').read())\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return str(program), reference.read_bytes()


def test_render_cell_with_dot_program(tmp_path, monkeypatch):
    program, expected = write_fake_dot(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: program if name == "dot" else None)

    def no_matplotlib(*args, **kwargs):
        raise AssertionError("matplotlib fallback used although dot is available")

    monkeypatch.setattr(visualize, "_draw_cell_png", no_matplotlib)
    paths = render_cell(PUBLISHED["auto_maml_1shot"], "reduce", str(tmp_path / "reduce"))
    assert paths == [str(tmp_path / "reduce.dot"), str(tmp_path / "reduce.png")]
    assert (tmp_path / "reduce.png").read_bytes() == expected


def test_render_cell_falls_back_when_dot_fails(tmp_path, monkeypatch):
    program, _ = write_fake_dot(tmp_path, exit_code=3)
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: program if name == "dot" else None)
    paths = render_cell(PUBLISHED["auto_maml_1shot"], "normal", str(tmp_path / "normal"))
    assert_png(paths[1])


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` not installed")
def test_render_cell_with_real_dot(tmp_path):
    paths = render_cell(PUBLISHED["auto_maml_5shot"], "reduce", str(tmp_path / "reduce"))
    assert_png(paths[1])


def test_plot_genotype_writes_both_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    paths = plot_genotype(PUBLISHED["auto_maml_1shot"], str(tmp_path / "out"), prefix="epoch3_")
    expected = [str(tmp_path / "out" / f"epoch3_{cell}.{ext}") for cell in CELLS for ext in ("dot", "png")]
    assert paths == expected
    for path in expected[1::2]:
        assert_png(path)


# --------------------------------------------------------------------------- heatmap

def test_edge_labels():
    labels = edge_labels(4)
    assert len(labels) == num_edges(4)
    assert labels[:5] == ["0 <- c_{k-2}", "0 <- c_{k-1}", "1 <- c_{k-2}", "1 <- c_{k-1}", "1 <- 0"]
    assert labels[-1] == "3 <- 2"


def test_alpha_heatmap_of_the_search_stage_is_labelled_by_edge_and_op():
    """The search stage logs softmax(alpha) through RunLogger.heatmap (tnas.visualize.render_heatmap), rows
    labelled by edge, columns by op: an RGB image whose size grows with the rows."""
    alpha = torch.softmax(torch.randn(14, 8), dim=-1)
    image = render_heatmap(alpha, edge_labels(4), PRIMITIVES, "alpha normal, epoch 3")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    smaller = render_heatmap(alpha[:num_edges(2)], edge_labels(2), PRIMITIVES)
    assert smaller.shape[0] < image.shape[0]


def test_render_heatmap_image():
    image = render_heatmap(np.eye(14, 8), title="t")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 0
    with pytest.raises(ValueError):
        render_heatmap(np.zeros(3))
