#!/usr/bin/env bash
# GPU check of linvision on one CUDA machine, ~8 minutes at most: one command, from anywhere:
#
#     bash scripts/gpu_check.sh            (OUT=/some/dir to keep the logs there; default /tmp/linvision_gpu_check)
#
# Sections (each isolated: its failure or time-out does not stop the others; each has a time limit, shrunk so that
# the whole run ends within GPU_CHECK_SECONDS, default 450):
#   cuda_tests      pytest tests/test_cuda.py -m cuda (Triton vs references, 16k tokens, bf16/fp16, torch.compile)
#   amp_steps       bf16-autocast and fp16+GradScaler training steps of vrwkv_tiny / vir_tiny (scripts/gpu_amp_check.py)
#   amp_cli         `linvision train --amp` (fp16 + GradScaler on CUDA), 3 steps of test_vir
#   ddp_nccl_2proc  torchrun --nproc_per_node 2 -m linvision train (nccl): with ONE GPU linvision refuses (exit 2)
#   ddp_nccl_1gpu   2 ranks both on cuda:0 with nccl (scripts/ddp_one_gpu.py): NCCL usually refuses duplicates
#   ddp_gloo_1gpu   2 ranks on cuda:0 with gloo: DDP on CUDA tensors, 3 steps of test_vrwkv
#   ddp_nccl_1proc  1 rank, nccl process group, DDP on CUDA
#   bench           scripts/gpu_bench.py: Bi-WKV / retention kernels vs SDPA and the PyTorch forms; models' img/s
# Writes to $OUT (or the default): gpu_check.log (all output), cuda_tests.log, summary.md, bench.json, bench.md.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export TQDM_DISABLE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
LOG="${OUT:-/tmp/linvision_gpu_check}"
mkdir -p "$LOG"
WORK="$(mktemp -d)"
ALL="$LOG/gpu_check.log"
: > "$ALL"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-450}))
SUMMARY=()

left() { echo $((DEADLINE - $(date +%s))); }

# section NAME LIMIT_SECONDS CMD...: run CMD with a time limit (shrunk to the time left), log, record the outcome
section() {
    local name=$1 limit=$2 t0 rc note secs
    shift 2
    local avail=$(( $(left) - 5 ))
    (( avail < limit )) && limit=$avail
    if (( limit < 10 )); then
        SUMMARY+=("| $name | SKIPPED | - | 0 | no time left |")
        echo "=== $name: skipped (no time left)" | tee -a "$ALL"
        return
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$ALL"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    cat "$WORK/$name.log" >> "$ALL"
    tail -n 15 "$WORK/$name.log"
    note=$(grep -E "(passed|failed|skipped|error)[^/]* in [0-9.]+s|^(OK|FAIL) |all_reduce|[A-Za-z]+(Error|Exception):|linvision: |Duplicate|NCCL|img_per_s|GPU benchmark" "$WORK/$name.log" \
           | grep -v "errors.html" | tail -n 1 | cut -c1-160 | tr '|' '/')
    if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc == 0 )); then status="ok"; else status="FAIL"; fi
    SUMMARY+=("| $name | $status | $rc | $secs | ${note:-} |")
    echo "=== $name: $status (rc $rc, ${secs}s)" | tee -a "$ALL"
}

TRAIN=(train --img-size 32 --patch-size 8 --epochs 1 --max-steps 3 --batch-size 32 --workers 0 --no-ema)

{
    echo "linvision gpu_check $(date -u) on $(hostname)"
    nvidia-smi -L 2>&1 | head -4
    python3 -c "import linvision, torch, triton, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() \
else 'NO CUDA')" 2>&1
} | tee -a "$ALL"

section cuda_tests 150 python3 -m pytest tests/test_cuda.py -m cuda -q -rfEs -p no:cacheprovider --durations=10
cp "$WORK/cuda_tests.log" "$LOG/cuda_tests.log" 2>/dev/null
# the benchmark before the DDP/AMP checks: its numbers matter most; those below are short and may be cut
BUDGET=${GPU_BENCH_SECONDS:-140}
section bench $((BUDGET + 40)) python3 scripts/gpu_bench.py --out "$LOG" --budget "$BUDGET"
section amp_steps 45 python3 scripts/gpu_amp_check.py
section amp_cli 35 python3 -m linvision "${TRAIN[@]}" --model test_vir --device cuda --amp --output "$WORK/amp_cli"
section ddp_gloo_1gpu 45 torchrun --standalone --nproc_per_node 2 scripts/ddp_one_gpu.py gloo "${TRAIN[@]}" \
    --model test_vrwkv --device cuda --output "$WORK/ddp_gloo_1gpu"
section ddp_nccl_1proc 30 torchrun --standalone --nproc_per_node 1 scripts/ddp_one_gpu.py nccl "${TRAIN[@]}" \
    --model test_vir --device cuda --output "$WORK/ddp_nccl_1proc"
section ddp_nccl_2proc 25 torchrun --standalone --nproc_per_node 2 -m linvision "${TRAIN[@]}" --model test_vrwkv \
    --device cuda --output "$WORK/ddp_nccl_2proc"
section ddp_nccl_1gpu 20 torchrun --standalone --nproc_per_node 2 scripts/ddp_one_gpu.py nccl "${TRAIN[@]}" \
    --model test_vrwkv --device cuda --output "$WORK/ddp_nccl_1gpu"

{
    echo
    echo "## linvision gpu_check summary ($(( $(date +%s) - START ))s; logs in $LOG)"
    echo
    echo "| section | status | rc | seconds | last relevant line |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "Expected on a 1-GPU machine: ddp_nccl_2proc FAIL (exit 2: 'LOCAL_RANK 1 but only 1 GPU(s)'),"
    echo "ddp_nccl_1gpu usually FAIL (NCCL refuses two ranks on one device); ddp_gloo_1gpu and ddp_nccl_1proc ok."
    [ -f "$LOG/bench.md" ] && cat "$LOG/bench.md"
} | tee "$LOG/summary.md" | tee -a "$ALL"
rm -rf "$WORK"
exit 0
