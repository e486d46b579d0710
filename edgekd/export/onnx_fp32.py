"""The fp32 ONNX graph every other precision derives from: exported, checked, compared with PyTorch."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import onnx
import torch

log = logging.getLogger(__name__)

OPSET = 21  # fp8 DequantizeLinear needs >= 19; one opset for every precision keeps the graphs comparable
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


def export_fp32(model: torch.nn.Module, image_size: int) -> tuple[onnx.ModelProto, str]:
    """Export with the dynamo exporter, or the TorchScript exporter when it fails (the reason is logged)."""
    model = model.eval().float()
    example = torch.zeros(2, 3, image_size, image_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}},
                opset_version=OPSET, external_data=False, optimize=True, verbose=False)
        proto = program.model_proto
        exporter = f"torch.onnx dynamo (torch {torch.__version__})"
    except Exception as exc:  # the dynamo exporter fails on graphs it cannot trace; say why and fall back
        log.warning("dynamo exporter failed (%s: %s); using the TorchScript exporter", exc.__class__.__name__, exc)
        buffer = io.BytesIO()
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=min(OPSET, 20),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load_from_string(buffer.getvalue())
        exporter = f"torch.onnx TorchScript (torch {torch.__version__})"
    strip_debug_info(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto, exporter


def strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and doc strings: they can outweigh a small model's
    weights and would leak the build machine's source paths into a file that ships to devices."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    proto.graph.doc_string = ""
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        del value.metadata_props[:]
        value.doc_string = ""


def opset_of(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@torch.no_grad()
def torch_logits(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    """PyTorch fp32 logits for (N, H, W, 3) uint8 images, in batches."""
    model = model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(pixels[i:i + 64])).permute(0, 3, 1, 2).float()).numpy()
           for i in range(0, len(pixels), 64)]
    return np.concatenate(out)
