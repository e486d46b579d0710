"""Inference speed on this machine: int8 ONNX students against PyTorch fp32 eager, side by side.

Every row runs in its own fresh process (edgekd.validate.measure: warm-up, then timed runs at a fixed
thread count) on the same real images. Ratios are against the PyTorch fp32 rows.

    python benchmarks/inference_speed.py --student artifacts/intel_8block \\
        [--student artifacts/intel_8block_fast] --images ../shared/datasets/intel-sample/val
Each student run folder needs best.pt (whose teacher is measured too) and exports/<run>.int8.onnx.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def _pixels(folder: Path, size: int, count: int) -> np.ndarray:
    from edgekd.runtime.preprocess import IMAGE_SUFFIXES, load_rgb

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    return np.stack([load_rgb(p, size) for p in files])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", action="append", required=True, help="a distilled run folder (repeatable)")
    parser.add_argument("--images", required=True, help="a folder of real images")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per batch size, after warm-up")
    args = parser.parse_args()

    from edgekd.train.checkpoint import read_checkpoint
    from edgekd.validate import measure_in_fresh_process
    from edgekd.validate.measure import Settings, Variant

    batches = [int(b) for b in args.batch.split(",")]
    rows: list[tuple[str, Variant, int]] = []
    teacher_done = set()
    for run_dir in map(Path, args.student):
        payload = read_checkpoint(run_dir / "best.pt")
        teacher = Path(payload["teacher"]["checkpoint"])
        if teacher not in teacher_done:
            size = read_checkpoint(teacher)["image_size"]
            rows.append((f"teacher ({teacher.parent.name}) PyTorch fp32", Variant("t", "pytorch", str(teacher),
                                                                                  "fp32", "cpu"), size))
            teacher_done.add(teacher)
        rows.append((f"{run_dir.name} PyTorch fp32", Variant("s", "pytorch", str(run_dir / "best.pt"), "fp32", "cpu"),
                     payload["image_size"]))
        rows.append((f"{run_dir.name} int8 ONNX", Variant("q", "onnx", str(run_dir / "exports" /
                                                                          f"{run_dir.name}.int8.onnx"), "int8", "cpu"),
                     payload["image_size"]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant, size in rows:
            pixels_file = Path(tmp) / f"{size}.npy"
            if not pixels_file.exists():
                np.save(pixels_file, _pixels(Path(args.images), size, 64))
            settings = Settings(str(pixels_file), batches, args.threads, args.seconds)
            results[name] = (measure_in_fresh_process(variant, settings)["latency"], size)
    teacher_name = rows[0][0]
    print(f"\n{args.threads} threads; p50 latency in ms; speed-up = PyTorch fp32 p50 / this p50\n")
    header = f"{'':42} {'px':>4}" + "".join(f" {'b' + str(b) + ' ms':>9} {'vs teacher':>10}" for b in batches)
    print(header)
    for name, (latency, size) in results.items():
        cells = "".join(f" {latency[str(b)]['p50_ms']:>9.2f} "
                        f"{results[teacher_name][0][str(b)]['p50_ms'] / latency[str(b)]['p50_ms']:>9.1f}x"
                        for b in batches)
        print(f"{name:42} {size:>4}{cells}")
    for run_dir in map(Path, args.student):
        eager, int8 = results[f"{run_dir.name} PyTorch fp32"][0], results[f"{run_dir.name} int8 ONNX"][0]
        ratios = ", ".join(f"batch {b}: {eager[str(b)]['p50_ms'] / int8[str(b)]['p50_ms']:.1f}x" for b in batches)
        print(f"{run_dir.name}: int8 ONNX vs its PyTorch fp32: {ratios}")


if __name__ == "__main__":
    main()
