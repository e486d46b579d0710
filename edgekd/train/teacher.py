"""The teacher side of distillation: which checkpoints teach, loading them, and where their logits come from.

A distillation's teacher logits come from one of three places, decided once before the loop starts: a
per-dataset cache (no augmentation: the teacher sees the same pixels every epoch), stored teacher views
(augmentation with `distill.teacher_views`), or the teacher itself on every batch. The trainer only asks
for logits; this module owns the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
from pathlib import Path

import torch

from edgekd.data import Dataset, RowStore, Split, open_dataset
from edgekd.data.cache import default_cache_root
from edgekd.errors import CheckpointError, RecipeError
from edgekd.models import Classifier
from edgekd.recipe import Recipe, load_recipe
from edgekd.runs import run_dirs
from edgekd.train.augment import batch_generator, draw_views, render_views
from edgekd.train.batches import iter_batches
from edgekd.train.checkpoint import file_sha256, load_model, refuse_nonfinite
from edgekd.train.teacher_cache import cached_teacher_logits
from edgekd.train.teacher_forward import TeacherForward, fastest_forward
from edgekd.train.teacher_views import TeacherViews, teacher_views

log = logging.getLogger(__name__)

Teacher = tuple[torch.nn.Module, dict]  # the model (eval mode, frozen) and its checkpoint's metadata


# ----- which checkpoints teach --------------------------------------------------------------------------

def _checkpoint_file(value: str, key: str) -> Path:
    path = Path(value).absolute()
    path = path / "best.pt" if path.is_dir() else path
    if not path.is_file():
        raise CheckpointError(f"{key} {path} does not exist",
                              hint="train the teacher first (`edgekd train <teacher recipe>`)")
    _check_teaches(path)
    return path


def _check_teaches(path: Path) -> None:
    """CheckpointError unless the file rebuilds its model with finite weights (checked once per file version)."""
    stat = path.stat()
    problem = _teaching_problem(str(path), stat.st_mtime_ns, stat.st_size)
    if problem is not None:
        raise problem


@functools.lru_cache(maxsize=32)
def _teaching_problem(path: str, mtime_ns: int, size: int) -> CheckpointError | None:
    try:
        _, payload = load_model(path)
        refuse_nonfinite(payload, "a teacher")
    except CheckpointError as exc:
        return exc
    return None


def resolve_teachers(recipe: Recipe, artifacts: Path) -> list[Path]:
    """Every teacher checkpoint: the main one, then the ensemble's."""
    return [resolve_teacher(recipe, artifacts),
            *(_checkpoint_file(value, "teacher.ensemble member") for value in recipe.teacher.ensemble)]


def resolve_teacher(recipe: Recipe, artifacts: Path) -> Path:
    """The teacher checkpoint a distillation recipe names (directly, or via the teacher's recipe)."""
    teacher = recipe.teacher
    if teacher.checkpoint:
        return _checkpoint_file(teacher.checkpoint, "teacher.checkpoint")
    if teacher.recipe:
        teacher_name = load_recipe(teacher.recipe).name
        return _newest_teaching_run(artifacts, teacher_name, teacher.recipe)
    raise RecipeError(f"{recipe.source}: distillation needs a teacher: set teacher.checkpoint or teacher.recipe")


def _newest_teaching_run(artifacts: Path, name: str, recipe_path: str) -> Path:
    """The best.pt of the newest run of `name` that can teach: one whose weights hold NaN (a run that
    diverged) or whose stored model does not fit them is passed over, with a line saying why."""
    passed_over = []
    for run_dir in run_dirs(artifacts, name):
        path = (run_dir / "best.pt").absolute()
        if not path.is_file():
            continue
        try:
            _check_teaches(path)
        except CheckpointError as exc:
            log.warning("teacher: passing over %s: %s", path, exc.message)
            passed_over.append(run_dir.name)
            continue
        return path
    also = f" ({', '.join(passed_over)} cannot teach, see above)" if passed_over else ""
    raise CheckpointError(f"no finished run of the teacher recipe {recipe_path} under {artifacts}/{also}",
                          hint=f"run `edgekd train {recipe_path}` first, or set teacher.checkpoint")


# ----- loading them -------------------------------------------------------------------------------------

