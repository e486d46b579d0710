import json

import pytest

from conftest import make_image_folder
from edgekd.errors import CheckpointError, DataError
from edgekd.evaluate import evaluate_checkpoint
from edgekd.recipe import load_recipe
from edgekd.train.trainer import run


@pytest.fixture
def trained(tmp_path, image_dataset, teacher_recipe):
    make_image_folder(image_dataset / "test", per_class=5, seed=3)
    run(load_recipe(teacher_recipe, ["train.epochs=3"]), "train", tmp_path / "artifacts")
    return tmp_path / "artifacts" / "tiny_teacher"


def test_evaluate_reports_accuracy_per_class_and_confusion(trained):
    result = evaluate_checkpoint(trained, "test")
    assert result.images == 15 and result.class_names == ["buildings", "forest", "sea"]
    confusion = result.confusion
    assert sum(map(sum, confusion)) == 15 and [sum(row) for row in confusion] == [5, 5, 5]
    assert result.accuracy == pytest.approx(sum(confusion[i][i] for i in range(3)) / 15)
    assert result.per_class_accuracy == [pytest.approx(confusion[i][i] / 5) for i in range(3)]
    json.dumps(result.to_dict())


def test_evaluate_matches_the_validation_accuracy_recorded_in_training(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert evaluate_checkpoint(trained / "best.pt", "val").accuracy == pytest.approx(summary["best_val_acc"])


def test_evaluate_refuses_a_missing_split_and_a_foreign_checkpoint(tmp_path, image_dataset, teacher_recipe):
    run(load_recipe(teacher_recipe, ["train.epochs=1"]), "train", tmp_path / "artifacts")
    with pytest.raises(DataError, match="no test split"):
        evaluate_checkpoint(tmp_path / "artifacts" / "tiny_teacher", "test")
    (tmp_path / "foreign.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        evaluate_checkpoint(tmp_path / "foreign.pt", "val")
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate_checkpoint(tmp_path / "missing.pt", "val")
