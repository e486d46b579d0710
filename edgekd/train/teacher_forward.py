"""The teacher's fastest forward pass on this machine, chosen by measuring, for filling the stored views.

Filling teacher views runs a large teacher over K views of every training photo: the longest part of a
distillation on a CPU. Which forward pass is fastest depends on the machine, so it is measured, not
assumed: PyTorch fp32 (channels-last), PyTorch bf16 autocast, fp16 autocast on CUDA, onnxruntime on the
teacher's own fp32 export (CPU; exported once into the cache, keyed by the teacher's checksum), and OpenVINO
running that same file in bf16 when openvino is installed. bf16 is offered only where the processor has
bf16 instructions: emulated, it is slower than fp32. Each candidate runs the same real views: a warm-up,
then three interleaved timed runs; the fastest median per image wins. Measured on 2 AMX cores, Lite0 at
150 px: OpenVINO bf16 640 views/s, onnxruntime fp32 333, PyTorch bf16 214, PyTorch fp32 80.

`distill.teacher_forward` forces one (torch, onnxruntime, openvino); `auto` measures, except for a job PyTorch
fp32 finishes before the export would (`small_job`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgekd.runs import atomic_write
from edgekd.train.precision import cpu_has_native_bf16

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]  # float 0-255 NCHW views → float32 logits on the CPU


@dataclass
class TeacherForward:
    name: str  # what ran, e.g. "onnxruntime fp32 (CPU)"
    run: Forward
    images_per_s: float | None = None  # as measured on the probe batch (None: not measured)


def _torch_forward(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> Forward:
    def run(views: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(device.type, dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return model(views.to(device)).float().cpu()
    return run


def _fp32_export(model: torch.nn.Module, image_size: int, sha256: str, folder: Path) -> Path:
    """The teacher's own fp32 ONNX file, exported once into the cache."""
    path = folder / f"{sha256[:16]}.fp32.onnx"
    if not path.is_file():
        import onnx

        from edgekd.export.onnx_fp32 import export_fp32

        proto, _ = export_fp32(model, image_size)
        atomic_write(path, lambda tmp: onnx.save_model(proto, tmp, save_as_external_data=False))
    return path


