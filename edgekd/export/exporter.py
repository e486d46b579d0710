"""`edgekd export`: a checkpoint → one self-describing .onnx file per precision.

Every file holds its weights (no .onnx.data beside it), has a dynamic batch dimension, and carries in its
metadata what a device needs: class names, input size, mean/std (applied inside the graph), resize method,
precision, and where it came from. A file is written under a temporary name and renamed, so a failed
export never replaces a good one.

int8 and fp8 files must meet the validate gate (export.max_drop_<precision>, export.min_agreement) on
held-out val images before they are written; one that misses it gets its most sensitive layers kept in
float (edgekd/export/search.py). When no file within the cap meets it, nothing is written for that
precision (an older file at its path stays as it was) and the export ends in ExportError once the other
precisions are written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx

import edgekd
from edgekd.errors import CheckpointError, EdgekdError
from edgekd.export.inputs import export_dataset, first_lines, load_finite_model, training_status
from edgekd.export.onnx_fp32 import INPUT_NAME, export_fp32, opset_of, torch_logits
from edgekd.export.precisions import Int8Quantizer, to_fp16
from edgekd.export.search import (SENSITIVITY_IMAGES, GateLimits, HeldOut, LayerwiseFp8, LayerwiseInt8, meet_gate,
                                  requested_layers)
from edgekd.runs import atomic_write
from edgekd.runtime.model_info import ModelInfo
from edgekd.runtime.session import available_providers, open_session, run_logits

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
FP32_TOLERANCE = 1e-4  # max |logit difference| allowed between PyTorch and the fp32 export
HELD_OUT_IMAGES = 2000  # the gate's val images: all of them up to this many (a seeded sample beyond)


class ExportError(EdgekdError):
    """An export that failed its own checks; no file was replaced."""


@dataclass
class ExportedFile:
    precision: str
    path: Path
    size_bytes: int
    max_abs_logit_diff: float  # against PyTorch fp32, on real validation images
    agreement: float  # fraction of those images with the same top-1 class as PyTorch
    float_layers: list[str] = field(default_factory=list)  # int8/fp8: layers kept in float
    accuracy_gate: dict = field(default_factory=dict)  # int8/fp8: the held-out gate check (metadata accuracy_gate)


@dataclass
class ExportPlan:
    checkpoint: Path
    precisions: list[str]
    out_dir: Path
    calibration_images: int | None = None  # None: the recipe's export.calibration_images
    keep_float: list[str] | None = None  # None: the recipe's export.keep_float
    data_root: str | None = None
    calibration_method: str | None = None  # None: the recipe's export.calibration_method
    max_drop_pts: float | None = None  # None: the recipe's export.max_drop_<precision> (int8 and fp8)
    min_agreement: float | None = None  # None: the recipe's export.min_agreement
    max_float_layers: int | None = None  # layers the search may add in float; None: a third of them


def export_checkpoint(plan: ExportPlan) -> list[ExportedFile]:
    """Export fp32 (always: it is the reference the others derive from) and the requested precisions."""
    model, payload, sha256 = load_finite_model(plan.checkpoint)  # before the folder is made: a bad one makes none
    _check_writable(plan.out_dir)
    stem = payload.get("run") or plan.checkpoint.parent.name
    _check_targets([plan.out_dir / f"{stem}.{p}.onnx" for p in ["fp32", *plan.precisions]])
    run_status = training_status(plan.checkpoint)
    recipe, dataset = export_dataset(payload, plan.data_root)
    if plan.calibration_images is None:
        plan.calibration_images = recipe.export.calibration_images
    if plan.keep_float is None:
        plan.keep_float = list(recipe.export.keep_float)
    if plan.calibration_method is None:
        plan.calibration_method = recipe.export.calibration_method
    reference_pixels, reference = _reference(model, dataset, plan.checkpoint)
    fp32, exporter = export_fp32(model, payload["image_size"])
    info = _model_info(payload, sha256, exporter, opset_of(fp32))
    if run_status:
        info.extra["run_status"] = run_status
    sources = _Sources(plan, recipe, dataset, model, fp32, plan.out_dir / f"{stem}.fp32.onnx",
                       list(payload["class_names"]), payload)
    results, missed = [], {}
    for precision in ["fp32", *[p for p in plan.precisions if p != "fp32"]]:
        path = plan.out_dir / f"{stem}.{precision}.onnx"
        graph, extra = _convert(precision, sources)
        if graph is None:
            missed[precision] = extra
            continue
        file_info = dataclasses.replace(info, extra={**info.extra, **extra})
        written = _write_checked(graph, path, file_info, precision, reference_pixels, reference)
        written.float_layers = json.loads(extra.get("float_layers", "[]"))
        written.accuracy_gate = json.loads(extra.get("accuracy_gate", "{}"))
        results.append(written)
    if missed:
        raise _gate_missed(missed, results)
    return results


def _reference(model, dataset, checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """Real val images and PyTorch's logits on them: what every exported file is compared with."""
    pixels = _sample(dataset.splits["val"], 256, seed=0, balanced=False)
    logits = torch_logits(model, pixels)
    if not np.isfinite(logits).all():
        raise CheckpointError(f"{checkpoint}: the model's own PyTorch logits are not finite (NaN or inf) on real "
                              f"validation images, so no export of it could be right",
                              hint="its weights are finite but overflow: retrain it (e.g. with a lower train.lr)")
    return pixels, logits


