"""`edgekd init DATA_DIR`: a folder of photos → a teacher recipe, a student recipe and the commands to run.

It reads the layout (through the same code that training reads it with, so what init accepts trains),
counts classes and photos, looks at photo sizes, times a few training steps of both models on this machine,
sizes the recipes from that, and writes two YAML files that need no editing. Nothing is overwritten
without `force`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import statistics
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgekd.data.sources import (
    _direct_images,
    _subfolders,
    _unnest,
    find_split_dirs,
    folder_class_names,
    images_under,
)
from edgekd.errors import DataError, EdgekdError, RecipeError
from edgekd.recipe import DataConfig, load_recipe
from edgekd.runs import atomic_write_text

log = logging.getLogger(__name__)

TEACHER_MODEL = "efficientnet_lite0"
# Minutes init aims the teacher and the distillation at together, before it trims the plan.
DEFAULT_BUDGET_MINUTES = 60.0
# A timed step is the model alone; a training epoch also renders augmented views, validates and saves. On
# the 2-core CPU where the Intel recipes were measured, whole epochs ran about 1.5x slower than bare steps.
EPOCH_OVERHEAD = 1.5
# Timing stops after this many seconds of timed steps per model (at least one after the warm-up).
STEP_SECONDS = 2.0


@dataclass
class Survey:
    """What a data folder holds, read without decoding a photo."""

    root: Path
    splits: dict[str, Path | None]
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> photos (subfolders included)
    unlabeled: Path | None = None
    unlabeled_count: int = 0
    test_labelled: bool = False
    photo_side: int = 0  # median shorter side of a sample of photos, in pixels
    photo_sides: tuple[int, int] = (0, 0)  # smallest and largest shorter side in that sample

    @property
    def train_count(self) -> int:
        return sum(self.counts["train"].values())

    def split_total(self, split: str) -> int:
        return sum(self.counts.get(split, {}).values())


@dataclass
class Timing:
    """Images per second measured on this machine for a few steps of each model."""

    device: str
    teacher_train: float
    student_train: dict[int, float]  # by the paper student's block count (8 and 4)
    teacher_forward: float
    decode: float  # photos decoded and resized per second (one process)
    student_parameters: dict[int, int]
    teacher_parameters: int
    seconds: float  # what the timing itself took
    render: float = float("inf")  # augmented views rendered per second (crop, flip, colour, resize)
    load: float | None = None  # the 1-minute load average while timing (None where the OS has none)
    cores: int = 1


@dataclass
class Plan:
    name: str
    teacher_size: int
    student_size: int
    teacher_epochs: int
    student_epochs: int
    student_blocks: int
    batch_size: int
    teacher_views: int
    teacher_forward: str
    precision: str
    workers: int
    reasons: list[str] = field(default_factory=list)


@dataclass
class InitResult:
    survey: Survey
    timing: Timing
    plan: Plan
    teacher_path: Path
    student_path: Path
    minutes: dict[str, float]
    commands: list[str]
    warnings: list[str]


# ----- reading the folder ---------------------------------------------------------------------------------

def survey_folder(data_dir: str | Path) -> Survey:
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{data_dir} is not a folder", hint="pass the folder that holds your photos' class folders")
    splits = find_split_dirs(DataConfig(root=str(root)))
    classes = folder_class_names(splits["train"])
    if len(classes) < 2:
        raise DataError(f"{splits['train']} holds one class folder ({classes[0]}): a classifier needs two or more",
                        hint="put the photos of each class in a folder named after it")
    counts: dict[str, dict[str, int]] = {}
    sample: list[Path] = []
    for split, folder in splits.items():
        if folder is None or not _subfolders(folder):
            continue
        counts[split] = {}
        for name in classes:
            photos = images_under(folder / name) if (folder / name).is_dir() else []
            counts[split][name] = len(photos)
            sample += photos[:: max(1, len(photos) // 8)][:8]
    empty = [name for name, n in counts["train"].items() if n == 0]
    if empty:
        raise DataError(f"class folder(s) {', '.join(empty)} in {splits['train']} hold no photos",
                        hint="add photos or remove the folder")
    survey = Survey(root, splits, classes, counts, test_labelled="test" in counts)
    survey.unlabeled, survey.unlabeled_count = _unlabeled_folder(root, splits)
    survey.photo_side, survey.photo_sides = _photo_sides(sample)
    return survey


def _unlabeled_folder(root: Path, splits: dict[str, Path | None]) -> tuple[Path | None, int]:
    """The largest folder of photos without class folders beside the splits (Kaggle's seg_pred/, an
    unlabeled test/ folder): distillation learns from such photos through the teacher."""
    if splits["train"] == root:
        return None, 0  # a plain ImageFolder: every top folder is a class
    used = {p.resolve() for p in splits.values() if p is not None and _subfolders(p)}
    best: tuple[int, Path | None] = (0, None)
    for top in _subfolders(root):
        folder = _unnest(top)
        if folder.resolve() in used or any(images_under(c) for c in _subfolders(folder)):
            continue
        count = len(images_under(folder))
        best = max(best, (count, folder), key=lambda b: b[0])
    return best[1], best[0]


def _photo_sides(sample: list[Path]) -> tuple[int, tuple[int, int]]:
    from PIL import Image

    sides = []
    for path in sample[:200]:
        try:
            with Image.open(path) as image:  # reads the header only
                sides.append(min(image.size))
        except Exception:  # noqa: BLE001  (an unreadable photo is skipped at training time, with a warning)
            continue
    if not sides:
        raise DataError(f"none of {len(sample)} sampled photos could be opened", hint="check the files are images")
    return int(statistics.median(sides)), (min(sides), max(sides))


# ----- timing a few steps --------------------------------------------------------------------------------

def time_models(survey: Survey, teacher_size: int, student_size: int, steps: int = 3) -> Timing:
    """A few optimizer steps of each model on random pixels at its size, after one warm-up step."""
    import torch

    from edgekd.models import Classifier, create_model
    from edgekd.train.precision import cpu_has_native_bf16

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" or cpu_has_native_bf16()
    n = len(survey.classes)
    teacher = Classifier(create_model(TEACHER_MODEL, n), (0.5,) * 3, (0.5,) * 3).to(device)
    students = {blocks: Classifier(create_model("paper_cnn", n, blocks=blocks, classifier=[128]), (0.5,) * 3,
                                   (0.5,) * 3).to(device) for blocks in (8, 4)}
    batch = 8
    result = Timing(
        device=device.type,
        teacher_train=_train_speed(teacher, teacher_size, batch, steps, device, None),
        student_train={blocks: _train_speed(model, student_size, batch, steps, device,
                                            torch.bfloat16 if bf16 else None) for blocks, model in students.items()},
        teacher_forward=_forward_speed(teacher, teacher_size, 2 * batch, steps, device),
        decode=_decode_speed(survey, teacher_size),
        student_parameters={blocks: sum(p.numel() for p in m.parameters()) for blocks, m in students.items()},
        teacher_parameters=sum(p.numel() for p in teacher.parameters()),
        seconds=0.0)
    result.render = _render_speed(teacher_size, student_size)
    result.seconds = time.perf_counter() - started
    result.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result.cores = os.cpu_count() or 1
    return result


def _pixels(batch: int, size: int, device):
    import torch

    return torch.randint(0, 256, (batch, 3, size, size), device=device).float().contiguous(
        memory_format=torch.channels_last)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _train_speed(model, size: int, batch: int, steps: int, device, autocast_dtype) -> float:
    import torch

    model.train()
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = _pixels(batch, size, device), torch.randint(0, 2, (batch,), device=device)
    times: list[float] = []
    while len(times) <= steps and sum(times[1:]) < STEP_SECONDS:  # step 0 warms up (allocations, kernels)
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return batch / max(statistics.median(times[1:]), 1e-9)


def _forward_speed(model, size: int, batch: int, steps: int, device) -> float:
    import torch

    model.eval()
    x = _pixels(batch, size, device)
    times: list[float] = []
    with torch.inference_mode():
        while len(times) <= steps and sum(times[1:]) < STEP_SECONDS:
            _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    return batch / max(statistics.median(times[1:]), 1e-9)


def _render_speed(teacher_size: int, student_size: int, batch: int = 32) -> float:
    """Augmented views per second, cut at the teacher's size and resized to the student's, as distill does."""
    import torch

    from edgekd.recipe import AugmentConfig
    from edgekd.train.augment import batch_generator, draw_views, render_views

    config = AugmentConfig(crop="resized", crop_scale=0.5, flip=True, color_jitter=0.2, render_size=teacher_size)
    pixels = torch.randint(0, 256, (batch, 3, teacher_size, teacher_size), dtype=torch.uint8)
    times = []
    for i in range(3):
        start = time.perf_counter()
        render_views(pixels, draw_views(batch, teacher_size, config, batch_generator(0, 0, i)), config, student_size)
        times.append(time.perf_counter() - start)
    return batch / max(statistics.median(times), 1e-9)


def _decode_speed(survey: Survey, size: int) -> float:
    from edgekd.runtime.preprocess import load_rgb

    photos = images_under(survey.splits["train"] / survey.classes[0])[:12]
    start = time.perf_counter()
    decoded = 0
    for path in photos:
        try:
            load_rgb(path, size)
            decoded += 1
        except Exception:  # noqa: BLE001  (training skips such a photo with a warning)
            continue
    return max(decoded, 1) / max(time.perf_counter() - start, 1e-9)


# ----- sizing ----------------------------------------------------------------------------------------------

def _clamp(value: float, low: int, high: int) -> int:
    return int(min(max(round(value), low), high))


def _safe_name(folder: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name.lower()).strip("._-")
    return name or "photos"


def first_plan(survey: Survey, name: str | None, image_size: int | None, epochs: int | None,
               cuda: bool) -> Plan:
    """Sizes from the data alone; `fit_to_budget` then trims them to what this machine can do."""
    n = survey.train_count
    teacher_size = image_size or _clamp(survey.photo_side, 32, 224)
    student_size = min(teacher_size, 128 if cuda else 64)
    # A pretrained teacher needs a few thousand updates' worth of photos, a student from scratch more.
    teacher_epochs = epochs or _clamp(6000 / n, 3, 15)
    student_epochs = epochs or _clamp(150_000 / n, 12, 30)
    batch = min(64, 2 ** max(2, int(math.log2(max(n // 8, 1)))))  # at least 8 batches an epoch
    reasons = [f"teacher at {teacher_size} px: the photos' median shorter side is {survey.photo_side} px"
               if not image_size else f"teacher at {teacher_size} px (--image-size)",
               f"student at {student_size} px ({'GPU' if cuda else 'CPU'}: the paper's students ran at 64 px "
               f"from 150 px photos)",
               f"{teacher_epochs} teacher and {student_epochs} student epoch(s) for {n} training photos"
               + (" (--epochs)" if epochs else ""),
               f"batch {batch}"]
    return Plan(name or _safe_name(survey.root), teacher_size, student_size, teacher_epochs, student_epochs,
                8, batch, 8, "auto", "fp32", 0 if n < 2000 else min(8, os.cpu_count() or 1), reasons)


def estimate_minutes(survey: Survey, plan: Plan, timing: Timing) -> dict[str, float]:
    n = survey.train_count
    unlabeled = survey.unlabeled_count
    val = survey.split_total("val") or round(0.1 * n)
    decode = (n + val + survey.split_total("test")) / timing.decode
    teacher = plan.teacher_epochs * (EPOCH_OVERHEAD * n / timing.teacher_train + n / timing.render
                                     + val / timing.teacher_forward)
    fill = (n + unlabeled) * plan.teacher_views / timing.teacher_forward
    student_step = timing.student_train[plan.student_blocks]
    distill = plan.student_epochs * ((n + unlabeled) * (EPOCH_OVERHEAD / student_step + 1 / timing.render)
                                     + val / (4 * student_step)) + decode
    # Export (four files, the int8/fp8 gate on val) and validate (each file on each runtime, two batch sizes
    # timed 2 s each, in fresh processes) are roughly fixed costs on small models; not timed here.
    rows = 12
    export = 0.5 + (300 + 4 * val) / (50 * timing.teacher_forward)
    validate = rows * (4 + 2 * 2 * 1.5) / 60 + rows * (survey.split_total("test") or val) / 60_000
    return {"train": (decode + teacher) / 60, "distill": (fill + distill) / 60, "export": export,
            "validate": validate}


def fit_to_budget(survey: Survey, plan: Plan, timing: Timing, budget: float, epochs_given: bool) -> None:
    """Cut the plan to about `budget` minutes of training: fewer teacher views, a smaller student, fewer
    epochs, in that order. Each cut is named in the plan's reasons."""
    n = survey.train_count + survey.unlabeled_count
    plan.precision = "bf16" if timing.device == "cuda" or _native_bf16() else "fp32"
    fill_views = n * plan.teacher_views
    if fill_views / timing.teacher_forward > 0.25 * plan.student_epochs * n / timing.student_train[8]:
        plan.teacher_views = 2
        plan.reasons.append("2 teacher views per photo: 8 would cost more than a quarter of the distillation")
    plan.teacher_forward = "auto" if n * plan.teacher_views > 20_000 else "torch"
    if plan.teacher_forward == "torch":
        plan.reasons.append("the teacher fills its views in PyTorch: too few to be worth measuring the faster "
                            "runtimes first")

    def total() -> float:
        m = estimate_minutes(survey, plan, timing)
        return m["train"] + m["distill"]

    if total() > budget and plan.student_blocks == 8:
        plan.student_blocks = 4
        plan.reasons.append(f"the 4-block student ({timing.student_parameters[4]:,} parameters): the 8-block "
                            f"would take over {budget:.0f} min here (--budget)")
    if total() > budget and not epochs_given:
        scale = budget / total()
        plan.teacher_epochs = max(1, math.floor(plan.teacher_epochs * scale))
        plan.student_epochs = max(3, math.floor(plan.student_epochs * scale))
        plan.reasons.append(f"epochs cut to {plan.teacher_epochs} and {plan.student_epochs} to fit about "
                            f"{budget:.0f} min on this machine (--budget)")


