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
    """Feeds real training images to onnxruntime's calibrator, one at a time."""

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


def weight_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name → node name for every Conv/Gemm/MatMul with a stored weight, in graph order.

    A layer is named after its weight without `.weight` (`net.blocks.3.conv_dw`): the PyTorch module a
    user recognises, where the node names the exporter makes up (`node_Conv_312`) mean nothing.
    """
    initializers = {i.name for i in model.graph.initializer}
    layers = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers:
            layers.setdefault(node.input[1].removesuffix(".weight"), node.name)
    return layers


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


class Int8Quantizer:
    """onnxruntime static quantisation, QDQ format, per-channel int8 weights, uint8 activations; activation
    ranges from the calibration images by `method` (one of CALIBRATION_METHODS).

    Calibration runs once; its ranges are cached so each further graph (other layers kept in float, or
    one layer quantised alone) costs only the quantiser's pass, not another pass over the images. Use it
    as a context manager: it works in a temporary folder.
    """

    def __init__(self, fp32_path: Path, calibration: np.ndarray, method: str = "minmax"):
        self.fp32_path, self.calibration, self.method = fp32_path, calibration, method
        self._folder = tempfile.TemporaryDirectory()
        self._tmp = Path(self._folder.name)
        self.prepared = self._tmp / "prepared.onnx"
        self.cache = self._tmp / "ranges.json"

    def __enter__(self) -> "Int8Quantizer":
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(self.fp32_path), str(self.prepared), skip_symbolic_shape=True)
        self.model = onnx.load(self.prepared)
        return self

    def __exit__(self, *exc) -> None:
        self._folder.cleanup()

    def quantize(self, keep_float: list[str] = (), only: list[str] | None = None) -> onnx.ModelProto:
        """The int8 graph with the nodes `keep_float` left in float, or with only the nodes `only` quantised."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                   "entropy": CalibrationMethod.Entropy}
        reader = None if self.cache.is_file() else _CalibrationReader(self.model.graph.input[0].name,
                                                                      self.calibration)
        output = self._tmp / "int8.onnx"
        quantize_static(
            str(self.prepared), str(output), reader, quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=list(keep_float), nodes_to_quantize=list(only or []),
            calibrate_method=methods[self.method], calibration_cache_path=self.cache,
            extra_options={"CalibPercentile": 99.99} if self.method == "percentile" else {})
        return onnx.load(output)


def to_int8(fp32_path: Path, calibration: np.ndarray, keep_float: list[str],
            method: str = "minmax") -> onnx.ModelProto:
    """The int8 graph with the node groups `keep_float` (stem, classifier) left in float."""
    with Int8Quantizer(fp32_path, calibration, method) as quantizer:
        return quantizer.quantize(sensitive_nodes(quantizer.model, keep_float))


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


def _fp8_weights(graph: onnx.GraphProto, scales: dict[str, np.ndarray] | None, skip_nodes, only_nodes):
    """Each Conv/Gemm/MatMul weight to store as fp8 → (fp32 weight, e4m3 codes, per-channel scale, axis).

    Nodes in `skip_nodes` keep their weight in float; with `only_nodes`, every other node does too.
    """
    initializers = {init.name: init for init in graph.initializer}
    chosen: dict[str, tuple] = {}
    for node in graph.node:
        if len(node.input) < 2 or node.input[1] not in initializers or node.input[1] in chosen:
            continue
        if node.name in skip_nodes or (only_nodes is not None and node.name not in only_nodes):
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        axis = _weight_axis(node, weight.ndim)
        if axis is None or weight.dtype != np.float32:
            continue
        name = node.input[1]
        scale = (scales or {}).get(name, per_channel_scale(weight, axis)).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        chosen[name] = (weight, fp8_e4m3_bytes(weight / scale.reshape(shape)), scale, axis)
    return chosen


def to_fp8(fp32: onnx.ModelProto, scales: dict[str, np.ndarray] | None = None,
           keep_float: list[str] = ()) -> onnx.ModelProto:
    """Store Conv/Gemm/MatMul weights as FLOAT8E4M3FN with per-output-channel scales.

    Each weight becomes DequantizeLinear(w_fp8, scale, 0, axis) feeding the original consumer, so
    activations and arithmetic stay fp32: onnxruntime's CPU provider runs it (opset >= 19). `scales`
    (weight name → per-channel scale) replaces the amax/448 default, e.g. with fp8-trained scales.
    The nodes named in `keep_float` keep their fp32 weights.
    """
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    dequantize_nodes = []
    for name, (weight, codes, scale, axis) in _fp8_weights(graph, scales, set(keep_float), None).items():
        graph.initializer.remove(initializers[name])
        graph.initializer.extend([
            helper.make_tensor(f"{name}_fp8", TensorProto.FLOAT8E4M3FN, weight.shape, codes, raw=True),
            numpy_helper.from_array(scale, f"{name}_scale"),
            helper.make_tensor(f"{name}_zero", TensorProto.FLOAT8E4M3FN, scale.shape, bytes(len(scale)), raw=True)])
        dequantize_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_fp8", f"{name}_scale", f"{name}_zero"],
                                                 [name], name=f"{name}_dequantize", axis=axis))
    for position, node in enumerate(dequantize_nodes):
        graph.node.insert(position, node)
    log.info("fp8: %d weight tensors stored as float8 e4m3fn with per-channel scales%s", len(dequantize_nodes),
             f", {len(keep_float)} layers kept in float" if keep_float else "")
    return model


def fp8_as_fp32(fp32: onnx.ModelProto, scales: dict[str, np.ndarray] | None = None, keep_float: list[str] = (),
                only: list[str] | None = None) -> onnx.ModelProto:
    """The fp8 graph's arithmetic in an fp32 graph: each weight replaced by its fp8 value times its scale.

    DequantizeLinear computes exactly that product in float32, so the logits are those of `to_fp8`'s
    graph; onnxruntime runs this one at fp32 speed (the fp8 file dequantises every weight on every run,
    3x slower on CPU), which keeps the search for layers to leave in float cheap. With `only`, just those
    nodes' weights are rounded (one layer's sensitivity alone).
    """
    import torch

    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    initializers = {init.name: init for init in model.graph.initializer}
    chosen = _fp8_weights(model.graph, scales, set(keep_float), None if only is None else set(only))
    for name, (weight, codes, scale, axis) in chosen.items():
        shape = [1] * weight.ndim
        shape[axis] = -1
        values = torch.frombuffer(bytearray(codes), dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
        rounded = values.reshape(weight.shape) * scale.reshape(shape)
        initializers[name].CopyFrom(numpy_helper.from_array(rounded.astype(np.float32), name))
    return model
