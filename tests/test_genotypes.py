"""Genotypes: the DARTS decoding rule on alphas with known answers, JSON I/O, validation, lookup."""
import json
import math

import pytest
import torch

from tnas.errors import TnasError
from tnas.genotypes import (PRIMITIVES, PUBLISHED, Genotype, decode_genotype, edge_inputs, genotype_from_dict,
                            load_genotype, num_edges, resolve_genotype, save_genotype, validate_genotype)

STEPS = 4
EDGES = num_edges(STEPS)


def op_index(name):
    return PRIMITIVES.index(name)


def edge_row(node, source):
    """Alpha row of the edge ``source -> node``."""
    return edge_inputs(STEPS).index((node, source))


def alpha_with_winners(winners, background=0.0):
    """Alphas where, for each node, ``winners[node] = [(op, source, logit), ...]`` sets those logits."""
    alpha = torch.full((EDGES, len(PRIMITIVES)), background, dtype=torch.float64)
    for node, entries in enumerate(winners):
        for op, source, logit in entries:
            alpha[edge_row(node, source), op_index(op)] = logit
    return alpha


def reference_decode(alpha, steps=STEPS):
    """An independent, plain-Python statement of the DARTS rule (strongest edge first)."""
    pairs = []
    row = 0
    for node in range(steps):
        candidates = []
        for source in range(node + 2):
            logits = alpha[row + source].tolist()
            total = sum(math.exp(v) for v in logits)
            weights = [math.exp(v) / total for v in logits]
            best_op = max(range(1, len(PRIMITIVES)), key=lambda o: (weights[o], -o))
            candidates.append((weights[best_op], -source, PRIMITIVES[best_op], source))
        candidates.sort(reverse=True)
        pairs += [(op, source) for _, _, op, source in candidates[:2]]
        row += node + 2
    return tuple(pairs)


# --------------------------------------------------------------------------- the edge layout

def test_edge_layout():
    assert num_edges(4) == 14 and num_edges(1) == 2 and num_edges(3) == 9
    layout = edge_inputs(4)
    assert len(layout) == 14
    assert layout[:5] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert layout[-1] == (3, 4)


def test_primitives_in_darts_order():
    assert PRIMITIVES == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                          "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


# --------------------------------------------------------------------------- decoding

def test_decode_known_answer():
    # Node 0 has only two inputs, both kept; nodes 1-3 each have one clear loser.
    winners = [
        [("sep_conv_3x3", 0, 5.0), ("dil_conv_5x5", 1, 4.0)],
        [("skip_connect", 2, 6.0), ("max_pool_3x3", 0, 3.0), ("sep_conv_5x5", 1, 1.0)],
        [("avg_pool_3x3", 3, 4.5), ("dil_conv_3x3", 1, 4.0), ("sep_conv_3x3", 0, 0.5)],
        [("sep_conv_5x5", 4, 3.0), ("skip_connect", 0, 2.5), ("max_pool_3x3", 2, 0.2)],
    ]
    normal = alpha_with_winners(winners)
    reduce = alpha_with_winners([[(op, src, -v) for op, src, v in node] for node in winners])
    reduce[edge_row(0, 0), op_index("max_pool_3x3")] = 1.0
    reduce[edge_row(0, 1), op_index("avg_pool_3x3")] = 1.0
    genotype = decode_genotype(normal, reduce)
    assert genotype.normal == (
        ("sep_conv_3x3", 0), ("dil_conv_5x5", 1),
        ("skip_connect", 2), ("max_pool_3x3", 0),
        ("avg_pool_3x3", 3), ("dil_conv_3x3", 1),
        ("sep_conv_5x5", 4), ("skip_connect", 0),
    )
    # Negative logits push an op down: the winners are the edges/ops left at the background.
    assert genotype.reduce[:2] == (("max_pool_3x3", 0), ("avg_pool_3x3", 1))
    assert genotype.normal_concat == (2, 3, 4, 5) and genotype.reduce_concat == (2, 3, 4, 5)
    assert genotype.reduce == reference_decode(reduce)


def test_decode_keeps_strongest_edge_first():
    # The DARTS order: within a node the stronger kept edge comes first.
    winners = [[("sep_conv_3x3", 0, 1.0), ("dil_conv_5x5", 1, 3.0)]] + [[] for _ in range(3)]
    genotype = decode_genotype(alpha_with_winners(winners), torch.zeros(EDGES, 8))
    assert genotype.normal[:2] == (("dil_conv_5x5", 1), ("sep_conv_3x3", 0))


