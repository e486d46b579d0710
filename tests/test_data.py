import gzip
import logging
import os

import numpy as np
import pytest

from conftest import make_image_folder, write_image
from edgekd.data import channel_stats, open_dataset, stratified_holdout
from edgekd.data import cache as cache_module
from edgekd.data.sources import read_idx
from edgekd.errors import DataError
from edgekd.recipe import DataConfig

INTEL = {"buildings": (200, 60, 60), "forest": (40, 180, 60), "glacier": (230, 230, 240),
         "mountain": (120, 110, 100), "sea": (50, 80, 210), "street": (90, 90, 90)}


def config(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), image_size=kw.pop("image_size", 16), **kw)


def test_kaggle_nested_intel_layout_is_read_as_downloaded(tmp_path):
    root = tmp_path / "intel-image-classification"
    make_image_folder(root / "seg_train" / "seg_train", per_class=5, classes=INTEL)
    make_image_folder(root / "seg_test" / "seg_test", per_class=2, classes=INTEL)
    pred = root / "seg_pred" / "seg_pred"
    write_image(pred / "1.jpg", (0, 0, 0), np.random.default_rng(0))
    dataset = open_dataset(config(root, classes=list(INTEL)), splits=("train", "val", "test"))
    assert dataset.class_names == list(INTEL)
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 24, "val": 6, "test": 12}
    assert dataset.val_held_out
    assert np.bincount(dataset.splits["val"].row_labels).tolist() == [1] * 6
    pixels, labels = dataset.splits["test"].take(np.arange(12))
    assert pixels.shape == (12, 16, 16, 3) and pixels.dtype == np.uint8
    assert labels.tolist() == [i for i in range(6) for _ in range(2)]


def test_seed001_layout_with_unlabeled_test_folder(tmp_path):
    root = tmp_path / "imagenet10"
    make_image_folder(root / "train", per_class=4)
    make_image_folder(root / "validation", per_class=2)
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(root / "test" / f"{i}.jpg", (10, 10, 10), rng)
    dataset = open_dataset(config(root), splits=("train", "val", "test"))
    assert not dataset.val_held_out
    assert len(dataset.splits["val"]) == 6
    assert dataset.splits["test"].labels is None
    with pytest.raises(DataError, match="no labels"):
        _ = dataset.splits["test"].row_labels


def test_corrupt_images_are_skipped_with_one_warning_each_and_counted(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d" / "train", per_class=4).parent
    (root / "train" / "forest" / "truncated.jpg").write_bytes(
        (root / "train" / "forest" / "0.jpg").read_bytes()[:200])
    (root / "train" / "sea" / "text.jpg").write_text("not an image")
    (root / "train" / "sea" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="edgekd"):
        dataset = open_dataset(config(root))
    skipped_lines = [r for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert len(skipped_lines) == 3
    assert dataset.summary()["skipped_images"]["train"] == 3
    assert len(dataset.splits["train"]) + len(dataset.splits["val"]) == 12
    assert sorted(os.path.basename(f) for f in dataset.summary()["skipped_files"]["train"]) == \
        ["empty.png", "text.jpg", "truncated.jpg"]


def test_images_are_decoded_once_and_the_cache_follows_file_changes(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "d" / "train", per_class=3).parent
    first = open_dataset(config(root))
    calls = []
    real = cache_module._decode_file
    monkeypatch.setattr(cache_module, "_decode_file", lambda *a: calls.append(a) or real(*a))
    second = open_dataset(config(root))
    assert calls == []  # nothing decoded again
    np.testing.assert_array_equal(first.splits["train"].images, second.splits["train"].images)
    touched = root / "train" / "sea" / "0.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    open_dataset(config(root))
    assert len(calls) == 9  # a changed file list (mtime) gets a fresh cache entry
    assert isinstance(first.splits["train"].images, np.memmap)


def test_missing_or_empty_dataset_fails_with_what_was_expected(tmp_path):
    with pytest.raises(DataError) as err:
        open_dataset(config(tmp_path / "nowhere"))
    assert "does not exist" in str(err.value) and "kaggle.com" in err.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no training folder"):
        open_dataset(config(tmp_path / "empty"))
    (tmp_path / "noclasses" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no class folders"):
        open_dataset(config(tmp_path / "noclasses"))


def test_declared_classes_must_match_the_folders(tmp_path):
    root = make_image_folder(tmp_path / "d" / "train", per_class=2).parent
    with pytest.raises(DataError, match=r"missing \['glacier'\]"):
        open_dataset(config(root, classes=["buildings", "forest", "glacier", "sea"]))


def test_stratified_holdout_is_seeded_disjoint_and_per_class():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    keep, held = stratified_holdout(labels, 0.1, seed=5)
    assert np.bincount(labels[held]).tolist() == [1, 2, 3]
    assert set(keep).isdisjoint(held) and len(keep) + len(held) == 60
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.1, seed=5)[1])
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=6)[1])


