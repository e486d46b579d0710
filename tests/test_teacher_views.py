"""Consistent teaching across resolutions: the teacher and the student see the same crop of the same photo,
each at its own resolution, whether the teacher runs per batch or its views are stored once."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_image, write_recipe
from edgekd.data import open_dataset
from edgekd.recipe import AugmentConfig, load_recipe
from edgekd.train.teacher_views import teacher_views
from edgekd.train.trainer import Trainer, run

AUGMENT = {"crop": "resized", "crop_scale": 0.3, "flip": True, "color_jitter": 0.3}


@pytest.fixture
def teacher(tmp_path, image_dataset):
    """A tiny teacher trained at 32 px."""
    recipe = write_recipe(tmp_path / "big_teacher.yaml", image_dataset, model={"blocks": 2},
                          data={"image_size": 32}, train={"epochs": 1})
    run(load_recipe(recipe), "train", tmp_path / "artifacts")
    return tmp_path / "artifacts" / "big_teacher" / "best.pt"


def _student(tmp_path, image_dataset, teacher, **distill):
    return write_recipe(tmp_path / "small_student.yaml", image_dataset, model={"blocks": 1},
                        teacher={"checkpoint": str(teacher)}, augment={**AUGMENT, "render_size": 32},
                        distill={"alpha": 0.5, **distill}, train={"epochs": 1})


def _shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).clamp(0, 255)


def _record_views(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(what the teacher saw, what the student trained on) for every batch of a run."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(self, batch, epoch, index):
        teacher_model, forward = self.teacher_model, self.teacher_forward
        inputs = []

        class Recorder(torch.nn.Module):
            def forward(self, pixels):
                inputs.append(pixels.detach().clone())
                return teacher_model(pixels)

        self.teacher_model = Recorder()
        if forward is not None:  # the live teacher's measured forward pass (teacher_forward.py)
            self.teacher_forward = dataclasses.replace(forward, run=lambda pixels: (
                inputs.append(pixels.detach().clone()), forward.run(pixels))[1])
        student, logits, mix = original(self, batch, epoch, index)
        self.teacher_model, self.teacher_forward = teacher_model, forward
        seen.append((inputs[0], student.detach().clone()))
        return student, logits, mix

    original = Trainer._inputs
    monkeypatch.setattr(Trainer, "_inputs", spy)
    return seen


def test_teacher_and_student_see_the_same_crop_each_at_its_own_resolution(tmp_path, image_dataset, teacher,
                                                                         monkeypatch):
    seen = _record_views(monkeypatch)
    run(load_recipe(_student(tmp_path, image_dataset, teacher)), "distill", tmp_path / "artifacts")
    assert seen
    for teacher_view, student_view in seen:
        assert teacher_view.shape[-1] == 32 and student_view.shape[-1] == 16
        # the student's view is the teacher's, shrunk: the same crop, flip and colours of the same photo...
        torch.testing.assert_close(student_view, _shrink(teacher_view, 16))
    # ...and a real crop: not the uncropped photo (a test that could not tell the two apart proves nothing)
    dataset = open_dataset(load_recipe(tmp_path / "small_student.yaml").data, splits=("train",))
    plain = torch.from_numpy(np.array(dataset.splits["train"].images[:])).permute(0, 3, 1, 2).float()
    first_student = seen[0][1]
    assert not any(torch.allclose(view, image, atol=1) for view in first_student for image in plain)


@pytest.mark.parametrize("mixing", [{"mixup_probability": 1.0}, {"cutmix_probability": 1.0}])
def test_teacher_and_student_see_the_same_mixed_view(tmp_path, image_dataset, teacher, monkeypatch, mixing):
    """Function matching: the mixed image the teacher sees at 32 px is the student's at 16 px, and it is the
    unmixed views mixed with the partners and λ drawn from (seed, epoch, batch)."""
    from edgekd.train.augment import draw_mix, mix_generator, mix_pixels

    seen = _record_views(monkeypatch)
    student = _student(tmp_path, image_dataset, teacher, teacher_forward="torch")
    run(load_recipe(student), "distill", tmp_path / "plain")
    plain = list(seen)
    seen.clear()
    recipe = load_recipe(student, [f"augment.{key}={value}" for key, value in mixing.items()])
    run(recipe, "distill", tmp_path / "mixed")
    assert len(seen) == len(plain) == 4
    for index, ((teacher_view, student_view), (_, unmixed)) in enumerate(zip(seen, plain)):
        assert teacher_view.shape[-1] == 32 and student_view.shape[-1] == 16
        mix = draw_mix(12, 16, recipe.augment, mix_generator(0, 1, index))
        torch.testing.assert_close(student_view, mix_pixels(unmixed, mix))
        assert not torch.allclose(student_view, unmixed, atol=1)  # mixed indeed
        shrunk = _shrink(teacher_view, 16)
        if mix.box is None:
            torch.testing.assert_close(student_view, shrunk, atol=1e-3, rtol=0)
        else:  # a box edge blurs where the 32 px image is shrunk: close on average, equal away from edges
            assert (student_view - shrunk).abs().mean() < 2.0
            assert ((student_view - shrunk).abs() < 1e-3).float().mean() > 0.5


def _record_label_terms(monkeypatch) -> list:
    """Each training batch's call of the label term: (labels, mixed)."""
    from edgekd.train import losses
    from edgekd.train import trainer as trainer_module

    calls, real = [], losses.ce_loss

    def recording(logits, targets, label_smoothing=0.0, mixed=None):
        if torch.is_grad_enabled():  # training batches only: validation runs under no_grad
            calls.append((targets.clone(), mixed))
        return real(logits, targets, label_smoothing, mixed)

    monkeypatch.setattr(losses, "ce_loss", recording)
    monkeypatch.setattr(trainer_module, "ce_loss", recording)
    return calls


