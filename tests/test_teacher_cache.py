import json
import logging

import numpy as np
import pytest
import torch

from edgekd.data import open_dataset
from edgekd.models import Classifier
from edgekd.recipe import load_recipe
from edgekd.train.checkpoint import file_sha256, load_model
from edgekd.train.teacher_cache import cached_teacher_logits
from edgekd.train.trainer import run


@pytest.fixture
def teacher(tmp_path, teacher_recipe):
    run(load_recipe(teacher_recipe), "train", tmp_path / "artifacts")
    return tmp_path / "artifacts" / "tiny_teacher" / "best.pt"


def _logit_files(tmp_path):
    return sorted((tmp_path / "cache" / "teacher-logits").glob("*.npy"))


def test_cached_logits_are_the_teachers_own_in_fp16(teacher, teacher_recipe):
    model, meta = load_model(teacher)
    entry = open_dataset(load_recipe(teacher_recipe).data).entries["train"]
    cached = cached_teacher_logits(model, file_sha256(teacher), 3, entry, torch.device("cpu"))
    with torch.no_grad():
        direct = model(torch.from_numpy(np.array(entry.images)).permute(0, 3, 1, 2)).numpy()
    assert cached.dtype == np.float16 and cached.shape == (len(entry.images), 3)
    np.testing.assert_allclose(cached.astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_logits_are_computed_once_and_reused_by_every_student(tmp_path, teacher, student_recipe, monkeypatch):
    run(load_recipe(student_recipe), "distill", tmp_path / "artifacts")
    files = _logit_files(tmp_path)
    assert len(files) == 1
    before = files[0].stat().st_mtime_ns
    calls = []
    import edgekd.train.teacher_cache as module

    monkeypatch.setattr(module, "_compute", lambda *a: calls.append(a))
    run(load_recipe(student_recipe, ["model.blocks=2"]), "distill", tmp_path / "artifacts")
    assert calls == [] and files[0].stat().st_mtime_ns == before


def test_a_retrained_teacher_gets_new_logits(tmp_path, teacher, teacher_recipe, student_recipe):
    run(load_recipe(student_recipe), "distill", tmp_path / "artifacts")
    run(load_recipe(teacher_recipe, ["train.seed=1"]), "train", tmp_path / "artifacts")  # the newest teacher
    run(load_recipe(student_recipe), "distill", tmp_path / "artifacts")
    assert len(_logit_files(tmp_path)) == 2


def test_the_teacher_runs_per_batch_when_the_cache_is_off(tmp_path, teacher, student_recipe, caplog):
    with caplog.at_level(logging.INFO, logger="edgekd"):
        run(load_recipe(student_recipe, ["distill.cache_teacher_logits=false"]), "distill", tmp_path / "artifacts")
    assert "the teacher runs on every batch" in caplog.text
    assert _logit_files(tmp_path) == []


def test_each_shuffled_batch_gets_the_logits_of_its_own_images(teacher, teacher_recipe):
    from edgekd.train.batches import iter_batches

    model, _ = load_model(teacher)
    dataset = open_dataset(load_recipe(teacher_recipe).data)
    cached = cached_teacher_logits(model, file_sha256(teacher), 3, dataset.entries["train"], torch.device("cpu"))
    for batch in iter_batches(dataset.splits["train"], 7, shuffle=True, seed=3, epoch=2):
        with torch.no_grad():
            direct = model(batch.pixels).numpy()
        np.testing.assert_allclose(cached[batch.rows].astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_a_student_at_a_lower_resolution_learns_from_logits_at_the_teachers(tmp_path, teacher, student_recipe,
                                                                           monkeypatch):
    summary = run(load_recipe(student_recipe, ["data.image_size=12"]), "distill", tmp_path / "artifacts")
    model, meta = load_model(tmp_path / "artifacts" / summary["run"] / "best.pt")
    assert meta["image_size"] == 12
    assert {p.name.split("-")[1] for p in _logit_files(tmp_path)} == {"16px"}

    # Without the cache (as under augmentation) the teacher sees each 12 px batch resized to its own 16 px.
    seen_sizes = []
    original = Classifier.forward

    def recording_forward(self, pixels):
        seen_sizes.append(pixels.shape[-1])
        return original(self, pixels)

    monkeypatch.setattr(Classifier, "forward", recording_forward)
    run(load_recipe(student_recipe, ["data.image_size=12", "distill.cache_teacher_logits=false", "train.epochs=1"]),
        "distill", tmp_path / "artifacts")
    assert set(seen_sizes) == {12, 16}  # the student's view, and the teacher's resized copy of it


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "not an array"])
def test_damaged_logits_are_computed_again_with_one_warning_never_read(teacher, teacher_recipe, damage, caplog):
    model, meta = load_model(teacher)
    entry = open_dataset(load_recipe(teacher_recipe).data).entries["train"]
    good = np.array(cached_teacher_logits(model, file_sha256(teacher), 3, entry, torch.device("cpu")))
    (path,) = sorted((entry.path.parent / "teacher-logits").glob("*.npy"))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "wrong shape":
        np.save(path, np.zeros((len(good), 5), np.float16))
    else:
        path.write_bytes(b"PK\x03\x04 not an npy file")
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        again = cached_teacher_logits(model, file_sha256(teacher), 3, entry, torch.device("cpu"))
    np.testing.assert_array_equal(np.array(again), good)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "are damaged" in warnings[0].getMessage()
    assert [p.name for p in (entry.path.parent / "teacher-logits").iterdir()] == [path.name]  # nothing left aside


def test_a_distillation_over_a_damaged_logit_cache_runs_and_leaves_no_failed_run(tmp_path, teacher, student_recipe):
    run(load_recipe(student_recipe, ["train.epochs=1"]), "distill", tmp_path / "artifacts")
    (path,) = _logit_files(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    summary = run(load_recipe(student_recipe, ["train.epochs=1"]), "distill", tmp_path / "artifacts")
    assert summary["status"] == "finished"
    statuses = [json.loads((d / "summary.json").read_text())["status"]
                for d in (tmp_path / "artifacts").iterdir() if d.name.startswith("tiny_student")]
    assert statuses == ["finished", "finished"]


def test_teacher_logits_beyond_fp16_are_refused_not_cached(teacher, teacher_recipe):
    from edgekd.errors import CheckpointError

    class Loud(torch.nn.Module):
        def forward(self, pixels):
            return torch.full((len(pixels), 3), 1e6)

    entry = open_dataset(load_recipe(teacher_recipe).data).entries["train"]
    with pytest.raises(CheckpointError, match="overflow .* on 48 training images") as err:
        cached_teacher_logits(Loud(), "loud", 3, entry, torch.device("cpu"))
    assert "cache_teacher_logits: false" in err.value.hint
    assert not list((entry.path.parent / "teacher-logits").glob("*.npy"))
