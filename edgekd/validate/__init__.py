"""`edgekd validate`: every export against the PyTorch original, on every onnxruntime provider and on
OpenVINO, as a gate.

Rows: PyTorch fp32 (CPU, and CUDA when present) and each exported file on each requested provider
(onnxruntime's cpu, cuda, tensorrt; `openvino`: OpenVINO's CPU device reading the .onnx itself); providers
this machine lacks, and files a runtime cannot load, are listed as skipped with the reason. Each row is
measured in its own process (load time, peak memory, latency percentiles at each batch size) and compared
with the PyTorch CPU row (accuracy change, top-1 agreement, probability differences, worst class).

An export fails before any comparison when it cannot run on the run's own images, when its metadata does
not fit its graph, or when it was made from another checkpoint (checks.py). Warnings say when the numbers
cannot carry their weight: a wide latency spread, a busy machine, a gate finer than one image. A rerun
keeps the earlier rows it did not measure again (history.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
from datetime import datetime, timezone
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekd.errors import CheckpointError, DataError, EdgekdError
from edgekd.validate import checks, history
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
    failures: dict[str, list[str]]  # variant name (or file name, for an export rejected before measuring) → reasons
    gate: dict
    device: dict
    settings: dict
    warnings: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"file", "precision", "reasons"}: failed before measuring
    measured_at: str = ""
    earlier: dict = field(default_factory=dict)  # {"kept_rows": [...], "kept_beside": [...], "why_beside": ...}

    @property
    def gated_rows(self) -> list[dict]:
        """The rows this run measured and gated (earlier rows kept beside them are not)."""
        return [r for r in self.rows if r["gated"] and not r.get("kept_from_earlier")]


def _split_pixels(payload: dict, plan: ValidationPlan) -> tuple[str, np.ndarray, np.ndarray]:
    from edgekd.data.sources import has_split
    from edgekd.train.checkpoint import checkpoint_dataset, stored_recipe

    try:
        split = plan.split or ("test" if has_split(stored_recipe(payload, plan.data_root).data, "test") else "val")
        _, dataset = checkpoint_dataset(payload, (split,), plan.data_root)
    except DataError as exc:  # its hint speaks of recipes (--set data.root); validate takes --data
        root = plan.data_root or payload["recipe"].get("data", {}).get("root")
        raise DataError(exc.message, hint=f"validate reads the dataset {run_name(payload)} was trained on "
                        f"({root}); if it moved, point --data at it: edgekd validate RUN --data DIR") from exc
    pixels, labels = dataset.splits[split].take(np.arange(len(dataset.splits[split])))
    if labels is None:
        raise EdgekdError(f"the {split} split has no labels", hint="validate on --split val")
    return split, np.ascontiguousarray(pixels), labels


def run_name(payload: dict) -> str:
    return str(payload.get("recipe", {}).get("name") or "the checkpoint")


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


def _checked_exports(plan: ValidationPlan, payload: dict | None = None, sha256: str | None = None,
                     sample: np.ndarray | None = None) -> list:
    """checks.check_export of every .onnx file in the run's exports/ folder, against its best.pt (and run on
    `sample`, one of the run's images, when given)."""
    from edgekd.train.checkpoint import file_sha256, read_checkpoint

    exports = sorted((plan.run_dir / "exports").glob("*.onnx"))
    if not exports:
        raise EdgekdError(f"no exported model in {plan.run_dir / 'exports'}", hint="run `edgekd export --all` first")
    if payload is None:
        checkpoint = _checkpoint(plan.run_dir)
        payload, sha256 = read_checkpoint(checkpoint), file_sha256(checkpoint)
    found = [checks.check_export(path, payload["class_names"], payload["image_size"], sha256, sample)
             for path in exports]
    for warning in (w for c in found for w in c.warnings):
        log.warning("%s", warning)
    return found


def _onnx_variants(plan: ValidationPlan, exports: list | None = None) -> tuple[list[Variant], list[dict]]:
    """Every export that passes its checks, on every requested provider; providers missing here become
    skipped rows."""
    exports = [c for c in (_checked_exports(plan) if exports is None else exports) if not c.problems]
    unusable = _unusable_providers(plan.providers)
    variants, skipped = [], []
    for check in exports:
        for provider in plan.providers:
            name = variant_name(check.precision, provider)
            if provider in unusable:
                skipped.append({"variant": name, "file": check.path.name, "reason": unusable[provider]})
            else:
                variants.append(Variant(name, "onnx", str(check.path), check.precision, provider,
                                        check.path.stat().st_size))
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


def _is_reference_runtime(variant: Variant) -> bool:
    """onnxruntime's CPU provider, the runtime classify uses: a file it cannot run is broken, not unsupported.
    Elsewhere (OpenVINO, a GPU provider) a file that onnxruntime's CPU runs meets a runtime's limit: skipped."""
    return variant.kind == "onnx" and variant.provider == "cpu"