def test_the_mixed_labels_reach_the_label_term_only_when_alpha_is_below_one(tmp_path, image_dataset, teacher,
                                                                            monkeypatch):
    calls = _record_label_terms(monkeypatch)
    student = _student(tmp_path, image_dataset, teacher, teacher_forward="torch")
    mixup = ["augment.mixup_probability=1.0"]
    pure = run(load_recipe(student, [*mixup, "distill.alpha=1.0"]), "distill", tmp_path / "a")
    assert calls == []  # KL alone: no label is ever read
    run(load_recipe(student, [*mixup, "distill.alpha=0.5"]), "distill", tmp_path / "b")
    assert len(calls) == 4
    for labels, (partner_labels, lam) in calls:
        assert 0 < lam < 1 and sorted(partner_labels.tolist()) == sorted(labels.tolist())
        assert not torch.equal(partner_labels, labels)
    # `edgekd train` (no teacher) learns the mixed labels too
    calls.clear()
    run(load_recipe(student, mixup), "train", tmp_path / "c")
    assert len(calls) == 4 and all(mixed is not None for _, mixed in calls)
    assert pure["loss"].startswith("kd: 1*T^2*KL")


def test_the_live_teacher_runs_on_the_forward_the_run_reports(tmp_path, image_dataset, teacher, monkeypatch):
    """The per-batch teacher is the forward pass chosen once before the loop, named in the run's summary; a
    resumed run asks for the one its first attempt taught with."""
    from edgekd.train import teacher as teacher_module
    from edgekd.train.checkpoint import load_model
    from edgekd.train.teacher_forward import TeacherForward

    model, _ = load_model(teacher)
    calls, asked = [], []

    def fake_fastest(model_, meta, device, probe, folder, choice="auto", earlier=None, views=None):
        asked.append((tuple(probe.shape), earlier))

        def run_(pixels):
            calls.append(tuple(pixels.shape))
            with torch.no_grad():
                return model(pixels).float()
        return TeacherForward("recording fake (test)", run_)

    monkeypatch.setattr(teacher_module, "fastest_forward", fake_fastest)
    recipe = _student(tmp_path, image_dataset, teacher)
    summary = run(load_recipe(recipe), "distill", tmp_path / "artifacts")
    assert summary["teacher"]["forward"] == "recording fake (test)"
    batches = json.loads(Path(tmp_path / "artifacts" / "small_student" / "summary.json").read_text())
    assert batches["teacher"]["forward"] == "recording fake (test)"
    assert asked == [((12, 3, 32, 32), None)]  # chosen once, on real views at the teacher's size
    assert len(calls) == 4 and all(shape == (12, 3, 32, 32) for shape in calls)  # every batch, at 32 px
    summary = run(load_recipe(recipe, ["train.epochs=2"]), "distill", tmp_path / "artifacts", resume=True)
    assert asked[-1] == ((12, 3, 32, 32), "recording fake (test)") and len(calls) == 8
    assert summary["epochs_done"] == 2 and summary["teacher"]["forward"] == "recording fake (test)"