class _Sources:
    """What the conversions draw on, each computed once and only when a precision needs it."""

    def __init__(self, plan: ExportPlan, recipe, dataset, model, fp32: onnx.ModelProto, fp32_path: Path,
                 class_names: list[str], payload: dict):
        self.plan, self.recipe, self.dataset, self.model = plan, recipe, dataset, model
        self.fp32, self.fp32_path, self.class_names, self.payload = fp32, fp32_path, class_names, payload

    @cached_property
    def calibration(self) -> np.ndarray:
        return _sample(self.dataset.splits["train"], self.plan.calibration_images, seed=0, balanced=True)

    @cached_property
    def sensitivity(self) -> np.ndarray:
        """A seeded subset of the calibration images (still class-balanced in expectation)."""
        rng = np.random.default_rng(1)
        return self.calibration[np.sort(rng.permutation(len(self.calibration))[:SENSITIVITY_IMAGES])]

    @cached_property
    def held_out(self) -> HeldOut:
        """The val split's labelled images (calibration saw only training images) and PyTorch's logits."""
        split = self.dataset.splits["val"]
        rng = np.random.default_rng(0)
        pixels, labels = split.take(np.sort(rng.permutation(len(split))[:HELD_OUT_IMAGES]))
        if labels is None or not len(labels):
            raise ExportError("the val split has no labelled images to check int8/fp8 accuracy on",
                              hint="export from a run whose dataset has a labelled val split")
        log.info("gate images: %d of the %d val images, PyTorch fp32 as the reference", len(labels), len(split))
        return HeldOut("val", pixels, np.asarray(labels), torch_logits(self.model, pixels), self.class_names)

    def limits(self, precision: str) -> GateLimits:
        export, plan = self.recipe.export, self.plan
        return GateLimits(
            getattr(export, f"max_drop_{precision}") if plan.max_drop_pts is None else plan.max_drop_pts,
            export.min_agreement if plan.min_agreement is None else plan.min_agreement, plan.max_float_layers)


def _check_targets(paths: list[Path]) -> None:
    """A folder (or anything but a file or link) where an export goes would fail the final rename."""
    for path in paths:
        if path.exists() and not path.is_file():
            raise ExportError(f"cannot write {path}: something other than a file is in its place",
                              hint="move it away, or pass another folder with --out")


