"""Export: a checkpoint → one self-describing ONNX file per precision (fp32, fp16, int8, fp8)."""

from edgekd.export.exporter import PRECISIONS, ExportedFile, ExportError, ExportPlan, export_checkpoint

__all__ = ["PRECISIONS", "ExportError", "ExportPlan", "ExportedFile", "export_checkpoint"]
