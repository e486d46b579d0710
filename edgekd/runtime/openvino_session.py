"""`edgekd classify` on OpenVINO's CPU device, and which runtime `--provider auto` takes. No torch.

OpenVINO reads the exported .onnx itself (no conversion step, no second file) and exposes the file's
metadata_props under rt_info["framework"], so the same ModelInfo contract holds. OpenVINOSession answers
the few calls classify makes of an onnxruntime session (get_inputs, get_outputs, get_modelmeta, run), so
classify keeps one code path for both runtimes.

The file runs as written (inference precision f32): on CPUs with AVX512-BF16/AMX the CPU plugin would
otherwise compute float layers in bf16 unasked, and the labels could differ from the validated export.
"""

from __future__ import annotations

import importlib.util
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# `auto` takes OpenVINO from this many photos on: below, its longer start (import and compile, ~0.3 s more
# than onnxruntime on 2 cores) is not repaid by its faster batches (benchmarks/classify_cold_start.py).
AUTO_OPENVINO_FROM = 32
_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None  # finding it does not import it (cold start)


def auto_provider(photos: int, path: str | Path | None = None) -> str:
    """What `--provider auto` runs: OpenVINO's CPU device for an int8 export where OpenVINO is installed,
    the CPU is x86 and there are at least AUTO_OPENVINO_FROM photos; otherwise onnxruntime's CPU provider.

    Measured on 2 AMX cores (8-block student, 150 px): int8 runs ~3x faster on OpenVINO than on
    onnxruntime (its VNNI/AMX int8 kernels), fp32 about as fast; so only int8 files, where the gain repays
    OpenVINO's longer start. `path` is read for its precision (None: assume int8, classify's default)."""
    if photos < AUTO_OPENVINO_FROM or platform.machine().lower() not in _X86 or not openvino_installed():
        return "cpu"
    return "openvino" if path is None or file_precision(path) == "int8" else "cpu"


def file_precision(path: str | Path) -> str | None:
    """The precision an edgekd export's metadata names, read by OpenVINO (None: unreadable or not edgekd's)."""
    try:
        from edgekd.runtime.openvino_cpu import read_for_any_batch

        _, model = read_for_any_batch(path)
        return model.get_rt_info(["framework", "precision"]).astype(str)
    except Exception:  # any file OpenVINO cannot read is onnxruntime's to judge (and report)
        return None


@dataclass
class _Port:
    name: str
    shape: list  # ints where static, strings where dynamic, as onnxruntime reports them


@dataclass
class _Meta:
    custom_metadata_map: dict[str, str]


def _shape(partial) -> list:
    return [dim.get_length() if dim.is_static else "?" for dim in partial]


class OpenVINOSession:
    """An exported .onnx compiled for OpenVINO's CPU device, called like an onnxruntime InferenceSession.

    One inference at a time, on `threads` cores: classify's other threads decode the next batches
    meanwhile. Infer requests running side by side (one per thread, several streams) deadlocked in
    OpenVINO 2026.4 about one run in five when a request's batch size changed (its input tensor is
    reshaped while another request runs)."""

    def __init__(self, path: str | Path, threads: int = 1):
        from edgekd.runtime.openvino_cpu import cpu_config, read_for_any_batch

        core, model = read_for_any_batch(path)
        framework = model.get_rt_info()["framework"] if model.has_rt_info(["framework"]) else {}
        self._metadata = {key: value.astype(str) for key, value in framework.items()}
        self._inputs = [_Port(port.get_any_name(), _shape(port.get_partial_shape())) for port in model.inputs]
        self._outputs = [_Port(port.get_any_name(), _shape(port.get_partial_shape())) for port in model.outputs]
        self.compiled = core.compile_model(model, "CPU", cpu_config(threads, "f32"))
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def get_modelmeta(self) -> _Meta:
        return _Meta(dict(self._metadata))

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            results = self._request.infer(feed)
            return [np.array(results[port]) for port in self.compiled.outputs]  # copies: the next infer reuses them