def _check_writable(folder: Path) -> None:
    """Fail before any work when the output folder cannot hold files."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write exports to {folder}: {exc.strerror or exc}",
                          hint="pass a writable folder with --out") from exc


def _sample(split, count: int, seed: int, balanced: bool) -> np.ndarray:
    """Real images from a split: a seeded sample, class-balanced when asked (for calibration)."""
    rng = np.random.default_rng(seed)
    if not balanced:
        positions = np.sort(rng.permutation(len(split))[:count])
        return split.take(positions)[0]
    labels = split.row_labels
    classes = np.unique(labels)
    per_class = -(-count // len(classes))
    positions = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes])
    return split.take(np.sort(positions[:count] if len(positions) > count else positions))[0]


def _convert(precision: str, sources: _Sources) -> tuple[onnx.ModelProto | None, dict[str, str]]:
    """The graph for one precision and the metadata it adds; no graph when int8/fp8 misses the gate."""
    plan = sources.plan
    if precision == "fp32":
        return sources.fp32, {}
    if precision == "fp16":
        if "cuda" not in available_providers():
            log.warning("fp16 is for GPU and NPU runtimes; this machine has no CUDA provider, and onnxruntime's "
                        "CPU provider runs fp16 no faster than fp32")
        return to_fp16(sources.fp32), {}
    if precision == "int8":
        log.info("int8: calibrating on %d real training images (class-balanced, seed 0), %s ranges",
                 len(sources.calibration), plan.calibration_method)
        try:
            with Int8Quantizer(sources.fp32_path, sources.calibration, plan.calibration_method) as quantizer:
                return _meeting_the_gate(LayerwiseInt8(quantizer), sources)
        except AssertionError as exc:  # onnxruntime's quantiser asserts on ranges it cannot represent
            raise ExportError(f"onnxruntime's int8 quantiser failed ({first_lines(exc)}); no int8 file was "
                              f"written", hint="try --calibration-method percentile, or export without --int8") \
                from exc
    return _meeting_the_gate(LayerwiseFp8(sources.fp32, _trained_fp8_scales(sources.payload, sources.fp32)),
                             sources)


def _meeting_the_gate(layerwise, sources: _Sources) -> tuple[onnx.ModelProto | None, dict[str, str]]:
    """The user's keep_float layers in float, and more if the file misses the gate on held-out images;
    which layers and why go into the file's metadata."""
    requested = requested_layers(layerwise, sources.plan.keep_float)
    result = meet_gate(layerwise, requested, sources.held_out, sources.limits(layerwise.precision),
                       sources.sensitivity)
    extra = {"float_layers": json.dumps(result.float_layers), "accuracy_gate": json.dumps(result.record)}
    return (result.graph if result.passed else None), extra


def _gate_missed(missed: dict[str, dict[str, str]], written: list[ExportedFile]) -> ExportError:
    lines = []
    for precision, extra in missed.items():
        record = json.loads(extra["accuracy_gate"])
        lines.append(f"{precision} misses the gate on {record['images']} held-out {record['split']} images even with "
                     f"{len(record.get('kept', []))} more layer(s) in float (at most {record.get('cap', 0)}): "
                     f"accuracy drop {record['drop_pts']:.2f} pts (limit {record['max_drop_pts']:g}), agreement "
                     f"{record['agreement']:.4f} (limit {record['min_agreement']:g}); no {precision} file was written")
    done = ", ".join(f.path.name for f in written)
    return ExportError("\n".join(lines) + f"\nwritten: {done}",
                       hint="for int8 try --calibration-method percentile; the gate is the run's recipe "
                            "(export.max_drop_int8 / max_drop_fp8, export.min_agreement), which --max-drop and "
                            "--min-agreement override; --max-float-layers raises the cap (a third of the layers)")


