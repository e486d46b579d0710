"""A fingerprint of the machine a validation ran on, so its latencies can be read in context."""

from __future__ import annotations

import os
import platform
from importlib import metadata

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo() -> tuple[str, set[str], int]:
    model, flags, cores = platform.processor() or platform.machine(), set(), set()
    physical = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name":
                    model = value
                elif key == "flags":
                    flags = set(value.split())
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    cores.add((physical, value))
    except OSError:
        pass
    return model, flags, len(cores) or (os.cpu_count() or 1)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(gpu_name: str | None) -> dict:
    model, flags, physical = _cpuinfo()
    import onnxruntime

    return {"cpu": model, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "instruction_sets": [f for f in ISA_FLAGS if f in flags], "gpu": gpu_name or "none",
            "onnxruntime": onnxruntime.__version__, "onnxruntime_providers": onnxruntime.get_available_providers(),
            "openvino": _version("openvino"),  # from its metadata: importing it here would load it beside torch
            "torch": _version("torch"), "python": platform.python_version(), "os": platform.platform()}
