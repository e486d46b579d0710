import importlib.util
import itertools
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


@pytest.fixture(scope="module")
def exported_once(distilled_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("exported") / "tiny_student"
    run_dir.mkdir()
    shutil.copy(distilled_run / "best.pt", run_dir)
    export_checkpoint(ExportPlan(run_dir / "best.pt", ["int8"], run_dir / "exports", calibration_images=12))
    return run_dir


@pytest.fixture
def run_with_exports(exported_once, tmp_path):
    """A fresh copy of the exported run each test may change."""
    return shutil.copytree(exported_once, tmp_path / "tiny_student")


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


@pytest.mark.slow
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


# ----- honest measurements, exports that cannot stand for best.pt, reruns -------------------------------------

@pytest.fixture
def in_process(monkeypatch):
    """Rows measured in this process (the fresh-process path is covered above): a few seconds, not half a minute."""
    import edgekd.validate
    from edgekd.validate import checks
    from edgekd.validate.measure import measure

    threads = torch.get_num_threads()
    monkeypatch.setattr(edgekd.validate, "measure_in_fresh_process", measure)
    monkeypatch.setattr(checks, "machine_load", lambda: (0.0, 2))
    yield monkeypatch
    torch.set_num_threads(threads)


def _plan(run_dir, **kwargs):
    return ValidationPlan(run_dir, **{"providers": ["cpu"], "batch_sizes": [1], "latency_seconds": 0.02,
                                      "threads": 1, **kwargs})


def _jittering_clock():
    """Each call moves time on by the next step; one timed run in five takes 20 ms, the others 1 ms."""
    steps, now = iter(itertools.cycle([0.001, 0.001, 0.001, 0.001, 0.020])), [0.0]

    def clock():
        now[0] += next(steps)
        return now[0]
    return clock


def test_a_pytorch_row_timed_by_a_jittering_clock_is_warned_as_noisy(run_with_exports, in_process):
    import edgekd.validate
    measure_module = importlib.import_module("edgekd.validate.measure")

    def measure_pytorch_with_fake_clock(variant, settings):
        if variant.kind != "pytorch":
            return measure_module.measure(variant, settings)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(measure_module, "clock", _jittering_clock())
            return measure_module.measure(variant, settings)

    in_process.setattr(edgekd.validate, "measure_in_fresh_process", measure_pytorch_with_fake_clock)
    result = validate_run(_plan(run_with_exports, latency_seconds=0.5))
    pytorch = result.rows[0]
    assert pytorch["variant"] == "pytorch fp32 · cpu"
    timing = pytorch["latency"]["1"]
    # timed for the same --latency-seconds as every row, after its warm-up: not a fixed 10 runs
    assert timing["runs"] > 30 and timing["warmup_runs"] >= 3
    assert timing["p50_ms"] == pytest.approx(1.0) and timing["p90_ms"] == pytest.approx(20.0)
    noisy = [w for w in result.warnings if w.startswith("wide latency spread (p90 over twice p50)")]
    assert noisy and "pytorch fp32 · cpu (b1 p90 20.0x p50)" in noisy[0] and "--latency-seconds" in noisy[0]
    assert not any("machine was busy" in w for w in result.warnings)


def test_a_busy_machine_and_a_wide_spread_are_warned():
    from edgekd.validate.checks import timing_warnings

    steady = {"variant": "int8 · cpu", "latency": {"1": {"p50_ms": 2.0, "p90_ms": 2.5}}}
    noisy = {"variant": "pytorch fp32 · cpu", "latency": {"1": {"p50_ms": 8.0, "p90_ms": 704.0}}}
    assert timing_warnings([steady], 1.0, 2) == []
    warnings = timing_warnings([steady, noisy], 5.3, 2)
    assert warnings[0].startswith("the machine was busy while measuring (load average 5.3 on 2 cores)")
    assert warnings[1] == ("wide latency spread (p90 over twice p50) in 1 of 2 rows: pytorch fp32 · cpu (b1 p90 "
                           "88.0x p50): those p50s are no steady numbers; rerun on an idle machine or with a longer "
                           "--latency-seconds") and len(warnings) == 2


def test_a_gate_finer_than_one_image_says_so_on_a_45_image_split(run_with_exports, in_process):
    from edgekd.validate.checks import resolution_warning

    drops = {"fp32": 0.1, "fp16": 0.1, "int8": 0.5, "fp8": 0.5}
    warning = resolution_warning(45, "val", drops, ["int8"])
    assert warning.startswith("one image of the 45 in the val split is 2.22 points, more than the gate's max "
                              "drop (int8 0.5 points)")
    assert resolution_warning(1000, "test", drops, ["int8"]) is None  # 0.1 points per image resolves 0.5
    result = validate_run(_plan(run_with_exports))  # 18 images here: 5.56 points each
    assert any(w.startswith("one image of the 18 in the val split is 5.56 points") and "fp32 0.1, int8 0.5" in w
               for w in result.warnings)


def _set_metadata(path, **values):
    model = onnx.load(path)
    for prop in model.metadata_props:
        if prop.key in values:
            prop.value = values[prop.key]
    onnx.save(model, path)


def _fixed_input_size(path, size):
    model = onnx.load(path)
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = size
    for prop in model.metadata_props:
        prop.value = str(size) if prop.key == "image_size" else prop.value
    onnx.save(model, path)


@pytest.mark.parametrize("damage, named", [
    (lambda p: _set_metadata(p, class_names=json.dumps(["buildings", "forest"])),
     "its metadata does not fit its graph: it lists 2 classes, the graph outputs 3"),
    (lambda p: _set_metadata(p, checkpoint_sha256="0" * 64), "made from another checkpoint: its checkpoint_sha256"),
    (lambda p: _fixed_input_size(p, 32), "cannot run on this run's images: it takes 32 px images, the run's are 16 px"),
])
def test_an_export_that_cannot_stand_for_best_pt_fails_and_says_which_way(run_with_exports, in_process, damage,
                                                                           named):
    damage(run_with_exports / "exports" / "tiny_student.fp32.onnx")
    result = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu", "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert f"FAIL      tiny_student.fp32.onnx: {named}" in result.output
    assert "every variant is within its thresholds" not in result.output
    assert "accuracy drop" not in result.output and "FAIL      int8 · cpu" not in result.output
    saved = json.loads((run_with_exports / "validation.json").read_text())
    assert saved["rejected"][0]["file"] == "tiny_student.fp32.onnx" and named in saved["rejected"][0]["reasons"][0]
    assert [r["variant"] for r in saved["rows"]][2:] == ["int8 · cpu"]  # the sound export is still measured


def test_a_file_onnxruntime_cannot_run_on_the_runs_images_fails_rather_than_skips(run_with_exports, in_process):
    path = run_with_exports / "exports" / "tiny_student.fp32.onnx"
    model = onnx.load(path)  # a Reshape to a shape only a batch of exactly 7 fits: loads, but cannot run
    logits = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_raw" if o == logits else o for o in node.output]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([7, -1], np.int64), "seven"))
    model.graph.node.append(onnx.helper.make_node("Reshape", [f"{logits}_raw", "seven"], [logits]))
    onnx.save(model, path)
    result = validate_run(_plan(run_with_exports))
    reasons = result.failures["tiny_student.fp32.onnx"]
    assert reasons[0].startswith("cannot run on this run's images: onnxruntime cannot run it on one of them")
    assert "fp32 · cpu" not in [s["variant"] for s in result.skipped]
    assert [r["variant"] for r in result.rows][2:] == ["int8 · cpu"]


def test_a_row_that_fails_on_onnxruntimes_cpu_provider_fails_rather_than_skips(run_with_exports, in_process):
    path = run_with_exports / "exports" / "tiny_student.fp32.onnx"
    model = onnx.load(path)  # a Reshape that fits a batch of one image only: the dry run passes, batch 4 cannot
    logits = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_raw" if o == logits else o for o in node.output]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 3], np.int64), "one"))
    model.graph.node.append(onnx.helper.make_node("Reshape", [f"{logits}_raw", "one"], [logits]))
    onnx.save(model, path)
    result = validate_run(_plan(run_with_exports, batch_sizes=[1, 4]))
    assert result.failures["fp32 · cpu"][0].startswith("cannot run on this run's images: onnxruntime cannot run it")
    assert "fp32 · cpu" not in [s["variant"] for s in result.skipped]


def test_a_named_pipe_in_exports_or_as_best_pt_is_refused_without_opening_it(run_with_exports, in_process):
    import os
    import threading

    os.mkfifo(run_with_exports / "exports" / "pipe.fp32.onnx")

    def invoke():
        outcome.append(CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu"]))

    outcome = []
    worker = threading.Thread(target=invoke, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "validate hung on a named pipe"
    result = outcome[0]
    assert result.exit_code == 1 and "FAIL      pipe.fp32.onnx: cannot run on this run's images: it is a named pipe" \
        in result.output and "Traceback" not in result.output
    (run_with_exports / "exports" / "pipe.fp32.onnx").unlink()
    (run_with_exports / "best.pt").rename(run_with_exports / "real.pt")
    os.mkfifo(run_with_exports / "best.pt")
    result = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST])
    assert result.exit_code == 1 and "best.pt is a named pipe, not a file" in result.output


def test_a_rerun_with_one_provider_keeps_the_other_providers_rows(run_with_exports, in_process):
    import dataclasses

    import edgekd.runtime.session
    measure_module = importlib.import_module("edgekd.validate.measure")

    def as_if_cuda(variant, settings):  # this machine has no CUDA: its rows are measured on CPU, named cuda
        return measure_module.measure(dataclasses.replace(variant, provider="cpu"), settings)

    real = edgekd.runtime.session.available_providers
    in_process.setattr(edgekd.runtime.session, "available_providers", lambda: ["cpu", "cuda"])
    in_process.setattr("edgekd.validate.measure_in_fresh_process", as_if_cuda)
    first = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu,cuda"])
    assert first.exit_code == 0, first.output
    in_process.setattr(edgekd.runtime.session, "available_providers", real)
    in_process.setattr("edgekd.validate.measure_in_fresh_process", measure_module.measure)
    second = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu"])
    assert second.exit_code == 0, second.output
    saved = json.loads((run_with_exports / "validation.json").read_text())
    rows = {r["variant"]: r for r in saved["rows"]}
    assert {"fp32 · cuda", "int8 · cuda", "fp32 · cpu", "int8 · cpu"} <= set(rows)
    assert rows["fp32 · cuda"]["kept_from_earlier"] and not rows["fp32 · cpu"].get("kept_from_earlier")
    assert "kept 2 earlier row(s) this run did not measure again" in second.output
    assert "fp32 · cuda, int8 · cuda" in second.output
    assert "ok (earlier," in second.output


def test_earlier_results_on_another_checkpoint_are_kept_beside_and_damaged_ones_too(run_with_exports, in_process):
    first = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu"])
    assert first.exit_code == 0, first.output
    path = run_with_exports / "validation.json"
    earlier = json.loads(path.read_text())
    earlier["settings"]["checkpoint_sha256"] = "f" * 64
    earlier["rows"].append({**earlier["rows"][-1], "variant": "int8 · openvino cpu"})  # one this rerun lacks
    path.write_text(json.dumps(earlier))
    second = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu"])
    assert second.exit_code == 0, second.output
    beside = sorted(p.name for p in run_with_exports.glob("validation.*.json"))
    assert len(beside) == 1 and "earlier results kept beside (another best.pt)" in second.output
    assert json.loads((run_with_exports / beside[0]).read_text()) == earlier
    assert "int8 · openvino cpu" not in path.read_text()
    path.write_text(json.dumps([1, 2]))  # valid JSON, the wrong shape
    third = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--providers", "cpu"])
    assert third.exit_code == 0 and "Traceback" not in third.output, third.output
    damaged = list(run_with_exports.glob("validation.damaged-*.json"))
    assert len(damaged) == 1 and json.loads(damaged[0].read_text()) == [1, 2]
    assert json.loads(path.read_text())["rows"]


def test_the_plot_labels_never_overlap_and_the_exports_set_its_range():
    from types import SimpleNamespace

    from edgekd.validate.report import figure

    def row(variant, runtime, ms, acc):
        return {"variant": variant, "runtime": runtime, "file_mb": 1.0, "accuracy": acc,
                "latency": {"1": {"p50_ms": ms}}}

    rows = [row("pytorch fp32 · cpu", "PyTorch eager", 704.0, 0.90), row("teacher pytorch fp32 · cpu",
            "PyTorch eager", 2000.0, 0.97)]
    rows += [row(f"{p} · {where}", "onnxruntime", 1.0 + 0.01 * i, 0.90 - 0.0005 * i)
             for i, (p, where) in enumerate((p, w) for p in ("fp32", "fp16", "int8", "fp8")
                                            for w in ("cpu", "cuda", "openvino cpu"))]
    validation = SimpleNamespace(rows=rows, failures={}, split="val", settings={"batch_sizes": [1]})
    fig = figure(validation)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 12  # every export labelled, each once
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    low, high = ax.get_xlim()
    assert high < 100 and ax.get_ylim()[1] < 95  # neither PyTorch's 704 ms nor the teacher's 97 % stretch it
    assert any("off the chart: pytorch fp32 · cpu: 90.00% at 704.00 ms" in t.get_text() for t in fig.texts)


def test_a_dataset_that_moved_gets_a_hint_validate_can_follow(run_with_exports, tmp_path):
    result = CliRunner().invoke(cli, ["validate", str(run_with_exports), *FAST, "--data", str(tmp_path / "gone")])
    assert result.exit_code == 1 and "does not exist" in result.output, result.output
    assert "--set" not in result.output and "point --data at it: edgekd validate RUN --data DIR" in result.output
