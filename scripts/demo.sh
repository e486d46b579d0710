#!/usr/bin/env bash
# The whole pipeline on the embedded default dataset: real Fashion-MNIST from Debian's package.
# Each stage is one edgekd command.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
edgekd="$venv/bin/edgekd"
scripts/ensure-fashion-mnist.sh

echo "== edgekd demo: real Fashion-MNIST (Debian's dataset-fashion-mnist), 28 px, quickstart recipes =="
echo "== 1/6 train the teacher =="
"$edgekd" train recipes/quickstart_teacher.yaml "$@"
echo "== 2/6 distill the student from it =="
"$edgekd" distill recipes/quickstart_student.yaml "$@"
echo "== 3/6 evaluate the student on Fashion-MNIST's test split =="
"$edgekd" evaluate --split test
echo "== 4/6 export the student to ONNX: fp32 and int8 =="
"$edgekd" export --int8
echo "== 5/6 validate both files against PyTorch: accuracy, agreement, latency (a gate) =="
"$edgekd" validate --providers cpu,openvino --latency-seconds 1
echo "== 6/6 classify real test photos with the int8 file (onnxruntime, no torch) =="
photos=artifacts/demo-photos
"$venv/bin/python" scripts/fashion_mnist_photos.py "$photos"
"$edgekd" classify "$photos"
