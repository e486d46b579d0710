"""`edgekd init`: a folder of one's own photos to recipes and commands that run as printed."""

import json
import shlex
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from conftest import CLASS_COLOURS, write_image
from edgekd.cli import cli


def kaggle_style_tree(root, per_class=10, val_per_class=4, unlabeled=4):
    """Train/ and Validation/ with photos in nested subfolders of each class, and a folder without classes."""
    rng = np.random.default_rng(0)
    for split, count in (("Train", per_class), ("Validation", val_per_class)):
        for name, colour in CLASS_COLOURS.items():
            for i in range(count):
                sub = root / split / name / ("2023" if i % 2 else "2024/March")
                write_image(sub / f"{i}.jpg", colour, rng)
    for i in range(unlabeled):
        write_image(root / "unsorted" / f"u{i}.jpg", list(CLASS_COLOURS.values())[i % 3], rng)
    return root


@pytest.fixture
def untimed(monkeypatch):
    """Skips timing the models (tests of what init reads and writes, not of how fast this machine is)."""
    import edgekd.scaffold as scaffold

    def fake(survey, teacher_size, student_size, steps=3):
        return scaffold.Timing("cpu", 50.0, {8: 400.0, 4: 800.0}, 150.0, 500.0, {8: 1_648_470, 4: 98_294},
                               3_378_694, 0.0)

    monkeypatch.setattr(scaffold, "time_models", fake)


def next_commands(output: str) -> list[list[str]]:
    lines = output.split("next:\n", 1)[1].splitlines()
    return [shlex.split(line)[1:] for line in lines if line.strip().startswith("edgekd ")]


