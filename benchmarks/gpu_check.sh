#!/usr/bin/env bash
# GPU checks in one go: the benchmarks the open targets ask for, the GPU tests, then the other
# benchmarks, each printing JSON.
#   bash benchmarks/gpu_check.sh            # everything, most important first (under 8 minutes;
#                                           # GPU_CHECK_SECONDS=900 leaves room for the older cases)
#   bash benchmarks/gpu_check.sh tests      # only the GPU tests
#   bash benchmarks/gpu_check.sh speed      # only the benchmarks
# Order: the targets first (about 4 minutes: T-NAS search 1- and 5-shot with default flags, with
# GFLOP and fraction of peak; the eager genotype batches, protocol_hours_600; --tf32), then the GPU
# tests (at most 180 s; 90 s per test where pytest-timeout is installed, so one hang cannot stop
# the rest), then the comparisons, the oldest last. Every step is cut to fit GPU_CHECK_SECONDS
# (default 460) in all, counted from the start; a step left under GPU_CHECK_MIN_STEP_SECONDS
# (default 20) is skipped. A cut step gets SIGTERM, on which bench_meta_iter.py still prints the
# cases it finished (then SIGKILL 5 s later). After each step the results so far (stdout of each
# step, stderr in stderr.txt) are packed into $OUT/gpu_check.tar.gz (or ./gpu_check_out), beside
# timeline.txt and gpu_tests.txt, so a run cut short still reports and the outputs stay few files.
# It ends within about 10 s of GPU_CHECK_SECONDS (the torch import counted; the kill grace, the
# summary and the packing after it): give the machine's command GPU_CHECK_SECONDS + 30 s.
# Needs only torch, numpy, pillow, matplotlib, fonttools, PyYAML, tqdm and pytest (no install:
# the GPU box may be offline; tensorboardX and ptflops are optional). Exit status: 0 when every
# step ran and passed, else 1. tests/test_bench_meta_iter.py dry-runs it with a fake python3.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
case "$part" in all|tests|speed) ;; *) echo "usage: $0 [all|tests|speed]" >&2; exit 2 ;; esac
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
work="$(mktemp -d)"
py="$(command -v python3 || command -v python)"
export PYTHONUNBUFFERED=1 TNAS_PROGRESS=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install needed (the GPU box may be offline)
started=$(date +%s)
deadline=$(( started + ${GPU_CHECK_SECONDS:-460} ))
min_step=${GPU_CHECK_MIN_STEP_SECONDS:-20}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$work/gpu.txt" \
  || echo "no nvidia-smi" | tee "$work/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$work/gpu.txt"
status=0
# limit N: the seconds a step may take, N at most and never past the deadline
limit() { local left=$(( deadline - $(date +%s) )); echo $(( left < $1 ? left : $1 )); }
pack() { tar czf "$out/gpu_check.tar.gz" -C "$work" . ; cp "$work/timeline.txt" "$out/" 2>/dev/null; }
mark() { echo "[gpu_check] $1 at +$(( $(date +%s) - started )) s" | tee -a "$work/timeline.txt"; pack; }
# step NAME SECONDS OUTPUT CMD...: run CMD with stdout into $work/OUTPUT (stderr shown and kept in
# stderr.txt), within limit SECONDS
step() {
  local name="$1" seconds; seconds=$(limit "$2"); local output="$3"; shift 3
  if [ "$seconds" -lt "$min_step" ]; then mark "$name skipped (no time left)"; status=1; return; fi
  case "$output" in bench_meta_iter_*.json) benches+=("$work/$output") ;; esac
  timeout -k 5 "$seconds" "$@" 2>&1 >"$work/$output" | tee -a "$work/stderr.txt" >&2
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then mark "$name done"; return; fi
  status=1; mark "$name FAILED or cut at ${seconds} s (exit $rc)"
}
# summarize FILE...: one line per measurement of the bench_meta_iter reports that exist (a skipped
# step leaves none), into the log and the timeline
summarize() {
  local file files=()
  for file; do if [ -e "$file" ]; then files+=("$file"); fi; done
  if [ "${#files[@]}" -gt 0 ]; then "$py" benchmarks/gpu_check_summary.py "${files[@]}" | tee -a "$work/timeline.txt"; fi
}
bench="$py benchmarks/bench_meta_iter.py"
benches=()  # the bench_meta_iter reports of the steps run, in order
n_targets=0

