"""benchmarks/bench_meta_iter.py: a tiny CPU run of every kind of case, and its extrapolations; the other
benchmark scripts; and dry runs of benchmarks/gpu_check.sh (a fake python3), so that the rare GPU run
cannot be wasted on a bad flag, a lost report or a missed deadline."""
from __future__ import annotations

import json
import re

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
    cut = tmp_path / "cut.json"  # a process cut short by gpu_check.sh's timeout: its error, no rate
    cut.write_text(json.dumps({"results": [{"case": "scratch_1shot_T4", "error": "CutShort: cut short"}]}))
    assert shared.main(paths + [str(cut)]) == 0
    combined = json.loads(capsys.readouterr().out)
    assert combined["results"][0]["processes"] == 3 and combined["errors"][0]["error"] == "CutShort: cut short"
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert shared.main([str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err


def test_flop_count_of_a_depthwise_conv_counts_groups_once(bench):
    """Forward + backward of a conv is 3x its forward (input and weight gradients), grouped or not, and
    2x when its input needs no gradient (a network's first conv, on the images). torch's own formula
    counts a grouped conv's weight gradient ``groups`` times over; ungrouped, ours is torch's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    for groups in (1, 8):
        conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
        forward = 2 * (2 * 8 * 5 * 5) * (8 // groups) * 9  # 2 * out elements * C_in/groups * kh * kw
        for input_grad in (True, False):
            x = torch.randn(2, 8, 5, 5, requires_grad=input_grad)
            flops, _ = bench.count_work(lambda _: conv(x).sum().backward(), [0])
            assert flops == (3 if input_grad else 2) * forward
            if groups == 1:
                with FlopCounterMode(display=False) as torch_count:
                    conv(x).sum().backward()
                assert flops == torch_count.get_total_flops()


@pytest.mark.parametrize("case", ["tnas_1shot_T4", "scratch_1shot_T4"])
@pytest.mark.parametrize("pointwise", ["matmul", "conv"])
def test_meta_iteration_flops_are_three_forwards_per_image(bench, case, pointwise):
    """A first-order meta-iteration (tiny: 4 tasks x (5 support images x 1 inner step + 10 queries)) is,
    per image, 3x the network's forward FLOPs (counted by module hooks, no dispatch: 2 x MACs of every
    conv and linear layer), less the first conv's input gradient. Against torch's FlopCounterMode on the
    same iteration: its forward convolutions and matmuls as ours (the folded 1x1 convolutions' batched
    matmuls counted either way), each conv's backward 2x its forward. Fails if a grouped (task- or
    edge-folded, depthwise) conv's backward or the pointwise bmm path were miscounted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tnas.genotypes import PUBLISHED
    from tnas.models.complexity import conv_linear_macs
    from tnas.models.fast_edges import REFERENCE
    from tnas.models.network import Network
    from tnas.models.supernet import Supernet

    args = bench.parse_args(["--tiny", "--device", "cpu", "--pointwise", pointwise])
    one_iteration, _, tasks = bench.prepare_case(bench.CASES[case], args, torch.device("cpu"))
    flops, _ = bench.count_work(one_iteration, [0])
    shape = dict(n_way=5, C=args.C, layers=args.layers, in_channels=3, plan=REFERENCE)  # hooks see every layer
    model = Supernet(**shape) if case.startswith("tnas") else Network(PUBLISHED["auto_maml_1shot"], **shape)
    macs = conv_linear_macs(model, (3, args.img_size, args.img_size))
    first = model.stem[0]
    first_forward = 2 * first.out_channels * args.img_size ** 2 * first.in_channels * 9
    images = tasks * (5 * args.inner_steps + 5 * args.q_query)
    assert images == 60
    assert flops == images * (3 * 2 * macs - first_forward)

    with FlopCounterMode(display=False) as torch_count:
        one_iteration(1)
    by_op = {str(op): count for op, count in torch_count.get_flop_counts()["Global"].items()}
    assert set(by_op) == {"aten.convolution", "aten.convolution_backward", "aten.bmm"}  # no mm path missed
    assert flops == 3 * by_op["aten.convolution"] - images * first_forward + by_op["aten.bmm"]
    assert by_op["aten.convolution_backward"] > 2 * by_op["aten.convolution"]  # torch's grouped overcount


