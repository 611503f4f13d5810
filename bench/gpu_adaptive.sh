#!/usr/bin/env bash
# The adaptive backbone on a GPU, in one go (a few minutes on an H200, Triton autotuning included): the
# fused kernel against torch's gather + matmul (values and time), bench/adaptive.py in its four
# variants, a profile of the folded form, and a training smoke of the adaptive R101. JSON and text land in $OUT (or ./bench-out).
# Usage: bash bench/gpu_adaptive.sh   (with cadist importable: installed, or PYTHONPATH=.)
# On a lent GPU machine without cadist's dependencies: `bash bench/gpu_wheels.sh` here first, then
# run with carry [".whl"]: python3 -m pip install -q --no-index --no-deps --no-compile
# --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD bash bench/gpu_adaptive.sh
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
# training smoke: the adaptive R101 (edge mask) with the fused forward/backward kernels, with torch's
# path (CADIST_TRITON=0), and through cadist's DeepSpeed engine; losses must fall in all three
$py bench/train_step.py --model deeplabv3_batch_ap_resnet101 --dtype bf16 --batch 8 --steps 15 > "$out/train_step_edge_triton.json"
CADIST_TRITON=0 $py bench/train_step.py --model deeplabv3_batch_ap_resnet101 --dtype bf16 --batch 8 --steps 15 > "$out/train_step_edge_torch.json"
$py bench/train_step.py --model deeplabv3_batch_ap_resnet101 --dtype bf16 --batch 8 --steps 10 --engine deepspeed > "$out/train_step_edge_deepspeed.json"
for f in "$out"/*.json; do echo "== $f"; cat "$f"; echo; done
tail -25 "$out/profile_folded.txt"
