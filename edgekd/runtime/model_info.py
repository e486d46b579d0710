"""What an exported edgekd .onnx file says about itself (its metadata_props), readable without torch.

The export writes these keys; classify and validate read them back. The model takes RGB pixels in
[0, 255] as float32 NCHW, resized with `resize` to `image_size`; normalisation is inside the graph.
"""

from __future__ import annotations

import json
import math
import unicodedata
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
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
NORMALIZATIONS = ("in-graph",)
# The recipe's bound on data.image_size: no edgekd export is larger, and a tampered size (20000 px) would
# allocate gigabytes per photo before the graph check could refuse it.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 1, 2048
MAX_CLASSES, MAX_NAME_LENGTH = 100_000, 200
# Unicode categories a class name may not hold: controls (newline, tab, escape), format characters (bidi
# overrides, zero-width), line and paragraph separators, surrogates, private-use and unassigned code points.
_UNSHOWN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def model_info_from_metadata(metadata: dict[str, str], source: str = "model") -> ModelInfo:
    """The metadata checked for type and range, field by field: bad metadata names its field."""
    if metadata.get("edgekd_format") != FORMAT:
        raise NotAnEdgekdModel(f"{source} is not an edgekd export (no '{FORMAT}' metadata): its classes and "
                               f"preprocessing are unknown; export one with `edgekd export`")
    missing = [k for k in _CORE if k not in metadata]
    if missing:
        raise NotAnEdgekdModel(f"{source}: damaged edgekd metadata: {', '.join(missing)} missing")
    try:
        return ModelInfo(_class_names(metadata["class_names"]), _image_size(metadata["image_size"]),
                         _channel_values(metadata["mean"], "mean"), _channel_values(metadata["std"], "std"),
                         metadata["resize"], _one_of(metadata["normalization"], "normalization", NORMALIZATIONS),
                         _input_name(metadata["input_name"]), _one_of(metadata["precision"], "precision", PRECISIONS),
                         {k: v for k, v in metadata.items() if k not in (*_CORE, "edgekd_format")})
    except _BadField as exc:
        raise NotAnEdgekdModel(f"{source}: damaged edgekd metadata: {exc}") from None


class _BadField(ValueError):
    pass


def _json(text: str, field: str):
    try:
        return json.loads(text)
    except ValueError:
        raise _BadField(f"{field} is not JSON ({_shown(text)})") from None


def _shown(value) -> str:
    """A value for an error message: short and on one line, whatever it holds."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _class_names(text: str) -> list[str]:
    names = _json(text, "class_names")
    if not isinstance(names, list) or not names:
        raise _BadField(f"class_names must be a non-empty JSON list of strings, not {_shown(names)}")
    if len(names) > MAX_CLASSES:
        raise _BadField(f"class_names lists {len(names)} classes (at most {MAX_CLASSES})")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise _BadField(f"class_names[{i}] must be a non-empty string, not {_shown(name)}")
        # a newline or tab would forge output lines and columns, a bidi override reorder them on screen
        if len(name) > MAX_NAME_LENGTH or any(unicodedata.category(ch) in _UNSHOWN for ch in name):
            raise _BadField(f"class_names[{i}] {_shown(name)} holds control or invisible characters or is over "
                            f"{MAX_NAME_LENGTH} characters")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _BadField(f"class_names lists {_shown(duplicates[0])} more than once")
    return names


def _image_size(text: str) -> int:
    try:
        size = int(text.strip())
    except ValueError:
        raise _BadField(f"image_size must be a whole number of pixels, not {_shown(text)}") from None
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise _BadField(f"image_size {size} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px")
    return size


def _channel_values(text: str, field: str) -> list[float]:
    values = _json(text, field)
    if (not isinstance(values, list) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise _BadField(f"{field} must be a list of 3 numbers (R, G, B), not {_shown(values)}")
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values) or (field == "std" and min(values) <= 0):
        raise _BadField(f"{field} {values} must be finite{' and positive' if field == 'std' else ''}")
    return values


def _one_of(value: str, field: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _BadField(f"{field} {_shown(value)} is not one of {', '.join(allowed)} (a newer edgekd's file?)")
    return value


def _input_name(value: str) -> str:
    if not value:
        raise _BadField("input_name is empty")
    return value
