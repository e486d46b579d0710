"""scripts/gpu-check.sh in its CPU form, end to end: the doctor, the full smoke, the paper's setting at toy sizes.

This is the one test that runs every smoke row this machine offers (each in its own process), so it is
the slowest of the doctor's tests (about 2-3 minutes on 2 busy cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("EDGEKD_GPU_CHECK_DATA", REPO.parent / "shared" / "datasets" / "intel-sample"))
if not (SAMPLE / "train").is_dir():  # a checkout beside /work/shared, as in this workspace
    SAMPLE = Path("/work/shared/datasets/intel-sample")


@pytest.mark.slow
@pytest.mark.skipif(not (SAMPLE / "train").is_dir(), reason="the Intel sample is not on this machine")
def test_gpu_check_cpu_form_runs_end_to_end_and_prints_its_table(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "EDGEKD_GPU_CHECK_DATA": str(SAMPLE)}
    started = time.perf_counter()
    done = subprocess.run([str(REPO / "scripts" / "gpu-check.sh"), "--cpu", "--out", str(out)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "## doctor --smoke" in done.stdout and "## the paper's setting" in done.stdout
    assert (out / "summary.md").read_text() in done.stdout
    doctor = json.loads((out / "doctor.json").read_text())
    assert doctor["cpu"]["logical_cores"] >= 1

    rows = json.loads((out / "smoke" / "smoke.json").read_text())
    cpu_rows = [row for row in rows if "cuda" not in row["name"].lower() and "tensorrt" not in row["name"]]
    assert cpu_rows and all(row["status"] == "ok" for row in cpu_rows), [r for r in cpu_rows if r["status"] != "ok"]
    names = {row["name"] for row in rows}
    assert {f"train {p} on cpu" for p in ("fp32", "bf16", "fp16", "fp8")} <= names
    assert {f"export {p}" for p in ("fp32", "fp16", "int8", "fp8")} <= names
    assert "torchrun: 2 gloo processes (CPU)" in names and any("teacher fill" in name for name in names)

    paper = json.loads((out / "paper" / "paper_setting.json").read_text())
    labels = {row["precision"]: row["label"] for row in paper["throughput"]}
    assert labels == {"fp32": "native", "fp16": "simulated", "fp8": "simulated"}
    assert all(row["images_per_s"] > 0 for row in paper["throughput"])
    assert "error" not in paper["teacher_fill"] and paper["teacher_fill"]["photos"] > 0
    print(f"gpu-check CPU form: {time.perf_counter() - started:.0f} s in all (the smoke's own limit is 240 s)")


def test_gpu_check_refuses_a_missing_data_folder(tmp_path):
    done = subprocess.run([str(REPO / "scripts" / "gpu-check.sh"), "--cpu", "--data", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and "no Intel sample" in done.stderr