def test_decode_ties_go_to_lower_index():
    # Uniform alphas: every op ties (max_pool_3x3 is the first non-none op), every input
    # ties (inputs 0 and 1 win).
    genotype = decode_genotype(torch.zeros(EDGES, 8), torch.zeros(EDGES, 8))
    expected = tuple(pair for _ in range(STEPS) for pair in (("max_pool_3x3", 0), ("max_pool_3x3", 1)))
    assert genotype.normal == expected and genotype.reduce == expected

    # A tie between two ops on one edge, and a tie between inputs 1 and 2 of node 1
    # (input 0 weaker): the lower op index and the lower inputs win.
    alpha = torch.zeros(EDGES, 8)
    alpha[edge_row(1, 1), op_index("sep_conv_3x3")] = 2.0
    alpha[edge_row(1, 1), op_index("dil_conv_3x3")] = 2.0
    alpha[edge_row(1, 2), op_index("dil_conv_3x3")] = 2.0
    alpha[edge_row(1, 2), op_index("sep_conv_3x3")] = 2.0
    genotype = decode_genotype(alpha, torch.zeros(EDGES, 8))
    assert genotype.normal[2:4] == (("sep_conv_3x3", 1), ("sep_conv_3x3", 2))


def test_decode_ignores_dominant_none():
    alpha = torch.zeros(EDGES, 8)
    # Node 0 keeps both its inputs; on edge 0 `none` is by far the largest weight, but the
    # op chosen must be the strongest non-none one.
    alpha[edge_row(0, 0), op_index("none")] = 10.0
    alpha[edge_row(0, 0), op_index("dil_conv_5x5")] = 3.0
    # Node 1: input 0 has a huge `none` (so its non-none weights are tiny), input 1 is
    # uniform, input 2 favours sep_conv_5x5. If `none` counted, input 0 would win with
    # `none`; by the rule its strength is its best non-none weight (~5e-5), so inputs 2
    # and 1 are kept.
    alpha[edge_row(1, 0), op_index("none")] = 10.0
    alpha[edge_row(1, 2), op_index("sep_conv_5x5")] = 1.0
    # Node 2: `none` dominates every input; the edge strengths are their best non-none
    # weights, so input 3 (with skip_connect raised too) and then input 0 win.
    for source in range(4):
        alpha[edge_row(2, source), op_index("none")] = 8.0
    alpha[edge_row(2, 3), op_index("skip_connect")] = 2.0
    genotype = decode_genotype(alpha, torch.zeros(EDGES, 8))
    assert all(op != "none" for op, _ in genotype.normal)
    # Both inputs of node 0 are kept; input 0 (tiny non-none weights) comes second.
    assert genotype.normal[:2] == (("max_pool_3x3", 1), ("dil_conv_5x5", 0))
    assert genotype.normal[2:4] == (("sep_conv_5x5", 2), ("max_pool_3x3", 1))
    assert genotype.normal[4:6] == (("skip_connect", 3), ("max_pool_3x3", 0))
    assert genotype.normal == reference_decode(alpha)


def test_decode_edge_strength_is_softmax_weight_not_logit():
    # Node 1, input 0: logit 3 for sep_conv_3x3, shared with two more logit-3 ops (weight
    # ~0.31); input 1: logit 2.5 alone (weight ~0.64) -> input 1 is stronger despite the
    # smaller logit; input 2 is uniform (0.125) and loses.
    alpha = torch.zeros(EDGES, 8)
    for op in ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3"):
        alpha[edge_row(1, 0), op_index(op)] = 3.0
    alpha[edge_row(1, 1), op_index("avg_pool_3x3")] = 2.5
    genotype = decode_genotype(alpha, torch.zeros(EDGES, 8))
    assert genotype.normal[2:4] == (("avg_pool_3x3", 1), ("sep_conv_3x3", 0))


@pytest.mark.parametrize("seed", range(5))
def test_decode_matches_reference_on_random_alphas(seed):
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(EDGES, 8, generator=generator, dtype=torch.float64) * 2
    reduce = torch.randn(EDGES, 8, generator=generator, dtype=torch.float64) * 2
    genotype = decode_genotype(normal, reduce)
    assert genotype.normal == reference_decode(normal)
    assert genotype.reduce == reference_decode(reduce)
    validate_genotype(genotype)


