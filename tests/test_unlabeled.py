"""Semi-supervised data: a folder of unlabeled photos, and label_fraction hiding training labels."""

import json
import logging
import os

import numpy as np
import pytest

from conftest import make_image_folder, write_image
from edgekd.data import UNLABELED, RowStore, channel_stats, open_dataset, stratified_subset
from edgekd.data import cache as cache_module
from edgekd.errors import DataError
from edgekd.recipe import DataConfig
from edgekd.runtime.preprocess import load_rgb
from edgekd.train.batches import iter_batches


def config(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), image_size=kw.pop("image_size", 16), **kw)


def labelled_root(tmp_path, per_class=4, val=True):
    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=per_class, seed=1)
    if val:
        make_image_folder(root / "val", per_class=2, seed=2)
    return root


def photo_folder(tmp_path, count=5):
    """`count` good photos in nested folders, three bad files, and files that are not photos at all."""
    folder = tmp_path / "photos"
    rng = np.random.default_rng(3)
    for i in range(count):
        write_image(folder / f"trip{i % 2}" / ("deep" if i == 4 else "") / f"{i}.png", (i * 40, 90, 200), rng,
                    fmt="PNG")
    (folder / "bad.jpg").write_bytes((folder / "trip0" / "0.png").read_bytes()[:100])
    (folder / "trip1" / "text.jpg").write_text("not an image")
    (folder / "empty.webp").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image file name")
    write_image(folder / ".thumbnails" / "x.jpg", (0, 0, 0), rng)  # hidden: ignored
    return folder


def test_unlabeled_photos_are_decoded_once_counted_and_their_bad_files_skipped(tmp_path, caplog, monkeypatch):
    root, photos = labelled_root(tmp_path), photo_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        dataset = open_dataset(config(root, unlabeled=str(photos)))
    assert len([r for r in caplog.records if r.getMessage().startswith("skipped ")]) == 3
    assert sorted(os.path.basename(f) for f in dataset.summary()["skipped_files"]["unlabeled"]) == \
        ["bad.jpg", "empty.webp", "text.jpg"]
    train = dataset.splits["train"]
    assert len(train) == 12 + 5 and train.unlabeled_count == 5
    assert train.row_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [UNLABELED] * 5
    assert len(dataset.splits["val"]) == 6 and dataset.splits["val"].unlabeled_count == 0
    assert "train 17 (12 labelled, 5 taught by the teacher alone), val 6 images" in dataset.describe()
    summary = dataset.summary()
    assert summary["unlabeled"] == 5 and summary["sizes"]["train"] == 17
    assert summary["skipped_images"] == {"train": 0, "val": 0, "unlabeled": 3}
    # The photos' pixels are what the runtime decoder makes of their files, in sorted path order.
    files = sorted(p for p in photos.rglob("*.png") if ".thumbnails" not in p.parts)
    pixels, labels = train.take(np.arange(12, 17))
    assert labels.tolist() == [UNLABELED] * 5
    for got, path in zip(pixels, files):
        np.testing.assert_array_equal(got, load_rgb(path, 16))
    calls = []
    real = cache_module._decode_file
    monkeypatch.setattr(cache_module, "_decode_file", lambda *a: calls.append(a) or real(*a))
    open_dataset(config(root, unlabeled=str(photos)))
    assert calls == []  # a cache entry of its own, reused


