#!/usr/bin/env bash
# One prepared check of every path edgekd has on this machine, for a GPU machine without internet:
#   1. `edgekd doctor` (the machine's facts, JSON too)
#   2. `edgekd doctor --smoke`: training per precision on each device, teacher fills, exports, runtimes,
#      torchrun over gloo and NCCL, each row ok / failed / skipped
#   3. the paper's setting: the 8-block student at 150 px, batch 224, fp32/fp16/fp8 for 300 steps on the
#      Intel sample (images/s, native or simulated), and a 12-block teacher fill with fp16 on CUDA
# At most 8 minutes (each step has its own timeout). Table and logs go into one folder. Nothing is
# installed and nothing is downloaded: it runs from this checkout (PYTHONPATH), with the Python given.
# Without CUDA (or with --cpu) it runs its CPU form: the same steps at toy sizes.
#
#   scripts/gpu-check.sh [--cpu] [--out DIR] [--data DIR]
#   PYTHON=python3            the interpreter with torch (default: .venv/bin/python, else python3)
#   EDGEKD_GPU_CHECK_DATA=DIR the Intel sample (default: ../shared/datasets/intel-sample, from the repo root)
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
data="${EDGEKD_GPU_CHECK_DATA:-../shared/datasets/intel-sample}"
out=""
cpu=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) cpu=--cpu ;;
        --out) out="$2"; shift ;;
        --data) data="$2"; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ ! -d "$data/train" ]; then
    echo "gpu-check: no Intel sample at $data (train/<class>/*.jpg); pass --data DIR" >&2
    exit 2
fi
out="${out:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out" && out="$(cd "$out" && pwd)"
data="$(cd "$data" && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export EDGEKD_CACHE="$out/cache" EDGEKD_ARTIFACTS="$out/artifacts"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

gpu="$("$python" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)"
if [ -z "$gpu" ] && [ -z "$cpu" ]; then
    echo "gpu-check: PyTorch sees no CUDA device here: running the CPU form"
    cpu=--cpu
fi
started=$(date +%s)
status=0
step() {  # step NAME SECONDS COMMAND...: its output into $out/NAME.txt, stderr into $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s) =="
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.txt" 2> "$out/$name.log"
    local code=$?
    [ $code -eq 124 ] && echo "gpu-check: $name timed out after ${limit}s" | tee -a "$out/$name.log"
    [ $code -ne 0 ] && { status=1; echo "   exit $code; see $out/$name.log"; }
    return 0
}
step doctor 60 "$python" -m edgekd doctor --json
cp "$out/doctor.txt" "$out/doctor.json"
step smoke 240 "$python" -m edgekd doctor --smoke --out "$out/smoke"
step paper 170 "$python" -m edgekd.doctor.gpu_check $cpu --data "$data" --out "$out/paper"

{
    echo "# edgekd gpu-check, $(date -u +%Y-%m-%d' '%H:%M' UTC')"
    echo
    echo "GPU: ${gpu:-none (CPU form)}; $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'no git') ; $(( $(date +%s) - started )) s in all"
    echo
    echo "## doctor --smoke"
    echo
    cat "$out/smoke/smoke.md" 2>/dev/null || echo "(no smoke table: see smoke.log)"
    echo
    echo "## the paper's setting"
    echo
    cat "$out/paper/paper_setting.md" 2>/dev/null || echo "(no table: see paper.log)"
} > "$out/summary.md"
cat "$out/summary.md"
echo
echo "table and logs: $out"
exit $status