targets() {
  # T-NAS search 1-shot and 5-shot, 4 tasks, default flags (--cuda_graph auto; the JSON's setting
  # says what auto chose), with GFLOP per meta-iteration and the fraction of peak
  step "meta-iteration, default flags" 60 bench_meta_iter_default.json $bench --iterations 10 \
    --cases tnas_1shot_T4 tnas_5shot_T4
  summarize "$work/bench_meta_iter_default.json"
  # Genotype batches: G genotypes (random decodes, 4 tasks each) trained as one network,
  # first-order MAML and MAML++, 1-shot; aggregate tasks/s, peak memory, protocol_hours_600
  step "genotype batches fp32, eager" 150 bench_meta_iter_genobatch.json $bench --iterations 3 --warmup 1 \
    --cuda_graph off --cases genobatch_1shot_G1_T4 genobatch_1shot_G8_T4 genobatch_1shot_G32_T4 \
    genobatch_1shot_G64_T4 genobatch_pp_1shot_G1_T4 genobatch_pp_1shot_G8_T4 genobatch_pp_1shot_G32_T4 \
    genobatch_pp_1shot_G64_T4 genobatch_same_1shot_G64_T4
  summarize "$work/bench_meta_iter_genobatch.json"
  # Precision (tnas/precision.py; README "Measured figures"): graphed T-NAS search and from-scratch
  # MAML with --tf32
  step "meta-iteration --tf32 + CUDA graph" 35 bench_meta_iter_tf32_graph.json $bench --iterations 10 --tf32 \
    --cuda_graph on --cases tnas_1shot_T4 scratch_1shot_T4
  summarize "$work/bench_meta_iter_tf32_graph.json"
}

gpu_tests() {
  # the default path first (source folding, graphs), then the newest tests, the oldest last
  local seconds; seconds=$(limit 180)
  if [ "$seconds" -lt "$min_step" ]; then mark "GPU tests skipped (no time left)"; status=1; return; fi
  local per_test=""
  "$py" -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 90"
  timeout -k 5 "$seconds" "$py" -m pytest -m gpu -q -p no:cacheprovider --durations=15 $per_test \
    tests/test_gpu.py tests/test_branches.py tests/test_data_parallel_graph.py tests/test_train_batched.py \
    tests/test_precision.py tests/test_genotype_batch.py tests/test_data_episodes.py 2>&1 | tee "$work/gpu_tests.txt"
  local rc=${PIPESTATUS[0]}
  cp "$work/gpu_tests.txt" "$out/"
  if [ "$rc" -eq 0 ]; then mark "GPU tests passed"; return; fi
  status=1; mark "GPU tests FAILED or cut at ${seconds} s (exit $rc)"
}

