"""Torch-free code a device needs: image decoding and preprocessing, onnxruntime sessions, OpenVINO on the CPU."""
