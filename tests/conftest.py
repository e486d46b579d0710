"""Shared fixtures: tiny generated image datasets and tiny recipes, isolated caches and artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import settings
from PIL import Image

# `make test` and CI replay the same generated inputs on every run, so a red CI is the code's, never the
# draw's; HYPOTHESIS_PROFILE=explore draws new ones (what a fuzzing session wants). Loaded before the test
# modules, so their own settings(...) inherit it.
settings.register_profile("replay", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "replay"))

# `make test` runs two pytest-xdist workers on two cores: each computes on one thread (set before torch is
# imported; the runs the tests start inherit it), as two torch pools of two threads on two cores spend
# their time waiting for each other. An OMP_NUM_THREADS of your own is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """The tests marked slow first: under xdist's file scheduling their files start at once instead of
    ending the run on one worker while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


CLASS_COLOURS = {"buildings": (200, 60, 60), "forest": (40, 180, 60), "sea": (50, 80, 210)}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test gets its own cache and artifacts folders and runs in a temporary directory."""
    monkeypatch.setenv("EDGEKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEKD_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.chdir(tmp_path)


def write_image(path: Path, colour, rng: np.random.Generator, size=(20, 18), fmt="JPEG") -> None:
    """A noisy image whose mean colour identifies its class, so a tiny model can learn it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, fmt)


def make_image_folder(folder: Path, per_class: int, seed: int = 0, classes=CLASS_COLOURS) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in classes.items():
        for i in range(per_class):
            write_image(folder / name / f"{i}.jpg", colour, rng)
    return folder


@pytest.fixture
def image_dataset(tmp_path) -> Path:
    """train/<class>/ and val/<class>/, three colour classes."""
    root = tmp_path / "colours"
    make_image_folder(root / "train", per_class=16, seed=1)
    make_image_folder(root / "val", per_class=6, seed=2)
    return root


def write_recipe(path: Path, root: Path, **sections) -> Path:
    """A tiny recipe: a 2-block paper_cnn at 16 px; `sections` update its sections."""
    recipe = {
        "name": path.stem,
        "data": {"kind": "folder", "root": str(root), "image_size": 16},
        "model": {"name": "paper_cnn", "blocks": 2},
        "train": {"batch_size": 12, "epochs": 2, "patience": None, "seed": 0, "lr": 0.01},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update(value)
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def teacher_recipe(tmp_path, image_dataset) -> Path:
    return write_recipe(tmp_path / "tiny_teacher.yaml", image_dataset, model={"blocks": 3})


@pytest.fixture
def student_recipe(tmp_path, image_dataset, teacher_recipe) -> Path:
    return write_recipe(tmp_path / "tiny_student.yaml", image_dataset, model={"blocks": 1},
                        teacher={"recipe": str(teacher_recipe)}, distill={"temperature": 2.0, "alpha": 0.5})


REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


@pytest.fixture(scope="session")
def distilled_run(tmp_path_factory):
    """A teacher and a distilled 8-block student (the paper's 1.6 M-parameter shape, at 16 px so it trains in
    a second) on generated colour images, shared by the export and classify tests."""
    from edgekd.recipe import load_recipe
    from edgekd.train.trainer import run

    base = tmp_path_factory.mktemp("distilled")
    root = base / "colours"
    make_image_folder(root / "train", per_class=16, seed=1)
    make_image_folder(root / "val", per_class=6, seed=2)
    common = {"data": {"cache_dir": str(base / "cache")}}
    teacher = write_recipe(base / "tiny_teacher.yaml", root, model={"blocks": 3}, **common)
    student = write_recipe(base / "tiny_student.yaml", root, model={"blocks": 8},
                           teacher={"recipe": str(teacher)}, distill={"temperature": 2.0, "alpha": 0.5}, **common)
    # Enough steps that BatchNorm's running statistics settle and the student really separates the colours.
    run(load_recipe(teacher, ["train.epochs=4"]), "train", base / "artifacts")
    run(load_recipe(student, ["train.epochs=6", "train.lr=0.003"]), "distill", base / "artifacts")
    return base / "artifacts" / "tiny_student"


@pytest.fixture
def sigint_as_in_a_terminal():
    """Python's own Ctrl-C handler for the test, even when the suite runs where SIGINT is ignored (a script's `&`)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
