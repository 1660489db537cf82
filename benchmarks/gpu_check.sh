#!/usr/bin/env bash
# GPU checks in one go: the GPU tests, then the speed benchmarks, each printing JSON.
# Results land in $OUT (or ./gpu_check_out) as they come, so a run cut short still reports.
#   bash benchmarks/gpu_check.sh            # everything, most important first (about 8 minutes)
#   bash benchmarks/gpu_check.sh tests      # only the GPU tests
#   bash benchmarks/gpu_check.sh speed      # only the benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
case "$part" in all|tests|speed) ;; *) echo "usage: $0 [all|tests|speed]" >&2; exit 2 ;; esac
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TNAS_PROGRESS=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install needed (the GPU box may be offline)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt" || echo "no nvidia-smi" | tee "$out/gpu.txt"
status=0
started=$(date +%s)
mark() { echo "[gpu_check] $1 done at +$(( $(date +%s) - started )) s" | tee -a "$out/timeline.txt"; }

if [ "$part" != speed ]; then
  timeout 200 python -m pytest -m gpu -q tests/test_gpu.py tests/test_data_episodes.py 2>&1 | tee "$out/gpu_tests.txt" || status=1
  mark "GPU tests"
fi
if [ "$part" != tests ]; then
  key_cases="tnas_1shot_T4 tnas_1shot_T16 auto_maml_1shot_T4 adapt_1shot_T100 scratch_1shot_T4"
  timeout 150 python benchmarks/bench_meta_iter.py --iterations 5 > "$out/bench_meta_iter_fp32.json" || status=1
  mark "meta-iteration fp32"
  timeout 120 python benchmarks/bench_meta_iter.py --iterations 5 --cuda_graph --cases $key_cases \
    > "$out/bench_meta_iter_fp32_graph.json" || status=1
  mark "meta-iteration fp32 + CUDA graph"
  timeout 150 python benchmarks/bench_meta_iter.py --iterations 5 --amp --channels_last \
    > "$out/bench_meta_iter_bf16.json" || status=1
  mark "meta-iteration bf16"
  timeout 120 python benchmarks/bench_meta_iter.py --iterations 5 --amp --channels_last --cuda_graph --cases $key_cases \
    > "$out/bench_meta_iter_bf16_graph.json" || status=1
  mark "meta-iteration bf16 + CUDA graph"
  timeout 60 python benchmarks/bench_episodes.py --seconds 1 > "$out/bench_episodes.json" || status=1
  mark "episodes"
  # Four from-scratch trainings sharing the GPU (the protocol with more processes than GPUs):
  # each warms up, then all start their 150 timed iterations at the same moment; the summed
  # tasks/s is what one GPU delivers to four genotype trainings at once.
  start_at=$(( $(date +%s) + 45 ))
  pids=()
  for i in 1 2 3 4; do
    timeout 100 python benchmarks/bench_meta_iter.py --cases scratch_1shot_T4 --iterations 150 --warmup 3 \
      --start_at "$start_at" > "$out/shared_$i.json" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  python benchmarks/shared_gpu.py "$out"/shared_?.json > "$out/bench_shared_gpu.json" || status=1
  mark "shared GPU"
  # The same two cases with the tasks batched by torch.func.vmap instead of folded (for comparison)
  timeout 60 python benchmarks/bench_meta_iter.py --iterations 3 --batching vmap --cases tnas_1shot_T4 scratch_1shot_T4 \
    > "$out/bench_meta_iter_fp32_vmap.json" || status=1
  mark "meta-iteration fp32, vmap"
  cat "$out"/bench_*.json
fi
exit $status
