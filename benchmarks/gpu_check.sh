#!/usr/bin/env bash
# GPU checks in one go (under 8 minutes on one H100/H200): the GPU tests, then the speed
# benchmarks, each printing JSON. Results also land in $OUT (or ./gpu_check_out) as files.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TNAS_PROGRESS=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install needed (the GPU box may be offline)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt" || echo "no nvidia-smi" | tee "$out/gpu.txt"
status=0
timeout 240 python -m pytest -m gpu -q tests/test_gpu.py tests/test_data_episodes.py 2>&1 | tee "$out/gpu_tests.txt" || status=1
timeout 120 python benchmarks/bench_episodes.py --seconds 2 > "$out/bench_episodes.json" || status=1
timeout 180 python benchmarks/bench_meta_iter.py --iterations 5 > "$out/bench_meta_iter_fp32.json" || status=1
timeout 180 python benchmarks/bench_meta_iter.py --iterations 5 --amp --channels_last > "$out/bench_meta_iter_bf16.json" || status=1
# Four from-scratch trainings sharing the GPU (the protocol with more processes than GPUs):
# each warms up, then all start their 150 timed iterations at the same moment; the summed
# tasks/s is what one GPU delivers to four genotype trainings at once.
start_at=$(( $(date +%s) + 45 ))
pids=()
for i in 1 2 3 4; do
  timeout 120 python benchmarks/bench_meta_iter.py --cases scratch_1shot_T4 --iterations 150 --warmup 3 \
    --start_at "$start_at" > "$out/shared_$i.json" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
python benchmarks/shared_gpu.py "$out"/shared_?.json > "$out/bench_shared_gpu.json" || status=1
cat "$out"/bench_*.json
exit $status
