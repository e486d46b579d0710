"""Measure one variant (PyTorch or an .onnx file on one provider) in a fresh process.

A fresh process per variant makes load time and peak memory mean something: nothing another variant
loaded is counted, and an onnxruntime row never has torch in memory. This module imports neither torch
nor onnx at the top for that reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Variant:
    name: str  # e.g. "int8 · cpu"
    kind: str  # "pytorch" or "onnx"
    path: str  # checkpoint or .onnx file
    precision: str
    provider: str  # cpu, cuda, tensorrt
    file_bytes: int = 0
    pixels_file: str | None = None  # its own images (a teacher at another resolution); None: Settings'


@dataclass
class Settings:
    pixels_file: str  # .npy of (N, S, S, 3) uint8 images of the split
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    threads: int = 2
    latency_seconds: float = 2.0  # time spent measuring each batch size (after warm-up)
    eval_batch: int = 64


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


def _pytorch_runner(variant: Variant, threads: int):
    import torch

    from edgekd.train.checkpoint import load_model

    torch.set_num_threads(threads)
    device = torch.device("cuda" if variant.provider == "cuda" else "cpu")
    model, _ = load_model(variant.path, device)

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2)
        logits = model(x).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return logits.cpu().numpy()

    return run


def _onnx_runner(variant: Variant, threads: int):
    from edgekd.runtime.session import as_input, open_session

    session = open_session(variant.path, variant.provider, threads)
    name = session.get_inputs()[0].name
    return lambda pixels: session.run(None, {name: as_input(pixels)})[0].astype(np.float32)


def _latency(run, pixels: np.ndarray, batch: int, seconds: float) -> dict:
    sample = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
    for _ in range(3):  # warm-up: lazy initialisation, caches, allocator
        run(sample)
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        run(sample)
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": float(batch / np.median(ms) * 1000),
            "runs": len(times)}


def measure(variant: Variant, settings: Settings) -> dict:
    """Load the variant, predict the whole split, time each batch size; runs in its own process."""
    pixels = np.load(variant.pixels_file or settings.pixels_file)  # loaded before the baseline: not counted
    baseline = _rss_kib("VmRSS:")
    start = time.perf_counter()
    run = (_pytorch_runner if variant.kind == "pytorch" else _onnx_runner)(variant, settings.threads)
    load_seconds = time.perf_counter() - start
    logits = np.concatenate([run(pixels[i:i + settings.eval_batch])
                             for i in range(0, len(pixels), settings.eval_batch)])
    latency = {str(b): _latency(run, pixels, b, settings.latency_seconds) for b in settings.batch_sizes}
    return {"logits": logits, "load_seconds": load_seconds, "latency": latency,
            "peak_memory_mb": max(_rss_kib("VmHWM:") - baseline, 0) / 1024}