def test_peak_is_the_dense_peak_of_the_part_and_basis_asked_for(bench, monkeypatch):
    """fraction_of_peak's denominator: NVIDIA's dense figures (not the 2:4-sparsity ones) of the part the
    device's name says (NVL and PCIe parts apart from SXM), on the basis of the run's arithmetic; a
    default run (cuDNN allowed TF32, matmuls float32) gets the TF32 peak too."""
    from types import SimpleNamespace

    import torch

    from tnas import precision

    cuda = torch.device("cuda")  # only the type is read; no GPU needed
    args = SimpleNamespace(peak_tflops=None, amp=False)
    expected = {"NVIDIA H200": (67.0, 494.5, 989.5), "NVIDIA H100 80GB HBM3": (67.0, 494.5, 989.5),
                "NVIDIA H200 NVL": (60.0, 417.5, 835.5), "NVIDIA H100 PCIe": (51.0, 378.0, 756.5),
                "NVIDIA A100-SXM4-80GB": (19.5, 156.0, 312.0)}
    for name, (fp32, tf32, bf16) in expected.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device, name=name: name)
        with precision.tf32(False):
            assert bench.peak_tflops(args, cuda) == {"peak_tflops": fp32, "peak_basis": "fp32"}
        with precision.tf32(True):
            assert bench.peak_tflops(args, cuda) == {"peak_tflops": tf32, "peak_basis": "tf32"}
        with precision.tf32(False):
            precision.set_tf32_state(precision.TF32State(matmul=False, cudnn=True))  # PyTorch's default
            assert bench.peak_tflops(args, cuda) == {"peak_tflops": fp32, "peak_basis": "fp32",
                                                     "tf32_peak_tflops": tf32}
            assert bench.peak_tflops(SimpleNamespace(peak_tflops=None, amp=True), cuda) == {
                "peak_tflops": bf16, "peak_basis": "bf16"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device: "NVIDIA GeForce RTX 4090")
    assert bench.peak_tflops(args, cuda) == {}
    assert bench.peak_tflops(args, torch.device("cpu")) == {}
    assert bench.peak_tflops(SimpleNamespace(peak_tflops=100.0, amp=False), torch.device("cpu")) == {
        "peak_tflops": 100.0, "peak_basis": "given"}


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


# -- one GPU run must not be wasted: cut steps, per-case errors, benchmarks/gpu_check.sh dry runs --------------
def test_one_failing_case_leaves_the_others(bench, monkeypatch):
    """An error in one case (e.g. out of memory) is that case's record; the cases after it still run."""
    real = bench.run_case

    def run_case(name, spec, args, device):
        if name == "tnas_1shot_T4":
            raise RuntimeError("CUDA out of memory")
        return real(name, spec, args, device)

    monkeypatch.setattr(bench, "run_case", run_case)
    report = bench.main(["--tiny", "--device", "cpu", "--iterations", "1", "--warmup", "0",
                         "--cases", "scratch_1shot_T4", "tnas_1shot_T4", "scratch_1shot_T4"])
    first, failed, last = report["results"]
    assert failed == {"case": "tnas_1shot_T4", "error": "RuntimeError: CUDA out of memory"}
    assert first["tasks_per_second"] > 0 and last["tasks_per_second"] > 0 and "cut_short" not in report


def test_sigterm_prints_the_cases_finished_so_far(bench, monkeypatch, capsys):
    """gpu_check.sh's timeout ends a step with SIGTERM: the JSON on stdout still holds the finished
    cases, the cut one's error and the ones never started; the process's SIGTERM handler comes back."""
    import os
    import signal
    import time

    def run_case(name, spec, args, device):
        if name == "tnas_1shot_T4":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler's exception ends the sleep
        return {"case": name, "tasks_per_second": 1.0}

    monkeypatch.setattr(bench, "run_case", run_case)
    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    report = bench.main(["--tiny", "--device", "cpu", "--cases", "scratch_1shot_T4", "tnas_1shot_T4",
                         "adapt_1shot_T100"])
    assert time.monotonic() - started < 10
    assert signal.getsignal(signal.SIGTERM) is before
    assert json.loads(capsys.readouterr().out) == report
    done, cut, not_run = report["results"]
    assert done == {"case": "scratch_1shot_T4", "tasks_per_second": 1.0}
    assert cut["case"] == "tnas_1shot_T4" and cut["error"].startswith("CutShort: cut short by SIGTERM")
    assert not_run == {"case": "adapt_1shot_T100", "error": "not run: an earlier case was cut short"}
    assert report["cut_short"] == "cut short by SIGTERM (the step's time limit)"


