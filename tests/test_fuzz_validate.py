"""Generated bad input for `edgekd validate` and `edgekd report`: never a traceback, never a hang.

Each command runs in a thread that must finish within its timeout (a hang fails the test instead of
stalling the suite); an outcome is fine when it is a result or a clear error (exit 1 or 2, no exception).
"""

import json
import os
import shutil
import threading

import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_validate import FAST, exported_once, in_process, run_with_exports  # noqa: F401 (fixtures)

from edgekd.cli import cli
from edgekd.train.checkpoint import file_sha256
from edgekd.validate.checks import CANNOT_RUN, METADATA, STALE, check_export

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 6))  # FUZZ_EXAMPLES=200 for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)
REPORT_FUZZ = settings(FUZZ, max_examples=3 * EXAMPLES)  # a report of one loose run is a fraction of a second

scalars = st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True) | st.text(max_size=6)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def keyed(*keys):
    """Objects with the keys a record really has, holding anything."""
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys))


def invoke(args, timeout=120):
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(CliRunner().invoke(cli, args)), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"edgekd {' '.join(args)} hung"
    result = outcome[0]
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and result.exit_code in (0, 1, 2), result.output
    return result


rows = st.lists(keyed("variant", "file", "precision", "latency", "file_mb", "runtime", "provider"), max_size=3)
validation_records = json_values | keyed("rows", "settings", "failures", "split", "images", "device") | \
    st.fixed_dictionaries({"rows": rows, "settings": keyed("batch_sizes", "checkpoint_sha256")})


@FUZZ
@given(record=validation_records)
def test_validate_over_any_earlier_validation_json(run_with_exports, in_process, record):  # noqa: F811
    (run_with_exports / "validation.json").write_text(json.dumps(record))
    result = invoke(["validate", str(run_with_exports), *FAST, "--providers", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((run_with_exports / "validation.json").read_text())["rows"]


metadata_values = st.text(max_size=12) | json_values.map(json.dumps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(key=st.sampled_from(["class_names", "image_size", "precision", "input_name", "mean", "std", "edgekd_format",
                            "checkpoint_sha256"]), value=metadata_values)
def test_any_tampered_metadata_is_a_named_problem_never_a_crash(exported_once, tmp_path_factory, key,  # noqa: F811
                                                                value):
    path = tmp_path_factory.mktemp("meta") / "tampered.fp32.onnx"
    model = onnx.load(exported_once / "exports" / "tiny_student.fp32.onnx")
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(model, path)
    original = {p.key: p.value for p in onnx.load(exported_once / "exports" / "tiny_student.fp32.onnx").metadata_props}
    check = check_export(path, ["buildings", "forest", "sea"], 16, file_sha256(exported_once / "best.pt"))
    assert all(p.startswith((CANNOT_RUN, METADATA, STALE)) for p in check.problems), check.problems
    if value != original[key] and key in ("checkpoint_sha256", "image_size", "edgekd_format", "input_name"):
        assert check.problems  # each of these values is fixed by the graph or the run: any change breaks it
    if not check.problems:
        assert check.precision in ("fp32", "fp16", "int8", "fp8")


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling link", "empty", "garbage"])
def test_anything_but_an_export_in_exports_fails_that_file_only(run_with_exports, in_process, kind):  # noqa: F811
    path = run_with_exports / "exports" / "odd.fp32.onnx"
    {"fifo": lambda: os.mkfifo(path), "folder": lambda: path.mkdir(),
     "dangling link": lambda: path.symlink_to(run_with_exports / "nowhere"), "empty": lambda: path.write_bytes(b""),
     "garbage": lambda: path.write_bytes(os.urandom(300))}[kind]()
    result = invoke(["validate", str(run_with_exports), *FAST, "--providers", "cpu", "--threads", "1"])
    assert result.exit_code == 1 and "FAIL      odd.fp32.onnx: cannot run on this run's images" in result.output
    assert "FAIL      int8 · cpu" not in result.output


@pytest.fixture(scope="module")
def teacher_alone(distilled_run, tmp_path_factory):
    """The shared teacher run: one loose run, so a report is a second or so (no confusion matrix)."""
    folder = tmp_path_factory.mktemp("loose") / "runs"
    shutil.copytree(distilled_run.parent / "tiny_teacher", folder / "tiny_teacher")
    return folder


summaries = json_values | keyed("mode", "status", "best_val_acc", "best_epoch", "model", "dataset", "precision",
                                "seconds_per_epoch", "device", "torch_threads")
records = st.sampled_from(["summary.json", "validation.json", "metrics.jsonl", "recipe.yaml"])


@REPORT_FUZZ
@given(name=records, record=summaries | validation_records)
def test_report_with_a_damaged_sibling_still_reports_the_sound_run(teacher_alone, tmp_path_factory, name, record):
    base = tmp_path_factory.mktemp("fuzz")
    runs = shutil.copytree(teacher_alone, base / "runs")
    sibling = shutil.copytree(runs / "tiny_teacher", runs / "broken")
    text = json.dumps(record)
    (sibling / name).write_text(text + "\n" if name == "metrics.jsonl" else text)
    result = invoke(["report", str(runs), "--out", str(base / "out")])
    assert result.exit_code == 0, result.output
    assert "Table I — teacher: " in result.output
    assert "tiny_teacher" in (base / "out" / "report.md").read_text()


@REPORT_FUZZ
@given(record=json_values | keyed("sweep", "sweep_file", "overrides", "members"))
def test_report_over_any_sweep_json(teacher_alone, tmp_path_factory, record):
    base = tmp_path_factory.mktemp("sweepfuzz")
    runs = shutil.copytree(teacher_alone, base / "runs")
    (runs / "sweep.json").write_text(json.dumps(record))
    result = invoke(["report", str(runs), "--out", str(base / "out")])
    assert result.exit_code in (0, 1), result.output  # 1: a sweep.json of the right shape naming no run
