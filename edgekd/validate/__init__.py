"""`edgekd validate`: every export against the PyTorch original, on every onnxruntime provider and on
OpenVINO, as a gate.

Rows: PyTorch fp32 (CPU, and CUDA when present) and each exported file on each requested provider
(onnxruntime's cpu, cuda, tensorrt; `openvino`: OpenVINO's CPU device reading the .onnx itself); providers
this machine lacks, and files a runtime cannot load, are listed as skipped with the reason. Each row is
measured in its own process (load time, peak memory, latency percentiles at each batch size) and compared
with the PyTorch CPU row (accuracy change, top-1 agreement, probability differences, worst class).
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.errors import EdgekdError
from edgekd.validate.compare import Gate, compare
from edgekd.validate.measure import Settings, Unsupported, Variant, measure, openvino_unusable, runtime_name

log = logging.getLogger(__name__)

PRECISION_ORDER = ("fp32", "fp16", "int8", "fp8")
PROVIDER_ORDER = ("cpu", "cuda", "tensorrt", "openvino")  # onnxruntime's, then OpenVINO (its CPU device)
TEACHER_ROW = "teacher pytorch fp32 · cpu"  # context only: not gated


@dataclass
class ValidationPlan:
    run_dir: Path
    split: str | None = None  # None: test when the dataset has one, else val
    providers: list[str] = field(default_factory=lambda: list(PROVIDER_ORDER))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    threads: int | None = None  # None: the physical core count
    max_drop_pts: float | None = None  # None: the recipe's export.max_drop_<precision>
    min_agreement: float | None = None
    latency_seconds: float = 2.0
    data_root: str | None = None


@dataclass
class Validation:
    split: str
    images: int
    rows: list[dict]
    skipped: list[dict]
    failures: dict[str, list[str]]  # variant name → reasons
    gate: dict
    device: dict
    settings: dict


def _split_pixels(payload: dict, plan: ValidationPlan) -> tuple[str, np.ndarray, np.ndarray]:
    from edgekd.data.sources import has_split
    from edgekd.train.checkpoint import checkpoint_dataset, stored_recipe

    split = plan.split or ("test" if has_split(stored_recipe(payload, plan.data_root).data, "test") else "val")
    _, dataset = checkpoint_dataset(payload, (split,), plan.data_root)
    pixels, labels = dataset.splits[split].take(np.arange(len(dataset.splits[split])))
    if labels is None:
        raise EdgekdError(f"the {split} split has no labels", hint="validate on --split val")
    return split, np.ascontiguousarray(pixels), labels


def _teacher_at_its_size(variants: list, payload: dict, plan: ValidationPlan, split: str, count: int,
                         folder: Path) -> None:
    """A teacher trained at another resolution is measured on the same photos decoded at its own size
    (shown the student's small images it would look worse than it is)."""
    import dataclasses

    from edgekd.data import open_dataset
    from edgekd.train.checkpoint import read_checkpoint, stored_recipe

    teacher = next((v for v in variants if v.name == TEACHER_ROW), None)
    if teacher is None:
        return
    size = read_checkpoint(teacher.path)["image_size"]
    if size == payload["image_size"]:
        return
    data = dataclasses.replace(stored_recipe(payload, plan.data_root).data, image_size=size, unlabeled=None,
                               label_fraction=1.0)
    own = open_dataset(data, splits=(split,)).splits[split]
    if len(own) != count:  # a photo decodable at one size only: the rows would not line up
        log.warning("teacher row left out: its %dpx %s split holds %d images, the student's %d", size, split,
                    len(own), count)
        variants.remove(teacher)
        return
    pixels, _ = own.take(np.arange(len(own)))
    teacher.pixels_file = str(folder / f"teacher-{size}px.npy")
    np.save(teacher.pixels_file, np.ascontiguousarray(pixels))


def _gate(payload: dict, plan: ValidationPlan) -> Gate:
    from edgekd.train.checkpoint import stored_recipe

    export = stored_recipe(payload).export
    drops = {p: getattr(export, f"max_drop_{p}") for p in PRECISION_ORDER}
    if plan.max_drop_pts is not None:
        drops = {p: plan.max_drop_pts for p in PRECISION_ORDER}
    return Gate(drops, export.min_agreement if plan.min_agreement is None else plan.min_agreement)


def _pytorch_variants(checkpoint: Path, teacher: dict | None, cuda: bool) -> list[Variant]:
    """The student in PyTorch (the reference), on CUDA too when present, and its teacher for context."""
    size = checkpoint.stat().st_size
    variants = [Variant("pytorch fp32 · cpu", "pytorch", str(checkpoint), "fp32", "cpu", size)]
    if cuda:
        variants.append(Variant("pytorch fp32 · cuda", "pytorch", str(checkpoint), "fp32", "cuda", size))
    if teacher and Path(teacher["checkpoint"]).is_file():
        path = Path(teacher["checkpoint"])
        variants.append(Variant(TEACHER_ROW, "pytorch", str(path), "fp32", "cpu", path.stat().st_size))
    return variants


def _export_precision(path: Path) -> str:
    from edgekd.runtime.model_info import NotAnEdgekdModel, model_info_from_metadata
    from edgekd.runtime.session import open_session

    try:
        metadata = dict(open_session(path).get_modelmeta().custom_metadata_map)
        return model_info_from_metadata(metadata, str(path)).precision
    except NotAnEdgekdModel as exc:
        raise EdgekdError(str(exc), hint="remove it from the exports folder or re-export") from exc
    except Exception as exc:  # onnxruntime raises its own types for a damaged file
        raise EdgekdError(f"{path}: onnxruntime cannot load it ({exc.__class__.__name__})",
                          hint="re-export it with `edgekd export`") from exc


def variant_name(precision: str, provider: str) -> str:
    """"int8 · cpu" on onnxruntime's CPU provider, "int8 · openvino cpu" on OpenVINO's CPU device."""
    return f"{precision} · {'openvino cpu' if provider == 'openvino' else provider}"


def _provider_rank(provider: str) -> int:
    return PROVIDER_ORDER.index(provider) if provider in PROVIDER_ORDER else len(PROVIDER_ORDER)


def _unusable_providers(requested: list[str]) -> dict[str, str]:
    """Requested provider → why it cannot run here."""
    from edgekd.runtime.session import available_providers

    offered = available_providers()
    reasons = {p: f"no {p} provider in this onnxruntime build (it offers {', '.join(offered)})"
               for p in requested if p != "openvino" and p not in offered}
    if "openvino" in requested:
        try:
            reason = in_fresh_process(openvino_unusable)  # never imported here, where torch is
        except BrokenProcessPool:
            reason = "importing openvino crashed its process"
        if reason:
            reasons["openvino"] = reason
    return reasons


def _onnx_variants(plan: ValidationPlan) -> tuple[list[Variant], list[dict]]:
    """Every exported file on every requested provider; providers missing here become skipped rows."""
    exports = sorted((plan.run_dir / "exports").glob("*.onnx"))
    if not exports:
        raise EdgekdError(f"no exported model in {plan.run_dir / 'exports'}", hint="run `edgekd export --all` first")
    unusable = _unusable_providers(plan.providers)
    variants, skipped = [], []
    for path in exports:
        precision = _export_precision(path)
        for provider in plan.providers:
            name = variant_name(precision, provider)
            if provider in unusable:
                skipped.append({"variant": name, "file": path.name, "reason": unusable[provider]})
            else:
                variants.append(Variant(name, "onnx", str(path), precision, provider, path.stat().st_size))
    variants.sort(key=lambda v: (PRECISION_ORDER.index(v.precision), _provider_rank(v.provider)))
    return variants, skipped


def in_fresh_process(function, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def measure_in_fresh_process(variant: Variant, settings: Settings) -> dict:
    return in_fresh_process(measure, variant, settings)


def _measure_or_skip(variant: Variant, settings: Settings) -> tuple[dict | None, str | None]:
    """(measurements, None), or (None, why) when the variant's runtime cannot load or run its file."""
    try:
        return measure_in_fresh_process(variant, settings), None
    except Unsupported as exc:
        return None, str(exc)
    except BrokenProcessPool:  # a runtime that crashes its process on a file (a native abort) cannot run it either
        if variant.kind == "pytorch":
            raise
        return None, f"{runtime_name(variant.kind, variant.provider)} crashed its process loading or running it"


def _row(variant: Variant, measured: dict, reference: np.ndarray, labels: np.ndarray, payload: dict,
         gated: bool) -> dict:
    return {"variant": variant.name, "precision": variant.precision, "provider": variant.provider,
            "runtime": runtime_name(variant.kind, variant.provider), "gated": gated,
            "file": Path(variant.path).name, "file_mb": variant.file_bytes / 1e6,
            **compare(measured["logits"], reference, labels, payload["class_names"]),
            **{k: v for k, v in measured.items() if k != "logits"}}


def validate_run(plan: ValidationPlan) -> Validation:
    import torch

    from edgekd.train.checkpoint import read_checkpoint
    from edgekd.validate.device import fingerprint

    checkpoint = plan.run_dir / "best.pt"
    payload = read_checkpoint(checkpoint)
    split, pixels, labels = _split_pixels(payload, plan)
    cuda = torch.cuda.is_available()
    device = fingerprint(torch.cuda.get_device_name(0) if cuda else None)
    threads = plan.threads or device["physical_cores"]
    onnx_variants, skipped = _onnx_variants(plan)
    variants = _pytorch_variants(checkpoint, payload.get("teacher"), cuda) + onnx_variants
    gate = _gate(payload, plan)
    rows, failures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(str(Path(tmp) / "pixels.npy"), plan.batch_sizes, threads, plan.latency_seconds)
        np.save(settings.pixels_file, pixels)
        _teacher_at_its_size(variants, payload, plan, split, len(labels), Path(tmp))
        reference = None
        for variant in variants:
            log.info("measuring %s (%s)", variant.name, Path(variant.path).name)
            measured, reason = _measure_or_skip(variant, settings)
            if measured is None:
                log.warning("skipped %s (%s): %s", variant.name, Path(variant.path).name, reason)
                skipped.append({"variant": variant.name, "file": Path(variant.path).name, "reason": reason})
                continue
            reference = measured["logits"] if reference is None else reference
            gated = variant.name != TEACHER_ROW and variant is not variants[0]
            row = _row(variant, measured, reference, labels, payload, gated)
            rows.append(row)
            if gated and gate.failures(row):
                failures[variant.name] = gate.failures(row)
    return Validation(split, len(labels), rows, skipped, failures,
                      {"max_drop_pts": gate.max_drop_pts, "min_agreement": gate.min_agreement}, device,
                      {"threads": threads, "batch_sizes": plan.batch_sizes, "latency_seconds": plan.latency_seconds,
                       "reference": rows[0]["variant"]})