def test_stored_views_are_the_crops_the_teacher_saw(tmp_path, image_dataset, teacher):
    """Each epoch's student view of a photo is the stored view the teacher's logits describe."""
    from edgekd.train.checkpoint import file_sha256, load_model

    config = AugmentConfig(**AUGMENT, render_size=32)
    data = load_recipe(_student(tmp_path, image_dataset, teacher)).data
    split = open_dataset(data.__class__(**{**data.__dict__, "image_size": 32}), splits=("train",)).splits["train"]
    model, meta = load_model(teacher)
    inputs: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    views = teacher_views(_plain(model), file_sha256(teacher), 3, split, config, 32, 32, count=2,
                          seed=5, choice_seed=0, cache_root=tmp_path / "cache", batch_size=1000)
    rows = np.sort(split.rows)
    per_view = dict(enumerate(inputs))  # one teacher call per stored view k, every photo in one chunk
    from edgekd.train.augment import render_views

    for epoch in (1, 2, 3):
        picks = views.choose(rows, epoch)
        stored, logits = views.views(rows, epoch)
        pixels = torch.from_numpy(np.array(split.images[rows])).permute(0, 3, 1, 2)
        student = render_views(pixels, stored, config, 16)
        seen_by_teacher = torch.stack([per_view[k][i] for i, k in enumerate(picks)])
        torch.testing.assert_close(student, _shrink(seen_by_teacher, 16))
        with torch.no_grad():
            expected = model(seen_by_teacher).numpy().astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(logits.numpy(), expected)
    assert len({tuple(views.choose(rows, e)) for e in range(1, 6)}) > 1  # epochs draw different views


def _plain(model):
    """A choose_forward that always takes PyTorch fp32 (what these tests compare against)."""
    from edgekd.train.teacher_forward import TeacherForward, _torch_forward

    return lambda probe, earlier, views: TeacherForward("torch fp32 (test)",
                                                 _torch_forward(model, torch.device("cpu"), None))


def _fill_args(tmp_path, image_dataset, teacher) -> dict:
    """teacher_views' arguments for a 3-view fill of the 32 px photos, in chunks of 8 photos."""
    from edgekd.train.checkpoint import file_sha256, load_model

    data = load_recipe(_student(tmp_path, image_dataset, teacher)).data
    split = open_dataset(data.__class__(**{**data.__dict__, "image_size": 32}), splits=("train",)).splits["train"]
    model, _ = load_model(teacher)
    return dict(choose_forward=_plain(model), teacher_sha256=file_sha256(teacher), num_classes=3, split=split,
                config=AugmentConfig(**AUGMENT), render_size=32, teacher_size=32, count=3, seed=1,
                choice_seed=0, batch_size=8)


def _entry_folder(cache_root: Path) -> Path:
    (folder,) = (cache_root / "teacher-views").iterdir()
    return folder


