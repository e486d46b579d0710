"""`edgekd classify` against a plain onnxruntime + Pillow script, side by side in one run.

  cold start   process spawn → the printed label of one photo, each a fresh process, repeated and
               interleaved (edgekd, plain script, and PyTorch eager when --checkpoint is given)
  throughput   photos per second over a folder of a few thousand real photos, the whole process timed
  OpenVINO     the same rows with `--provider openvino` (and `--provider cpu` beside the default, auto, which
               takes OpenVINO for an int8 file and 32 photos or more), when openvino is installed

The plain script is what a competent user writes without edgekd: onnxruntime with default options,
Pillow and numpy, the size and class names read from the model's metadata, the same preprocessing
(EXIF orientation, RGB, bilinear resize to the input size), batches of 32 decoded one by one.

Before timing, edgekd's own modules are compiled to .pyc once, as `pip install` does: this environment
sets PYTHONDONTWRITEBYTECODE, so an editable checkout would otherwise recompile them at every start.

    python benchmarks/classify_cold_start.py --model runs/s8/exports/s8.int8.onnx --photo photo.jpg \\
        --folder-from data/intel/seg_train/seg_train/buildings data/intel/seg_train/seg_train/forest \\
        data/intel/seg_pred/seg_pred [--checkpoint runs/s8/best.pt]
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN_SCRIPT = '''
import json, os, sys
import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
names, size, input_name = json.loads(meta["class_names"]), int(meta["image_size"]), meta["input_name"]
files = []
for arg in sys.argv[2:]:
    if os.path.isdir(arg):
        files += sorted(os.path.join(d, f) for d, _, fs in os.walk(arg) for f in fs if not f.startswith("."))
    else:
        files.append(arg)


def load(path):
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB").resize((size, size), Image.BILINEAR))


for start in range(0, len(files), 32):
    batch = files[start:start + 32]
    pixels = np.stack([load(path) for path in batch]).transpose(0, 3, 1, 2).astype(np.float32)
    logits = session.run(None, {input_name: pixels})[0].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for path, p in zip(batch, probs):
        print(path, names[int(p.argmax())], f"{p.max():.3f}", sep="\\t")
'''

PYTORCH_EAGER = '''
import sys, torch
from edgekd.runtime.preprocess import load_rgb
from edgekd.train.checkpoint import load_model
model, meta = load_model(sys.argv[1])
pixels = torch.from_numpy(load_rgb(sys.argv[2], meta["image_size"])).permute(2, 0, 1)[None].float()
with torch.no_grad():
    probs = model(pixels).softmax(1)[0]
print(sys.argv[2], meta["class_names"][int(probs.argmax())], f"{float(probs.max()):.3f}", sep="\\t")
'''

UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the first line arrives when it is printed


def time_to_answer(command: list[str]) -> tuple[float, float, str]:
    """Seconds from spawn to the first printed line, seconds to exit, and that line."""
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=UNBUFFERED) as child:
        line = child.stdout.readline()
        answered = time.perf_counter() - start
        _, errors = child.communicate()
    if child.returncode != 0 or not line:
        raise SystemExit(f"{command[0]} failed ({child.returncode}):\n{errors}")
    return answered, time.perf_counter() - start, line.strip()


def time_folder(command: list[str]) -> tuple[float, dict[str, str]]:
    """Seconds for the whole process, and the label it gave each file."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=UNBUFFERED)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, {line.split("\t")[0]: line.split("\t")[1] for line in done.stdout.splitlines()}


def photo_folder(sources: list[str], into: Path) -> int:
    """One folder of symlinks to the images of each source folder (a subfolder per source)."""
    count = 0
    for source in map(Path, sources):
        target = into / f"{source.parent.name}_{source.name}"
        target.mkdir()
        for photo in sorted(source.iterdir()):
            if photo.suffix.lower() in (".jpg", ".jpeg", ".png"):
                (target / photo.name).symlink_to(photo.resolve())
                count += 1
    return count