def test_decode_other_steps_and_multiplier():
    steps = 3
    alpha = torch.zeros(num_edges(steps), 8)
    genotype = decode_genotype(alpha, alpha, steps=steps, multiplier=2)
    assert len(genotype.normal) == 6 and genotype.normal_concat == (3, 4)
    validate_genotype(genotype)


def test_decode_rejects_wrong_shape():
    with pytest.raises(ValueError, match="alpha_normal"):
        decode_genotype(torch.zeros(13, 8), torch.zeros(14, 8))
    with pytest.raises(ValueError, match="alpha_reduce"):
        decode_genotype(torch.zeros(14, 8), torch.zeros(14, 7))


def test_decode_accepts_grad_tensors_and_leaves_them_alone():
    alpha = torch.randn(EDGES, 8, requires_grad=True)
    before = alpha.detach().clone()
    decode_genotype(alpha, alpha)
    assert torch.equal(alpha.detach(), before)


# --------------------------------------------------------------------------- published genotypes

def pairs(*flat):
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


# docs/design.md section 5, typed out again here on purpose.
DESIGN_PUBLISHED = {
    "auto_maml_1shot": dict(
        normal=pairs("avg_pool_3x3", 0, "avg_pool_3x3", 1, "avg_pool_3x3", 1, "avg_pool_3x3", 2,
                     "avg_pool_3x3", 1, "avg_pool_3x3", 2, "dil_conv_3x3", 3, "avg_pool_3x3", 2),
        reduce=pairs("avg_pool_3x3", 0, "dil_conv_5x5", 1, "avg_pool_3x3", 0, "dil_conv_5x5", 1,
                     "skip_connect", 3, "dil_conv_5x5", 2, "skip_connect", 4, "skip_connect", 3)),
    "auto_maml_5shot": dict(
        normal=pairs("dil_conv_5x5", 1, "dil_conv_5x5", 0, "dil_conv_5x5", 2, "dil_conv_3x3", 1,
                     "sep_conv_5x5", 2, "sep_conv_3x3", 3, "skip_connect", 4, "dil_conv_3x3", 3),
        reduce=pairs("sep_conv_5x5", 0, "avg_pool_3x3", 1, "avg_pool_3x3", 1, "skip_connect", 2,
                     "skip_connect", 2, "avg_pool_3x3", 1, "skip_connect", 2, "max_pool_3x3", 1)),
}


@pytest.mark.parametrize("name", sorted(DESIGN_PUBLISHED))
def test_published_genotypes_match_design(name):
    genotype = PUBLISHED[name]
    assert genotype.normal == DESIGN_PUBLISHED[name]["normal"]
    assert genotype.reduce == DESIGN_PUBLISHED[name]["reduce"]
    assert genotype.normal_concat == (2, 3, 4, 5) and genotype.reduce_concat == (2, 3, 4, 5)
    assert genotype.steps == 4
    validate_genotype(genotype)


def test_published_names():
    assert set(PUBLISHED) == {"auto_maml_1shot", "auto_maml_5shot"}


# --------------------------------------------------------------------------- JSON

