import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import make_image_folder, write_recipe
from PIL import Image

from edgekd.cli import cli
from edgekd.errors import EdgekdError
from edgekd.evaluate import evaluate_checkpoint
from edgekd.report import paper, write_report
from edgekd.report.collect import Collection, RunRecord, collect
from edgekd.report.tables import build_tables
from edgekd.sweep import SweepPlan, run_sweep


# Generated images under Intel Image Classification's six class names: the paper's reference columns belong
# beside runs on its dataset only.
INTEL_COLOURS = {"buildings": (200, 60, 60), "forest": (40, 180, 60), "glacier": (220, 220, 240),
                 "mountain": (120, 100, 80), "sea": (50, 80, 210), "street": (90, 90, 90)}
INTEL_CLASSES = sorted(INTEL_COLOURS)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A teacher (3 blocks) with an fp16 run, two students (2 and 1 blocks) with no-KD baselines, an fp8 run
    of the 2-block student: every table has rows. Two epochs each at 16 px on generated colour images."""
    base = tmp_path_factory.mktemp("sweep")
    root = make_image_folder(base / "colours" / "train", per_class=8, seed=1, classes=INTEL_COLOURS).parent
    make_image_folder(root / "val", per_class=3, seed=2, classes=INTEL_COLOURS)
    common = {"data": {"cache_dir": str(base / "cache")}}
    write_recipe(base / "t.yaml", root, model={"blocks": 3}, **common)
    for name, blocks in (("s2", 2), ("s1", 1)):
        write_recipe(base / f"{name}.yaml", root, model={"blocks": blocks}, distill={"temperature": 2.0}, **common)
    (base / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "teacher": "t.yaml", "students": ["s2.yaml", "s1.yaml"],
        "precisions": {"t.yaml": ["fp16"], "s2.yaml": ["fp8"]}}))
    run_sweep(SweepPlan(base / "sweep.yaml", ["train.epochs=2"], base / "artifacts"))
    for student in ("s2", "s2_fp8", "s1"):  # the confusion matrices' evaluations, which copies keep
        evaluation = evaluate_checkpoint(base / "artifacts" / "tiny" / student / "best.pt", "val")
        (base / "artifacts" / "tiny" / student / "eval_val.json").write_text(json.dumps(evaluation.to_dict()))
    return base / "artifacts" / "tiny"


@pytest.fixture
def sweep_dir(finished_sweep, tmp_path):
    """A copy each test may change."""
    return shutil.copytree(finished_sweep, tmp_path / "tiny")


def table(report, key):
    return next(t for t in report.tables if t.key == key)


def tables(*paths):
    return {t.key: t for t in build_tables(collect(list(paths)))}


def test_the_four_tables_have_the_papers_shape_and_the_right_rows(sweep_dir):
    report = write_report([sweep_dir]).report
    assert [t.key for t in report.tables] == ["I", "II", "III", "IV"]
    assert [r["run"] for r in table(report, "I").rows] == ["t"]
    assert [r["run"] for r in table(report, "II").rows] == ["s2", "s1"]  # by parameters, largest first
    assert [r["run"] for r in table(report, "III").rows] == ["t", "t_fp16"]
    assert [r["run"] for r in table(report, "IV").rows] == ["s2", "s2_fp8"]
    for t in report.tables:
        headers = [c.header for c in t.columns]
        assert {"best acc %", "last acc %", "s/epoch", "ONNX MB", "ORT cpu b1 p50 ms", "paper: acc %",
                "paper: s/epoch"} <= set(headers), t.key
    assert {"parameters", "MMACs", "paper: parameters"} <= {c.header for c in table(report, "I").columns}
    assert {"no-KD best acc %", "KD gain pts"} <= {c.header for c in table(report, "II").columns}
    row = table(report, "II").rows[0]
    summary = json.loads((sweep_dir / "s2" / "summary.json").read_text())
    assert row["parameters"] == summary["model"]["parameters"] and row["mmacs"] > 0
    assert row["best_acc_pct"] == pytest.approx(100 * summary["best_val_acc"])
    assert row["onnx_mb"] is None and row["paper_acc"] is None  # not exported; not one of the paper's models
    assert any("not exported" in note for note in table(report, "II").notes)
    assert table(report, "III").rows[1]["precision"] == "fp16 (simulated)"
    md = (sweep_dir / "report.md").read_text()
    for heading in ("## Table I — teacher", "## Table II", "## Table III", "## Table IV", "## Training curves",
                    "## Confusion matrices", "## KD gain"):
        assert heading in md
    assert "| image size | 16 px | 150 px |" in md and "not at the paper's setting" in md
    saved = json.loads((sweep_dir / "report.json").read_text())
    assert [t["key"] for t in saved["tables"]] == ["I", "II", "III", "IV"]
    assert saved["tables"][1]["rows"][0]["run"] == "s2" and "kd_gain_pts" in saved["tables"][1]["rows"][0]


def test_kd_gain_is_the_student_minus_its_own_baseline(sweep_dir):
    summary_path = sweep_dir / "s1_nokd" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["best_val_acc"] = 0.25  # only s1's baseline changes
    summary_path.write_text(json.dumps(summary))
    best = {name: json.loads((sweep_dir / name / "summary.json").read_text())["best_val_acc"]
            for name in ("s1", "s2", "s2_nokd")}
    rows = {r["run"]: r for r in tables(sweep_dir)["II"].rows}
    assert rows["s1"]["nokd_acc_pct"] == pytest.approx(25.0)
    assert rows["s1"]["kd_gain_pts"] == pytest.approx(100 * (best["s1"] - 0.25))
    assert rows["s2"]["kd_gain_pts"] == pytest.approx(100 * (best["s2"] - best["s2_nokd"]))
    fp8 = tables(sweep_dir)["IV"].rows[1]
    assert fp8["run"] == "s2_fp8" and fp8["kd_gain_pts"] is None  # no fp8 baseline in this sweep


def test_a_missing_member_is_named_and_its_cells_say_why(sweep_dir):
    shutil.rmtree(sweep_dir / "s1_nokd")
    result = write_report([sweep_dir])
    rows = {r["run"]: r for r in table(result.report, "II").rows}
    assert rows["s1"]["kd_gain_pts"] is None and rows["s2"]["kd_gain_pts"] is not None
    assert "KD gain –: no no-KD baseline of s1 among these runs." in table(result.report, "II").notes
    assert any(line.startswith("s1_nokd: its run folder") for line in result.collection.not_included)
    assert "## Not included" in (sweep_dir / "report.md").read_text()


def test_loose_run_folders_pair_students_with_their_baselines_too(sweep_dir):
    runs = [sweep_dir / name for name in ("t", "s2", "s2_nokd", "s1", "s1_nokd")]
    collection = collect(runs)
    roles = {r.name: (r.role, r.baseline_of) for r in collection.runs}
    assert roles == {"t": ("teacher", None), "s2": ("student", None), "s2_nokd": ("baseline", "s2"),
                     "s1": ("student", None), "s1_nokd": ("baseline", "s1")}
    by_sweep = {r["run"]: r["kd_gain_pts"] for r in tables(sweep_dir)["II"].rows}
    assert {r["run"]: r["kd_gain_pts"] for r in build_tables(collection)[1].rows} == by_sweep


def test_the_html_is_self_contained_and_every_image_decodes(sweep_dir):
    result = write_report([sweep_dir])
    html = (sweep_dir / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    names = [f.name for s in result.report.sections for f in s.figures]
    # 7 runs' curves, 3 students' confusion matrices, 1 KD-gain chart
    assert len(images) == len(names) == 11
    assert sum(n.startswith("curves_") for n in names) == 7 and sum(n.startswith("confusion_") for n in names) == 3
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as png:
            png.verify()
            assert png.format == "PNG" and png.size[0] > 200
    assert "src='figures/" not in html and "<link" not in html and "<script" not in html
    for title in ("Table I — teacher", "Table II", "Table III", "Table IV", "paper: acc %"):
        assert title in html
    assert "class='paper'" in html and "not at the paper&#x27;s setting" in html
    assert all((sweep_dir / "figures" / f"{n}.png").is_file() for n in names)  # what report.md links to
    evaluation = json.loads((sweep_dir / "s2" / "eval_val.json").read_text())
    assert evaluation["split"] == "val" and sum(map(sum, evaluation["confusion"])) == 18


def test_validation_results_fill_the_onnx_columns(sweep_dir):
    validation = {"settings": {"batch_sizes": [1, 32]}, "failures": {"int8 · cpu": ["agreement 0.9 < 0.99"]},
                  "rows": [
                      {"variant": "pytorch fp32 · cpu", "runtime": "PyTorch eager", "provider": "cpu",
                       "precision": "fp32", "file_mb": 0.2, "latency": {"1": {"p50_ms": 9.0}}},
                      {"variant": "fp32 · cpu", "runtime": "onnxruntime", "provider": "cpu", "precision": "fp32",
                       "file_mb": 0.081, "latency": {"1": {"p50_ms": 0.5}, "32": {"p50_ms": 4.0}}},
                      {"variant": "int8 · cpu", "runtime": "onnxruntime", "provider": "cpu", "precision": "int8",
                       "file_mb": 0.03, "latency": {"1": {"p50_ms": 0.25}, "32": {"p50_ms": 2.0}}}]}
    (sweep_dir / "s2" / "validation.json").write_text(json.dumps(validation))
    t = tables(sweep_dir)["II"]
    row = t.rows[0]
    assert row["onnx_mb"] == {"fp32": 0.081, "int8": 0.03} and row["ort_ms"] == {"fp32": 0.5, "int8": 0.25}
    onnx = next(c for c in t.columns if c.key == "onnx_mb")
    assert t.cell(row, onnx) == "fp32 0.08 · int8 0.03"
    assert any("s2: int8 · cpu fails the validate gate" in n for n in t.notes)
    assert any(n.startswith("ONNX columns –: s1 not exported") for n in t.notes)


def _record(name, blocks, precision="fp32", metrics=None, **summary):
    metrics = metrics or [{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_acc": 0.5},
                          {"epoch": 2, "train_loss": 0.8, "val_loss": 0.7, "val_acc": 0.6}]
    base = {"mode": "distill", "status": "finished", "best_val_acc": 0.6, "best_epoch": 2, "seconds_per_epoch": 3.0,
            "precision": {"mode": precision, "native": precision == "fp32"},
            "model": {"name": "paper_cnn", "args": {"blocks": blocks}, "parameters": 1000 * blocks},
            "dataset": {"image_size": 32, "classes": INTEL_CLASSES, "sizes": {"train": 10, "val": 4}}}
    return RunRecord(name, Path("/nonexistent") / name, {**base, **summary}, metrics, {}, role="student",
                     base=f"intel_{blocks}block")


def test_the_papers_numbers_sit_beside_the_paper_architectures():
    assert paper.reference({"name": "paper_cnn", "args": {"blocks": 8, "classifier": [128]}}, "fp16").accuracy_pct == 87.0
    assert paper.reference({"name": "paper_cnn", "args": {"blocks": 12}}, "fp32").parameters == 26_534_358
    assert paper.reference({"name": "paper_cnn", "args": {"blocks": 8, "width": 8}}, "fp32") is None
    assert paper.reference({"name": "resnet18", "args": {}}, "fp32") is None
    collection = Collection([_record("intel_8block", 8), _record("intel_8block_fp8", 8, "fp8"),
                             _record("intel_4block", 4)])
    built = {t.key: t for t in build_tables(collection)}
    rows = {r["run"]: r for r in built["II"].rows}
    assert (rows["intel_8block"]["paper_parameters"], rows["intel_8block"]["paper_acc"],
            rows["intel_8block"]["paper_s_per_epoch"]) == (1_648_470, 86.43, 67.0)
    assert rows["intel_4block"]["paper_acc"] == 84.57
    fp8 = built["IV"].rows[1]
    assert fp8["run"] == "intel_8block_fp8" and (fp8["paper_acc"], fp8["paper_s_per_epoch"]) == (86.07, 69.0)
    assert fp8["precision"] == "fp8 (simulated)"
    assert built["I"].rows == [] and "no teacher run" in built["I"].notes[0]


def test_runs_without_train_accuracy_still_plot(tmp_path):
    from edgekd.report import plots

    png = plots.curves(_record("old", 4))  # records from before train_acc was logged
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"


def test_bad_input_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgekdError, match="neither a run folder"):
        collect([tmp_path / "empty"])
    with pytest.raises(EdgekdError, match="is not a folder"):
        collect([tmp_path / "missing"])
    runner = CliRunner()
    result = runner.invoke(cli, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "neither a run folder" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["report"])  # no sweep under $EDGEKD_ARTIFACTS
    assert result.exit_code == 1 and "no sweep folder" in result.output


def test_cli_report_finds_the_newest_sweep(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKD_ARTIFACTS", str(tmp_path))
    result = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Table II — weight reduction: distilled students: 2 row(s)" in result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "report.html", "report.json", "figures"}


def test_runs_with_no_fp32_sibling_fill_tables_one_and_two_at_their_own_precision():
    # e.g. every run trained at bf16: each model sits in Table I/II beside the paper's fp32 numbers, and the
    # precision tables stay empty because no model ran at two precisions.
    collection = Collection([_record("s8_bf16", 8, "bf16"), _record("s4_bf16", 4, "bf16"),
                             _record("s8_bf16_other_method", 8, "bf16")])
    built = {t.key: t for t in build_tables(collection)}
    rows = {r["run"]: r for r in built["II"].rows}
    assert set(rows) == {"s8_bf16", "s4_bf16", "s8_bf16_other_method"} and rows["s8_bf16"]["paper_acc"] == 86.43
    assert built["IV"].rows == [] and "more than one precision" in built["IV"].notes[0]
    # With an fp32 run of the same model present, that one is the reference and bf16 moves to Table IV.
    built = {t.key: t for t in build_tables(Collection([*collection.runs, _record("s8", 8)]))}
    assert {r["run"] for r in built["II"].rows} == {"s8", "s4_bf16"}
    assert [r["run"] for r in built["IV"].rows] == ["s8", "s8_bf16", "s8_bf16_other_method"]


def test_students_of_one_recipe_share_its_no_kd_baseline(sweep_dir, tmp_path):
    # Two distillation runs of the same student recipe (say kd and dkd) and one no-KD run: both get its gain.
    twin = shutil.copytree(sweep_dir / "s2", tmp_path / "s2_again")
    summary = json.loads((twin / "summary.json").read_text())
    summary.update(run="s2_again", best_val_acc=summary["best_val_acc"] - 0.1)
    (twin / "summary.json").write_text(json.dumps(summary))
    built = tables(sweep_dir / "s2", twin, sweep_dir / "s2_nokd")
    gains = {r["run"]: r["kd_gain_pts"] for r in built["II"].rows}
    assert gains["s2_again"] == pytest.approx(gains["s2"] - 10)


@pytest.fixture
def colour_runs(distilled_run, tmp_path):
    """The shared teacher and student, trained on three colour classes: not the paper's dataset."""
    for name in ("tiny_teacher", "tiny_student"):
        shutil.copytree(distilled_run.parent / name, tmp_path / "runs" / name, ignore=shutil.ignore_patterns("exports"))
    return tmp_path / "runs"


