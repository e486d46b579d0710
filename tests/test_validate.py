import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgekd.cli import cli
from edgekd.export import ExportPlan, export_checkpoint
from edgekd.runtime.preprocess import load_rgb
from edgekd.runtime.session import open_session, run_logits
from edgekd.train.checkpoint import load_model
from edgekd.validate import ValidationPlan, validate_run

FAST = ["--latency-seconds", "0.05", "--batch", "1,4"]
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")


@pytest.fixture
def run_with_exports(distilled_run, tmp_path):
    run_dir = tmp_path / "tiny_student"
    run_dir.mkdir()
    shutil.copy(distilled_run / "best.pt", run_dir)
    export_checkpoint(ExportPlan(run_dir / "best.pt", ["int8"], run_dir / "exports", calibration_images=12))
    return run_dir


def test_every_variant_gets_every_column_and_missing_providers_are_listed(run_with_exports):
    result = validate_run(ValidationPlan(run_with_exports, providers=["cpu", "cuda"], batch_sizes=[1, 4],
                                         latency_seconds=0.05))
    assert [r["variant"] for r in result.rows] == ["pytorch fp32 · cpu", "teacher pytorch fp32 · cpu", "fp32 · cpu",
                                                   "int8 · cpu"]
    assert [r["gated"] for r in result.rows] == [False, False, True, True]  # reference and teacher: context
    assert [s["variant"] for s in result.skipped] == ["fp32 · cuda", "int8 · cuda"]
    assert "no cuda provider" in result.skipped[0]["reason"]
    for row in result.rows:
        for key in ("accuracy", "accuracy_change_pts", "agreement", "max_abs_dprob", "mean_abs_dprob",
                    "worst_class", "load_seconds", "peak_memory_mb", "file_mb"):
            assert key in row, key
        for batch in ("1", "4"):
            latency = row["latency"][batch]
            assert 0 < latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"] and latency["images_per_s"] > 0
    fp32 = result.rows[2]
    assert fp32["agreement"] == 1.0 and fp32["max_abs_dprob"] < 1e-4
    assert result.split == "val" and result.images == 18
    assert result.device["cpu"] and result.device["physical_cores"] >= 1
    assert result.device["onnxruntime"] and result.settings["threads"] >= 1


def test_cli_writes_json_markdown_and_a_plot(run_with_exports):
    result = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu"])
    assert result.exit_code == 0, result.output
    assert "every variant is within its thresholds" in result.output
    report = json.loads((run_with_exports / "validation.json").read_text())
    assert len(report["rows"]) == 4 and report["device"]["cpu"]
    markdown = (run_with_exports / "validation.md").read_text()
    assert "| variant |" in markdown and "| max\\|Δp\\| |" in markdown  # a pipe in a header is escaped
    with Image.open(run_with_exports / "validation.png") as png:
        assert png.size[0] > 300 and png.mode in ("RGB", "RGBA")


def test_a_damaged_export_fails_the_gate_and_is_named(run_with_exports):
    path = run_with_exports / "exports" / "tiny_student.fp32.onnx"
    model = onnx.load(path)
    for init in model.graph.initializer:  # weights scaled by 0
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 4:
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(init)), init.name))
    onnx.save(model, path)
    result = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu"])
    assert result.exit_code == 1
    assert "FAIL      fp32 · cpu:" in result.output and "agreement" in result.output
    assert "FAIL      int8 · cpu" not in result.output


def test_pytorch_and_onnxruntime_see_the_same_preprocessed_photo(run_with_exports, tmp_path):
    model, payload = load_model(run_with_exports / "best.pt")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)).save(photo)
    pixels = load_rgb(photo, payload["image_size"])[None]  # the one decode/resize path, numpy + Pillow
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    onnx_logits = run_logits(open_session(run_with_exports / "exports" / "tiny_student.fp32.onnx"), pixels)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=0)


def test_a_teacher_at_another_resolution_is_measured_on_its_own_size_of_the_same_photos(tmp_path, image_dataset):
    from conftest import write_recipe
    from edgekd.data import open_dataset
    from edgekd.recipe import load_recipe
    from edgekd.train.checkpoint import read_checkpoint
    from edgekd.train.trainer import run
    from edgekd.validate import TEACHER_ROW, _pytorch_variants, _teacher_at_its_size

    teacher = write_recipe(tmp_path / "big.yaml", image_dataset, data={"image_size": 32}, train={"epochs": 1})
    run(load_recipe(teacher), "train", tmp_path / "artifacts")
    student = write_recipe(tmp_path / "small.yaml", image_dataset, model={"blocks": 1}, train={"epochs": 1},
                           teacher={"checkpoint": str(tmp_path / "artifacts" / "big" / "best.pt")})
    run(load_recipe(student), "distill", tmp_path / "artifacts")
    checkpoint = tmp_path / "artifacts" / "small" / "best.pt"
    payload = read_checkpoint(checkpoint)
    variants = _pytorch_variants(checkpoint, payload["teacher"], cuda=False)
    _teacher_at_its_size(variants, payload, ValidationPlan(checkpoint.parent), "val", 18, tmp_path)
    teacher_row = next(v for v in variants if v.name == TEACHER_ROW)
    expected = open_dataset(load_recipe(teacher).data, splits=("val",)).splits["val"]
    np.testing.assert_array_equal(np.load(teacher_row.pixels_file), expected.take(np.arange(len(expected)))[0])
    assert variants[0].pixels_file is None  # the student keeps the shared 16 px images