class TeacherEnsemble(torch.nn.Module):
    """Several teachers as one: the mean of their logits."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(pixels).float() for member in self.members]).mean(0)


def load_teacher(recipe: Recipe, artifacts: Path, device: torch.device, dataset: Dataset) -> Teacher:
    """The recipe's teacher (or the mean of its ensemble) and its metadata, checked against the dataset."""
    loaded = [_load_one_teacher(path, device, dataset) for path in resolve_teachers(recipe, artifacts)]
    if len(loaded) == 1:
        return loaded[0]
    metas = [meta for _, meta in loaded]
    if len({meta["image_size"] for meta in metas}) > 1:
        raise CheckpointError("teacher.ensemble members were trained at different image sizes: "
                              f"{[meta['image_size'] for meta in metas]}", hint="use teachers of one image size")
    meta = {**metas[0], "path": " + ".join(str(m["path"]) for m in metas),
            "sha256": hashlib.sha256("".join(m["sha256"] for m in metas).encode()).hexdigest(),
            "model": {"name": f"ensemble of {len(metas)}", "members": [m["model"] for m in metas]},
            "run": " + ".join(str(m.get("run")) for m in metas)}
    log.info("teacher: an ensemble of %d checkpoints (mean of their logits)", len(metas))
    return TeacherEnsemble([model for model, _ in loaded]).eval(), meta


def _load_one_teacher(path: Path, device: torch.device, dataset: Dataset) -> tuple[Classifier, dict]:
    teacher, meta = load_model(path, device)
    meta["sha256"] = file_sha256(path)
    if meta["class_names"] != dataset.class_names:
        raise CheckpointError(f"teacher {path} was trained on classes {meta['class_names']}, this dataset has "
                              f"{dataset.class_names}", hint="distill on the teacher's dataset")
    for param in teacher.parameters():
        param.requires_grad = False
    log.debug("teacher: %s (%s, val acc %.4f)", path, meta["model"]["name"], meta.get("val_acc", float("nan")))
    return teacher, meta


# ----- where its logits come from -----------------------------------------------------------------------

def _teacher_logit_cache(recipe: Recipe, dataset: Dataset, teacher: Teacher, device: torch.device) -> RowStore:
    """Teacher logits for every train-cache row (unlabeled photos included), at the teacher's own image size."""
    model, meta = teacher
    entries = dataset.train_entries
    if meta["image_size"] != dataset.image_size:
        teacher_view = dataclasses.replace(recipe.data, image_size=meta["image_size"])
        teacher_entries = open_dataset(teacher_view, splits=("train",), workers=recipe.train.workers).train_entries
        if [e.ids for e in teacher_entries] != [e.ids for e in entries]:
            raise CheckpointError("the teacher-resolution and student-resolution caches hold different files")
        log.info("student at %dpx learns from teacher logits computed at %dpx", dataset.image_size,
                 meta["image_size"])
        entries = teacher_entries
    return RowStore([cached_teacher_logits(model, meta["sha256"], len(meta["class_names"]), entry, device,
                                           recipe.train.batch_size) for entry in entries])


def _stored_views(recipe: Recipe, dataset: Dataset, teacher: Teacher, split: Split,
                  device: torch.device) -> TeacherViews:
    model, meta = teacher
    cache_root = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_root()

    def choose(probe: torch.Tensor, earlier: str | None, views: int) -> TeacherForward:
        return fastest_forward(model, meta, device, probe, cache_root / "teacher-onnx",
                               recipe.distill.teacher_forward, earlier, views)

    return teacher_views(choose, meta["sha256"], len(meta["class_names"]), split, recipe.augment.views,
                         split.images.shape[1], meta["image_size"], recipe.distill.teacher_views,
                         recipe.distill.teacher_views_seed, recipe.train.seed, cache_root)