def _native_bf16() -> bool:
    from edgekd.train.precision import cpu_has_native_bf16

    return cpu_has_native_bf16()


# ----- the recipes -----------------------------------------------------------------------------------------

def _data_section(survey: Survey, size: int, plan: Plan, unlabeled: bool) -> dict:
    data: dict = {"kind": "folder", "root": str(survey.root)}
    for split, folder in survey.splits.items():
        if folder is not None and (split != "test" or survey.test_labelled):
            data[f"{split}_dir"] = "." if folder == survey.root else str(folder.relative_to(survey.root))
    data.update({"classes": survey.classes, "image_size": size, "val_fraction": 0.1, "split_seed": 0})
    if unlabeled and survey.unlabeled is not None:
        data["unlabeled"] = str(survey.unlabeled)
    return data


def teacher_recipe(survey: Survey, plan: Plan) -> dict:
    return {
        "name": f"{plan.name}_teacher",
        "data": _data_section(survey, plan.teacher_size, plan, unlabeled=False),
        "model": {"name": TEACHER_MODEL, "pretrained": "imagenet", "dropout": 0.2},
        "train": {"optimizer": "adamw", "lr": 1.0e-3, "backbone_lr_factor": 0.3, "weight_decay": 0.02,
                  "batch_size": plan.batch_size, "epochs": plan.teacher_epochs, "scheduler": "cosine",
                  "warmup_epochs": round(min(0.3, plan.teacher_epochs / 4), 2), "label_smoothing": 0.0,
                  "patience": None, "seed": 0, "workers": plan.workers},
        "augment": {"crop": "resized", "crop_scale": 0.5, "flip": True, "color_jitter": 0.2},
        "export": {"calibration_method": "percentile"},
        "precision": "fp32",
    }


