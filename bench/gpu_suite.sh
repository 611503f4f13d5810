#!/usr/bin/env bash
# Every benchmark that means something on a GPU machine, in one go; JSON files land in $OUT (or ./bench-out).
# Usage: bash bench/gpu_suite.sh   (with cadist importable: installed, or PYTHONPATH=.)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py bench/models.py --device cuda --dtype fp32 --warmup 3 --repeats 10 > "$out/models_cuda_fp32.json"
$py bench/models.py --device cuda --dtype bf16 --warmup 3 --repeats 10 > "$out/models_cuda_bf16.json"
for os_ in 16 8; do
  $py bench/train_step.py --device cuda --dtype bf16 --channels-last --output-stride $os_ --steps 20 > "$out/train_step_os${os_}.json"
done
$py bench/loader.py --data /tmp/cadist-bench > "$out/loader.json"
$py -m pytest -q tests/unit/test_models.py tests/unit/test_data.py -p no:cacheprovider 2>&1 | tail -3 | tee "$out/pytest.txt"
for f in "$out"/*.json; do echo "== $f"; cat "$f"; echo; done