def cold_start(commands: dict[str, list[str]], repeat: int) -> None:
    for command in commands.values():  # one warm-up each: page cache
        time_to_answer(command)
    answered: dict[str, list[float]] = {name: [] for name in commands}
    exited: dict[str, list[float]] = {name: [] for name in commands}
    answers = {}
    for _ in range(repeat):
        for name, command in commands.items():
            to_answer, to_exit, answers[name] = time_to_answer(command)
            answered[name].append(to_answer)
            exited[name].append(to_exit)
    print(f"{'cold start, one photo':38} {'to answer: median':>17} {'min':>6} {'max':>6} {'to exit':>8}  answer")
    for name in commands:
        values = answered[name]
        print(f"{name:38} {statistics.median(values):>17.3f} {min(values):>6.3f} {max(values):>6.3f} "
              f"{statistics.median(exited[name]):>8.3f}  {' '.join(answers[name].split(chr(9))[1:3])}")
    edgekd, plain = (statistics.median(answered[name]) for name in list(commands)[:2])
    print(f"edgekd / plain script: {edgekd / plain:.2f}x   (target: edgekd classify <= 0.300 s median)")
    if len(commands) > 2 and "openvino" in list(commands)[2]:
        openvino = statistics.median(answered[list(commands)[2]])
        print(f"OpenVINO's cold start: {openvino - edgekd:+.3f} s against onnxruntime's (import, read and compile)")


def throughput(commands: dict[str, list[str]], photos: int, repeat: int) -> None:
    """The first two commands are edgekd and the plain script; every row's labels are compared with the script's."""
    rates: dict[str, list[float]] = {name: [] for name in commands}
    labels = {}
    for _ in range(repeat):
        for name, command in commands.items():
            seconds, labels[name] = time_folder(command)
            rates[name].append(photos / seconds)
    plain = labels[list(commands)[1]]
    print(f"\n{f'throughput, {photos} photos':38} {'photos/s: median':>17} {'min':>6} {'max':>6}  labels as the script's")
    for name, values in rates.items():
        same = sum(labels[name].get(file) == label for file, label in plain.items())
        print(f"{name:38} {statistics.median(values):>17.0f} {min(values):>6.0f} {max(values):>6.0f}  "
              f"{same}/{len(plain)}")
    a, b = (statistics.median(values) for values in list(rates.values())[:2])
    print(f"edgekd / plain script: {a / b:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an exported .onnx file (int8 for the CPU path)")
    parser.add_argument("--photo", required=True, help="the photo of the cold-start runs")
    parser.add_argument("--folder-from", nargs="+", required=True, metavar="DIR",
                        help="folders whose photos make up the throughput folder (symlinked, not copied)")
    parser.add_argument("--checkpoint", help="the checkpoint the model came from: adds a PyTorch eager row")
    parser.add_argument("--repeat", type=int, default=11, help="cold starts of each command")
    parser.add_argument("--throughput-repeat", type=int, default=3, help="passes over the folder per command")
    args = parser.parse_args()

    compileall.compile_dir(Path(__file__).resolve().parents[1] / "edgekd", quiet=1)
    edgekd = [str(Path(sys.executable).with_name("edgekd")), "classify", "--model", args.model]
    with tempfile.TemporaryDirectory() as scratch:
        plain_script = Path(scratch) / "plain_classify.py"
        plain_script.write_text(PLAIN_SCRIPT)
        plain = [sys.executable, str(plain_script), args.model]
        folder = Path(scratch) / "photos"
        folder.mkdir()
        photos = photo_folder(args.folder_from, folder)

        load = os.getloadavg()
        print(f"{os.cpu_count()} cores; load average {load[0]:.1f} (other jobs share the CPU: medians of "
              f"interleaved runs)\nmodel {args.model}\n")
        commands = {"edgekd classify": [*edgekd, args.photo], "plain script (onnxruntime+Pillow)":
                    [*plain, args.photo]}
        openvino = importlib.util.find_spec("openvino") is not None
        if openvino:
            commands["edgekd classify --provider openvino"] = [*edgekd, "--provider", "openvino", args.photo]
        if args.checkpoint:
            commands["PyTorch eager (checkpoint)"] = [sys.executable, "-c", PYTORCH_EAGER, args.checkpoint,
                                                      args.photo]
        print(f"photo {args.photo}; {args.repeat} runs each, interleaved")
        cold_start(commands, args.repeat)
        print(f"\nfolder: {photos} photos from {', '.join(args.folder_from)}; {args.throughput_repeat} "
              f"passes each, interleaved; edgekd at its defaults, the plain script at batch 32")
        folder_commands = {"edgekd classify": [*edgekd, str(folder)],
                           "plain script (onnxruntime+Pillow)": [*plain, str(folder)]}
        if openvino:  # the default (auto) is one of these two, by the file's precision and the photo count
            folder_commands["edgekd classify --provider cpu"] = [*edgekd, "--provider", "cpu", str(folder)]
            folder_commands["edgekd classify --provider openvino"] = [*edgekd, "--provider", "openvino", str(folder)]
        throughput(folder_commands, photos, args.throughput_repeat)
        print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