def gate_for(survey: Survey) -> dict:
    """The export gate, no finer than one validation photo: with 120 val photos one photo is 0.83 points, and
    a gate of 0.5 would fail a file for the first borderline photo it flips."""
    val = survey.split_total("val") or max(1, round(0.1 * survey.train_count))
    one_photo = math.ceil(10_000 / val) / 100  # points, rounded up to 0.01
    defaults = {"max_drop_fp32": 0.1, "max_drop_fp16": 0.1, "max_drop_int8": 0.5, "max_drop_fp8": 0.5}
    return {key: max(limit, one_photo) for key, limit in defaults.items() if one_photo > limit}


def student_recipe(survey: Survey, plan: Plan) -> dict:
    gate = gate_for(survey)
    return {
        "name": f"{plan.name}_student",
        "data": _data_section(survey, plan.student_size, plan, unlabeled=True),
        "model": {"name": "paper_cnn", "blocks": plan.student_blocks, "classifier": [128]},
        "teacher": {"recipe": f"{plan.name}_teacher.yaml"},
        "train": {"optimizer": "adamw", "lr": 2.0e-3, "weight_decay": 0.05, "batch_size": plan.batch_size,
                  "epochs": plan.student_epochs, "scheduler": "cosine",
                  "warmup_epochs": min(1, plan.student_epochs / 4), "label_smoothing": 0.1, "ema_decay": 0.99,
                  "grad_clip": 5.0, "patience": None, "seed": 0, "workers": plan.workers},
        "augment": {"crop": "resized", "crop_scale": 0.5, "flip": True, "color_jitter": 0.2,
                    "render_size": plan.teacher_size},
        "distill": {"method": "kd", "temperature": 4.0, "alpha": 0.9, "teacher_views": plan.teacher_views,
                    "teacher_forward": plan.teacher_forward},
        **({"export": gate} if gate else {}),
        "precision": plan.precision,
    }


