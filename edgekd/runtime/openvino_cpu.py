"""An edgekd .onnx file compiled for OpenVINO's CPU device (torch-free; openvino is imported when called)."""

from __future__ import annotations

from pathlib import Path


def read_for_any_batch(path: str | Path):
    """(core, model): the file read by OpenVINO, its batch dimension made dynamic (a file exported for one
    batch size is reshaped), so one compiled model serves every batch."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    shape = model.input(0).get_partial_shape()
    if shape[0].is_static:
        shape[0] = ov.Dimension()
        model.reshape({model.input(0): shape})
    return core, model


def cpu_config(threads: int, precision: str) -> dict:
    """The CPU plugin's settings: one inference at a time (latency mode) on `threads` cores."""
    return {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}


def compile_for_cpu(path: str | Path, threads: int, precision: str):
    """The compiled model, for any batch size.

    `precision` is OpenVINO's inference precision: "f32" runs the file as written; "bf16" lets the CPU plugin
    run float math in bf16, which it would also do unasked on CPUs with AVX512-BF16/AMX."""
    core, model = read_for_any_batch(path)
    return core.compile_model(model, "CPU", cpu_config(threads, precision))