def test_the_train_store_reads_rows_across_both_caches(tmp_path):
    root, photos = labelled_root(tmp_path), photo_folder(tmp_path)
    dataset = open_dataset(config(root, unlabeled=str(photos)))
    train, entries = dataset.splits["train"], dataset.train_entries
    assert [e.name for e in entries] == ["train", "unlabeled"]
    store = train.images
    assert isinstance(store, RowStore) and len(store) == 17 and store.shape == (17, 16, 16, 3)
    assert store.dtype == np.uint8
    rows = np.array([0, 5, 11, 12, 16])
    got = store[rows]
    assert got.shape == (5, 16, 16, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:3], entries[0].images[[0, 5, 11]])
    np.testing.assert_array_equal(got[3:], entries[1].images[[0, 4]])
    np.testing.assert_array_equal(store[rows[::-1]], got[::-1])  # any order, returned as asked
    np.testing.assert_array_equal(store[3:14], np.concatenate([entries[0].images[3:], entries[1].images[:2]]))
    with pytest.raises(IndexError):
        store[np.array([17])]
    # Batches come out as before, unlabeled rows labelled -1.
    batches = list(iter_batches(train, 5, shuffle=True, seed=1))
    assert sum(len(b.rows) for b in batches) == 17
    assert sorted(np.concatenate([b.labels.numpy() for b in batches]).tolist()) == \
        [UNLABELED] * 5 + [0] * 4 + [1] * 4 + [2] * 4
    for b in batches:
        np.testing.assert_array_equal(b.pixels.permute(0, 2, 3, 1).numpy(), store[b.rows])
    mean, std = channel_stats(train, chunk=4)
    every = np.asarray(store).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, every.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, every.std(0), rtol=1e-7)


def test_labeled_only_drops_the_unlabeled_rows(tmp_path):
    root, photos = labelled_root(tmp_path), photo_folder(tmp_path)
    train = open_dataset(config(root, unlabeled=str(photos), label_fraction=0.5,
                                hidden_labels="unlabeled")).splits["train"]
    labelled = train.labeled_only()
    assert len(labelled) == 6 and labelled.unlabeled_count == 0
    assert np.bincount(labelled.row_labels).tolist() == [2, 2, 2]
    assert train.unlabeled_count == 6 + 5  # the hidden half plus the photos