def test_max_per_class_takes_a_seeded_subset(tmp_path):
    root = make_image_folder(tmp_path / "d" / "train", per_class=10).parent
    dataset = open_dataset(config(root, max_per_class=4), splits=("train", "val"))
    assert len(dataset.splits["train"]) + len(dataset.splits["val"]) == 12


def test_channel_stats_match_numpy(tmp_path):
    root = make_image_folder(tmp_path / "d" / "train", per_class=5).parent
    split = open_dataset(config(root)).splits["train"]
    mean, std = channel_stats(split, chunk=4)
    pixels = split.images[np.sort(split.rows)].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-7)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_become_three_channel_images(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    dataset = open_dataset(DataConfig(kind="fashion-mnist", root=str(tmp_path), image_size=28),
                           splits=("train", "val", "test"))
    assert dataset.class_names[0] == "T-shirt/top" and len(dataset.class_names) == 10
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 30, "val": 10, "test": 20}
    gray = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    pixels, _ = dataset.splits["test"].take(np.arange(20))
    np.testing.assert_array_equal(pixels[..., 0], gray)
    np.testing.assert_array_equal(pixels[..., 2], gray)


def test_missing_fashion_mnist_says_which_package_to_install(tmp_path):
    with pytest.raises(DataError) as err:
        open_dataset(DataConfig(kind="fashion-mnist", root=str(tmp_path)))
    assert "apt-get install dataset-fashion-mnist" in err.value.hint


def test_a_damaged_idx_file_is_refused(tmp_path):
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + (5).to_bytes(4, "big") + b"abc"))
    with pytest.raises(DataError, match="header promises"):
        read_idx(tmp_path / "x.gz")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian's dataset-fashion-mnist is not installed (`.ci/run` installs it)")
def test_real_fashion_mnist_from_debian():
    dataset = open_dataset(DataConfig(kind="fashion-mnist", image_size=28, max_per_class=30),
                           splits=("train", "test"))
    assert len(dataset.splits["train"]) == 270 and len(dataset.splits["test"]) == 300  # 10% held out
    assert np.bincount(dataset.splits["test"].row_labels).tolist() == [30] * 10


def test_train_split_alone_still_excludes_the_held_out_rows(tmp_path):
    root = make_image_folder(tmp_path / "d" / "train", per_class=10).parent
    both = open_dataset(config(root))
    alone = open_dataset(config(root), splits=("train",))
    np.testing.assert_array_equal(alone.splits["train"].rows, both.splits["train"].rows)
    make_image_folder(root / "val", per_class=2)
    with_val = open_dataset(config(root), splits=("train",))
    assert len(with_val.splits["train"]) == 30  # a real val folder: nothing held out


def test_decoding_in_worker_processes_gives_the_same_cache(tmp_path):
    root = make_image_folder(tmp_path / "d" / "train", per_class=6).parent
    serial = open_dataset(config(root, cache_dir=str(tmp_path / "c1")), splits=("train",))
    parallel = open_dataset(config(root, cache_dir=str(tmp_path / "c2")), splits=("train",), workers=2)
    np.testing.assert_array_equal(serial.splits["train"].images, parallel.splits["train"].images)


