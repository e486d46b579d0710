#!/usr/bin/env bash
# The whole pipeline on the embedded default dataset: real Fashion-MNIST from Debian's package.
# Each stage is one edgekd command; later stages (export, validate, classify) join as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
edgekd="${VENV:-.venv}/bin/edgekd"
scripts/ensure-fashion-mnist.sh

echo "== edgekd demo: real Fashion-MNIST (Debian's dataset-fashion-mnist), 28 px, quickstart recipes =="
echo "== 1/3 train the teacher =="
"$edgekd" train recipes/quickstart_teacher.yaml "$@"
echo "== 2/3 distill the student from it =="
"$edgekd" distill recipes/quickstart_student.yaml "$@"
echo "== 3/3 evaluate the student on Fashion-MNIST's test split =="
"$edgekd" evaluate --split test
