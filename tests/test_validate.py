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
    assert "| variant |" in (run_with_exports / "validation.md").read_text()
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