def test_summary_reads_every_report_and_says_which_are_unreadable(tmp_path, capsys):
    summary = load_script("benchmarks/gpu_check_summary.py")
    good = tmp_path / "bench_meta_iter_default.json"
    good.write_text(json.dumps({"setting": {"cuda_graph_reason": "cuda_graph auto: graphs"}, "cut_short": "cut",
                                "results": [{"case": "tnas_1shot_T4", "tasks_per_second": 42.91234,
                                             "fraction_of_peak": 0.01, "peak_basis": "fp32",
                                             "fraction_of_tf32_peak": 0.0014, "cuda_graph": "graphed"},
                                            {"case": "tnas_5shot_T4", "error": "CutShort: cut"}]}))
    (tmp_path / "bench_meta_iter_partial.json").write_text('{"results": [{"case": "x"')
    (tmp_path / "bench_meta_iter_empty.json").write_text("")
    paths = [str(tmp_path / f"bench_meta_iter_{n}.json") for n in ("default", "partial", "empty", "missing")]
    assert summary.main(paths) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["default: cuda_graph auto: graphs", "default tnas_1shot_T4 tasks/s 42.91 of peak 0.01 peak basis fp32 of tf32 peak 0.0014 graphed",
                         "default tnas_5shot_T4 error CutShort: cut", "default: cut"]
    assert [line.split(":")[0:2] for line in lines[4:]] == [["partial", " unreadable (JSONDecodeError"],
                                                            ["empty", " unreadable (JSONDecodeError"],
                                                            ["missing", " unreadable (FileNotFoundError"]]


FAKE_PYTHON = r'''#!/usr/bin/env bash
# python3 for a dry run of gpu_check.sh: logs each call; the summaries run for real; a benchmark
# prints a report naming its cases at once (or hangs, FAKE_BENCH=hang); pytest and the rest echo.
printf '%s\n' "$*" >> "$FAKE_LOG"
case "$1" in
  benchmarks/shared_gpu.py|benchmarks/gpu_check_summary.py) exec "$REAL_PYTHON" "$@" ;;
  -c) echo "fake torch"; exit 0 ;;
  -m) echo "1 passed"; exit 0 ;;
  benchmarks/bench_meta_iter.py)
    [ "${FAKE_BENCH:-}" = hang ] && exec sleep 60
    shift; printf '{"setting": {"cuda_graph_reason": "fake"}, "results": ['; on=0; sep=""
    rate='"tasks_per_second": 2.0, "genotype_hours_paper_schedule": 1.0'
    rate="$rate"', "protocol_device_hours_600_genotypes": 600.0'
    for a in "$@"; do
      case "$a" in --cases) on=1 ;; --*) on=0 ;;
        *) if [ $on = 1 ]; then printf '%s{"case": "%s", %s}' "$sep" "$a" "$rate"; sep=", "; fi ;;
      esac
    done
    echo ']}' ;;
  benchmarks/profile_meta_iter.py) echo '{"case": "tnas_1shot_T4", "kernels_per_iteration": 1}' ;;
  *) echo '{}' ;;
esac
'''


def dry_run_gpu_check(tmp_path, **env):
    """Run benchmarks/gpu_check.sh with the fake python3 first on PATH: (exit status, seconds, the
    calls' argument lists, $OUT, the packed tarball's members)."""
    import os
    import shutil
    import subprocess
    import sys
    import tarfile
    import time

    from script_loader import REPO

    if not all(shutil.which(tool) for tool in ("bash", "timeout", "tar")):
        pytest.skip("needs bash, timeout and tar")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(FAKE_PYTHON)
    (fake / "python3").chmod(0o755)
    out, log = tmp_path / "out", tmp_path / "calls.txt"
    environment = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
                   "FAKE_LOG": str(log), "REAL_PYTHON": sys.executable, **env}
    started = time.monotonic()
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh")], env=environment,
                            capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    calls = [line.split() for line in log.read_text().splitlines()]
    with tarfile.open(out / "gpu_check.tar.gz") as packed:
        members = {os.path.normpath(name) for name in packed.getnames()}
    return result, seconds, calls, out, members


