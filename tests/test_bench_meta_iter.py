"""benchmarks/bench_meta_iter.py: a tiny CPU run of every kind of case, and its extrapolations."""
from __future__ import annotations

import json

import pytest

from script_loader import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_meta_iter.py")


def test_every_kind_of_case_runs_and_reports(bench, capsys):
    cases = ["tnas_1shot_T4", "auto_maml_1shot_T4", "adapt_1shot_T100", "scratch_1shot_T4", "scratch_pp_1shot_T4"]
    report = bench.main(["--tiny", "--device", "cpu", "--iterations", "1", "--warmup", "1", "--cases", *cases])
    captured = capsys.readouterr()
    assert captured.out.strip().startswith("{")
    # default flags: --cuda_graph auto, and the JSON says what it chose and why
    setting = report["setting"]
    assert setting["cuda_graph"] == "auto" and setting["graphed"] is False
    assert setting["cuda_graph_reason"] == "cuda_graph auto: eager steps, not CUDA graphs: the device is cpu"
    assert setting["cuda_graph_reason"] in captured.err
    assert [r["case"] for r in report["results"]] == cases
    for record in report["results"]:
        assert record["seconds_per_iteration"] > 0
        assert record["tasks_per_second"] == pytest.approx(record["tasks"] / record["seconds_per_iteration"])
        original = bench.ORIGINAL_SECONDS[record["kind"]]
        assert record["speedup_vs_original"] == pytest.approx(record["tasks_per_second"] * original)
        assert record["cuda_graph"] == "eager" and "fraction_of_peak" not in record  # no known peak on a CPU
        assert record["gflop_per_iteration"] > 0 and record["ops_per_iteration"] > 0
        assert record["achieved_tflops"] == pytest.approx(record["gflop_per_iteration"] / 1e3
                                                          / record["seconds_per_iteration"])
    scratch = {r["case"]: r for r in report["results"] if r["kind"] == "scratch"}
    assert scratch["scratch_1shot_T4"]["first_order"] and not scratch["scratch_pp_1shot_T4"]["first_order"]
    for record in scratch.values():
        hours = 15 * 15_000 / record["tasks_per_second"] / 3600
        assert record["genotype_hours_paper_schedule"] == pytest.approx(hours)
        assert record["protocol_device_hours_600_genotypes"] == pytest.approx(600 * hours)


def test_original_scratch_rate_is_six_hours_per_genotype(bench):
    """The original's README: 600 tasks x 6 h = 3,600 GPU-hours, at 225,000 tasks per genotype."""
    assert bench.ORIGINAL_SECONDS["scratch"] * bench.PAPER_SCHEDULE_TASKS == pytest.approx(6 * 3600)


def test_scratch_learner_is_the_derived_network(bench):
    from types import SimpleNamespace

    import torch

    from tnas.genotypes import PUBLISHED
    from tnas.models.network import Network

    args = SimpleNamespace(n_way=5, C=4, layers=1, inner_steps=1, inner_steps_test=2, amp=False,
                           channels_last=False, batching="fold", edges="fused", branch_streams=3,
                           pointwise="matmul")
    learner = bench.build_learner(bench.CASES["scratch_pp_1shot_T4"], args, torch.device("cpu"))
    assert isinstance(learner.model, Network)
    assert learner.model.genotype == PUBLISHED["auto_maml_1shot"]
    assert learner.config.per_step_bn and learner.config.learn_inner_lr and not learner.config.first_order
    assert learner.forward_for(1).folds_tasks
    args.batching = "vmap"
    assert not bench.build_learner(bench.CASES["tnas_1shot_T4"], args, torch.device("cpu")).forward.folds_tasks


@pytest.mark.parametrize("edges", ["sources", "fused", "reference"])
def test_edges_flag_picks_the_supernet_edge_path(bench, edges):
    import torch

    args = bench.parse_args(["--tiny", "--device", "cpu", "--edges", edges])
    cell = bench.build_learner(bench.CASES["tnas_1shot_T4"], args, torch.device("cpu")).model.cells[0]
    assert ((cell.sources is not None), (cell.fused is not None)) == {
        "sources": (True, False), "fused": (False, True), "reference": (False, False)}[edges]
    assert bench.parse_args(["--tiny", "--device", "cpu"]).edges == bench.DEFAULT_EDGES