def _header(survey: Survey, plan: Plan, role: str) -> str:
    what = ("the teacher: EfficientNet-Lite0 with its ImageNet weights, the whole network fine-tuned"
            if role == "teacher" else
            f"the student: the paper's {plan.student_blocks}-block CNN, distilled from "
            f"{plan.name}_teacher.yaml (teacher views on: each crop shown to the teacher at "
            f"{plan.teacher_size} px and to the student at {plan.student_size} px)")
    lines = [f"Written by `edgekd init {survey.root}`: {what}.",
             f"{len(survey.classes)} classes, {survey.train_count} training photos"
             + (f", {survey.unlabeled_count} unlabeled photos (data.unlabeled: only distillation learns "
                f"from them)" if survey.unlabeled and role == "student" else "") + ".",
             "Sized for the machine it ran on:", *[f"- {r}" for r in plan.reasons],
             *([f"- the export gate allows one validation photo ({max(gate_for(survey).values()):.2f} points): a "
                f"finer gate than the split can measure fails files at random"] if role == "student" and
               gate_for(survey) else []),
             "Any key can be overridden per run: --set train.epochs=5."]
    return "".join(f"# {part}\n" for line in lines for part in textwrap.wrap(line, 108, subsequent_indent="  "))


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists of names on one line ([buildings, forest, ...]), as the shipped recipes are."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def _yaml(header: str, recipe: dict) -> str:
    return header + yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, width=110, allow_unicode=True)