def test_the_cache_holds_exactly_what_the_runtime_decoder_returns(tmp_path):
    from edgekd.runtime.preprocess import load_rgb

    root = tmp_path / "d"
    make_image_folder(root / "train", per_class=2)
    make_image_folder(root / "val", per_class=2, seed=5)
    split = open_dataset(config(root, image_size=24), splits=("val",)).splits["val"]
    first_file = sorted((root / "val" / "buildings").iterdir())[0]
    np.testing.assert_array_equal(split.take(np.arange(1))[0][0], load_rgb(first_file, 24))


def test_split_folders_are_found_in_any_case_and_usual_spellings(tmp_path):
    for train, val, test in (("Train", "Validation", "Test"), ("training", "valid", "testing"),
                             ("TRAIN", "VAL", "seg_test"), ("training_set", "validation set", "test_set")):
        root = tmp_path / train / "d"
        make_image_folder(root / train, per_class=3)
        make_image_folder(root / val, per_class=2, seed=1)
        make_image_folder(root / test, per_class=1, seed=2)
        dataset = open_dataset(config(root), splits=("train", "val", "test"))
        assert dataset.class_names == ["buildings", "forest", "sea"]
        assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 9, "val": 6, "test": 3}
        assert not dataset.val_held_out


def test_photos_in_subfolders_of_a_class_are_found_as_imagefolder_does(tmp_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for name, colour in {"cat": (200, 60, 60), "dog": (40, 180, 60)}.items():
        write_image(root / "Train" / name / "2023" / "a.jpg", colour, rng)
        write_image(root / "Train" / name / "2024" / "deep" / "b.png", colour, rng, fmt="PNG")
        write_image(root / "Train" / name / "c.jpg", colour, rng)
        write_image(root / "Train" / name / ".hidden" / "d.jpg", colour, rng)  # skipped, like dot files
        write_image(root / "Validation" / name / "x" / "e.jpg", colour, rng)
    write_image(tmp_path / "elsewhere" / "f.jpg", (40, 180, 60), rng)
    (root / "Train" / "dog" / "linked").symlink_to(tmp_path / "elsewhere")  # followed, as ImageFolder does
    (root / "Train" / "dog" / "again").symlink_to(root / "Train" / "dog" / "2023")  # a folder counts once
    (root / "Train" / "dog" / "2023" / "loop").symlink_to(root / "Train" / "dog")  # a loop: no hang
    dataset = open_dataset(config(root), splits=("train", "val"))
    assert dataset.class_names == ["cat", "dog"]
    assert np.bincount(dataset.splits["train"].row_labels).tolist() == [3, 4]
    assert len(dataset.splits["val"]) == 2


def test_a_layout_not_understood_names_what_it_saw_and_the_keys_that_fix_it(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root / "Fit", per_class=2)  # splits under names edgekd does not know
    make_image_folder(root / "Holdout", per_class=1, seed=1)
    with pytest.raises(DataError) as err:
        open_dataset(config(root))
    message = f"{err.value.message} {err.value.hint}"
    assert "Fit/ (6 images)" in message and "Holdout/ (3 images)" in message
    assert "data.train_dir" in message and "data.val_dir" in message
    dataset = open_dataset(config(root, train_dir="Fit", val_dir="Holdout"))  # the fix it names
    assert len(dataset.splits["train"]) == 6 and len(dataset.splits["val"]) == 3
    loose = tmp_path / "loose"
    make_image_folder(loose / "photos", per_class=1)
    for i, path in enumerate(sorted((loose / "photos").rglob("*.jpg"))):
        path.rename(loose / f"{i}.jpg")
    with pytest.raises(DataError, match=r"3 images directly in it") as err:
        open_dataset(config(loose))
    assert "data.train_dir" in err.value.hint


def test_classes_with_the_same_subfolders_are_still_classes(tmp_path):
    rng = np.random.default_rng(0)
    for name, colour in {"cat": (200, 60, 60), "dog": (40, 180, 60)}.items():
        for year in ("2022", "2023"):
            write_image(tmp_path / "d" / name / year / "a.jpg", colour, rng)
    dataset = open_dataset(config(tmp_path / "d"), splits=("train",))
    assert dataset.class_names == ["cat", "dog"]
