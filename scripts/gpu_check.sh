#!/usr/bin/env bash
# The one script to run when a GPU is lent (an H100 or H200; no internet there).
#
#   scripts/gpu_check.sh             # CUDA machine: measure, append to benchmarks/RESULTS.md (and copy to $OUT)
#   scripts/gpu_check.sh --dry-run   # any machine: the same Python entry points at tiny sizes on the CPU,
#                                    # written to $OUT or a temp file, RESULTS.md untouched
#
# It uses the machine's own python3 (override with PYTHON=...), which must already hold torch with CUDA;
# nothing is installed. Steps, most important first, each under `timeout` and a total budget
# (GPU_CHECK_BUDGET_S, default 330 s), so the whole script ends well within 8 minutes; a step that
# fails or runs out of time is recorded and the script goes on:
#   1. medium preset, bf16 and fp16, eager: tokens/s, MFU vs the dense bf16 peak, peak memory at 4 x 512
#   2. every preset at 4 x 512 (benchmarks/presets.py), with the seed's run extrapolated
#   3. the ablations at medium 4 x 512 (benchmarks/ablations.py), fp16 as the mixed precision
#   4. medium bf16 + torch.compile, then fp16 + torch.compile (first-step column = compile time)
#   5. our step against transformers' Llama, medium bf16, eager
#   6. FSDP2 on CUDA through the trainer's own test (process group of one)
set -euo pipefail

cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-330}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: $PY not found; set PYTHON=/path/to/python with torch installed." >&2
    exit 2
fi
if [[ $DRY == 0 ]] && ! timeout 60 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" \
        >/dev/null 2>&1; then
    echo "error: $PY has no torch that sees a CUDA GPU here; this script measures a GPU (use --dry-run to" \
         "exercise it on a CPU, or set PYTHON to an interpreter whose torch has CUDA)." >&2
    exit 2
fi

SECTION="$(mktemp)"
FAILED=0
note() { echo "$*" | tee -a "$SECTION"; }

# step TITLE LIMIT_S ARGS... : run one benchmark under `timeout`, its output into the section.
step() {
    local title=$1 limit=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    note ""
    note "### $title"
    note ""
    note "\`$PY $*\`"
    note ""
    if ((left < 20)); then
        note "skipped: the ${BUDGET}s budget is spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    local rc=0
    timeout --kill-after=10 "$limit" "$PY" "$@" 2>&1 | tee -a "$SECTION" || rc=$?
    if ((rc == 124 || rc == 137)); then
        note "(stopped after ${limit}s: over this step's time limit)"
        FAILED=1
    elif ((rc != 0)); then
        note "(failed with exit status $rc)"
        FAILED=1
    fi
}

GPU="$(timeout 60 "$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (dry run on the CPU)')" 2>&1 | tail -1)"
note ""
note "## GPU check: $GPU, $(date -u '+%Y-%m-%d %H:%M UTC')"
note ""
note "Produced by \`scripts/gpu_check.sh$([[ $DRY == 1 ]] && echo ' --dry-run')\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)); each command below ran from the repository root with PYTHONPATH=."
if [[ $DRY == 0 ]]; then
    note ""
    note '```'
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 \
        | tee -a "$SECTION" || true
    timeout 20 "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)" 2>&1 \
        | tee -a "$SECTION" || true
    note '```'
fi

if [[ $DRY == 1 ]]; then
    # Same entry points and flags as below, at sizes a CPU finishes in a few minutes.
    SPEED=(--presets nano --batch 2 --seq-len 64 --steps 2)
    PRESETS=(benchmarks/presets.py --quick --steps 1)
    ABL=(benchmarks/ablations.py --quick)
    HF=(benchmarks/train_throughput.py --quick --precisions bf16)
    MIXED=(bf16)
    NAME=nano
else
    SPEED=(--presets medium --batch 4 --seq-len 512 --steps 10)
    PRESETS=(benchmarks/presets.py --batch 4 --seq-len 512 --steps 5)
    ABL=(benchmarks/ablations.py --preset medium --precision fp16 --batch 4 --seq-len 512 --steps 5 --repeats 2)
    HF=(benchmarks/train_throughput.py --presets medium --precisions bf16 --batch 4 --seq-len 512 --steps 10)
    MIXED=(bf16 fp16)
    NAME=medium
fi

step "Our training step, $NAME, eager: tokens/s, MFU, peak memory" 90 \
    benchmarks/train_throughput.py --ours-only "${SPEED[@]}" --precisions "${MIXED[@]}" --compile none
step "Presets: parameters, estimated vs measured memory, tokens/s, the seed's run extrapolated" 60 "${PRESETS[@]}"
step "Ablations: one technique at a time" 100 "${ABL[@]}"
for precision in "${MIXED[@]}"; do
    step "Our training step, $NAME, $precision + torch.compile" 150 \
        benchmarks/train_throughput.py --ours-only "${SPEED[@]}" --precisions "$precision" --compile ours
done
step "Our training step against transformers' LlamaForCausalLM (SDPA), $NAME, same weights and step" 60 "${HF[@]}"
if [[ $DRY == 0 ]]; then
    # FSDP2 over nccl with a process group of one: sharded parameters on CUDA, losses, checkpoint and resume
    # equal to plain training (needs pytest in $PY; two-GPU FSDP needs a machine with two GPUs).
    step "FSDP2 on CUDA (nccl, process group of one)" 120 -m pytest -q -rs -p no:cacheprovider \
        tests/test_train_distributed.py -k "group_of_one and cuda"
fi
note ""
note "Total time of the check: $((SECONDS - START)) s."

if [[ $DRY == 1 ]]; then
    DEST="${OUT:-$(mktemp -d)}"
    cp "$SECTION" "$DEST/gpu_check.md"
    echo "dry run: results in $DEST/gpu_check.md (benchmarks/RESULTS.md untouched)"
else
    cat "$SECTION" >> benchmarks/RESULTS.md
    echo "appended to benchmarks/RESULTS.md"
    if [[ -n "${OUT:-}" ]]; then
        cp "$SECTION" "$OUT/gpu_check.md"
        cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
        echo "copied to $OUT/gpu_check.md and $OUT/RESULTS.md"
    fi
fi
rm -f "$SECTION"
exit $FAILED
