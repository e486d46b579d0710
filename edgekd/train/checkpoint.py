"""Checkpoints that rebuild their model alone: model name and arguments, classes, preprocessing, recipe."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

import edgekd
from edgekd.errors import CheckpointError, DataError
from edgekd.models import Classifier, create_model
from edgekd.recipe import Recipe, recipe_from_dict
from edgekd.runs import atomic_write

FORMAT = "edgekd.checkpoint"
FORMAT_VERSION = 1


def describe_model(name: str, args: dict, class_names: list[str], image_size: int,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """The part of a checkpoint that rebuilds the model and its preprocessing."""
    from edgekd.runtime.preprocess import RESIZE_METHOD

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "edgekd_version": edgekd.__version__,
            "model": {"name": name, "args": dict(args)}, "class_names": list(class_names),
            "image_size": image_size, "mean": list(mean), "std": list(std), "resize": RESIZE_METHOD,
            "input": "RGB pixels 0-255, NCHW; normalisation is inside the model"}


def build_model(meta: dict) -> Classifier:
    net = create_model(meta["model"]["name"], len(meta["class_names"]), **meta["model"]["args"])
    return Classifier(net, tuple(meta["mean"]), tuple(meta["std"]))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (→ its best.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist",
                              hint="pass a run folder under artifacts/ or its best.pt / last.pt")
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file raises anything from pickle, zipfile or torch
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edgekd checkpoint (no '{FORMAT}' format marker)",
                              hint="edgekd reads the best.pt / last.pt files written by `edgekd train|distill`")
    version = payload.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer edgekd ({payload.get('edgekd_version')})",
                              hint="upgrade edgekd")
    problem = payload_problem(payload)
    if problem:
        raise CheckpointError(f"{path} is damaged: {problem}",
                              hint="use a best.pt / last.pt as `edgekd train|distill` wrote it")
    payload["path"] = str(path)
    return payload


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def payload_problem(payload: dict) -> str | None:
    """Why a checkpoint's self-description cannot be used (fields of the wrong type); None when it can."""
    model = payload.get("model")
    if not _is_int(payload.get("format_version")):
        return f"format_version is {payload.get('format_version')!r}"
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(model.get("args"), dict):
        return f"model is {model!r}, not {{name, args}}"
    names = payload.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        return "class_names is not a list of two or more names"
    if not _is_int(payload.get("image_size")) or not 8 <= payload["image_size"] <= 4096:
        return f"image_size is {payload.get('image_size')!r}"
    for key in ("mean", "std"):
        values = payload.get(key)
        if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) and
                                                                  not isinstance(v, bool) for v in values):
            return f"{key} is {values!r}"
    if not isinstance(payload.get("state_dict"), dict):
        return "state_dict is not a mapping of tensors"
    if "recipe" in payload and not isinstance(payload["recipe"], dict):
        return f"recipe is {payload['recipe']!r}"
    return None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the model from the checkpoint alone (no recipe file needed), in eval mode.

    A checkpoint whose stored model does not fit its weights (tampered metadata, a foreign state_dict) is a
    CheckpointError naming the file."""
    payload = read_checkpoint(path)
    try:
        model = build_model(payload)
        reason = weights_mismatch(model, payload)
        if reason is None:
            model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        reason = first_reason(exc)
    if reason is not None:
        raise CheckpointError(f"{payload['path']}: its stored model does not fit its weights ({reason})",
                              hint="the file was changed after edgekd wrote it, or comes from another tool; "
                                   "use the run's own best.pt")
    return model.to(device).eval(), payload


def weights_mismatch(model: torch.nn.Module, payload: dict[str, Any]) -> str | None:
    """What differs between the model a checkpoint describes and the weights it holds, in a few words
    (load_state_dict's own message lists every key, and first says nothing)."""
    expected, stored = model.state_dict(), payload["state_dict"]
    missing = [k for k in expected if k not in stored]
    unexpected = [k for k in stored if k not in expected]
    shapes = [f"{k} is {list(stored[k].shape)} in the file, {list(expected[k].shape)} in the model"
              for k in expected if k in stored and hasattr(stored[k], "shape")
              and tuple(stored[k].shape) != tuple(expected[k].shape)]
    described = payload["model"]
    parts = [f"{len(missing)} weight(s) the model {described.get('name')} {described.get('args')} needs are "
             f"missing (e.g. {', '.join(missing[:2])})" if missing else "",
             f"{len(unexpected)} weight(s) belong to no layer (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
             f"{len(shapes)} weight(s) have another shape (e.g. {shapes[0]})" if shapes else ""]
    return "; ".join(p for p in parts if p) or None


def first_reason(exc: BaseException) -> str:
    """The line of an exception that says what is wrong: load_state_dict's first line only introduces the
    list of mismatched keys, so the first of those is taken."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    line = lines[0] if lines else ""
    return f"{exc.__class__.__name__}: {line if len(line) <= 160 else line[:157] + '...'}"


def nonfinite_weights(state_dict: dict) -> list[str]:
    """The tensors of a state_dict holding NaN or infinity (a run that diverged): never taught, never exported."""
    return [name for name, tensor in state_dict.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def refuse_nonfinite(payload: dict[str, Any], use: str) -> None:
    """CheckpointError when a checkpoint's weights hold NaN or infinity; `use` says what it was wanted for."""
    bad = nonfinite_weights(payload.get("state_dict") or {})
    if bad:
        raise CheckpointError(f"{payload['path']} holds NaN or infinite weights ({len(bad)} tensor(s), first "
                              f"{bad[0]}): its training diverged, so it cannot be {use}",
                              hint="retrain it with a lower train.lr (edgekd now stops a run whose loss "
                                   "diverges), or use an earlier run")


def stored_recipe(payload: dict[str, Any], data_root: str | None = None) -> Recipe:
    """The resolved recipe a checkpoint carries, its dataset root moved to `data_root` when given."""
    recipe = recipe_from_dict(payload["recipe"], origin=f"{payload['path']} (stored recipe)")
    if data_root:
        recipe.data.root = os.path.abspath(Path(data_root).expanduser())
    return recipe


def checkpoint_dataset(payload: dict[str, Any], splits: tuple[str, ...], data_root: str | None = None):
    """The checkpoint's recipe and the requested splits of its dataset, checked against its classes."""
    from edgekd.data import open_dataset

    recipe = stored_recipe(payload, data_root)
    # Evaluation, calibration and validation read labelled photos only: the unlabeled folder (perhaps not
    # on this machine) and the label-hiding protocol belong to training.
    data = dataclasses.replace(recipe.data, unlabeled=None, label_fraction=1.0)
    dataset = open_dataset(data, splits=splits, workers=recipe.train.workers)
    if dataset.class_names != payload["class_names"]:
        raise DataError(f"the dataset's classes {dataset.class_names} differ from the checkpoint's "
                        f"{payload['class_names']}", hint="point --data at the dataset the model was trained on")
    return recipe, dataset


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