def _row(variant: Variant, measured: dict, reference: np.ndarray, labels: np.ndarray, payload: dict,
         gated: bool) -> dict:
    return {"variant": variant.name, "precision": variant.precision, "provider": variant.provider,
            "runtime": runtime_name(variant.kind, variant.provider), "gated": gated,
            "file": Path(variant.path).name, "file_mb": variant.file_bytes / 1e6,
            **compare(measured["logits"], reference, labels, payload["class_names"]),
            **{k: v for k, v in measured.items() if k != "logits"}}


def _checkpoint(run_dir: Path) -> Path:
    checkpoint = run_dir / "best.pt"
    if not checkpoint.exists():
        raise CheckpointError(f"no best.pt in {run_dir}", hint="name a run folder that finished at least one epoch")
    reason = checks.not_regular(checkpoint)
    if reason:
        raise CheckpointError(f"{checkpoint} {reason}", hint="validate reads a checkpoint file written by edgekd")
    return checkpoint


def _row_order(row: dict) -> tuple:
    if row["runtime"] == "PyTorch eager":
        return (0, 0, 0)  # the reference first, then the teacher, in the order measured
    return (1, PRECISION_ORDER.index(row["precision"]), _provider_rank(row["provider"]))


def validate_run(plan: ValidationPlan) -> Validation:
    import torch

    from edgekd.train.checkpoint import file_sha256, read_checkpoint
    from edgekd.validate.device import fingerprint

    checkpoint = _checkpoint(plan.run_dir)
    payload = read_checkpoint(checkpoint)
    sha256 = file_sha256(checkpoint)
    split, pixels, labels = _split_pixels(payload, plan)
    cuda = torch.cuda.is_available()
    device = fingerprint(torch.cuda.get_device_name(0) if cuda else None)
    threads = plan.threads or device["physical_cores"]
    exports = _checked_exports(plan, payload, sha256, pixels[:1])
    rejected = [c for c in exports if c.problems]
    onnx_variants, skipped = _onnx_variants(plan, exports)
    variants = _pytorch_variants(checkpoint, payload.get("teacher"), cuda) + onnx_variants
    gate = _gate(payload, plan)
    rows, failures = [], {c.path.name: c.problems for c in rejected}
    measured_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    hashes = {"best.pt": sha256, **{Path(v.path).name: file_sha256(v.path) for v in onnx_variants}}
    load_before, cores = checks.machine_load()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(str(Path(tmp) / "pixels.npy"), plan.batch_sizes, threads, plan.latency_seconds)
        np.save(settings.pixels_file, pixels)
        _teacher_at_its_size(variants, payload, plan, split, len(labels), Path(tmp))
        reference = None
        for variant in variants:
            log.info("measuring %s (%s)", variant.name, Path(variant.path).name)
            measured, reason = _measure_or_skip(variant, settings)
            if measured is None and _is_reference_runtime(variant):
                failures[variant.name] = [f"{checks.CANNOT_RUN}: {reason}"]
                continue
            if measured is None:
                log.warning("skipped %s (%s): %s", variant.name, Path(variant.path).name, reason)
                skipped.append({"variant": variant.name, "file": Path(variant.path).name, "reason": reason})
                continue
            reference = measured["logits"] if reference is None else reference
            gated = variant.name != TEACHER_ROW and variant is not variants[0]
            row = _row(variant, measured, reference, labels, payload, gated)
            row.update(gate_failures=gate.failures(row) if gated else [], measured_at=measured_at,
                       file_sha256=hashes.get(row["file"]) if variant.name != TEACHER_ROW else None)
            rows.append(row)
            if row["gate_failures"]:
                failures[variant.name] = row["gate_failures"]
    load_after, _ = checks.machine_load()
    load = max((v for v in (load_before, load_after) if v is not None), default=None)
    warnings = [w for c in exports for w in c.warnings] + checks.timing_warnings(rows, load, cores)
    precisions = sorted({v.precision for v in onnx_variants} | {c.precision for c in rejected if c.precision != "?"})
    resolution = checks.resolution_warning(len(labels), split, gate.max_drop_pts, precisions)
    warnings += [resolution] if resolution else []
    validation = Validation(
        split, len(labels), rows, skipped, failures,
        {"max_drop_pts": gate.max_drop_pts, "min_agreement": gate.min_agreement}, device,
        {"threads": threads, "batch_sizes": plan.batch_sizes, "latency_seconds": plan.latency_seconds,
         "reference": rows[0]["variant"], "checkpoint_sha256": sha256, "load_average": load, "cores": cores},
        warnings, [{"file": c.path.name, "precision": c.precision, "reasons": c.problems} for c in rejected],
        measured_at)
    earlier = history.combine(validation, plan.run_dir, hashes)
    validation.rows.sort(key=_row_order)
    validation.earlier = {"kept_rows": earlier.kept_rows, "kept_beside": [str(p) for p in earlier.kept_beside],
                          "why_beside": earlier.why_beside}
    return validation