def prepare_teacher(recipe: Recipe, dataset: Dataset, teacher: Teacher, device: torch.device, split: Split,
                    earlier_forward: str | None = None
                    ) -> tuple[RowStore | None, TeacherViews | None, TeacherForward | None]:
    """Where the teacher's logits come from: (cached logits, None, None), (None, stored views, None), or the
    teacher run live on every batch: (None, None, its forward pass; None for PyTorch as the model stands).
    `split` is what batches are drawn from (at augment.render_size). Stored views and live teaching with
    augmentation use the teacher's fastest forward pass on this machine (teacher_forward.py); a resumed run
    passes `earlier_forward`, the one its first attempt taught with, kept wherever this machine offers it."""
    meta = teacher[1]
    logits, views, live = None, None, None
    if recipe.distill.cache_teacher_logits and not recipe.augment.active:
        logits = _teacher_logit_cache(recipe, dataset, teacher, device)
    elif recipe.augment.active and recipe.distill.teacher_views:
        views = _stored_views(recipe, dataset, teacher, split, device)
        repeats = repeats_note(recipe.train.epochs, recipe.distill.teacher_views)
        if repeats:
            log.warning(repeats)
    elif recipe.augment.active:
        live = _live_forward(recipe, teacher, split, device, earlier_forward)
        log.info("augmentation is on, so the teacher runs on every batch, on the view the student sees, with "
                 "%s (distill.teacher_views: K stores K views per photo and runs the teacher once per view)",
                 live.name)
    else:
        log.info("the teacher runs on every batch (distill.cache_teacher_logits is false)")
    if recipe.augment.active:
        note = resolution_note(meta["image_size"], split.images.shape[1], dataset.image_size)
        if note:
            log.log(*note)
    return logits, views, live


def _live_forward(recipe: Recipe, teacher: Teacher, split: Split, device: torch.device,
                  earlier: str | None) -> TeacherForward:
    """The forward pass the live teacher runs on every batch: chosen once, measured on real views of the
    first photos at the teacher's size (as the views' fill is), or the one a resumed run began with."""
    model, meta = teacher
    cache_root = Path(recipe.data.cache_dir) if recipe.data.cache_dir else default_cache_root()
    first = next(iter_batches(split, min(32, recipe.train.batch_size)))
    drawn = draw_views(len(first.rows), first.pixels.shape[-1], recipe.augment, batch_generator(0, 0, 0))
    probe = render_views(first.pixels, drawn, recipe.augment, meta["image_size"])
    forward = fastest_forward(model, meta, device, probe, cache_root / "teacher-onnx",
                              recipe.distill.teacher_forward, earlier, recipe.train.epochs * len(split.rows))
    if earlier is not None and forward.name != earlier:
        log.warning("teacher forward: this run began with %s, which is not offered now (this machine, or "
                    "distill.teacher_forward); it continues with %s, whose logits differ slightly", earlier,
                    forward.name)
    return forward


# Stored views seen more often than this overfit: at 30 epochs with K 8 (3.75 times each) they taught as well
# as the live teacher, at 100 (12.5 times) 0.9 points worse (docs/function-matching.md)
MAX_VIEW_REPEATS = 6


def repeats_note(epochs: int, views: int) -> str | None:
    """A warning when a long schedule would show each stored teacher view too many times."""
    repeats = epochs / views
    if repeats <= MAX_VIEW_REPEATS:
        return None
    return (f"{epochs} epochs over {views} stored teacher views per photo show each view about {repeats:.1f} "
            f"times, and stored views overfit a long schedule (docs/function-matching.md): let the teacher run "
            f"live (--set distill.teacher_views=null) or store at least {math.ceil(epochs / MAX_VIEW_REPEATS)} views")


def resolution_note(teacher_size: int, render_size: int, student_size: int) -> tuple[int, str] | None:
    """What to tell about the resolution the teacher's views are cut at: a warning when the teacher sees the
    student's small views blown up, a note when they are cut from photos decoded smaller than the teacher
    (rendering at its size is worth it only where the photos themselves are larger), nothing when views are
    cut at or above the teacher's size."""
    if teacher_size <= render_size:
        return None
    if render_size == student_size:
        return logging.WARNING, (f"the teacher ({teacher_size}px) sees the student's {student_size}px views "
                                 f"blown up: set augment.render_size: {teacher_size} so each view is cut from the "
                                 "photo at the teacher's resolution")
    return logging.INFO, (f"the teacher ({teacher_size}px) sees views cut from the photos decoded at "
                          f"{render_size}px, resized (augment.render_size: {teacher_size} cuts them at its own "
                          f"resolution, worth it where the photos are larger than {render_size}px)")
