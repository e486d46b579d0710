"""Accuracy-aware int8 and fp8: when a file misses the validate gate, the fewest layers kept in float.

1. The file is measured on held-out labelled images (the val split; calibration used training images)
   against PyTorch fp32, by validate's rule: accuracy drop ≤ export.max_drop_<precision> points and top-1
   agreement ≥ export.min_agreement.
2. If it misses, every layer is ranked by its sensitivity: that layer alone quantised, the rest fp32, on a
   few hundred calibration images; sensitivity = the mean KL divergence of its softmax from fp32's.
3. Layers go into float, most sensitive first, one at a time, until the held-out images meet the gate or
   a cap is reached (past it the file is hardly quantised any more).

Every graph runs in onnxruntime, the runtime the file ships to.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from edgekd.export.precisions import Int8Quantizer, fp8_as_fp32, sensitive_nodes, to_fp8, weight_layers
from edgekd.runtime.session import as_input
from edgekd.validate.compare import Gate, compare

log = logging.getLogger(__name__)

# Images per layer: ranking the 50 layers of EfficientNet-Lite0 at 150 px took 72 s (int8) and 189 s (fp8) on
# 2 cores shared with two training jobs.
SENSITIVITY_IMAGES = 128
# Default cap on the layers the search adds in float: a third of the quantisable ones (the Lite0 teacher's fp8
# needed 11 of 50). Past it the file is hardly quantised any more, and the search would run on and on.
FLOAT_FRACTION_CAP = 1 / 3
TOP_RANKED_RECORDED = 10  # the ranking's head goes into the metadata, not all of it


@dataclass
class HeldOut:
    """Labelled real images the calibration never saw, with PyTorch fp32's logits on them."""
    split: str
    pixels: np.ndarray
    labels: np.ndarray
    reference: np.ndarray
    class_names: list[str]


@dataclass
class GateLimits:
    max_drop_pts: float
    min_agreement: float
    max_float_layers: int | None = None  # None: FLOAT_FRACTION_CAP of the quantisable layers


@dataclass
class SearchResult:
    passed: bool
    graph: onnx.ModelProto | None  # the graph to write; None when nothing met the gate
    float_layers: list[str]  # every layer in float: those asked for, then those the search added
    record: dict = field(default_factory=dict)  # what was measured, for the file's metadata


class LayerwiseInt8:
    """int8 graphs with chosen layers in float, from one calibration."""

    precision = "int8"

    def __init__(self, quantizer: Int8Quantizer):
        self.quantizer = quantizer
        self.fp32 = quantizer.model
        self.layers = weight_layers(self.fp32)
        self._last: tuple[tuple[str, ...], onnx.ModelProto] | None = None

    def file_graph(self, float_layers: list[str]) -> onnx.ModelProto:
        # the graph just measured is the one to write: quantising a large model again costs seconds
        if self._last is None or self._last[0] != tuple(float_layers):
            self._last = tuple(float_layers), self.quantizer.quantize([self.layers[name] for name in float_layers])
        return self._last[1]

    def measured_graph(self, float_layers: list[str]) -> onnx.ModelProto:
        return self.file_graph(float_layers)

    def alone_graph(self, layer: str) -> onnx.ModelProto:
        return self.quantizer.quantize(only=[self.layers[layer]])


class LayerwiseFp8:
    """fp8 graphs with chosen layers in float; measured through their fp32 twin, which computes the same
    logits at fp32 speed (see fp8_as_fp32)."""

    precision = "fp8"

    def __init__(self, fp32: onnx.ModelProto, scales: dict[str, np.ndarray] | None):
        self.fp32, self.scales = fp32, scales
        self.layers = weight_layers(fp32)

    def file_graph(self, float_layers: list[str]) -> onnx.ModelProto:
        return to_fp8(self.fp32, self.scales, [self.layers[name] for name in float_layers])

    def measured_graph(self, float_layers: list[str]) -> onnx.ModelProto:
        return fp8_as_fp32(self.fp32, self.scales, [self.layers[name] for name in float_layers])

    def alone_graph(self, layer: str) -> onnx.ModelProto:
        return fp8_as_fp32(self.fp32, self.scales, only=[self.layers[layer]])


def requested_layers(layerwise, groups: list[str]) -> list[str]:
    """The layers the user's keep_float groups (stem, classifier) name: the search's starting set."""
    by_node = {node: name for name, node in layerwise.layers.items()}
    return [by_node[node] for node in sensitive_nodes(layerwise.fp32, groups) if node in by_node]