def _fake_openvino(folder, body: str) -> None:
    """An `openvino` package that shadows the real one; spawned children inherit sys.path, so it reaches them."""
    (folder / "openvino").mkdir(parents=True)
    (folder / "openvino" / "__init__.py").write_text(body)


@needs_openvino
def test_openvino_rows_agree_with_onnxruntime_on_the_same_file(run_with_exports):
    result = validate_run(ValidationPlan(run_with_exports, providers=["cpu", "openvino"], batch_sizes=[1, 4],
                                         latency_seconds=0.05))
    rows = {r["variant"]: r for r in result.rows}
    assert list(rows)[2:] == ["fp32 · cpu", "fp32 · openvino cpu", "int8 · cpu", "int8 · openvino cpu"]
    assert result.skipped == [] and result.failures == {}
    for precision in ("fp32", "int8"):
        openvino, onnxruntime = rows[f"{precision} · openvino cpu"], rows[f"{precision} · cpu"]
        assert openvino["runtime"] == "OpenVINO" and openvino["gated"] and openvino["file"] == onnxruntime["file"]
        assert abs(openvino["accuracy"] - onnxruntime["accuracy"]) * 100 <= result.gate["max_drop_pts"][precision]
        assert openvino["runtime_settings"] == {"threads": result.settings["threads"], "inference_precision": "f32"}
        for batch in ("1", "4"):  # the dynamic batch dimension runs at every timed size
            assert 0 < openvino["latency"][batch]["p50_ms"] <= openvino["latency"][batch]["p99_ms"]
        assert openvino["load_seconds"] > 0 and openvino["peak_memory_mb"] >= 0
    assert rows["fp32 · openvino cpu"]["agreement"] == 1.0 and rows["fp32 · openvino cpu"]["max_abs_dprob"] < 1e-4
    assert result.device["openvino"]


@needs_openvino
def test_a_file_openvino_cannot_load_is_a_skipped_row_and_the_run_goes_on(run_with_exports):
    path = run_with_exports / "exports" / "tiny_student.fp32.onnx"
    model = onnx.load(path)  # logits through ai.onnx.ml.Scaler (identity): onnxruntime runs it, OpenVINO cannot
    logits = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_raw" if o == logits else o for o in node.output]
    model.graph.node.append(onnx.helper.make_node("Scaler", [f"{logits}_raw"], [logits], domain="ai.onnx.ml",
                                                  offset=[0.0], scale=[1.0]))
    model.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 3))
    onnx.save(model, path)
    result = validate_run(ValidationPlan(run_with_exports, providers=["openvino"], batch_sizes=[1],
                                         latency_seconds=0.05))
    assert [r["variant"] for r in result.rows][2:] == ["int8 · openvino cpu"]
    assert [s["variant"] for s in result.skipped] == ["fp32 · openvino cpu"]
    assert result.skipped[0]["file"] == path.name
    assert "OpenVINO cannot load it" in result.skipped[0]["reason"] and "Scaler" in result.skipped[0]["reason"]
    assert result.failures == {}


def test_openvino_rows_say_skipped_and_why_when_it_cannot_be_imported(run_with_exports, tmp_path, monkeypatch):
    from edgekd.validate import _onnx_variants

    _fake_openvino(tmp_path / "fake", "raise ModuleNotFoundError(\"No module named 'openvino'\", name='openvino')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    variants, skipped = _onnx_variants(ValidationPlan(run_with_exports, providers=["cpu", "openvino"]))
    assert [v.name for v in variants] == ["fp32 · cpu", "int8 · cpu"]
    assert [s["variant"] for s in skipped] == ["fp32 · openvino cpu", "int8 · openvino cpu"]
    assert all(s["reason"] == "openvino is not installed (pip install 'edgekd[validate]')" for s in skipped)


def test_a_runtime_that_kills_its_process_on_a_file_gives_a_skipped_row(run_with_exports, tmp_path, monkeypatch):
    from edgekd.validate import Settings, Variant, _measure_or_skip

    _fake_openvino(tmp_path / "fake", "import os\n\nclass Core:\n    def read_model(self, path):\n"
                                      "        os._exit(134)  # as a native abort would\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    np.save(tmp_path / "pixels.npy", np.zeros((2, 16, 16, 3), np.uint8))
    path = run_with_exports / "exports" / "tiny_student.fp32.onnx"
    variant = Variant("fp32 · openvino cpu", "onnx", str(path), "fp32", "openvino", path.stat().st_size)
    assert _measure_or_skip(variant, Settings(str(tmp_path / "pixels.npy"), [1], 1, 0.01)) == (
        None, "OpenVINO crashed its process loading or running it")
