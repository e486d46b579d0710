"""What lands on disk from the Trainer's state and how it is read back: a checkpoint's payload (best.pt,
last.pt) and restoring last.pt, the run's summary.json and first lines. Functions of the trainer, so that
trainer.py holds the loop alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgekd.errors import CheckpointError
from edgekd.models.summary import count_parameters
from edgekd.runs import atomic_write_json, process_identity
from edgekd.train.checkpoint import first_reason
from edgekd.train.precision import amax_histories, fp8_scales, load_amax_histories
from edgekd.train.progress import EarlyStopping, EpochProgress
from edgekd.train.run_folder import now

if TYPE_CHECKING:  # annotations only: trainer.py imports this module
    from edgekd.train.trainer import Trainer


def _mean(values: list) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) / len(numbers) if numbers else None


def checkpoint_payload(trainer: Trainer, with_train_state: bool,
                       progress: EpochProgress | None = None) -> dict:
    """A checkpoint: the model alone (best.pt), or with the whole training state (last.pt); `epoch` counts
    finished epochs, and a mid-epoch last.pt says in train_state.epoch_progress how far the next one got."""
    payload = {**trainer.meta, "state_dict": trainer.eval_model.state_dict(), "recipe": trainer.recipe.to_dict(),
               "mode": trainer.mode, "role": "student" if trainer.mode == "distill" else "teacher",
               "epoch": trainer.epoch, "val_acc": trainer.history[-1].get("val_acc") if trainer.history else None,
               "precision": trainer.precision,
               "run": trainer.run_dir.name, "teacher": teacher_info(trainer), "saved": now()}
    if trainer.policy.fake_quant == "fp8":
        payload["fp8_weight_scales"] = fp8_scales(trainer.eval_model)
    if with_train_state:
        payload["train_state"] = {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
            "grad_scaler": trainer.policy.scaler.state_dict() if trainer.policy.scaler is not None else None,
            "amax_histories": amax_histories(trainer.model),
            "raw_state_dict": trainer.model.state_dict() if trainer.ema is not None else None,
            "ema_updates": trainer.ema.updates if trainer.ema is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "early_stopping": {k: v for k, v in dataclasses.asdict(trainer.stopper).items() if k != "patience"},
            "epoch_progress": dataclasses.asdict(progress) if progress is not None else None,
            "started": trainer.started}
    return payload


def teacher_info(trainer: Trainer) -> dict | None:
    if trainer.teacher_meta is None:
        return None
    forward = trainer.teacher_forward  # the live teacher's forward pass (None: cached logits, stored views)
    return {"checkpoint": trainer.teacher_meta["path"], "sha256": trainer.teacher_meta["sha256"],
            "model": trainer.teacher_meta["model"], "run": trainer.teacher_meta.get("run"),
            "forward": forward.name if forward is not None else None}


def loss_description(trainer: Trainer) -> str:
    smoothing = trainer.recipe.train.label_smoothing
    ce = f"CE (label smoothing {smoothing:g})" if smoothing else "CE"
    if trainer.teacher_model is None:
        return ce
    d = trainer.recipe.distill
    if d.method == "kd":
        text = f"kd: {d.alpha:g}*T^2*KL(teacher || student) + {1 - d.alpha:g}*{ce}, T={d.temperature:g}"
    elif d.method == "dkd":
        text = f"dkd: {ce} + T^2*({d.dkd_alpha:g}*TCKD + {d.dkd_beta:g}*NCKD), T={d.temperature:g}"
    else:
        text = (f"dist: {ce} + T^2*({d.dist_beta:g}*inter + {d.dist_gamma:g}*intra Pearson), "
                f"T={d.temperature:g}")
    return text + (f", distillation ramped in over {d.warmup_epochs:g} epochs" if d.warmup_epochs else "")


def write_summary(trainer: Trainer, status: str, error: str | None = None) -> dict:
    summary = {
        "run": trainer.run_dir.name, "recipe": trainer.recipe.name, "recipe_file": trainer.recipe.source,
        "mode": trainer.mode, "status": status, "error": error, "loss": loss_description(trainer),
        "device": trainer.device.type,
        "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "precision": trainer.precision,
        "model": {**trainer.meta["model"], "parameters": count_parameters(trainer.model),
                  "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)},
        "dataset": trainer.dataset.summary(), "mean": trainer.meta["mean"], "std": trainer.meta["std"],
        "teacher": teacher_info(trainer),
        "teacher_views_fill": trainer.views.fill if trainer.views is not None else None,
        "epochs_done": trainer.epoch, "epochs_planned": trainer.recipe.train.epochs,
        "best_epoch": trainer.stopper.best_epoch, "best_val_acc": trainer.stopper.best_acc if trainer.epoch else None,
        "seconds_per_epoch": _mean([r.get("seconds") for r in trainer.history]),
        "distributed": {**trainer.dist.describe(), "ranks_identical": getattr(trainer, "ranks_identical", None)},
        "last_saved": trainer.saved, "checkpointing": trainer.checkpointing, "process": process_identity(),
        "started": trainer.started, "updated": now()}
    if trainer.dist.main:
        atomic_write_json(trainer.run_dir / "summary.json", summary)
    return summary



def restore(trainer: Trainer, last: dict, run_dir: Path) -> None:
    """Rebuild the model and put last.pt's state into it; a file whose weights or state do not fit the
    run's model (tampered, or from another edgekd) is a CheckpointError, not a traceback."""
    try:
        trainer.build(tuple(last["mean"]), tuple(last["std"]), pretrained=False)
        _load_train_state(trainer, last)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{run_dir / 'last.pt'} does not fit this run's model ({first_reason(exc)})",
                              hint="start a new run without --resume (the folder is kept as it is)") from None


