"""fp16, int8 and fp8 graphs, each derived from the checked fp32 graph."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekd.runtime.session import as_input

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # the largest finite float8 e4m3fn value


# ----- fp16 ---------------------------------------------------------------------------------------------

def to_fp16(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in fp16; the input and output stay fp32 so callers feed the same tensor."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(fp32, keep_io_types=True)
    topological_sort(model.graph)  # the converter appends its input Casts after their consumers
    return model


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node], []
    while pending:
        waiting = []
        for node in pending:
            if all(i in ready for i in node.input):
                ready.update(node.output)
                ordered.append(node)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near node {waiting[0].name!r}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


# ----- int8 ---------------------------------------------------------------------------------------------

class _CalibrationReader:
    """Feeds real training images to onnxruntime's calibrator, 32 at a time."""

    def __init__(self, input_name: str, pixels: np.ndarray):
        self.batches = iter([{input_name: as_input(pixels[i:i + 1])} for i in range(len(pixels))])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):  # pragma: no cover - part of onnxruntime's reader protocol, unused by MinMax
        raise NotImplementedError


def sensitive_nodes(model: onnx.ModelProto, groups: list[str]) -> list[str]:
    """Node names for `stem` (the first convolution) and `classifier` (the Gemm/MatMul head)."""
    names: list[str] = []
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    for group in groups:
        if group == "stem":
            names += convs[:1]
        elif group == "classifier":
            names += [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
        else:
            raise ValueError(f"unknown node group {group!r}: use stem or classifier")
    return names


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def to_int8(fp32_path: Path, calibration: np.ndarray, keep_float: list[str],
            method: str = "minmax") -> onnx.ModelProto:
    """onnxruntime static quantisation, QDQ format, per-channel int8 weights, uint8 activations; activation
    ranges from the calibration images by `method` (one of CALIBRATION_METHODS)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    with tempfile.TemporaryDirectory() as tmp:
        prepared, output = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(prepared)
        input_name = model.graph.input[0].name
        quantize_static(
            str(prepared), str(output), _CalibrationReader(input_name, calibration), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=sensitive_nodes(model, keep_float), calibrate_method=methods[method],
            extra_options={"CalibPercentile": 99.99} if method == "percentile" else {})
        return onnx.load(output)


# ----- fp8 ----------------------------------------------------------------------------------------------

def _weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The output-channel axis of a node's weight input, or None when the node has no such weight."""
    if node.op_type == "Conv" and rank == 4:
        return 0
    if node.op_type == "Gemm" and rank == 2:
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul" and rank == 2:
        return 1
    return None


def fp8_e4m3_bytes(values: np.ndarray) -> bytes:
    """Round float32 values to float8 e4m3fn (as PyTorch does) and return the raw bytes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.float8_e4m3fn).view(
        torch.uint8).numpy().tobytes()


def per_channel_scale(weight: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=other)
    return np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)


def to_fp8(fp32: onnx.ModelProto, scales: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Store Conv/Gemm/MatMul weights as FLOAT8E4M3FN with per-output-channel scales.

    Each weight becomes DequantizeLinear(w_fp8, scale, 0, axis) feeding the original consumer, so
    activations and arithmetic stay fp32: onnxruntime's CPU provider runs it (opset >= 19). `scales`
    (weight name → per-channel scale) replaces the amax/448 default, e.g. with fp8-trained scales.
    """
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    dequantize_nodes = []
    done: set[str] = set()
    for node in graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers or node.input[1] in done:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        axis = _weight_axis(node, weight.ndim)
        if axis is None or weight.dtype != np.float32:
            continue
        name = node.input[1]
        scale = (scales or {}).get(name, per_channel_scale(weight, axis)).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        quantized = fp8_e4m3_bytes(weight / scale.reshape(shape))
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([
            helper.make_tensor(f"{name}_fp8", TensorProto.FLOAT8E4M3FN, weight.shape, quantized, raw=True),
            numpy_helper.from_array(scale, f"{name}_scale"),
            helper.make_tensor(f"{name}_zero", TensorProto.FLOAT8E4M3FN, scale.shape, bytes(len(scale)), raw=True)])
        dequantize_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_fp8", f"{name}_scale", f"{name}_zero"],
                                                 [name], name=f"{name}_dequantize", axis=axis))
        done.add(name)
    for position, node in enumerate(dequantize_nodes):
        graph.node.insert(position, node)
    log.info("fp8: %d weight tensors stored as float8 e4m3fn with per-channel scales", len(dequantize_nodes))
    return model