def test_shared_gpu_sums_throughput_and_rescales_the_cost(tmp_path, capsys):
    shared = load_script("benchmarks/shared_gpu.py")

    def report(tasks_per_second):
        hours = 225_000 / tasks_per_second / 3600
        return {"device": "gpu", "results": [{"case": "scratch_1shot_T4", "tasks_per_second": tasks_per_second,
                                              "genotype_hours_paper_schedule": hours,
                                              "protocol_device_hours_600_genotypes": 600 * hours}]}

    paths = []
    for index, rate in enumerate((30.0, 20.0, 50.0)):
        path = tmp_path / f"shared_{index}.json"
        path.write_text(json.dumps(report(rate)))
        paths.append(str(path))
    assert shared.main(paths) == 0
    (entry,) = json.loads(capsys.readouterr().out)["results"]
    assert entry["processes"] == 3 and entry["tasks_per_second_total"] == pytest.approx(100.0)
    assert entry["genotype_device_hours_paper_schedule"] == pytest.approx(225_000 / 100.0 / 3600)
    assert entry["protocol_device_hours_600_genotypes"] == pytest.approx(600 * 225_000 / 100.0 / 3600)
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert shared.main([str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_flop_count_of_a_depthwise_conv_counts_groups_once(bench):
    """Forward + backward of a conv is 3x its forward (input and weight gradients), grouped or not
    (torch's own formula counts a depthwise conv's input gradient C times over)."""
    import torch

    for groups in (1, 8):
        conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
        x = torch.randn(2, 8, 5, 5, requires_grad=True)
        flops, _ = bench.count_work(lambda _: conv(x).sum().backward(), [0])
        forward = 2 * (2 * 8 * 5 * 5) * (8 // groups) * 9
        assert flops == 3 * forward


def test_op_count_leaves_out_views(bench):
    import torch

    x = torch.randn(4, 6)
    _, ops = bench.count_work(lambda _: (x.view(6, 4).t() * 2 + 1).sum(), [0, 1])
    assert ops == 3  # mul, add, sum; the view and the transpose launch nothing


def test_genotype_batch_cases_report_aggregate_rate_and_protocol_cost(bench):
    cases = ["genobatch_1shot_G8_T4", "genobatch_pp_1shot_G1_T4", "genobatch_demo_G8_distinct_vs_sequential",
             "genobatch_same_1shot_G8_T4"]
    report = bench.main(["--tiny", "--device", "cpu", "--iterations", "1", "--warmup", "0", "--cases", *cases])
    batched, plus_plus, comparison, same = report["results"]
    assert same["distinct_choices_per_edge"] == 1.0 and same["genotypes"] == 8
    assert "error" not in batched and "error" not in plus_plus and "error" not in comparison, report["results"]
    assert (batched["genotypes"], batched["tasks_per_genotype"], batched["tasks"]) == (8, 4, 32)
    assert batched["first_order"] and not plus_plus["first_order"] and plus_plus["tasks"] == 4
    for record in (batched, plus_plus):
        assert record["tasks_per_second"] == pytest.approx(record["tasks"] / record["seconds_per_iteration"])
        assert record["protocol_hours_600"] == pytest.approx(600 * 15 * 15_000 / record["tasks_per_second"] / 3600)
    assert plus_plus["distinct_choices_per_edge"] == 1.0 and batched["distinct_choices_per_edge"] > 1.0
    assert comparison["speedup_batched_vs_sequential"] == pytest.approx(
        comparison["seconds_per_iteration_sequential"] / comparison["seconds_per_iteration_batched"])


def test_random_genotypes_are_valid_and_reproducible(bench):
    from tnas.genotypes import validate_genotype

    genotypes = bench.random_genotypes(5)
    assert genotypes == bench.random_genotypes(5) and len(set(genotypes)) == 5
    for genotype in genotypes:
        validate_genotype(genotype)


def test_tf32_and_compile_are_recorded_and_refused_where_they_cannot_apply(bench):
    """--tf32 is on while the cases run (and off again after); --compile is recorded, and the cases
    that cannot compile (second-order MAML++, genotype batches) report one error each."""
    from tnas import precision

    before = precision.tf32_state()
    report = bench.main(["--tiny", "--device", "cpu", "--iterations", "1", "--warmup", "1", "--tf32", "--compile",
                         "--cases", "scratch_pp_1shot_T4", "genobatch_1shot_G1_T4"])
    assert precision.tf32_state() == before
    setting = report["setting"]
    assert setting["tf32"] is True and setting["compile"] == "inductor"
    assert setting["tf32_state"] == {"matmul": True, "cudnn": True}
    errors = {r["case"]: r["error"] for r in report["results"]}
    assert "compile_forward needs first-order MAML" in errors["scratch_pp_1shot_T4"]
    assert "--compile: genotype batches have no compile_forward" in errors["genobatch_1shot_G1_T4"]


@pytest.mark.slow
def test_compiled_case_reports_warmup_and_no_flops(bench):
    """A first-order from-scratch case through torch.compile (aot_eager: tracing without code
    generation): timed, warm-up (with the compilation) reported, FLOPs not counted."""
    report = bench.main(["--tiny", "--device", "cpu", "--iterations", "1", "--warmup", "1", "--compile", "aot_eager",
                         "--cases", "scratch_1shot_T4"])
    record = report["results"][0]
    assert "error" not in record, record
    assert record["seconds_per_iteration"] > 0 and record["warmup_seconds"] > 0
    assert "gflop_per_iteration" not in record