comparisons() {
  # The supernet's other edge path, graphed, beside the default's figures: edge by edge (--edges fused)
  # instead of all edges from a cell state at once (the default, source folding)
  step "meta-iteration, edges one by one" 60 bench_meta_iter_edges_fused.json $bench --iterations 10 \
    --cuda_graph on --edges fused --cases tnas_1shot_T4 tnas_5shot_T4 auto_maml_1shot_T4
  step "genotype batches fp32 + CUDA graph" 90 bench_meta_iter_genobatch_graph.json $bench --iterations 3 \
    --cuda_graph on --cases genobatch_1shot_G8_T4 genobatch_1shot_G64_T4 genobatch_pp_1shot_G8_T4
  step "genotype batches 5-shot fp32, eager" 60 bench_meta_iter_genobatch_5shot.json $bench --iterations 2 \
    --warmup 1 --cuda_graph off --cases genobatch_5shot_G8_T4 genobatch_5shot_G32_T4 genobatch_pp_5shot_G8_T4
  # torch.compile of the first-order step, eager and graphed; compiling the supernet takes minutes, so
  # it comes after the targets (the JSON's warmup_seconds holds the compile time; an error or a failed
  # capture is recorded per case)
  step "meta-iteration --compile, eager" 120 bench_meta_iter_compile.json $bench --iterations 5 --compile \
    --cuda_graph off --cases tnas_1shot_T4
  step "meta-iteration --compile + CUDA graph" 60 bench_meta_iter_compile_graph.json $bench --iterations 10 \
    --compile --cuda_graph on --cases tnas_1shot_T4
  # Every other search case and adaptation as CUDA graphs (1x1 convs as matmuls, the default)
  step "meta-iteration fp32 + CUDA graph" 90 bench_meta_iter_fp32_graph.json $bench --iterations 5 --cuda_graph on \
    --cases auto_maml_1shot_T4 tnas_1shot_T16 scratch_1shot_T4 scratch_pp_1shot_T4
  step "adaptation fp32 + CUDA graph" 45 bench_meta_iter_adapt_graph.json $bench --iterations 2 --cuda_graph on \
    --cases adapt_1shot_T100
  # The supernet's edge ops on one stream instead of side by side (tnas.models.branches), for comparison
  step "meta-iteration fp32 + CUDA graph, one stream" 45 bench_meta_iter_fp32_graph_one_stream.json \
    $bench --iterations 5 --cuda_graph on --branch_streams 0 --cases tnas_1shot_T4 auto_maml_1shot_T4
  step "meta-iteration fp32, eager" 90 bench_meta_iter_fp32.json $bench --iterations 3 --cuda_graph off \
    --cases tnas_1shot_T4 \
    auto_maml_1shot_T4 tnas_5shot_T4 scratch_1shot_T4 scratch_5shot_T4 scratch_pp_1shot_T4
  # The same graphed case with 1x1 convs as grouped cuDNN convs, and in bf16 (for comparison)
  step "meta-iteration fp32 + CUDA graph, 1x1 convs as grouped convs" 30 bench_meta_iter_fp32_graph_conv.json \
    $bench --iterations 5 --cuda_graph on --pointwise conv --cases tnas_1shot_T4
  step "meta-iteration bf16 + CUDA graph" 35 bench_meta_iter_bf16_graph.json \
    $bench --iterations 5 --amp --cuda_graph on --cases tnas_1shot_T4 auto_maml_1shot_T4
  step "episodes" 30 bench_episodes.json "$py" benchmarks/bench_episodes.py --seconds 1
  # Four from-scratch trainings sharing the GPU (the protocol with more processes than GPUs):
  # each warms up, then all start their 100 timed iterations at the same moment; the summed
  # tasks/s is what one GPU delivers to four genotype trainings at once.
  seconds=$(limit 70)
  if [ "$seconds" -ge 60 ]; then
    start_at=$(( $(date +%s) + 35 ))
    pids=()
    for i in 1 2 3 4; do
      timeout -k 5 "$seconds" "$py" benchmarks/bench_meta_iter.py --cases scratch_1shot_T4 --iterations 100 --warmup 3 \
        --cuda_graph off --start_at "$start_at" > "$work/shared_$i.json" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    "$py" benchmarks/shared_gpu.py "$work"/shared_?.json > "$work/bench_shared_gpu.json" || status=1
    mark "shared GPU"
  else
    mark "shared GPU skipped (no time left)"; status=1
  fi
  # The same two cases with the tasks batched by torch.func.vmap instead of folded (for comparison)
  step "meta-iteration fp32, vmap" 40 bench_meta_iter_fp32_vmap.json \
    "$py" benchmarks/bench_meta_iter.py --iterations 3 --cuda_graph off --batching vmap --cases tnas_1shot_T4 scratch_1shot_T4
  # Where the graphed time goes (if time is left)
  step "profile, CUDA graph" 35 profile_tnas_graph.txt \
    "$py" benchmarks/profile_meta_iter.py --cases tnas_1shot_T4 --cuda_graph on --rows 30
}

if [ "$part" != tests ]; then targets; n_targets=${#benches[@]}; fi
if [ "$part" != speed ]; then gpu_tests; fi
if [ "$part" != tests ]; then
  comparisons
  cat "$work/bench_episodes.json" "$work/bench_shared_gpu.json" 2>/dev/null
  grep -h '^{"case"' "$work"/profile_*.txt 2>/dev/null
  # One line per measurement, so the end of the log (and timeline.txt) carries every figure: the
  # comparisons in the order they ran, then the targets again, last
  summarize "${benches[@]:n_targets}" "${benches[@]:0:n_targets}"
fi
mark "end (exit status $status)"
rm -rf "$work"
exit $status
