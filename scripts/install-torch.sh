#!/usr/bin/env bash
# Installs torch and torchvision into a venv without pulling CUDA libraries onto a machine without a GPU.
#   scripts/install-torch.sh PYTHON "torch==X torchvision==Y"
# TORCH_INDEX chooses where torch comes from:
#   auto (default)  no NVIDIA GPU here and PyTorch's CPU index answers: the CPU build from it (about 1 GB in
#                   the venv instead of about 6 GB); otherwise pip's own index (on Linux x86_64 that is the
#                   CUDA build)
#   URL             that index, e.g. https://download.pytorch.org/whl/cpu or .../whl/cu128
#   default         pip's own index and configuration, as it is
set -euo pipefail
python="$1"
pins="$2"
index="${TORCH_INDEX:-auto}"
cpu_index="https://download.pytorch.org/whl/cpu"

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ] || [ -e /dev/nvidia0 ]
}

answers() {  # the index is reachable within a few seconds
    "$python" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5)
PY
}

if [ "$index" = auto ]; then
    if has_gpu; then
        echo "install-torch: an NVIDIA GPU is here: torch from pip's index (the CUDA build)" >&2
        index=default
    elif answers "$cpu_index"; then
        echo "install-torch: no GPU here: the CPU build of torch from $cpu_index" >&2
        index="$cpu_index"
    else
        echo "install-torch: no GPU here, but $cpu_index does not answer: torch from pip's index" \
             "(on Linux x86_64 a CUDA build, about 6 GB; set TORCH_INDEX to a reachable CPU index to avoid it)" >&2
        index=default
    fi
fi

# shellcheck disable=SC2086  # the pins are several words on purpose
if [ "$index" = default ]; then
    "$python" -m pip install $pins
elif ! "$python" -m pip install --index-url "$index" $pins; then
    echo "install-torch: $pins is not on $index; falling back to pip's index" >&2
    "$python" -m pip install $pins
fi
