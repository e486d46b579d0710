import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import RECIPES, make_image_folder, write_recipe
from edgekd.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_the_pipeline_commands(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "distill", "evaluate", "summary"):
        assert command in result.output


def test_summary_prints_the_papers_parameter_counts(runner):
    paths = [str(RECIPES / f"intel_{n}.yaml") for n in ("teacher", "10block", "8block", "6block", "4block")]
    result = runner.invoke(cli, ["summary", *paths])
    assert result.exit_code == 0, result.output
    for count in ("26,534,358", "6,601,686", "1,648,470", "408,854", "98,294"):
        assert count in result.output
    assert "MACs" in result.output and "768,039,872" in result.output


def test_a_misspelt_key_is_one_clear_error_not_a_traceback(runner, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path, train={"epohcs": 3})
    result = runner.invoke(cli, ["train", str(path)])
    assert result.exit_code == 2
    assert "unknown key train.epohcs; did you mean train.epochs?" in result.output
    assert "Traceback" not in result.output


def test_train_distill_evaluate_from_the_command_line(runner, tmp_path, image_dataset, teacher_recipe,
                                                      student_recipe):
    make_image_folder(image_dataset / "test", per_class=3, seed=3)
    result = runner.invoke(cli, ["train", str(teacher_recipe), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "device    cpu, precision fp32 (native)" in result.output
    assert "epoch   1" in result.output
    result = runner.invoke(cli, ["distill", str(student_recipe), "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert "teacher" in result.output and "tiny_teacher/best.pt" in result.output
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "artifacts" / "tiny_student"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "test" and report["images"] == 9
    assert (tmp_path / "artifacts" / "tiny_student" / "eval_test.json").is_file()


def test_resume_from_the_command_line_continues_the_run(runner, tmp_path, teacher_recipe):
    assert runner.invoke(cli, ["train", str(teacher_recipe), "--set", "train.epochs=1"]).exit_code == 0
    result = runner.invoke(cli, ["train", str(teacher_recipe), "--set", "train.epochs=2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming  after epoch 1" in result.output
    lines = (tmp_path / "artifacts" / "tiny_teacher" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_missing_dataset_and_missing_checkpoint_exit_non_zero(runner, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "no-such-data")
    result = runner.invoke(cli, ["train", str(path)])
    assert result.exit_code == 1 and "does not exist" in result.output and "kaggle" in result.output
    result = runner.invoke(cli, ["evaluate", str(tmp_path / "nothing.pt")])
    assert result.exit_code == 1 and "checkpoint" in result.output


def test_the_command_line_imports_no_stage_until_a_command_runs():
    script = "import json, sys, edgekd.cli; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    loaded = set(json.loads(done.stdout))
    assert "click" in loaded and not loaded & {"numpy", "onnxruntime", "PIL", "torch", "yaml"}


def test_classify_help_lists_its_options(runner):
    result = runner.invoke(cli, ["classify", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--top-k", "--json", "--provider", "--threads", "--batch-size"):
        assert option in result.output


def test_export_passes_the_gate_and_search_options_through(runner, tmp_path, monkeypatch):
    import edgekd.export as export_module

    seen = []

    def fake_export(plan):
        seen.append(plan)
        return [export_module.ExportedFile("fp32", tmp_path / "m.fp32.onnx", 1000, 0.0, 1.0),
                export_module.ExportedFile("int8", tmp_path / "m.int8.onnx", 300, 0.1, 0.996, ["net.stem.0"])]

    monkeypatch.setattr(export_module, "export_checkpoint", fake_export)
    (tmp_path / "best.pt").write_bytes(b"")
    result = runner.invoke(cli, ["export", str(tmp_path / "best.pt"), "--int8", "--max-drop", "0.3",
                                 "--min-agreement", "0.995", "--max-float-layers", "4", "--keep-float", "stem"])
    assert result.exit_code == 0, result.output
    assert "net.stem.0" in result.output  # the layers kept in float are listed
    plan = seen[0]
    assert (plan.max_drop_pts, plan.min_agreement, plan.max_float_layers, plan.keep_float) == (0.3, 0.995, 4,
                                                                                              ["stem"])


def test_validate_offers_openvino_and_names_it_when_a_provider_is_wrong(runner, tmp_path):
    result = runner.invoke(cli, ["validate", str(tmp_path), "--providers", "cpu,openvinno"])
    assert result.exit_code == 2 and "choose from cpu, cuda, tensorrt, openvino" in result.output
    assert "openvino" in runner.invoke(cli, ["validate", "--help"]).output


def test_without_the_training_extra_training_commands_say_how_to_install_it(runner, monkeypatch, tmp_path):
    import edgekd.cli as cli_module
    import edgekd.recipe

    monkeypatch.setattr(cli_module, "_has_training_extra", lambda: False)
    result = runner.invoke(cli, ["distill", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1 and "pip install 'edgekd[train]'" in result.output
    assert "[train extra]" in runner.invoke(cli, ["--help"]).output
    monkeypatch.undo()

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'timm'", name="timm")

    monkeypatch.setattr(edgekd.recipe, "load_recipe", missing)
    result = runner.invoke(cli, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1 and "needs timm" in result.output and "pip install 'edgekd[train]'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
