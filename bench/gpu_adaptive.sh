#!/usr/bin/env bash
# The adaptive backbone on a GPU, in one go (about 3 minutes on an H200): the fused kernel against
# torch's gather + matmul (values and time), then bench/adaptive.py in its three variants, then a
# profile of the folded form. JSON and text land in $OUT (or ./bench-out).
# Usage: bash bench/gpu_adaptive.sh   (with cadist importable: installed, or PYTHONPATH=.)
set -uo pipefail
out=${OUT:-bench-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"
$py bench/irregular_conv.py --device cuda --dtype bf16 --size 1024x2048 --batch 4 > "$out/irregular_conv_bf16.json"
$py bench/irregular_conv.py --device cuda --dtype fp32 --size 1024x2048 --batch 2 > "$out/irregular_conv_fp32.json"
$py bench/adaptive.py --device cuda --dtype bf16 --sizes 512x1024,1024x2048 --batch 4 \
  --variants eager,eager_torch,folded,folded_torch --warmup 3 --repeats 10 > "$out/adaptive_bf16_b4.json"
$py -m bench.profile_adaptive --device cuda --dtype bf16 --size 1024x2048 --folded > "$out/profile_folded.txt"
for f in "$out"/*.json; do echo "== $f"; cat "$f"; echo; done
tail -25 "$out/profile_folded.txt"