def _onnxruntime_forward(model: torch.nn.Module, image_size: int, sha256: str, folder: Path) -> Forward:
    from edgekd.runtime.session import open_session

    path = _fp32_export(model, image_size, sha256, folder)
    session = open_session(path, threads=torch.get_num_threads())
    name = session.get_inputs()[0].name

    def run(views: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(views.float().numpy())
        return torch.from_numpy(session.run(None, {name: pixels})[0].astype(np.float32))
    return run


def _openvino_forward(model: torch.nn.Module, image_size: int, sha256: str, folder: Path) -> Forward:
    from edgekd.runtime.openvino_cpu import compile_for_cpu

    compiled = compile_for_cpu(_fp32_export(model, image_size, sha256, folder), torch.get_num_threads(), "bf16")
    request = compiled.create_infer_request()

    def run(views: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(views.float().numpy())
        return torch.from_numpy(np.array(request.infer([pixels])[0], dtype=np.float32))
    return run


def candidates(model: torch.nn.Module, meta: dict, device: torch.device, folder: Path,
               choice: str = "auto") -> dict[str, Callable[[], Forward]]:
    """Named builders of every forward pass this machine offers (built lazily: an export costs seconds)."""
    offered: dict[str, Callable[[], Forward]] = {}
    if device.type == "cuda":
        offered["torch fp16 autocast (CUDA)"] = lambda: _torch_forward(model, device, torch.float16)
        offered["torch fp32 (CUDA)"] = lambda: _torch_forward(model, device, None)
        return offered if choice != "onnxruntime" else {}
    if choice in ("auto", "torch"):
        offered["torch fp32 (CPU, channels-last)"] = lambda: _torch_forward(model, device, None)
        if cpu_has_native_bf16():  # never offered where bf16 is emulated: it is slower than fp32 there
            offered["torch bf16 autocast (CPU, native bf16)"] = lambda: _torch_forward(model, device, torch.bfloat16)

    def on_export(build: Callable[..., Forward]) -> Callable[[], Forward]:
        return lambda: build(model, meta["image_size"], meta["sha256"], folder)

    if choice in ("auto", "onnxruntime"):
        offered["onnxruntime fp32 (CPU)"] = on_export(_onnxruntime_forward)
    if choice in ("auto", "openvino") and cpu_has_native_bf16() and importlib.util.find_spec("openvino"):
        offered["openvino bf16 (CPU, native bf16)"] = on_export(_openvino_forward)
    return offered


def fastest_forward(model: torch.nn.Module, meta: dict, device: torch.device, probe: torch.Tensor, folder: Path,
                    choice: str = "auto", earlier: str | None = None, views: int | None = None) -> TeacherForward:
    """The fastest of the candidates on `probe` (real views at the teacher's size), timed on a second run;
    `earlier`, when this machine offers it, is kept without measuring (a resumed fill computes as it began).
    `views`, the number of views the pass will run (None: not known), lets a small job keep PyTorch's own
    pass when the whole job takes less than exporting the teacher would (`small_job`)."""
    model.eval()
    offered = candidates(model, meta, device, folder, choice)
    if not offered:
        raise ValueError(f"no teacher forward pass '{choice}' on {device.type}")
    if earlier in offered:
        return TeacherForward(earlier, offered[earlier]())
    if len(offered) == 1:
        name, build = next(iter(offered.items()))
        return TeacherForward(name, build())
    small = small_job(offered, probe, views) if views is not None else None
    if small is not None:
        return small
    runs = {}
    for name, build in offered.items():
        try:
            run = build()
            run(probe)  # warm-up: first-call allocations, oneDNN kernel choice, onnxruntime's arena
            runs[name] = run
        except Exception as exc:  # a path this model or machine cannot take is skipped, with the reason
            log.warning("teacher forward: %s unavailable (%s: %s)", name, exc.__class__.__name__, exc)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3):  # interleaved rounds, the median of each: other jobs' bursts hit every candidate alike
        for name, run in runs.items():
            start = time.perf_counter()
            run(probe)
            seconds[name].append(time.perf_counter() - start)
    measured = [TeacherForward(name, runs[name], len(probe) / sorted(times)[1]) for name, times in seconds.items()]
    if not measured:
        raise RuntimeError("no teacher forward pass ran on this machine")
    best = max(measured, key=lambda forward: forward.images_per_s)
    log.info("teacher forward: %s", ", ".join(f"{f.name} {f.images_per_s:.0f} img/s" for f in measured))
    return best


# Exporting the teacher to ONNX and timing every candidate costs seconds to tens of seconds (for a tiny
# EfficientNet-Lite0 job in the test suite, about 40 s of a 2-core machine busy with another run). A job
# PyTorch finishes in less time than this is run as it is.
SMALL_JOB_SECONDS = 30.0


def small_job(offered: dict[str, Callable[[], Forward]], probe: torch.Tensor, views: int) -> TeacherForward | None:
    """PyTorch's own pass when it runs all `views` in under SMALL_JOB_SECONDS (timed on `probe` after a
    warm-up), else None: the job is worth measuring the exported candidates for."""
    name = next((n for n in offered if n.startswith("torch fp32")), None)
    if name is None or all(n.startswith("torch") for n in offered):  # nothing to export: measure them all
        return None
    run = offered[name]()
    run(probe)  # warm-up
    start = time.perf_counter()
    run(probe)
    images_per_s = len(probe) / max(time.perf_counter() - start, 1e-9)
    if views / images_per_s >= SMALL_JOB_SECONDS:
        return None
    log.info("teacher forward: %s (%d views take about %.0f s at its %.0f img/s: too few to pay for an export "
             "and the other candidates' timing)", name, views, views / images_per_s, images_per_s)
    return TeacherForward(name, run, images_per_s)