def test_gpu_check_dry_run_asks_for_known_cases_and_flags_targets_first(bench, tmp_path):
    """Every bench_meta_iter.py call of gpu_check.sh parses on a CUDA device and names known cases;
    the targets (default flags, genotype batches, --tf32) run before the GPU tests; every step's
    output is packed and $OUT holds three files (the device tool brings back at most 8)."""
    import torch

    result, _, calls, out, members = dry_run_gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "gpu_tests.txt", "timeline.txt"]
    benches = [call[1:] for call in calls if call[0] == "benchmarks/bench_meta_iter.py"]
    benchmark = torch.backends.cudnn.benchmark
    try:
        for argv in benches:
            assert "--tiny" not in argv and "--device" not in argv, argv
            args = bench.parse_args(argv + ["--device", "cuda"])  # a bad flag or case exits here
            assert args.cases and set(args.cases) <= set(bench.CASES)
        profile = next(call[1:] for call in calls if call[0] == "benchmarks/profile_meta_iter.py")
        rows = profile.index("--rows")
        bench.parse_args(profile[:rows] + profile[rows + 2:] + ["--device", "cuda"])
    finally:
        torch.backends.cudnn.benchmark = benchmark
    episodes = next(call[1:] for call in calls if call[0] == "benchmarks/bench_episodes.py")
    load_script("benchmarks/bench_episodes.py").parse_args(episodes)
    default, genobatch, tf32 = benches[:3]
    assert default == ["--iterations", "10", "--cases", "tnas_1shot_T4", "tnas_5shot_T4"]  # default flags
    assert all(bench.CASES[case]["kind"] == "genobatch" for case in genobatch[genobatch.index("--cases") + 1:])
    assert "--tf32" in tf32
    order = [call[0] if call[0] != "-m" else "pytest" for call in calls if call[0] in (
        "-m", "benchmarks/bench_meta_iter.py")]
    assert order.index("pytest") == 3
    steps = [line for line in (out / "timeline.txt").read_text().splitlines() if " done at " in line]
    assert len(steps) == len(benches) - 4 + 2  # the four sharing processes are one step; episodes, profile
    assert {"bench_meta_iter_default.json", "bench_meta_iter_genobatch.json", "gpu_tests.txt", "timeline.txt",
            "bench_shared_gpu.json", "profile_tnas_graph.txt", "bench_episodes.json"} <= members
    *_, last_figure, end = result.stdout.splitlines()
    assert last_figure == "tf32_graph scratch_1shot_T4 tasks/s 2 t_g h 1"  # the targets end the log
    assert end.startswith("[gpu_check] end (exit status 0)")


def gpu_check_test_files():
    """The test files of gpu_check.sh's pytest command."""
    import os

    from script_loader import REPO

    script = open(os.path.join(REPO, "benchmarks", "gpu_check.sh")).read()
    command = script[script.index(" -m pytest "):]
    return sorted(set(re.findall(r"tests/test_\w+\.py", command[:command.index("| tee")])))


def test_gpu_check_runs_every_file_with_gpu_tests():
    """A GPU test in a file gpu_check.sh does not list would never run on a GPU."""
    import glob
    import os

    from script_loader import REPO

    listed = set(gpu_check_test_files())
    uses_the_mark = re.compile(r"^(@pytest\.mark\.gpu|pytestmark = .*pytest\.mark\.gpu)", re.M)
    marked = {os.path.relpath(path, REPO) for path in glob.glob(os.path.join(REPO, "tests", "test_*.py"))
              if uses_the_mark.search(open(path).read())}
    assert listed == marked


def test_gpu_check_deadline_cuts_a_step_and_still_reports(tmp_path):
    """A step past GPU_CHECK_SECONDS is killed at the deadline, the later ones are skipped, and the
    tarball and timeline still come back, with the cut report marked unreadable; exit status 1."""
    result, seconds, calls, out, members = dry_run_gpu_check(
        tmp_path, FAKE_BENCH="hang", GPU_CHECK_SECONDS="3", GPU_CHECK_MIN_STEP_SECONDS="1")
    assert result.returncode == 1
    assert seconds < 3 + 10  # the deadline, and the startup and the summary
    timeline = (out / "timeline.txt").read_text()
    assert re.search(r"meta-iteration, default flags FAILED or cut at [1-3] s \(exit 124\)", timeline), timeline
    assert "GPU tests skipped (no time left)" in timeline and "shared GPU skipped (no time left)" in timeline
    assert "default: unreadable" in timeline and "end (exit status 1)" in timeline
    assert {"bench_meta_iter_default.json", "timeline.txt"} <= members
    assert not any(call[0] == "-m" for call in calls)  # no GPU tests started after the deadline


GPU_BOX_LACKS = ("tensorboardX", "ptflops")
"""Dependencies of the package that the GPU machine's image has not got (it has torch, numpy, pillow,
matplotlib, fonttools, PyYAML, tqdm, tensorboard and pytest, and nothing can be installed there)."""


def test_gpu_check_needs_nothing_the_gpu_box_lacks():
    """With tensorboardX and ptflops unimportable, gpu_check.sh's scripts import and its GPU tests
    are collected (a collection error would run none of them)."""
    import os
    import subprocess
    import sys

    from script_loader import REPO

    script = open(os.path.join(REPO, "benchmarks", "gpu_check.sh")).read()
    files = gpu_check_test_files()
    scripts = sorted(set(re.findall(r"benchmarks/\w+\.py", script)))
    code = (f"import sys\nfor name in {GPU_BOX_LACKS!r}: sys.modules[name] = None  # import raises ImportError\n"
            "import pytest\nsys.path.insert(0, 'tests')\nfrom script_loader import load_script\n"
            f"for path in {scripts!r}: load_script(path)\n"
            f"sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', *{files!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "benchmarks")])})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^\d+/\d+ tests collected", result.stdout, re.M), result.stdout[-1000:]