def _assert_same_files(folder: Path, expected: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in expected.iterdir())
    for path in expected.iterdir():
        assert (folder / path.name).read_bytes() == path.read_bytes(), path.name


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_killed_fill_resumes_to_the_same_cache(tmp_path, image_dataset, teacher, monkeypatch, caplog):
    from edgekd.train import teacher_views as module

    args = _fill_args(tmp_path, image_dataset, teacher)
    whole = teacher_views(cache_root=tmp_path / "whole", **args)
    calls = {"n": 0}
    real = module._save_atomic

    def die_after_two_chunks(path, array):
        real(path, array)
        if path.name == "filled.npy" and array.any():  # a chunk done (not the new slots' all-False array)
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(module, "_save_atomic", die_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        teacher_views(cache_root=tmp_path / "killed", **args)
    monkeypatch.setattr(module, "_save_atomic", real)
    assert np.load(_entry_folder(tmp_path / "killed") / "filled.npy").sum() == 16  # two chunks of 8 photos
    with caplog.at_level(logging.INFO):
        resumed = teacher_views(cache_root=tmp_path / "killed", **args)
    assert "(16 done before)" in caplog.text and _warnings(caplog) == []  # resumed, not rebuilt
    np.testing.assert_array_equal(resumed.logits, whole.logits)
    np.testing.assert_array_equal(resumed.params, whole.params)
    _assert_same_files(_entry_folder(tmp_path / "killed"), _entry_folder(tmp_path / "whole"))


def _truncate_logits(folder: Path, args: dict) -> None:
    data = (folder / "logits.npy").read_bytes()
    (folder / "logits.npy").write_bytes(data[:len(data) // 2])


def _params_of_another_seed(folder: Path, args: dict) -> None:
    from edgekd.train.teacher_views import draw_photo_views

    np.save(folder / "params.npy", draw_photo_views(np.load(folder / "keys.npy"), 3, 32, args["config"], seed=2))


def _garbage_filled(folder: Path, args: dict) -> None:
    (folder / "filled.npy").write_bytes(b"\x93NUMPY garbage, not an array" * 4)


def _short_filled(folder: Path, args: dict) -> None:
    np.save(folder / "filled.npy", np.ones(3, bool))


def _foreign_manifest(folder: Path, args: dict) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["inputs"]["teacher_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, reason", [
    (_truncate_logits, "logits.npy is unreadable"),
    (_params_of_another_seed, "params.npy is not the views seed 1 draws"),
    (_garbage_filled, "filled.npy is unreadable"),
    (_short_filled, "filled.npy holds bool [3]"),
    (_foreign_manifest, "manifest.json describes another store (inputs differ)"),
], ids=["truncated-logits", "params-of-another-seed", "garbage-filled", "short-filled", "foreign-manifest"])
def test_a_damaged_or_foreign_cache_is_rebuilt_never_read(tmp_path, image_dataset, teacher, caplog, damage,
                                                          reason):
    args = _fill_args(tmp_path, image_dataset, teacher)
    clean = teacher_views(cache_root=tmp_path / "clean", **args)
    teacher_views(cache_root=tmp_path / "damaged", **args)
    folder = _entry_folder(tmp_path / "damaged")
    damage(folder, args)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rebuilt = teacher_views(cache_root=tmp_path / "damaged", **args)
    (warning,) = _warnings(caplog)
    assert str(folder) in warning and reason in warning
    assert "running the teacher (torch fp32 (test)) on 3 views" in caplog.text and "done before" not in caplog.text
    np.testing.assert_array_equal(rebuilt.logits, clean.logits)
    np.testing.assert_array_equal(rebuilt.params, clean.params)
    _assert_same_files(folder, _entry_folder(tmp_path / "clean"))


def test_a_distillation_with_stored_views_trains_and_reuses_the_fill(tmp_path, image_dataset, teacher, caplog):
    recipe = _student(tmp_path, image_dataset, teacher, teacher_views=2)
    first = run(load_recipe(recipe), "distill", tmp_path / "artifacts")
    assert first["status"] == "finished"
    caplog.clear()
    with caplog.at_level("INFO"):
        run(load_recipe(recipe, ["train.seed=1"]), "distill", tmp_path / "artifacts")
    assert "read from" in caplog.text and "running the teacher" not in caplog.text  # another seed, same fill


def test_bf16_is_offered_for_the_teacher_only_where_the_cpu_has_it(teacher, monkeypatch, tmp_path):
    from edgekd.train import teacher_forward
    from edgekd.train.checkpoint import load_model

    model, meta = load_model(teacher)
    for native in (False, True):
        monkeypatch.setattr(teacher_forward, "cpu_has_native_bf16", lambda: native)
        names = list(teacher_forward.candidates(model, meta, torch.device("cpu"), tmp_path))
        assert any("bf16" in name for name in names) == native
        assert "onnxruntime fp32 (CPU)" in names and "torch fp32 (CPU, channels-last)" in names


def test_openvino_bf16_runs_the_teachers_export_and_matches_torch(teacher, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    from edgekd.train import teacher_forward
    from edgekd.train.checkpoint import file_sha256, load_model

    model, meta = load_model(teacher)
    meta["sha256"] = file_sha256(teacher)
    monkeypatch.setattr(teacher_forward, "cpu_has_native_bf16", lambda: True)
    via_openvino = teacher_forward.fastest_forward(model, meta, torch.device("cpu"), torch.rand(4, 3, 32, 32) * 255,
                                                   tmp_path, choice="openvino")
    assert via_openvino.name == "openvino bf16 (CPU, native bf16)"
    for batch in (8, 3):  # any batch size: a fill's last chunk is smaller than the others
        probe = torch.rand(batch, 3, 32, 32) * 255
        expected = teacher_forward._torch_forward(model, torch.device("cpu"), None)(probe)
        got = via_openvino.run(probe)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max() + 0.02  # bf16 keeps 8 bits of mantissa


def test_the_fastest_teacher_forward_is_measured_and_onnxruntime_matches_torch(teacher, tmp_path, caplog):
    from edgekd.train.checkpoint import file_sha256, load_model
    from edgekd.train.teacher_forward import _torch_forward, fastest_forward

    model, meta = load_model(teacher)
    meta["sha256"] = file_sha256(teacher)
    probe = torch.rand(8, 3, 32, 32) * 255
    with caplog.at_level(logging.INFO):
        chosen = fastest_forward(model, meta, torch.device("cpu"), probe, tmp_path / "onnx")
    assert chosen.images_per_s > 0 and "onnxruntime fp32 (CPU)" in caplog.text  # every candidate was timed
    via_onnx = fastest_forward(model, meta, torch.device("cpu"), probe, tmp_path / "onnx", choice="onnxruntime")
    assert via_onnx.name == "onnxruntime fp32 (CPU)" and len(list((tmp_path / "onnx").glob("*.onnx"))) == 1
    torch.testing.assert_close(via_onnx.run(probe), _torch_forward(model, torch.device("cpu"), None)(probe),
                               rtol=1e-4, atol=1e-4)
    kept = fastest_forward(model, meta, torch.device("cpu"), probe, tmp_path / "onnx", earlier=via_onnx.name)
    assert kept.name == via_onnx.name and kept.images_per_s is None  # a resumed fill keeps its path, unmeasured


def test_a_job_smaller_than_an_export_keeps_pytorchs_pass_and_a_large_one_measures(teacher, tmp_path, caplog):
    from edgekd.train.checkpoint import file_sha256, load_model
    from edgekd.train.teacher_forward import fastest_forward

    model, meta = load_model(teacher)
    meta["sha256"] = file_sha256(teacher)
    probe = torch.rand(8, 3, 32, 32) * 255
    with caplog.at_level(logging.INFO):
        small = fastest_forward(model, meta, torch.device("cpu"), probe, tmp_path / "onnx", views=96)
    assert small.name == "torch fp32 (CPU, channels-last)" and small.images_per_s > 0
    assert "too few to pay for an export" in caplog.text and not (tmp_path / "onnx").exists()  # nothing exported
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fastest_forward(model, meta, torch.device("cpu"), probe, tmp_path / "onnx", views=10**12)
    assert "onnxruntime fp32 (CPU)" in caplog.text and len(list((tmp_path / "onnx").glob("*.onnx"))) == 1


def test_a_distillation_run_says_which_teacher_forward_filled_its_views(tmp_path, image_dataset, teacher):
    recipe = load_recipe(_student(tmp_path, image_dataset, teacher), ["distill.teacher_views=2",
                                                                      "distill.teacher_forward=onnxruntime"])
    summary = run(recipe, "distill", tmp_path / "artifacts")
    fill = summary["teacher_views_fill"]
    assert fill["forward"] == "onnxruntime fp32 (CPU)" and fill["views"] > 0 and fill["seconds"] > 0


def test_a_forward_pass_this_machine_cannot_take_is_skipped_with_the_reason(teacher, tmp_path, monkeypatch, caplog):
    from edgekd.train import teacher_forward
    from edgekd.train.checkpoint import load_model

    model, meta = load_model(teacher)
    real = teacher_forward.candidates

    def with_a_broken_one(*args, **kwargs):
        def broken():
            raise RuntimeError("no such kernel")
        return {**real(*args, **kwargs), "broken path": broken}

    monkeypatch.setattr(teacher_forward, "candidates", with_a_broken_one)
    with caplog.at_level(logging.INFO):
        chosen = teacher_forward.fastest_forward(model, {**meta, "sha256": "0" * 64}, torch.device("cpu"),
                                                 torch.rand(4, 3, 32, 32) * 255, tmp_path, choice="torch")
    assert chosen.name != "broken path" and "broken path unavailable (RuntimeError: no such kernel)" in caplog.text


def test_the_teacher_is_warned_about_only_when_it_sees_the_students_views_blown_up():
    from edgekd.train.teacher import resolution_note

    level, message = resolution_note(teacher_size=150, render_size=64, student_size=64)
    assert level == logging.WARNING and "augment.render_size: 150" in message
    # a 224 px teacher of 150 px photos: views cut at 150 px and resized lose nothing, so only a note
    level, message = resolution_note(teacher_size=224, render_size=150, student_size=64)
    assert level == logging.INFO and "larger than 150px" in message
    assert resolution_note(teacher_size=150, render_size=150, student_size=64) is None
    assert resolution_note(teacher_size=64, render_size=150, student_size=32) is None  # views shrunk for it


def _fill_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "running the teacher" in r.getMessage()
                     or "read from" in r.getMessage())


def test_adding_unlabeled_photos_fills_only_their_views(tmp_path, image_dataset, teacher, caplog):
    """The issue's case: a distillation given more photos keeps every stored view of the photos it had and
    runs the teacher on the new photos alone; their views are what a fill of everything from scratch stores."""
    rng = np.random.default_rng(7)
    for i in range(5):
        write_image(tmp_path / "more" / f"{i}.png", (i * 50, 90, 200), rng, size=(32, 32), fmt="PNG")
    recipe = _student(tmp_path, image_dataset, teacher, teacher_views=2, teacher_forward="onnxruntime")
    with caplog.at_level(logging.INFO):  # onnxruntime fp32: what a plain torch fill below matches to 1e-4
        run(load_recipe(recipe), "distill", tmp_path / "artifacts")
    folder = _entry_folder(tmp_path / "cache")
    before = {name: np.load(folder / f"{name}.npy") for name in ("keys", "params", "logits")}
    assert "on 2 views of 48 photos" in _fill_log(caplog)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        summary = run(load_recipe(recipe, [f"data.unlabeled={tmp_path / 'more'}", "name=with_more"]), "distill",
                      tmp_path / "artifacts")
    assert "on 2 views of 5 photos at 32px (48 done before)" in _fill_log(caplog)
    assert summary["teacher_views_fill"]["views"] == 10
    after = {name: np.load(folder / f"{name}.npy") for name in ("keys", "params", "logits")}
    for name, array in before.items():  # the 48 photos' slots are untouched
        np.testing.assert_array_equal(after[name][:48], array)
    assert len(after["keys"]) == 53

    fresh_cache = tmp_path / "fresh"
    from edgekd.data import open_dataset as open_data
    data = load_recipe(recipe, [f"data.unlabeled={tmp_path / 'more'}"]).data
    split = open_data(data.__class__(**{**data.__dict__, "image_size": 32}), splits=("train",)).splits["train"]
    from edgekd.train.checkpoint import file_sha256, load_model
    model, _ = load_model(teacher)
    fresh = teacher_views(_plain(model), file_sha256(teacher), 3, split, AugmentConfig(**AUGMENT, render_size=32),
                          32, 32, count=2, seed=0, choice_seed=0, cache_root=fresh_cache)
    grown = teacher_views(_plain(model), file_sha256(teacher), 3, split, AugmentConfig(**AUGMENT, render_size=32),
                          32, 32, count=2, seed=0, choice_seed=0, cache_root=tmp_path / "cache")
    np.testing.assert_array_equal(grown.params[grown.slots[split.rows]], fresh.params[fresh.slots[split.rows]])
    np.testing.assert_allclose(grown.all_logits(split.rows), fresh.all_logits(split.rows), atol=2e-3)


def test_a_photo_keeps_its_views_when_moved_or_renamed(tmp_path, image_dataset, teacher, caplog):
    import shutil

    args = _fill_args(tmp_path, image_dataset, teacher)
    first = teacher_views(cache_root=tmp_path / "cache", **args)
    moved = tmp_path / "moved"
    for path in sorted(image_dataset.rglob("*.jpg")):
        target = moved / path.relative_to(image_dataset).parent / f"renamed_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    data = load_recipe(_student(tmp_path, moved, teacher)).data
    split = open_dataset(data.__class__(**{**data.__dict__, "image_size": 32}), splits=("train",)).splits["train"]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = teacher_views(cache_root=tmp_path / "cache", **{**args, "split": split})
    assert "read from" in _fill_log(caplog) and again.fill is None
    np.testing.assert_array_equal(again.all_logits(split.rows), first.all_logits(args["split"].rows))


def test_a_crash_while_adding_photos_leaves_the_store_as_it_was(tmp_path, image_dataset, teacher, monkeypatch,
                                                                caplog):
    from edgekd.train import teacher_views as module

    args = _fill_args(tmp_path, image_dataset, teacher)
    split = args["split"]
    half = module.Split(split.name, split.images, split.labels, split.rows[: len(split.rows) // 2])
    teacher_views(cache_root=tmp_path / "cache", **{**args, "split": half})
    real = module._save_atomic

    def die_before_keys(path, array):
        if path.name == "keys.npy":
            raise KeyboardInterrupt
        real(path, array)

    monkeypatch.setattr(module, "_save_atomic", die_before_keys)
    with pytest.raises(KeyboardInterrupt):
        teacher_views(cache_root=tmp_path / "cache", **args)
    monkeypatch.setattr(module, "_save_atomic", real)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        whole = teacher_views(cache_root=tmp_path / "cache", **args)
    assert _warnings(caplog) == [] and f"({len(half.rows)} done before)" in _fill_log(caplog)
    clean = teacher_views(cache_root=tmp_path / "clean", **args)
    np.testing.assert_array_equal(whole.params[whole.slots[split.rows]], clean.params[clean.slots[split.rows]])
    np.testing.assert_allclose(whole.all_logits(split.rows), clean.all_logits(split.rows), atol=2e-3)


def test_a_long_schedule_over_few_stored_views_is_warned_about():
    from edgekd.train.teacher import repeats_note

    assert repeats_note(epochs=30, views=8) is None  # 3.75 times each: as good as the live teacher
    assert repeats_note(epochs=48, views=8) is None  # 6 times: the limit
    message = repeats_note(epochs=100, views=8)
    assert "12.5 times" in message and "distill.teacher_views=null" in message
    assert "at least 17 views" in message  # 100 / 17 < 6
    assert repeats_note(epochs=100, views=17) is None
