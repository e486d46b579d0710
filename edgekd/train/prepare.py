"""What a run settles before its loop: everything that can be refused, refused before any image is decoded;
the input normalisation a new model is built with; the photos batches are drawn from (the render split);
where the teacher's logits come from, the same on every process."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from edgekd.data import Dataset, RowStore, Split, channel_stats, open_dataset
from edgekd.errors import DataError, RecipeError
from edgekd.models import pretrained_normalisation, resolve_pretrained
from edgekd.models.pretrained import read_state
from edgekd.recipe import Recipe
from edgekd.runs import check_writable, latest_run_dir
from edgekd.train import distributed
from edgekd.train.precision import bitsandbytes_module, make_policy
from edgekd.train.run_folder import check_resumable
from edgekd.train.teacher import Teacher, prepare_teacher, resolve_teachers
from edgekd.train.teacher_forward import TeacherForward
from edgekd.train.teacher_views import TeacherViews

log = logging.getLogger(__name__)


def input_normalisation(recipe: Recipe, dataset: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """What a pretrained backbone's weights expect; otherwise the training split's own statistics."""
    if recipe.model.pretrained:
        expected = pretrained_normalisation(recipe.model.name)
        if expected is not None:
            log.info("input normalisation: mean %s, std %s (what %s's pretrained weights expect)",
                     expected[0], expected[1], recipe.model.name)
            return expected
    return channel_stats(dataset.splits["train"])


def render_split(recipe: Recipe, dataset: Dataset) -> Split:
    """The training photos batches are drawn from: decoded at augment.render_size when it differs from the
    model's image size (the same rows, checked), so each view is cropped from the larger image."""
    size = recipe.augment.render_size
    train = dataset.splits["train"]
    if not size or size == dataset.image_size:
        return train
    config = dataclasses.replace(recipe.data, image_size=size)
    rendered = open_dataset(config, splits=("train",), workers=recipe.train.workers)
    own_ids = [entry.ids for entry in dataset.train_entries]
    if [entry.ids for entry in rendered.train_entries] != own_ids:
        raise DataError(f"the {size}px and {dataset.image_size}px caches hold different files",
                        hint="a photo decoded at one size but not the other; see the skipped files in the logs")
    log.info("views are rendered from the photos decoded at %dpx, then resized to %dpx", size, dataset.image_size)
    return Split("train", rendered.splits["train"].images, train.labels, train.rows)


def check_before_work(recipe: Recipe, mode: str, artifacts: Path, dist: distributed.Distributed,
                       device: torch.device, resume: bool = False) -> None:
    """Everything that can be refused is refused before any image is decoded."""
    policy = make_policy(recipe.precision, device)
    if policy.warning and dist.main:
        log.warning("%s", policy.warning)
    if recipe.model.pretrained:  # a missing package or file, or a damaged one: refused now
        read_state(resolve_pretrained(recipe.model.name, recipe.model.pretrained))
    if recipe.train.optimizer == "adam8bit":
        bitsandbytes_module()
    if mode == "distill":
        resolve_teachers(recipe, artifacts)
    elif recipe.teacher.checkpoint or recipe.teacher.recipe:
        log.info("the recipe names a teacher; `edgekd train` ignores it and trains with cross-entropy only")
    distributed.check_world_size(recipe.train.batch_size, dist.world)
    if dist.active and recipe.train.sync_batchnorm and device.type != "cuda":
        raise RecipeError("train.sync_batchnorm needs CUDA; on CPU each process normalises its own share",
                          hint="--set train.sync_batchnorm=false")
    if dist.main:
        check_writable(artifacts, keep=False)
        if resume:
            check_resumable(recipe, latest_run_dir(artifacts, recipe.name))



def teacher_sources(recipe: Recipe, dataset: Dataset, teacher: Teacher, device: torch.device, split: Split,
                    last: dict | None, dist: distributed.Distributed
                    ) -> tuple[RowStore | None, TeacherViews | None, TeacherForward | None]:
    """teacher.prepare_teacher on every process (node-main first: it decodes and fills for the others); a
    resumed run teaches with the forward pass its first attempt used, and under DDP every rank with rank 0's."""
    earlier = ((last or {}).get("teacher") or {}).get("forward")
    with dist.node_main_first():
        logits, views, forward = prepare_teacher(recipe, dataset, teacher, device, split, earlier)
    if forward is not None and dist.active:
        chosen = dist.broadcast(forward.name)
        if chosen != forward.name:
            forward = prepare_teacher(recipe, dataset, teacher, device, split, chosen)[2]
    return logits, views, forward
