"""Cold start on the device: process start → first answer for one photo, side by side in one run.

  A: `edgekd classify --model MODEL.onnx PHOTO`           (onnxruntime + numpy + Pillow, no torch)
  B: PyTorch eager with the checkpoint: import torch, rebuild the model from best.pt, classify PHOTO

Each is a fresh process, timed from spawn to exit (it exits right after printing its answer), repeated
and interleaved so both see the same machine state; medians and their ratio are printed.

    python benchmarks/classify_cold_start.py --model artifacts/intel_8block/exports/intel_8block.int8.onnx \\
        --checkpoint artifacts/intel_8block/best.pt --photo some.jpg
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

PYTORCH_EAGER = """
import sys, torch
from edgekd.runtime.preprocess import load_rgb
from edgekd.train.checkpoint import load_model
torch.set_num_threads({threads})
model, meta = load_model(sys.argv[1])
pixels = torch.from_numpy(load_rgb(sys.argv[2], meta["image_size"])).permute(2, 0, 1)[None].float()
with torch.no_grad():
    probs = model(pixels).softmax(1)[0]
print(sys.argv[2], meta["class_names"][int(probs.argmax())], f"{{float(probs.max()):.3f}}")
"""


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip().splitlines()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported .onnx file (int8 for the CPU path)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint it was exported from")
    parser.add_argument("--photo", required=True)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    edgekd = str(Path(sys.executable).with_name("edgekd"))
    commands = {
        "edgekd classify (onnxruntime)": [edgekd, "-q", "classify", "--model", args.model, "--threads",
                                          str(args.threads), args.photo],
        "PyTorch eager (checkpoint)": [sys.executable, "-c", PYTORCH_EAGER.format(threads=args.threads),
                                       args.checkpoint, args.photo],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    answers = {}
    for command in commands.values():  # one warm-up each: page cache, .pyc files
        timed(command)
    for _ in range(args.repeat):
        for name, command in commands.items():
            seconds, answers[name] = timed(command)
            times[name].append(seconds)
    print(f"photo {args.photo}; {args.repeat} runs each, interleaved, {args.threads} threads\n")
    print(f"{'':32} {'median s':>9} {'min s':>7} {'max s':>7}  answer")
    for name, values in times.items():
        print(f"{name:32} {statistics.median(values):>9.3f} {min(values):>7.3f} {max(values):>7.3f}  "
              f"{answers[name]}")
    a, b = (statistics.median(v) for v in times.values())
    print(f"\nPyTorch eager / edgekd classify: {b / a:.2f}x   (target: classify <= 0.5 s)")


if __name__ == "__main__":
    main()