def _load_train_state(trainer: Trainer, last: dict) -> None:
    """Continue from last.pt: weights, optimizer, scheduler, RNG, early stopping, metrics."""
    state = last["train_state"]
    # With an EMA, the checkpoint's state_dict is the average and the raw weights ride in train_state.
    trainer.model.load_state_dict(state.get("raw_state_dict") or last["state_dict"])
    if trainer.ema is not None:
        trainer.ema.model.load_state_dict(last["state_dict"])
        trainer.ema.updates = state.get("ema_updates", 0)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None and state.get("scheduler"):
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.policy.scaler is not None and state.get("grad_scaler"):
        trainer.policy.scaler.load_state_dict(state["grad_scaler"])
    load_amax_histories(trainer.model, state.get("amax_histories") or {})
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    trainer.stopper = EarlyStopping(trainer.recipe.train.patience, **state["early_stopping"])
    trainer.epoch = last["epoch"]
    progress = state.get("epoch_progress")
    trainer.resume_point = EpochProgress(**progress) if progress else None
    trainer.started = state.get("started", trainer.started)
    trainer.history = trainer.metrics.truncate_to_epoch(trainer.epoch)


def start_info(trainer: Trainer, resumed: bool) -> dict:
    """What the run's first lines say (Callbacks.on_start)."""
    model, dataset = trainer.recipe.model, trainer.dataset
    return {
        "run_dir": str(trainer.run_dir), "mode": trainer.mode, "device": trainer.device.type,
        "precision": trainer.precision, "torch_threads": torch.get_num_threads(), "dataset": dataset.describe(),
        "model": f"{model.name}({', '.join(f'{k}={v}' for k, v in model.args.items())})",
        "parameters": count_parameters(trainer.model), "resumed_from_epoch": trainer.epoch if resumed else None,
        "resumed_at_batch": trainer.resume_point.next_batch if trainer.resume_point else None,
        "teacher": trainer.teacher_meta["path"] if trainer.teacher_meta else None,
        "teacher_forward": trainer.teacher_forward.name if trainer.teacher_forward is not None else None,
        "distributed": trainer.dist.describe(),
        "teacher_views_fill": trainer.views.fill if trainer.views is not None else None,
        "skipped_images": sum(len(v) for v in dataset.skipped.values()),
        "unlabeled_images": dataset.splits["train"].unlabeled_count}