@pytest.mark.slow
def test_init_then_the_printed_commands_reach_a_validated_int8_file(tmp_path):
    started = time.monotonic()
    data = kaggle_style_tree(tmp_path / "My Photos")
    runner = CliRunner()
    result = runner.invoke(cli, ["init", str(data), "--quick"])
    assert result.exit_code == 0, result.output
    assert "3 classes, 30 training photos" in result.output
    assert "train: Train/ (30 photos), val: Validation/ (12 photos)" in result.output
    assert "unsorted (4 photos without classes: data.unlabeled)" in result.output
    assert "estimate  minutes here: train" in result.output
    student = yaml.safe_load((tmp_path / "recipes" / "my_photos_student.yaml").read_text())
    assert student["data"]["unlabeled"] == str(data / "unsorted")
    assert student["teacher"] == {"recipe": "my_photos_teacher.yaml"}
    assert student["distill"]["teacher_views"] >= 1 and student["augment"]["render_size"] == 32
    assert student["export"]["max_drop_int8"] == 8.34  # one of the 12 val photos: the finest gate they measure
    commands = next_commands(result.output)
    assert [c[0] for c in commands] == ["train", "distill", "export", "validate", "classify"]
    for command in commands:  # exactly as printed: nothing edited
        begun = time.monotonic()
        done = runner.invoke(cli, command)
        assert done.exit_code == 0, f"edgekd {shlex.join(command)}\n{done.output}"
        print(f"edgekd {command[0]}: {time.monotonic() - begun:.1f} s")
    run = tmp_path / "artifacts" / "my_photos_student"
    assert (run / "exports" / "my_photos_student.int8.onnx").is_file()
    validation = json.loads((run / "validation.json").read_text())
    assert "int8 · cpu" in {row["variant"] for row in validation["rows"]} and not validation["failures"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"]["unlabeled"] == 4
    assert done.output.count("unsorted/u") == 4  # classify answered every unlabeled photo
    print(f"init → classify: {time.monotonic() - started:.1f} s")


def test_init_never_replaces_a_recipe_without_force(tmp_path, untimed):
    data = kaggle_style_tree(tmp_path / "pets", per_class=3, val_per_class=1, unlabeled=0)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "pets_student.yaml").write_text("# mine\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["init", str(data), "--quick"])
    assert result.exit_code == 1 and "already exist" in result.output and "--force" in result.output
    assert (tmp_path / "recipes" / "pets_student.yaml").read_text() == "# mine\n"
    assert not (tmp_path / "recipes" / "pets_teacher.yaml").exists()
    result = runner.invoke(cli, ["init", str(data), "--quick", "--force"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "recipes" / "pets_student.yaml").read_text())["name"] == "pets_student"


def test_init_on_a_layout_it_cannot_read_names_what_it_saw(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("Fit", "Holdout"):
        for name, colour in CLASS_COLOURS.items():
            write_image(tmp_path / "d" / split / name / "0.jpg", colour, rng)
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "d")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Fit/ (3 images)" in result.output and "data.train_dir" in result.output


@pytest.mark.parametrize("layout", ["plain", "one class"])
def test_init_reads_a_plain_folder_and_refuses_a_single_class(tmp_path, layout, untimed):
    rng = np.random.default_rng(0)
    classes = dict(list(CLASS_COLOURS.items())[:1 if layout == "one class" else 3])
    for name, colour in classes.items():
        for i in range(4):
            write_image(tmp_path / "d" / name / f"{i}.jpg", colour, rng)
    result = CliRunner().invoke(cli, ["init", str(tmp_path / "d"), "--quick"])
    if layout == "plain":
        assert result.exit_code == 0, result.output
        assert "train: ./ (12 photos), val: none (10% of train held out)" in result.output
    else:
        assert result.exit_code == 1 and "needs two or more" in result.output


def test_init_sizes_a_big_dataset_down_to_the_budget(tmp_path, untimed, monkeypatch):
    import edgekd.scaffold as scaffold

    data = kaggle_style_tree(tmp_path / "big", per_class=2, val_per_class=1, unlabeled=0)
    real = scaffold.survey_folder

    def bigger(path):  # 60,000 photos, as counted; nothing is decoded
        survey = real(path)
        survey.counts["train"] = {name: 20_000 for name in survey.classes}
        survey.photo_side = 300
        return survey

    monkeypatch.setattr(scaffold, "survey_folder", bigger)
    result = CliRunner().invoke(cli, ["init", str(data), "--budget", "30"])
    assert result.exit_code == 0, result.output
    teacher = yaml.safe_load((tmp_path / "recipes" / "big_teacher.yaml").read_text())
    student = yaml.safe_load((tmp_path / "recipes" / "big_student.yaml").read_text())
    assert teacher["data"]["image_size"] == 224 and student["data"]["image_size"] == 64
    assert student["model"]["blocks"] == 4 and student["distill"]["teacher_views"] == 2
    assert student["distill"]["teacher_forward"] == "auto" and student["train"]["workers"] >= 1
    assert "epochs cut" in (tmp_path / "recipes" / "big_student.yaml").read_text()


def test_init_reads_kaggle_intel_and_nguyen_layouts(tmp_path, untimed):
    from conftest import make_image_folder

    rng = np.random.default_rng(0)
    intel = tmp_path / "intel"
    make_image_folder(intel / "seg_train" / "seg_train", per_class=4)
    make_image_folder(intel / "seg_test" / "seg_test", per_class=1)
    for i in range(3):
        write_image(intel / "seg_pred" / "seg_pred" / f"{i}.jpg", (0, 0, 0), rng)
    result = CliRunner().invoke(cli, ["init", str(intel), "--quick"])
    assert result.exit_code == 0, result.output
    assert "seg_pred/seg_pred (3 photos without classes" in result.output
    assert "  edgekd validate --providers cpu" in result.output  # a labelled test split: validate measures it
    student = yaml.safe_load((tmp_path / "recipes" / "intel_student.yaml").read_text())
    assert student["data"]["train_dir"] == "seg_train/seg_train" and student["data"]["test_dir"] == "seg_test/seg_test"

    nguyen = tmp_path / "nguyen"
    make_image_folder(nguyen / "train", per_class=4)
    make_image_folder(nguyen / "validation", per_class=1)
    for i in range(2):
        write_image(nguyen / "test" / f"{i}.jpg", (0, 0, 0), rng)
    result = CliRunner().invoke(cli, ["init", str(nguyen), "--quick"])
    assert result.exit_code == 0, result.output
    assert "test: test/ (2 unlabeled photos)" in result.output
    assert "  edgekd validate --split val" in result.output  # its test photos have no labels to measure
    student = yaml.safe_load((tmp_path / "recipes" / "nguyen_student.yaml").read_text())
    assert student["data"]["unlabeled"] == str(nguyen / "test") and "test_dir" not in student["data"]


def test_init_refuses_a_missing_folder_and_a_bad_name_before_writing_anything(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["init", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "is not a folder" in result.output
    data = kaggle_style_tree(tmp_path / "pets", per_class=2, val_per_class=1, unlabeled=0)
    result = runner.invoke(cli, ["init", str(data), "--name", "my pets"])
    assert result.exit_code == 2 and "--name 'my pets'" in result.output
    assert not (tmp_path / "recipes").exists()