def test_a_report_on_another_dataset_has_no_reference_columns_and_no_empty_tables(colour_runs, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(colour_runs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Table I — teacher: 1 row(s)" in result.output and "Table II — weight reduction" in result.output
    assert "not shown: Table III — training precision: teacher: no teacher trained at more" in result.output
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [t["key"] for t in saved["tables"]] == ["I", "II"] and saved["paper_setting"] is None
    for t in saved["tables"]:
        assert t["rows"] and not any(c["paper"] for c in t["columns"]), t["key"]
        assert not any(note.startswith("paper columns") for note in t["notes"])
    md, html = (tmp_path / "out" / "report.md").read_text(), (tmp_path / "out" / "report.html").read_text()
    for text in (md, html):
        assert "paper:" not in text and "the paper" not in text
        assert "\n(no rows)" not in text and "'notes'>(no rows)" not in text  # an empty table's placeholder
        assert "Park & Kotla" not in text and "seed 00" not in text
    assert "| scale | these runs |\n" in md and "Tables not shown (no rows): Table III" in md


def test_a_report_out_folder_that_cannot_be_written_is_one_clear_error(sweep_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    for out in (tmp_path / "a-file" / "report", Path("/proc/edgekd-report")):
        result = CliRunner().invoke(cli, ["report", str(sweep_dir / "t"), "--out", str(out)])
        assert result.exit_code == 1, result.output
        assert f"Error: cannot write the report into {out}" in result.output and "--out DIR" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("name, content, named", [
    ("summary.json", "[1, 2]", "s1_nokd: summary.json damaged (it is list, not an object)"),
    ("summary.json", '{"model": "paper_cnn", "best_val_acc": 0.5}', "s1_nokd: summary.json damaged (model is str"),
    ("metrics.jsonl", '{"epoch": "one", "train_loss": 1, "val_loss": 1, "val_acc": 0.5}\n',
     "s1_nokd: metrics.jsonl damaged (epoch is str, not int)"),
    ("validation.json", '{"rows": 3}', "s1_nokd: validation.json damaged ('rows' is not a list of objects)"),
    ("recipe.yaml", "train: [unclosed", "s1_nokd: recipe.yaml unreadable"),
])
def test_one_damaged_record_never_blocks_the_other_runs(sweep_dir, name, content, named):
    (sweep_dir / "s1_nokd" / name).write_text(content)
    result = write_report([sweep_dir])
    assert any(line.startswith(named) for line in result.collection.not_included), result.collection.not_included
    assert [r["run"] for r in table(result.report, "II").rows] == ["s2", "s1"]


def test_a_damaged_sweep_json_reads_its_runs_as_loose_ones(sweep_dir):
    (sweep_dir / "sweep.json").write_text('{"members": ["s2"]}')
    result = write_report([sweep_dir])
    assert result.collection.sweep is None
    assert any("sweep.json damaged (members is list, not an object); its run folders are read as loose runs" in line
               for line in result.collection.not_included)
    assert {r["run"] for r in table(result.report, "II").rows} == {"s2", "s1"}