def _trained_fp8_scales(payload: dict, graph: onnx.ModelProto) -> dict[str, np.ndarray] | None:
    """Per-channel weight scales learnt in fp8 training, carried over to the exported graph's weights.

    The exporter folds each BatchNorm into the convolution before it, which multiplies every output
    channel of the weight by a constant; the learnt scale is multiplied by the same constant, so the
    fp8 codes stay those the model was trained with. `payload` is the checkpoint already loaded: reading the
    file again could see a newer best.pt than the weights being exported.
    """
    learnt = payload.get("fp8_weight_scales")
    if not learnt:
        return None
    graph_weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer if i.name in learnt}
    scales = {}
    for name, weight in graph_weights.items():
        trained = payload["state_dict"][name].float().numpy()
        if trained.shape != weight.shape:  # stored transposed (MatMul): output channels on another axis
            continue
        fold = _channel_amax(weight) / np.maximum(_channel_amax(trained), 1e-30)
        scales[name] = (np.asarray(learnt[name], np.float32).reshape(-1) * fold).astype(np.float32)
    log.info("fp8: using the weight scales learnt in fp8 training for %d of %d weights", len(scales), len(learnt))
    return scales


def _channel_amax(weight: np.ndarray) -> np.ndarray:
    return np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)


def _model_info(payload: dict, sha256: str, exporter: str, opset: int) -> ModelInfo:
    return ModelInfo(
        class_names=list(payload["class_names"]), image_size=int(payload["image_size"]),
        mean=list(payload["mean"]), std=list(payload["std"]), resize=payload["resize"],
        normalization="in-graph", input_name=INPUT_NAME, precision="",
        extra={"checkpoint_sha256": sha256, "recipe": payload["recipe"]["name"], "run": str(payload.get("run")),
               "model": json.dumps(payload["model"]), "val_accuracy": str(payload.get("val_acc")),
               "edgekd_version": edgekd.__version__, "exporter": exporter, "opset": str(opset)})


def _write_checked(graph: onnx.ModelProto, path: Path, info: ModelInfo, precision: str,
                   pixels: np.ndarray, reference: np.ndarray) -> ExportedFile:
    """Save as one file, run it in onnxruntime on real images, and only then rename it into place."""
    info.precision = precision
    del graph.metadata_props[:]
    onnx.helper.set_model_props(graph, info.to_metadata())
    onnx.checker.check_model(graph)
    measured: dict[str, float] = {}

    def save(tmp: Path) -> None:
        onnx.save_model(graph, tmp, save_as_external_data=False)
        logits = run_logits(open_session(tmp), pixels)
        if not np.isfinite(logits).all():  # NaN compares false with everything: it would pass `diff > tol`
            raise ExportError(f"the {precision} export's logits are not finite (NaN or inf) on "
                              f"{int((~np.isfinite(logits)).any(axis=1).sum())} of {len(pixels)} real images "
                              f"(PyTorch's are finite); the file was not written",
                              hint="fp16 overflows where activations pass 65504: export fp32 or int8 instead"
                              if precision == "fp16" else f"export without --{precision}, or --keep-float stem")
        measured["diff"] = float(np.abs(logits - reference).max())
        measured["agreement"] = float((logits.argmax(1) == reference.argmax(1)).mean())
        if precision == "fp32" and not measured["diff"] <= FP32_TOLERANCE:
            raise ExportError(f"the fp32 export differs from PyTorch by {measured['diff']:.2e} "
                              f"(> {FP32_TOLERANCE}) on real images; the file was not written")

    atomic_write(path, save)
    log.info("%s: max |logit - PyTorch| %.2e, top-1 agreement %.4f on %d real images", path.name,
             measured["diff"], measured["agreement"], len(pixels))
    if measured["agreement"] < 0.9:
        log.warning("%s agrees with PyTorch on only %.0f%% of the images: check it with `edgekd validate`",
                    path.name, 100 * measured["agreement"])
    return ExportedFile(precision, path, path.stat().st_size, measured["diff"], measured["agreement"])
