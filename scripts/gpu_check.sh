#!/usr/bin/env bash
# The one script to run when a GPU is lent (an H100 or H200; no internet there). One call of ~8 minutes.
#
#   scripts/gpu_check.sh             # CUDA machine: measure; results to $OUT as each step ends, then
#                                    # appended to benchmarks/RESULTS.md
#   scripts/gpu_check.sh --dry-run   # any machine: the same entry points at tiny sizes on the CPU,
#                                    # results to $OUT (or a temp folder), RESULTS.md untouched
#
# It uses the machine's own python3 (override with PYTHON=...), which must hold torch with CUDA; nothing
# is installed. The image we expect (python 3.12, torch 2.11 + CUDA, transformers 5.17) has no fastapi,
# gguf, llama_cpp or datasets, and perhaps no pytest or matplotlib: every step imports only torch,
# numpy, safetensors, tokenizers, tqdm (and transformers for its comparison); a step whose optional
# package is absent is skipped as not applicable and says why (the preflight lists what is there).
#
# Steps, by value (correctness first), each under `timeout` and within a total budget
# (GPU_CHECK_BUDGET_S, default 420 s, so the whole script fits one 8-minute call):
#   precision   bf16 / fp16 training losses vs fp32 at medium 4 x 512 (fp16: loss scale, skipped steps)
#   attention   fused SDPA vs the math kernel, forward + backward, the model's GQA shapes, bf16 / fp16,
#               printing which kernel ran; then the whole model's gradients with each
#   dist        DDP and FSDP2 (fp32, and bf16 with its mixed-precision policy) over nccl vs plain training
#   pytest      the CUDA cases of the DDP / FSDP2 tests, checkpoints and resume included (needs pytest)
#   torchrun    a 2-GPU DDP and FSDP2 smoke under torchrun (only with 2+ GPUs)
#   graphs      the engine's decode steps replayed as CUDA graphs (`--compile` on a GPU) against the same
#               step called directly and the eager step: tokens agree, tokens/s at nano / tiny, batch 1 / 8 / 32
#   eager       medium eager bf16 and fp16: tokens/s, MFU, max_memory_allocated / reserved vs the seed's ~6 GB
#   big-batch   medium bf16 at 16 x 512: tokens/s that grow with the batch mean the step is launch-bound
#   compile     medium bf16 + torch.compile (first-step column = compile time)
#   transformers  our step vs transformers' LlamaForCausalLM, medium bf16, eager
#   presets     every preset at 4 x 512; ablations  one technique at a time at medium 4 x 512
#   serve       the inference engine at 1 / 8 / 32 clients (only if serve_load.py has --engine-only)
#   serve-http  `serve` at 1 / 8 / 32 staggered clients, the engine in its own process and on a thread
#
# Results: $OUT/gpu_check/gpu_check.md (every step's command and output, written as it runs),
# $OUT/gpu_check/status.tsv (one line per finished step: id, status, seconds, title) and, at the end,
# a summary of every step: ok, failed, timed out, skipped (budget) or skipped (n/a: why). Killed by a
# signal, it still writes the summary; killed outright, what finished is already in $OUT.
# Exit status: 0 when every step that applies ran and passed; 1 when any failed, timed out or was
# skipped for the budget; 2 when it cannot start. For tests: GPU_CHECK_ONLY="id ..." runs only those
# steps (the rest: skipped (n/a: not selected)); GPU_CHECK_FAIL=id makes that step fail.
set -uo pipefail

cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
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

DEST="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.md"
STATUS="$DEST/status.tsv"
: >"$LOG"
: >"$STATUS"
declare -a IDS=() TITLES=() STATES=() TIMES=()
BAD=0
CURRENT=""

note() { echo "$*" | tee -a "$LOG"; }

record() {  # record ID TITLE STATUS SECONDS: remember a finished step and write its line to $OUT at once
    IDS+=("$1"); TITLES+=("$2"); STATES+=("$3"); TIMES+=("$4")
    printf '%s\t%s\t%s\t%s\n' "$1" "$3" "$4" "$2" >>"$STATUS"
    case "$3" in ok|"skipped (n/a"*) ;; *) BAD=1 ;; esac
}

summary() {
    note ""
    note "### Summary ($((SECONDS - START)) s of a ${BUDGET} s budget)"
    note ""
    note "| step | status | seconds |"
    note "|---|---|---|"
    local i
    for i in "${!IDS[@]}"; do
        note "| ${IDS[$i]}: ${TITLES[$i]} | ${STATES[$i]} | ${TIMES[$i]} |"
    done
}

on_signal() {
    [[ -n "$CURRENT" ]] && record "$CURRENT" "(interrupted)" "killed" "$((SECONDS - STEP_START))"
    note ""
    note "(stopped by a signal; the steps after this one did not run)"
    summary
    exit 1
}
trap on_signal TERM INT