def test_a_missing_empty_or_undecodable_unlabeled_folder_is_refused_before_decoding(tmp_path, monkeypatch):
    root = labelled_root(tmp_path)
    calls = []
    monkeypatch.setattr(cache_module, "_decode_file", lambda *a: calls.append(a))
    with pytest.raises(DataError, match=f"data.unlabeled: {tmp_path / 'nowhere'} is not a folder"):
        open_dataset(config(root, unlabeled=str(tmp_path / "nowhere")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    with pytest.raises(DataError, match=f"data.unlabeled: {tmp_path / 'empty'} holds no image files"):
        open_dataset(config(root, unlabeled=str(tmp_path / "empty")))
    assert calls == []  # refused before any image was decoded
    monkeypatch.undo()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_text("not an image")
    with pytest.raises(DataError, match=f"no image in {tmp_path / 'broken'} could be decoded"):
        open_dataset(config(root, unlabeled=str(tmp_path / "broken")))


def test_unlabeled_photos_are_only_read_for_the_train_split(tmp_path):
    root = labelled_root(tmp_path)
    dataset = open_dataset(config(root, unlabeled=str(tmp_path / "nowhere")), splits=("val",))
    assert len(dataset.splits["val"]) == 6 and "unlabeled" not in dataset.entries


def test_label_fraction_keeps_a_seeded_stratified_share_of_train_and_leaves_val_alone(tmp_path):
    root = labelled_root(tmp_path, per_class=11, val=False)  # 1 per class held out: 10 per class in train
    full = open_dataset(config(root))
    part = open_dataset(config(root, label_fraction=0.3))
    assert np.bincount(part.splits["train"].row_labels).tolist() == [3, 3, 3]
    assert set(part.splits["train"].rows) <= set(full.splits["train"].rows)
    np.testing.assert_array_equal(part.splits["val"].rows, full.splits["val"].rows)
    np.testing.assert_array_equal(part.splits["val"].row_labels, full.splits["val"].row_labels)
    assert part.labels_hidden == 21 and part.summary()["labels_hidden"] == 21
    assert part.summary()["unlabeled"] == 0 and "21 hidden, dropped" in part.describe()
    again = open_dataset(config(root, label_fraction=0.3))
    np.testing.assert_array_equal(again.splits["train"].rows, part.splits["train"].rows)
    larger = open_dataset(config(root, label_fraction=0.6))
    assert set(part.splits["train"].rows) < set(larger.splits["train"].rows)  # nested label budgets


def test_stratified_subset_is_per_class_seeded_and_keeps_every_class():
    labels = np.repeat(np.arange(3), [10, 20, 1])
    kept = stratified_subset(labels, 0.25, seed=4)
    assert np.bincount(labels[kept]).tolist() == [2, 5, 1]  # round(2.5) = 2; a lone image keeps its label
    np.testing.assert_array_equal(kept, stratified_subset(labels, 0.25, seed=4))
    assert not np.array_equal(kept, stratified_subset(labels, 0.25, seed=5))


def test_hidden_labels_drop_or_keep_the_images_as_unlabeled_rows(tmp_path):
    root = labelled_root(tmp_path, per_class=11, val=False)
    dropped = open_dataset(config(root, label_fraction=0.3))
    kept = open_dataset(config(root, label_fraction=0.3, hidden_labels="unlabeled"))
    full = open_dataset(config(root))
    train = kept.splits["train"]
    assert len(dropped.splits["train"]) == 9 and dropped.splits["train"].unlabeled_count == 0
    assert len(train) == 30 and train.unlabeled_count == 21
    np.testing.assert_array_equal(train.rows, full.splits["train"].rows)
    np.testing.assert_array_equal(train.labeled_only().rows, dropped.splits["train"].rows)
    assert "train 30 (9 labelled, 21 taught by the teacher alone)" in kept.describe()
    assert kept.summary()["unlabeled"] == 21 and kept.summary()["labelled"] == 9
    # val shares the train cache's labels; hiding train labels must not touch them.
    np.testing.assert_array_equal(kept.splits["val"].row_labels, full.splits["val"].row_labels)
    assert (kept.entries["train"].labels >= 0).all()


def test_no_hidden_label_reaches_a_cross_entropy_term_teacher_or_student(tmp_path, image_dataset, monkeypatch):
    """With data.label_fraction and hidden_labels: unlabeled, the teacher's and the student's training
    cross-entropy see exactly the labels kept, each once an epoch: a hidden label that leaked would add
    labels to what they see."""
    import torch

    from conftest import write_recipe
    from edgekd.recipe import load_recipe
    from edgekd.train import losses
    from edgekd.train import trainer as trainer_module

    seen: list[int] = []
    real = losses.ce_loss

    def recording(logits, targets, label_smoothing=0.0, mixed=None):
        if torch.is_grad_enabled():  # training batches only: validation runs under no_grad
            seen.extend(targets[targets >= 0].tolist())
        return real(logits, targets, label_smoothing, mixed)

    monkeypatch.setattr(losses, "ce_loss", recording)
    monkeypatch.setattr(trainer_module, "ce_loss", recording)
    hide = {"label_fraction": 0.25, "hidden_labels": "unlabeled"}
    teacher = write_recipe(tmp_path / "t.yaml", image_dataset, model={"blocks": 2}, data=hide, train={"epochs": 1})
    student = write_recipe(tmp_path / "s.yaml", image_dataset, model={"blocks": 1}, data=hide, train={"epochs": 1},
                           teacher={"recipe": str(teacher)}, distill={"alpha": 0.5})
    # The labels kept, drawn apart from the data path under test: a quarter of each class, as split_seed says.
    every = open_dataset(load_recipe(teacher, ["data.label_fraction=1.0"]).data).splits["train"].row_labels
    kept = sorted(int(label) for label in every[stratified_subset(every, 0.25, 0)])
    assert len(every) == 48 and len(kept) == 12

    summary = trainer_module.run(load_recipe(teacher), "train", tmp_path / "artifacts")
    assert sorted(seen) == kept, "the teacher's cross-entropy saw labels that data.label_fraction hid"
    # The teacher trains on the labelled quarter alone; its summary says so.
    assert (summary["dataset"]["labelled"], summary["dataset"]["unlabeled"]) == (12, 0)
    assert summary["dataset"]["labels_hidden"] == 36

    seen.clear()
    summary = trainer_module.run(load_recipe(student), "distill", tmp_path / "artifacts")
    assert sorted(seen) == kept, "the student's cross-entropy saw labels that data.label_fraction hid"
    assert (summary["dataset"]["labelled"], summary["dataset"]["unlabeled"]) == (12, 36)


FEW_LABELS_SMALL = ["data.classes=[buildings, forest, sea]", "data.label_fraction=0.25", "train.epochs=1",
                    "train.batch_size=8"]


def _invoke(command: str, recipe: str, artifacts, *overrides: str) -> str:
    from click.testing import CliRunner

    from conftest import RECIPES
    from edgekd.cli import cli as main

    result = CliRunner().invoke(main, [command, str(RECIPES / recipe), "--artifacts", str(artifacts),
                                       *[a for item in overrides for a in ("--set", item)]])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def few_label_teacher(tmp_path_factory):
    """recipes/few_labels_teacher.yaml shrunk to a generated tree (Lite0 at 32 px, one epoch): the generated
    root, the teacher's run folder and what `edgekd train` printed. Shared by the two tests below."""
    base = tmp_path_factory.mktemp("few_labels")
    root = labelled_root(base, per_class=8)
    output = _invoke("train", "few_labels_teacher.yaml", base / "art", f"data.root={root}", *FEW_LABELS_SMALL,
                     "data.image_size=32", f"data.cache_dir={base / 'cache'}")
    return root, base / "art" / "few_labels_teacher", output


def test_the_few_label_recipes_run_a_tiny_epoch_and_say_who_teaches_whom(tmp_path, few_label_teacher):
    """recipes/few_labels_teacher.yaml then few_labels_8block.yaml, shrunk to a generated tree: the teacher
    trains on the labelled photos alone, the student learns from all of them, and the first lines say so."""
    root, teacher, teacher_output = few_label_teacher
    assert "train 6, val 6 images" in teacher_output and "labels of 25% of train kept (18 hidden" in teacher_output
    output = _invoke("distill", "few_labels_8block.yaml", "art", f"data.root={root}", *FEW_LABELS_SMALL,
                     "data.image_size=16", "augment.render_size=32", "model.blocks=2", "precision=fp32",
                     f"teacher.checkpoint={teacher}")
    assert "train 24 (6 labelled, 18 taught by the teacher alone)" in output
    summary = json.loads((tmp_path / "art" / "few_labels_8block" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["dataset"]["labelled"] == 6
    assert summary["dataset"]["unlabeled"] == 18 and summary["teacher_views_fill"]["views"] == 24 * 8


@pytest.mark.slow
def test_the_self_trained_teacher_recipe_learns_from_every_photo_and_then_teaches(tmp_path, few_label_teacher):
    """recipes/few_labels_teacher_selftrained.yaml, shrunk: a fresh Lite0 distilled from the first teacher on the
    labelled and the unlabeled photos; its best.pt then teaches the 8-block like any teacher."""
    root, teacher, _ = few_label_teacher
    small = [f"data.root={root}", *FEW_LABELS_SMALL, "data.image_size=32"]
    output = _invoke("distill", "few_labels_teacher_selftrained.yaml", "art", *small, "augment.render_size=32",
                     f"teacher.checkpoint={teacher}")
    assert "train 24 (6 labelled, 18 taught by the teacher alone)" in output
    summary = json.loads((tmp_path / "art" / "few_labels_teacher_selftrained" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["model"]["name"] == "efficientnet_lite0"
    assert (summary["dataset"]["labelled"], summary["dataset"]["unlabeled"]) == (6, 18)
    _invoke("distill", "few_labels_8block.yaml", "art", *small, "data.image_size=16", "augment.render_size=32",
            "model.blocks=2", "precision=fp32", f"teacher.checkpoint={tmp_path / 'art/few_labels_teacher_selftrained'}")
    student = json.loads((tmp_path / "art" / "few_labels_8block" / "summary.json").read_text())
    assert student["status"] == "finished" and "few_labels_teacher_selftrained" in json.dumps(student["teacher"])
