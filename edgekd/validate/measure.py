"""Measure one variant (PyTorch, or an .onnx file on an onnxruntime provider or on OpenVINO) in a fresh process.

A fresh process per variant makes load time and peak memory mean something: nothing another variant
loaded is counted, and an onnxruntime or OpenVINO row never has torch in memory. This module imports
neither torch, onnx, onnxruntime nor openvino at the top for that reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

clock = time.perf_counter  # a module attribute so a test can time a row with a clock it controls
WARMUP_SHARE = 0.25  # of --latency-seconds spent warming up, at least 3 runs: a fresh PyTorch process
# builds its kernels (oneDNN primitives, allocator pools) during its first runs, each several times slower
MAX_RUNS = 100_000

@dataclass
class Variant:
    name: str  # e.g. "int8 · cpu"
    kind: str  # "pytorch" or "onnx"
    path: str  # checkpoint or .onnx file
    precision: str
    provider: str  # cpu, cuda, tensorrt (onnxruntime), openvino (OpenVINO's CPU device)
    file_bytes: int = 0
    pixels_file: str | None = None  # its own images (a teacher at another resolution); None: Settings'


@dataclass
class Settings:
    pixels_file: str  # .npy of (N, S, S, 3) uint8 images of the split
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    threads: int = 2
    latency_seconds: float = 2.0  # time spent measuring each batch size (after warm-up)
    eval_batch: int = 64


class Unsupported(Exception):
    """A runtime cannot load or run an exported file (an operator or type it lacks): a skipped row, not a crash."""


def runtime_name(kind: str, provider: str) -> str:
    if kind == "pytorch":
        return "PyTorch eager"
    return "OpenVINO" if provider == "openvino" else "onnxruntime"


def _gist(exc: Exception) -> str:
    """One line of a runtime's error: OpenVINO's and onnxruntime's messages end with the line that names the cause."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    return f"{exc.__class__.__name__}: {lines[-1] if lines else 'no message'}"[:300]


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

    return run, {"threads": torch.get_num_threads()}


def _onnx_runner(variant: Variant, threads: int):
    from edgekd.runtime.session import as_input, open_session

    session = open_session(variant.path, variant.provider, threads)
    name = session.get_inputs()[0].name

    def run(pixels: np.ndarray) -> np.ndarray:
        return session.run(None, {name: as_input(pixels)})[0].astype(np.float32)

    return run, {"threads": session.get_session_options().intra_op_num_threads}


def _openvino_runner(variant: Variant, threads: int):
    from edgekd.runtime.openvino_cpu import compile_for_cpu

    # f32: on CPUs with AVX512-BF16/AMX the CPU plugin would otherwise run float math in bf16, so the row would
    # measure a silent downcast rather than the file (its int8/fp8 quantisation and fp16 weights are kept).
    compiled = compile_for_cpu(variant.path, threads, "f32")
    request = compiled.create_infer_request()

    def run(pixels: np.ndarray) -> np.ndarray:
        # the layout of runtime.session.as_input, without importing onnxruntime into an OpenVINO row
        return request.infer([np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)])[0]

    return run, {"threads": compiled.get_property("INFERENCE_NUM_THREADS"),
                 "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()}


def _load(variant: Variant, threads: int):
    """(run, the settings the runtime reports); a file a runtime cannot load raises Unsupported."""
    if variant.kind == "pytorch":
        return _pytorch_runner(variant, threads)  # the reference: its failures are errors, not skipped rows
    runner = _openvino_runner if variant.provider == "openvino" else _onnx_runner
    try:
        return runner(variant, threads)
    except Exception as exc:  # each runtime raises its own types (RuntimeError, onnxruntime's Fail, ImportError)
        raise Unsupported(f"{runtime_name(variant.kind, variant.provider)} cannot load it: {_gist(exc)}") from None


def _predict(run, variant: Variant, pixels: np.ndarray, batch: int) -> np.ndarray:
    try:
        return np.concatenate([run(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]).astype(np.float32)
    except Exception as exc:
        if variant.kind == "pytorch":
            raise
        raise Unsupported(f"{runtime_name(variant.kind, variant.provider)} cannot run it: {_gist(exc)}") from None


def _latency(run, pixels: np.ndarray, batch: int, seconds: float) -> dict:
    """Percentiles over as many runs as fit in `seconds` (at least 10), after a warm-up; every row alike."""
    sample = np.ascontiguousarray(np.resize(pixels, (batch, *pixels.shape[1:])))
    warm, deadline = 0, clock() + WARMUP_SHARE * seconds
    while warm < 3 or clock() < deadline:
        run(sample)
        warm += 1
    times = []
    deadline = clock() + seconds
    while len(times) < 10 or (clock() < deadline and len(times) < MAX_RUNS):
        start = clock()
        run(sample)
        times.append(clock() - start)
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": float(batch / np.median(ms) * 1000),
            "runs": len(times), "warmup_runs": warm}


def measure(variant: Variant, settings: Settings) -> dict:
    """Load the variant, predict the whole split, time each batch size; runs in its own process.

    Raises Unsupported when the runtime cannot load or run the file."""
    pixels = np.load(variant.pixels_file or settings.pixels_file)  # loaded before the baseline: not counted
    baseline = _rss_kib("VmRSS:")
    start = clock()
    run, runtime_settings = _load(variant, settings.threads)
    load_seconds = clock() - start
    logits = _predict(run, variant, pixels, settings.eval_batch)
    latency = {str(b): _latency(run, pixels, b, settings.latency_seconds) for b in settings.batch_sizes}
    return {"logits": logits, "load_seconds": load_seconds, "latency": latency,
            "peak_memory_mb": max(_rss_kib("VmHWM:") - baseline, 0) / 1024, "runtime_settings": runtime_settings}


def openvino_unusable() -> str | None:
    """Why OpenVINO's CPU device cannot run here (None when it can); runs in its own process like the rows."""
    try:
        import openvino as ov
    except ModuleNotFoundError as exc:
        if exc.name == "openvino":
            return "openvino is not installed (pip install 'edgekd[validate]')"
        return f"openvino cannot be imported: {_gist(exc)}"
    except ImportError as exc:  # a broken install: a shared library missing
        return f"openvino cannot be imported: {_gist(exc)}"
    devices = ov.Core().available_devices
    if "CPU" not in devices:
        return f"OpenVINO offers no CPU device here (it offers {', '.join(devices) or 'none'})"
    return None