def meet_gate(layerwise, requested: list[str], held_out: HeldOut, limits: GateLimits,
              sensitivity_pixels: np.ndarray) -> SearchResult:
    """The graph with `requested` layers in float if it meets the gate, else with the fewest layers more."""
    started = time.perf_counter()
    precision = layerwise.precision
    gate = Gate({precision: limits.max_drop_pts}, limits.min_agreement)
    first = _measure(layerwise.measured_graph(requested), held_out, gate, precision)
    record = {"split": held_out.split, "images": len(held_out.labels), "max_drop_pts": limits.max_drop_pts,
              "min_agreement": limits.min_agreement, "requested_float": requested, "as_requested": first}
    log.info("%s on %d held-out %s images: accuracy drop %.2f pts, agreement %.4f (gate: ≤ %g pts, ≥ %g)",
             precision, len(held_out.labels), held_out.split, first["drop_pts"], first["agreement"],
             limits.max_drop_pts, limits.min_agreement)
    if first["passes"]:
        return SearchResult(True, layerwise.file_graph(requested), requested,
                            {**record, "searched": False, **_final(first, started)})
    log.info("%s misses the gate (%s): ranking layers to keep in float", precision, "; ".join(first["failures"]))
    ranking = rank_layers(layerwise, [name for name in layerwise.layers if name not in requested],
                          sensitivity_pixels)
    record.update(searched=True, cap=_cap(limits, layerwise), ranking_seconds=round(time.perf_counter() - started, 1),
                  sensitivity={"metric": f"mean KL(fp32 || this layer alone quantised) on {len(sensitivity_pixels)} "
                                         "calibration images",
                               "top": [[name, _sig(score)] for name, score in ranking[:TOP_RANKED_RECORDED]]})
    measure = functools.partial(_measure, held_out=held_out, gate=gate, precision=precision)
    return _add_float_layers(layerwise, requested, ranking, record, measure, started)


def _add_float_layers(layerwise, requested: list[str], ranking: list[tuple[str, float]], record: dict, measure,
                      started: float) -> SearchResult:
    """Most sensitive first, one layer more in float at a time, until the held-out images meet the gate."""
    precision = layerwise.precision
    kept, steps, result = list(requested), [], record["as_requested"]
    for layer, score in ranking[:record["cap"]]:
        kept.append(layer)
        result = measure(layerwise.measured_graph(kept))
        steps.append({"layer": layer, "sensitivity": _sig(score), "drop_pts": result["drop_pts"],
                      "agreement": result["agreement"]})
        log.info("%s: + %s in float (sensitivity %.3g): drop %.2f pts, agreement %.4f%s", precision, layer, score,
                 result["drop_pts"], result["agreement"], "" if result["passes"] else " - still misses")
        if result["passes"]:
            break
    record.update(kept=steps, **_final(result, started))
    if not result["passes"]:
        log.info("%s: no file with at most %d more layer(s) in float meets the gate (%.0f s)", precision,
                 record["cap"], record["seconds"])
        return SearchResult(False, None, kept, record)
    log.info("%s meets the gate with %d layer(s) in float (%s) after %.0f s", precision, len(kept), ", ".join(kept),
             record["seconds"])
    return SearchResult(True, layerwise.file_graph(kept), kept, record)


def _cap(limits: GateLimits, layerwise) -> int:
    if limits.max_float_layers is not None:
        return limits.max_float_layers
    return max(1, round(FLOAT_FRACTION_CAP * len(layerwise.layers)))


def rank_layers(layerwise, candidates: list[str], pixels: np.ndarray) -> list[tuple[str, float]]:
    """Candidates, most sensitive first: each quantised alone, the divergence of its outputs from fp32's."""
    started = time.perf_counter()
    reference = graph_logits(layerwise.fp32, pixels)
    scores = {name: mean_kl(reference, graph_logits(layerwise.alone_graph(name), pixels)) for name in candidates}
    ranking = sorted(scores.items(), key=lambda item: -item[1])
    log.info("%s: ranked %d layers on %d images in %.0f s; most sensitive: %s", layerwise.precision,
             len(candidates), len(pixels), time.perf_counter() - started,
             ", ".join(f"{name} {score:.3g}" for name, score in ranking[:5]))
    return ranking


def _measure(graph: onnx.ModelProto, held_out: HeldOut, gate: Gate, precision: str) -> dict:
    logits = graph_logits(graph, held_out.pixels)
    row = {"precision": precision, **compare(logits, held_out.reference, held_out.labels, held_out.class_names)}
    failures = gate.failures(row)
    return {"drop_pts": round(-row["accuracy_change_pts"], 4) + 0.0,  # + 0.0: no "-0.00"
            "agreement": round(row["agreement"], 6),
            "passes": not failures, "failures": failures}


def _final(result: dict, started: float) -> dict:
    return {"drop_pts": result["drop_pts"], "agreement": result["agreement"],
            "seconds": round(time.perf_counter() - started, 1)}


def mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over images of KL(softmax(reference) || softmax(logits)), in nats: 0 when they agree exactly,
    and it grows smoothly with the damage, where top-1 flips on a few hundred images are too coarse."""
    log_p, log_q = _log_softmax(reference), _log_softmax(logits)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return float(kl.mean()) if np.all(np.isfinite(kl)) else float("inf")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def graph_logits(graph: onnx.ModelProto, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle threads sleep instead of spinning: the search opens dozens of sessions on a CPU others share
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: as_input(pixels[i:i + batch_size])})[0]
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out).astype(np.float32)


def _sig(value: float) -> float:
    """Four significant digits: enough to compare layers, short enough to read in the metadata."""
    return float(f"{value:.4g}")