selected() { [[ -z "${GPU_CHECK_ONLY:-}" || " $GPU_CHECK_ONLY " == *" $1 "* ]]; }

skip() {  # skip ID TITLE REASON: a step that does not apply here (not a failure)
    note ""
    note "### $1: $2"
    note ""
    note "skipped: $3"
    record "$1" "$2" "skipped (n/a: $3)" 0
}

# step ID LIMIT_S TITLE ARGS...: run `$PY ARGS...` under `timeout`, its output into the log as it comes.
step() {
    local id=$1 limit=$2 title=$3; shift 3
    if ! selected "$id"; then skip "$id" "$title" "not selected"; return; fi
    local left=$((BUDGET - (SECONDS - START)))
    note ""
    note "### $id: $title"
    note ""
    note "\`$PY $*\`"
    note ""
    if ((left < 15)); then
        note "skipped: the ${BUDGET}s budget is spent"
        record "$id" "$title" "skipped (budget)" 0
        return
    fi
    ((limit > left)) && limit=$left
    local cmd=("$PY" "$@")
    if [[ "${GPU_CHECK_FAIL:-}" == "$id" ]]; then
        cmd=("$PY" -c "import sys; print('injected failure (GPU_CHECK_FAIL=$id)'); sys.exit(1)")
    fi
    CURRENT=$id
    STEP_START=$SECONDS
    local rc=0
    note '```'
    timeout --kill-after=10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$LOG" || rc=$?
    note '```'
    local took=$((SECONDS - STEP_START))
    CURRENT=""
    if ((rc == 124 || rc == 137)); then
        note "(stopped after ${limit}s: over this step's time limit)"
        record "$id" "$title" "timed out" "$took"
    elif ((rc != 0)); then
        note "(failed with exit status $rc)"
        record "$id" "$title" "failed" "$took"
    else
        record "$id" "$title" "ok" "$took"
    fi
}

# One interpreter start for the preflight: the GPU's name and count, and which optional packages exist
# (found without importing them).
PRE="$(timeout 90 "$PY" -c "
import importlib.util, torch
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU (dry run on the CPU)')
print(torch.cuda.device_count())
print(' '.join(m for m in ('transformers', 'pytest', 'matplotlib', 'fastapi', 'gguf', 'llama_cpp', 'datasets')
               if importlib.util.find_spec(m) is not None))
" 2>/dev/null)"
GPU="$(sed -n 1p <<<"$PRE")"
NGPU="$(sed -n 2p <<<"$PRE")"
HAVE=" $(sed -n 3p <<<"$PRE") "
has() { [[ "$HAVE" == *" $1 "* ]]; }
note ""
note "## GPU check: $GPU, $(date -u '+%Y-%m-%d %H:%M UTC')"
note ""
note "Produced by \`scripts/gpu_check.sh$([[ $DRY == 1 ]] && echo ' --dry-run')\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)); each command below ran from the repository root with PYTHONPATH=."
note ""
note '```'
if [[ $DRY == 0 ]]; then
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
fi
timeout 60 "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())" 2>&1 | tee -a "$LOG"
PRESENT="" ABSENT=""
for mod in transformers pytest matplotlib fastapi gguf llama_cpp datasets; do
    if has "$mod"; then PRESENT+=" $mod"; else ABSENT+=" $mod"; fi
done
note "optional packages present:${PRESENT:- none}; absent:${ABSENT:- none} (the steps that need an absent one are skipped; training plots need matplotlib and are left out without it)"
note '```'

if [[ $DRY == 1 ]]; then  # the same entry points and flags as below, at sizes a CPU finishes in minutes
    DEV=cpu; NAME=nano
    SHAPE=(--preset nano --batch 2 --seq-len 64)
    SPEED=(--presets nano --batch 2 --seq-len 64 --steps 2)
    BIG=(--presets nano --batch 8 --seq-len 64 --steps 2)
    MIXED=(bf16)
    PRESETS=(benchmarks/presets.py --quick --steps 1)
    ABL=(benchmarks/ablations.py --quick)
    HF=(benchmarks/train_throughput.py --quick --precisions bf16 --steps 2)
    SERVE=(--device cpu --clients 1,2 --engine-only --seconds 5 --max-tokens 16)
    GRAPH_TOKENS=8
    HTTP=(--device cpu --clients 1,2 --requests-per-client 1 --max-tokens 8 --byte-tokenizer --engine process thread)