@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_json_round_trip(name, tmp_path):
    genotype = PUBLISHED[name]
    assert genotype_from_dict(json.loads(genotype.to_json())) == genotype
    path = tmp_path / "genotype.json"
    save_genotype(genotype, str(path))
    assert load_genotype(str(path)) == genotype
    assert [p.name for p in tmp_path.iterdir()] == ["genotype.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert set(data) == {"normal", "normal_concat", "reduce", "reduce_concat"}
    assert data["normal"][0] == list(genotype.normal[0])


def test_json_concat_defaults_to_all_nodes():
    data = PUBLISHED["auto_maml_5shot"].to_dict()
    del data["normal_concat"], data["reduce_concat"]
    genotype = genotype_from_dict(data)
    assert genotype.normal_concat == (2, 3, 4, 5) and genotype.reduce_concat == (2, 3, 4, 5)


def test_decoded_genotype_round_trips():
    genotype = decode_genotype(torch.randn(EDGES, 8), torch.randn(EDGES, 8))
    assert genotype_from_dict(json.loads(genotype.to_json())) == genotype


# --------------------------------------------------------------------------- validation

def good_dict():
    return PUBLISHED["auto_maml_5shot"].to_dict()


def with_changes(**changes):
    data = good_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize("data, message", [
    (with_changes(normal=[["conv_7x7", 0]] + good_dict()["normal"][1:]), r"unknown op 'conv_7x7' in normal cell"),
    (with_changes(reduce=[["none", 0]] + good_dict()["reduce"][1:]), r"unknown op 'none' in reduce cell"),
    (with_changes(normal=good_dict()["normal"][:2] + [["sep_conv_3x3", 3]] + good_dict()["normal"][3:]),
     r"normal cell edge 2 \(node 1\) reads input 3; allowed inputs are 0\.\.2"),
    (with_changes(reduce=[["sep_conv_3x3", -1]] + good_dict()["reduce"][1:]), r"reduce cell edge 0 .* reads input -1"),
    (with_changes(normal=good_dict()["normal"][:7]), r"normal cell has 7 edges"),
    (with_changes(normal=[]), r"normal cell has 0 edges"),
    (with_changes(reduce=good_dict()["reduce"][:6], reduce_concat=[2, 3, 4]),
     r"normal cell has 8 edges but reduce cell has 6"),
    (with_changes(normal_concat=[2, 3, 4, 6]), r"normal_concat \[2, 3, 4, 6\] must list node indices in 0\.\.5"),
    (with_changes(reduce_concat=[]), r"reduce_concat \[\] must list"),
    (with_changes(normal_concat="2345"), r"'normal_concat' must be a list of integers"),
    (with_changes(normal=[["sep_conv_3x3", "0"]] + good_dict()["normal"][1:]), r"'normal' must be a list of"),
    (with_changes(normal=[["sep_conv_3x3", 0, 1]] + good_dict()["normal"][1:]), r"'normal' must be a list of"),
    (with_changes(normal=[["sep_conv_3x3", True]] + good_dict()["normal"][1:]), r"'normal' must be a list of"),
    ({"normal": good_dict()["normal"]}, r"missing key\(s\) reduce"),
    (with_changes(extra=1), r"unknown key\(s\) extra"),
    ([1, 2, 3], r"expected a JSON object"),
])
def test_validation_errors_name_the_problem(data, message):
    with pytest.raises(TnasError, match=message) as info:
        genotype_from_dict(data, source="my.json")
    assert str(info.value).startswith("my.json: ")
    assert "\n" not in str(info.value)


def test_validate_genotype_direct():
    bad = Genotype(normal=(("sep_conv_3x3", 0),) * 3, reduce=PUBLISHED["auto_maml_1shot"].reduce)
    with pytest.raises(TnasError, match="normal cell has 3 edges"):
        validate_genotype(bad)
    assert validate_genotype(PUBLISHED["auto_maml_1shot"]) is PUBLISHED["auto_maml_1shot"]


def test_malformed_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"normal": [["sep_conv_3x3", 0]')
    with pytest.raises(TnasError, match=r"broken\.json: invalid JSON at line 1"):
        load_genotype(str(path))


def test_deeply_nested_json_file_is_one_line(tmp_path):
    """json's decoder recurses per nesting level: a crafted file raises RecursionError, no ValueError."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(TnasError, match="deep.json: not a genotype JSON file .nested too deeply."):
        load_genotype(str(path))


def test_valid_json_but_invalid_genotype_names_the_file(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(with_changes(normal_concat=[9])))
    with pytest.raises(TnasError, match=r"g\.json: normal_concat \[9\]"):
        load_genotype(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(TnasError, match="cannot read genotype file"):
        load_genotype(str(tmp_path / "absent.json"))


# --------------------------------------------------------------------------- resolve_genotype

def test_resolve_published_name():
    assert resolve_genotype("auto_maml_1shot") is PUBLISHED["auto_maml_1shot"]


def test_resolve_file_and_run_directory(tmp_path):
    genotype = decode_genotype(torch.randn(EDGES, 8), torch.randn(EDGES, 8))
    save_genotype(genotype, str(tmp_path / "genotype.json"))
    assert resolve_genotype(str(tmp_path / "genotype.json")) == genotype
    assert resolve_genotype(str(tmp_path)) == genotype


def test_resolve_directory_without_genotype(tmp_path):
    with pytest.raises(TnasError, match="directory without best_genotype.json or genotype.json"):
        resolve_genotype(str(tmp_path))


def test_resolve_unknown_name_lists_published():
    with pytest.raises(TnasError, match=r"unknown genotype 'auto_maml_2shot'.*auto_maml_1shot, auto_maml_5shot"):
        resolve_genotype("auto_maml_2shot")
