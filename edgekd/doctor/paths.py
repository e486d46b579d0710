"""The tiny jobs `edgekd doctor --smoke` runs, one per row, each in its own process (doctor/row.py).

Each returns one line saying what ran; raising marks its row failed. They go through the same code as
the real stages (the trainer, the teacher-view fill, the exporter, classify), only at toy sizes.
torch is imported inside them: a classify row must run on a device install.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def train(recipe: str, precision: str, device: str, artifacts: str) -> str:
    """One short training run through the trainer, on `device` at `precision`."""
    from edgekd.recipe import load_recipe
    from edgekd.train.trainer import run

    name = f"smoke_{device}_{precision}"
    summary = run(load_recipe(recipe, [f"precision={precision}", f"train.device={device}", f"name={name}"]),
                  "train", Path(artifacts))
    records = [json.loads(line) for line in (Path(artifacts) / summary["run"] / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    if summary["status"] not in ("finished", "early_stopped") or not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"run {summary['status']}, train losses {losses}")
    p = summary["precision"]
    return (f"{'native' if p['native'] else 'simulated'}; {summary['epochs_done']} epoch(s), train loss "
            f"{losses[-1]:.3f} on {summary['device_name']}")


def _split_and_augment(recipe_path: str, max_per_class: int | None = None, data_root: str | None = None):
    from edgekd.data import open_dataset
    from edgekd.recipe import load_recipe

    overrides = [f"data.root={data_root}"] if data_root else []
    overrides += [f"data.max_per_class={max_per_class}"] if max_per_class else []
    recipe = load_recipe(recipe_path, overrides)
    dataset = open_dataset(recipe.data, splits=("train",), workers=min(8, os.cpu_count() or 1))
    return dataset.splits["train"], recipe.augment


def fill_views(model, meta: dict, split, augment, forward: str, device: str, cache_root: Path,
               count: int = 2, batch_size: int = 128) -> str:
    """The stored teacher views of `split` filled with the forward pass named `forward` (teacher_forward.py)."""
    import numpy as np
    import torch

    from edgekd.train.teacher_forward import TeacherForward, candidates
    from edgekd.train.teacher_views import teacher_views

    torch_device = torch.device(device)
    model = model.to(torch_device).eval()
    offered = candidates(model, meta, torch_device, cache_root / "teacher-onnx", "auto")
    if forward not in offered:
        raise RuntimeError(f"this machine offers no {forward!r} (offered: {', '.join(offered)})")
    build = offered[forward]
    started = time.perf_counter()
    views = teacher_views(lambda probe, earlier, count_: TeacherForward(forward, build()), meta["sha256"],
                          len(meta["class_names"]), split, augment, split.images.shape[1],
                          meta["image_size"], count, 0, 0, cache_root, batch_size, scope=f"smoke-{forward}")
    seconds = time.perf_counter() - started
    logits = views.all_logits(split.rows)
    if not np.isfinite(logits).all():
        raise RuntimeError("the teacher's stored logits are not all finite")
    filled = views.fill or {}
    rate = filled.get("views", 0) / filled["seconds"] if filled.get("seconds") else 0.0
    return f"{count} views of {len(split.rows)} photos in {seconds:.1f} s ({rate:.0f} views/s in the fill)"


def teacher_fill(checkpoint: str, recipe: str, forward: str, device: str, cache: str) -> str:
    """A teacher-view fill with one of the teacher forward passes, the teacher being a smoke checkpoint."""
    from edgekd.train.checkpoint import file_sha256, load_model

    model, payload = load_model(checkpoint)
    split, augment = _split_and_augment(recipe)
    return fill_views(model, {**payload, "sha256": file_sha256(checkpoint)}, split, augment, forward, device,
                      Path(cache))


def export(checkpoint: str, precision: str, out: str) -> str:
    """One export at `precision` (the exporter writes fp32 too: the others derive from it); the accuracy
    gate is opened wide: a model trained for one epoch is being exported, not judged."""
    from edgekd.export.exporter import ExportPlan, export_checkpoint

    files = export_checkpoint(ExportPlan(Path(checkpoint), [precision], Path(out), calibration_images=12,
                                         max_drop_pts=100.0, min_agreement=0.0))
    written = next(f for f in files if f.precision == precision)
    return (f"{written.path.name}, {written.size_bytes / 1024:.0f} KiB, max Δlogit vs PyTorch "
            f"{written.max_abs_logit_diff:.2g}, top-1 agreement {written.agreement:.0%}")


def classify(folder: str, precision: str, provider: str, photos: str) -> str:
    """One classification of a folder of photos through `edgekd classify`'s code on one runtime/provider."""
    import numpy as np

    from edgekd.classify import ExportedModel, Failure, expand_inputs

    model_file = next(Path(folder).glob(f"*.{precision}.onnx"))
    started = time.perf_counter()
    model = ExportedModel(model_file, provider)
    files = expand_inputs([photos])
    results = list(model.classify(files))
    failures = [r for r in results if isinstance(r, Failure)]
    if failures or len(results) != len(files):
        raise RuntimeError(f"{len(failures)} of {len(files)} photos failed: {failures[:1]}")
    if not all(np.isfinite(r.probability) for r in results):
        raise RuntimeError("a probability is not finite")
    labels = sorted({r.label for r in results})
    return f"{len(results)} photos in {time.perf_counter() - started:.2f} s (load included); labels {', '.join(labels)}"


def _under_torchrun(nproc: int, *module_and_args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
               *module_and_args]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"torchrun exited {done.returncode}: {' | '.join(lines[-3:])[-400:]}")
    return done.stdout.strip()


def torchrun(recipe: str, device: str, nproc: int, artifacts: str) -> str:
    """`edgekd train` under torchrun: DistributedDataParallel over gloo (CPU) or NCCL (CUDA). On CUDA an
    all-reduce over NCCL first: the trainer joins a process group only from 2 processes on, so on a one-GPU
    machine the all-reduce is what tests NCCL."""
    reduced = _under_torchrun(nproc, "edgekd.doctor.allreduce", "nccl") if device == "cuda" else ""
    name = f"smoke_ddp_{device}"
    _under_torchrun(nproc, "edgekd", "-q", "train", recipe, "--artifacts", artifacts, "--set", f"train.device={device}",
                    "--set", f"name={name}")
    runs = sorted(Path(artifacts).glob(f"{name}*/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(runs[-1].read_text())
    d = summary["distributed"]
    if d["world_size"] != nproc or summary["status"] not in ("finished", "early_stopped"):
        raise RuntimeError(f"run {summary['status']} with world size {d['world_size']}, expected {nproc}")
    trainer = (f"trainer: DDP over {d['backend']}, ranks identical: {d.get('ranks_identical')}" if nproc > 1
               else "trainer: 1 process (no process group)")
    return "; ".join(part for part in (reduced.splitlines()[-1] if reduced else "", trainer) if part)
