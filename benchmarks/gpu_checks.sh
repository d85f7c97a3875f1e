#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script: the core's tests on CUDA (fp16 autocast
# and the no-host-sync check included), a short fp16-AMP training run, the training-step
# cost at the paper's crop (512 x 1024, AMP fp16; without value checks, with them deferred,
# the trainer's default, and for DeepLabV3 read at once) and the loss cost on the GPU, what is
# live at the step's memory peak (gpu_memory.py; for DeepLabV3 also with small cuBLAS
# workspaces, and with RCH's products as convolutions) and the kernels a step launches, with
# their GPU time. It ends by printing one page of the numbers to read first
# (gpu_summary.py: the ratios against the 3 % target). Most important first: a lent
# machine's time may end before the last step (BUDGET below). 5.5 minutes on an H200
# (2026-11-27: 329 s, of which train_cost 119 + 112 s, the CUDA tests 32 s, gpu_memory 18 s,
# loss_cost 22 s, the AMP run 19 s), measured before the small-workspace step was
# added (about 20 s more, estimated from gpu_memory's 18 s) and before train_cost went from
# 20 to 40 repetitions (2026-11-28: about 13 s more per run, at 0.64 s per repetition of the
# three networks' two steps), the two --conv-products steps and step_ops (2026-11-28, not
# yet timed; about 2 minutes together, limited to 250 s), and last the checks read at once
# (60 s at most): about 9 minutes in all, which BUDGET caps. The step logs, the smaller
# memory reports and the summary end up in OUT/logs.tar.gz (a lent machine returns at most
# 8 files).
# Usage: benchmarks/gpu_checks.sh OUT_DIR   (from the repository root; PYTHON=python3 by default)
# Needs torch, torchvision, timm, hypothesis, pytest and segmentation-models-pytorch (SegFormer).
# A lent GPU machine (no network) had all of them but segmentation-models-pytorch: fetch its
# wheel here first (`pip download --no-deps -d .whl 'segmentation-models-pytorch>=0.6,<0.7'`),
# carry `.whl` along (git-ignored), and there run `pip install --no-index --no-deps --target
# /tmp/site .whl/*.whl` with PYTHONPATH=/tmp/site before this script.
# That machine's own torch runs the code (2.11.0 in 2026-11): `make compat` runs the whole
# suite here under it first (on the CPU), so that a version difference costs no GPU time.
# BUDGET (seconds, default 540): the whole script's time; a step gets at most what is left of
# it less 10 s, and is skipped with under 15 s left, so that the archive step always runs (a
# lent machine's command limit would otherwise kill the script before it, and the logs with
# it). Run it under a limit above BUDGET + 20.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR}
py=${PYTHON:-python3}
budget=${BUDGET:-540}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS CMD...: run, log to OUT/NAME.log, remember a failure
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS - 10))
    if [ "$left" -lt 15 ]; then
        echo "== $name: skipped, ${left} s left of BUDGET=$budget" | tee "$out/$name.log"
        printf '%s\tskipped\t0\n' "$name" >>"$out/steps.tsv"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -n 25
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc in $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$out/steps.tsv"
    [ "$rc" = 0 ] || status=1
}
nvidia-smi -L
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step train_cost_novalidate 200 "$py" benchmarks/train_cost.py --device cuda --amp fp16 \
    --crop 512 1024 --reps 40 --no-validate --out "$out/train_cost_cuda_fp16_novalidate.json"
step cuda_tests 120 env RCH_TEST_DEVICE=cuda "$py" -m pytest -q -p no:cacheprovider \
    -o addopts="" tests/test_functional.py tests/test_loss.py tests/test_properties.py \
    tests/test_validation.py tests/test_head.py tests/test_diagnostics.py tests/test_stats.py \
    tests/train/test_losses.py
step gpu_memory 90 "$py" benchmarks/gpu_memory.py --validate-off --out "$out/gpu_memory.json"
# DeepLabV3's baseline runs no matmul, so RCH's small ones bring in cuBLAS workspaces (2 x 32
# MiB on an H200, 2.3 of its 4.5 points; one since RCH's backward pass runs no BLAS on a
# GPU, 2026-11-28): how much of the gap is left with 4 MiB ones?
step gpu_memory_small_workspace 60 env CUBLAS_WORKSPACE_CONFIG=:4096:1 CUBLASLT_WORKSPACE_SIZE=4096 \
    "$py" benchmarks/gpu_memory.py --validate-off --networks deeplabv3_resnet50 \
    --out "$out/gpu_memory_small_workspace.json"
# and with no cuBLAS call from RCH at all: its forward pass's products as 1x1 convolutions
# (--conv-products, rch._fused.CONV_PRODUCTS_ON; off by default until this measures it):
# memory, then time
step gpu_memory_conv 60 "$py" benchmarks/gpu_memory.py --validate-off --networks \
    deeplabv3_resnet50 --conv-products --out "$out/gpu_memory_conv.json"
step train_cost_conv 100 "$py" benchmarks/train_cost.py --device cuda --amp fp16 \
    --crop 512 1024 --reps 40 --no-validate --networks deeplabv3_resnet50 --conv-products \
    --out "$out/train_cost_conv.json"
step loss_cost 90 "$py" benchmarks/loss_cost.py --device cuda --reps 20 --pairwise-reps 3 \
    --out "$out/loss_cost_cuda.json"
step amp_train 40 "$py" -m rch train configs/cpu/synthetic_tiny.yaml --no-progress --overwrite \
    --set train.device=cuda --set train.amp=fp16 --set train.iters=60 \
    --set train.out_dir=/tmp/rch-gpu-runs
# the trainer's default, rch.validate=deferred: the value checks read where it reads its losses
step train_cost 200 "$py" benchmarks/train_cost.py --device cuda --amp fp16 --crop 512 1024 \
    --reps 40 --out "$out/train_cost_cuda_fp16.json"
# what a step launches: the operators that step_ops.py counts on the CPU, against the kernels
# the profiler sees on the GPU
step step_ops 90 "$py" benchmarks/step_ops.py --device cuda --amp fp16 \
    --out "$out/step_ops_cuda.json"
# the checks read at once in the loss (rch.validate=true, the default before 2026-11-28): one
# synchronisation a step, what the deferred checks save
step train_cost_immediate 60 "$py" benchmarks/train_cost.py --device cuda --amp fp16 \
    --crop 512 1024 --reps 40 --validate true --networks deeplabv3_resnet50 \
    --out "$out/train_cost_immediate.json"
# the page to read first (benchmarks/gpu_summary.py: the ratios against the 3 % target, the
# memory peaks, the GPU time RCH adds), printed last so that it ends the command's output
"$py" benchmarks/gpu_summary.py "$out" > "$out/summary.md" || status=1
# at most 8 files come back: the logs, the smaller memory reports and the summary go into one
# archive
tar -C "$out" -czf "$out/logs.tar.gz" \
    $(cd "$out" && ls *.log gpu_memory_*.json train_cost_immediate.json summary.md steps.tsv \
        2>/dev/null)
cat "$out/summary.md"
rm -f "$out"/*.log "$out"/gpu_memory_*.json "$out"/train_cost_immediate.json "$out"/summary.md \
    "$out"/steps.tsv
exit $status
