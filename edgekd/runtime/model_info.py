"""What an exported edgekd .onnx file says about itself (its metadata_props), readable without torch.

The export writes these keys; classify and validate read them back. The model takes RGB pixels in
[0, 255] as float32 NCHW, resized with `resize` to `image_size`; normalisation is inside the graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

FORMAT = "edgekd.onnx/1"


class NotAnEdgekdModel(ValueError):
    """An .onnx file without edgekd's metadata: classes and preprocessing are unknown."""


@dataclass
class ModelInfo:
    class_names: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    resize: str
    normalization: str  # "in-graph": feed raw 0-255 pixels
    input_name: str
    precision: str
    extra: dict[str, str]  # everything else (provenance: checkpoint hash, recipe, exporter, opset, ...)

    def to_metadata(self) -> dict[str, str]:
        return {"edgekd_format": FORMAT, "class_names": json.dumps(self.class_names),
                "image_size": str(self.image_size), "mean": json.dumps(self.mean), "std": json.dumps(self.std),
                "resize": self.resize, "normalization": self.normalization, "input_name": self.input_name,
                "input_format": "RGB pixels 0-255, float32, NCHW", "precision": self.precision, **self.extra}


_CORE = ("class_names", "image_size", "mean", "std", "resize", "normalization", "input_name", "precision")


def model_info_from_metadata(metadata: dict[str, str], source: str = "model") -> ModelInfo:
    if metadata.get("edgekd_format") != FORMAT:
        raise NotAnEdgekdModel(f"{source} is not an edgekd export (no '{FORMAT}' metadata): its classes and "
                               f"preprocessing are unknown; export one with `edgekd export`")
    try:
        values = {k: metadata[k] for k in _CORE}
        info = ModelInfo(json.loads(values["class_names"]), int(values["image_size"]), json.loads(values["mean"]),
                         json.loads(values["std"]), values["resize"], values["normalization"], values["input_name"],
                         values["precision"], {k: v for k, v in metadata.items() if k not in (*_CORE, "edgekd_format")})
    except (KeyError, ValueError, TypeError) as exc:
        raise NotAnEdgekdModel(f"{source}: damaged edgekd metadata ({exc.__class__.__name__}: {exc})") from exc
    if not info.class_names or info.image_size < 1 or len(info.mean) != 3 or len(info.std) != 3:
        raise NotAnEdgekdModel(f"{source}: damaged edgekd metadata (classes, image size or mean/std)")
    return info