else
    DEV=cuda; NAME=medium
    SHAPE=(--preset medium --batch 4 --seq-len 512)
    SPEED=(--presets medium --batch 4 --seq-len 512 --steps 10)
    BIG=(--presets medium --batch 16 --seq-len 512 --steps 5)
    MIXED=(bf16 fp16)
    PRESETS=(benchmarks/presets.py --batch 4 --seq-len 512 --steps 5)
    ABL=(benchmarks/ablations.py --preset medium --precision fp16 --batch 4 --seq-len 512 --steps 5 --repeats 2)
    HF=(benchmarks/train_throughput.py --presets medium --precisions bf16 --batch 4 --seq-len 512 --steps 10)
    SERVE=(--device cuda --clients 1,8,32 --engine-only --seconds 20)
    GRAPH_TOKENS=64
    HTTP=(--device cuda --clients 1,8,32 --requests-per-client 4 --seconds 15 --stagger --byte-tokenizer
          --engine process thread)
fi

# 1. correctness
step precision 120 "bf16 / fp16 training losses vs fp32, $NAME" scripts/cuda_checks.py precision "${SHAPE[@]}" --steps 8 --device "$DEV"
step attention 90 "fused attention vs math, forward + backward, the model's GQA shapes, $NAME" \
    scripts/cuda_checks.py attention "${SHAPE[@]}" --device "$DEV"
step dist 90 "DDP and FSDP2 over a process group of one vs plain training ($DEV)" scripts/cuda_checks.py dist --device "$DEV"
if has pytest; then
    step pytest 120 "the DDP / FSDP2 tests' CUDA cases (checkpoints and resume included)" -m pytest -q -rs \
        -p no:cacheprovider tests/test_cuda_paths.py tests/test_train_distributed.py -k "$DEV and (group_of_one or ddp or fsdp)"
else
    skip pytest "the DDP / FSDP2 tests' CUDA cases" "no pytest in $PY (the dist step covers DDP and FSDP2 without it)"
fi
if [[ $DRY == 1 ]] || ((NGPU >= 2)); then
    TR="$(mktemp -d)"
    step torchrun 90 "torchrun, 2 processes ($DEV): DDP then FSDP2, 8 steps each" -c "
import subprocess, sys
for parallel in ('ddp', 'fsdp'):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           'tests/train_worker.py', '--device', '$DEV', '--out', '$TR/' + parallel, '--steps', '8', '--parallel', parallel]
    print(' '.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
"
else
    skip torchrun "torchrun, 2 GPUs: DDP then FSDP2" "this machine has $NGPU GPU(s)"
fi

step graphs 60 "decode steps replayed as CUDA graphs against the uncaptured step and the eager one ($DEV)" \
    scripts/cuda_checks.py graphs --steps "$GRAPH_TOKENS" --device "$DEV"

# 2. throughput and memory, eager, at the seed's shape; then a larger batch
step eager 100 "our training step, $NAME, eager: tokens/s, MFU, peak allocated / reserved" \
    benchmarks/train_throughput.py --ours-only "${SPEED[@]}" --precisions "${MIXED[@]}" --compile none
note "(the seed quotes about 6 GB to train medium at 4 x 512; compare the peak memory columns)"
step big-batch 60 "a larger batch, $NAME bf16, eager (launch-bound if tok/s grows much with the batch)" \
    benchmarks/train_throughput.py --ours-only "${BIG[@]}" --precisions bf16 --compile none

# 3. compile, then the comparisons that take longest, as the budget allows
step compile 150 "our training step, $NAME, bf16 + torch.compile" \
    benchmarks/train_throughput.py --ours-only "${SPEED[@]}" --precisions bf16 --compile ours
if has transformers; then
    step transformers 60 "our step vs transformers' LlamaForCausalLM (SDPA), $NAME bf16, same weights" "${HF[@]}"
else
    skip transformers "our step vs transformers' LlamaForCausalLM" "no transformers in $PY"
fi
step presets 90 "every preset: parameters, estimated vs measured memory, tokens/s, the seed's run extrapolated" \
    "${PRESETS[@]}"
step ablations 120 "what each technique buys, one at a time" "${ABL[@]}"
if grep -q -- --engine-only benchmarks/serve_load.py 2>/dev/null; then
    step serve 90 "the inference engine at $(IFS=,; echo "${SERVE[3]}") clients ($DEV)" benchmarks/serve_load.py "${SERVE[@]}"
else
    skip serve "the inference engine at 1 / 8 / 32 clients" "benchmarks/serve_load.py has no --engine-only yet"
fi
if grep -q -- --stagger benchmarks/serve_load.py 2>/dev/null; then
    step serve-http 100 "the HTTP server, the engine in its own process and on a thread ($DEV)" \
        benchmarks/serve_load.py "${HTTP[@]}"
else
    skip serve-http "the HTTP server with each engine placement" "benchmarks/serve_load.py has no --engine choice yet"
fi

summary
if [[ $DRY == 0 ]]; then
    cat "$LOG" >>benchmarks/RESULTS.md
    cp benchmarks/RESULTS.md "$DEST/RESULTS.md"
    echo "appended to benchmarks/RESULTS.md (a copy is in $DEST)"
else
    echo "dry run: results in $DEST (benchmarks/RESULTS.md untouched)"
fi
exit $BAD
