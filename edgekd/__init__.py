"""edgekd: teacher → distilled student → ONNX → validated → classified on the device."""

__version__ = "0.1.0"