# ----- the whole command ------------------------------------------------------------------------------------

def _classify_target(survey: Survey) -> Path:
    if survey.unlabeled is not None:
        return survey.unlabeled
    for split in ("test", "val", "train"):
        if split in survey.counts:
            return survey.splits[split] / survey.classes[0]
    return survey.splits["train"] / survey.classes[0]


def _commands(survey: Survey, teacher: str, student: str, quick: bool) -> list[str]:
    split = "" if survey.test_labelled or survey.splits["test"] is None else " --split val"
    short = " --providers cpu --batch 1 --latency-seconds 0.2" if quick else ""
    return [f"edgekd train {teacher}",
            f"edgekd distill {student}",
            "edgekd export --all",
            f"edgekd validate{split}{short}",
            f"edgekd classify {_quote(_classify_target(survey))}"]


def _quote(path: Path) -> str:
    return shlex.quote(str(path))


def init_project(data_dir: str | Path, out: str | Path = "recipes", name: str | None = None,
                 image_size: int | None = None, epochs: int | None = None,
                 budget: float = DEFAULT_BUDGET_MINUTES, force: bool = False, quick: bool = False) -> InitResult:
    """Survey `data_dir`, time both models here, write the two recipes into `out`. `quick`: a smoke run of
    the whole pipeline (1 epoch at 32 px unless given, validate on onnxruntime's CPU provider only)."""
    if name is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
        raise RecipeError(f"--name {name!r}: use letters, digits, '.', '_' or '-' (it names files and run folders)")
    survey = survey_folder(data_dir)
    out = Path(out)
    if quick:
        epochs, image_size = epochs or 1, image_size or 32
    plan = first_plan(survey, name, image_size, epochs, cuda=_cuda())
    if quick:
        plan.reasons.append("--quick: a smoke run of the whole pipeline, not a model to ship")
    teacher_path, student_path = out / f"{plan.name}_teacher.yaml", out / f"{plan.name}_student.yaml"
    existing = [p for p in (teacher_path, student_path) if p.exists()]
    if existing and not force:  # before any timing: a refusal should be instant
        raise EdgekdError(f"{', '.join(map(str, existing))} already exist(s); init never replaces a recipe silently",
                          hint="pass --force to replace it, or --name NAME / --out DIR to write new ones")
    timing = time_models(survey, plan.teacher_size, plan.student_size)
    fit_to_budget(survey, plan, timing, budget, epochs is not None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(teacher_path, _yaml(_header(survey, plan, "teacher"), teacher_recipe(survey, plan)))
    atomic_write_text(student_path, _yaml(_header(survey, plan, "student"), student_recipe(survey, plan)))
    for path in (teacher_path, student_path):
        load_recipe(path)  # what was written must load as it is
    warnings = [f"class {c} has only {k} training photo(s): its accuracy will be noisy"
                for c, k in survey.counts["train"].items() if k < 10]
    if survey.split_total("val") == 0 and survey.train_count < 200:
        warnings.append("no validation folder: 10% of train is held out, few photos to judge the gate on")
    return InitResult(survey, timing, plan, teacher_path, student_path, estimate_minutes(survey, plan, timing),
                      _commands(survey, _quote(teacher_path), _quote(student_path), quick), warnings)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def describe_layout(survey: Survey) -> str:
    parts = []
    for split in ("train", "val", "test"):
        folder = survey.splits[split]
        if folder is None:
            parts.append(f"{split}: none" + (" (10% of train held out)" if split == "val" else ""))
            continue
        where = "." if folder == survey.root else str(folder.relative_to(survey.root))
        total = survey.split_total(split) if split in survey.counts else len(_direct_images(folder))
        label = "" if split in survey.counts else " unlabeled"
        parts.append(f"{split}: {where}/ ({total}{label} photos)")
    return ", ".join(parts)
