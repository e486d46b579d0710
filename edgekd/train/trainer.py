"""The one stateful loop: train a teacher with cross-entropy, or distill a student from a teacher.

Each finished epoch appends a line to metrics.jsonl, then writes best.pt (when validation accuracy
improved) and last.pt, each atomically. last.pt carries the optimizer, scheduler, RNG and early-stopping
state, and is also written inside an epoch every train.checkpoint_seconds with the position in the epoch's
batch order, so `--resume` continues from the newest saved state exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

from edgekd.data import Dataset, RowStore, Split, channel_stats, open_dataset
from edgekd.errors import CheckpointError, DataError, EdgekdError, RecipeError
from edgekd.evaluate import evaluate_model
from edgekd.models import (Classifier, create_model, freeze_backbone, load_pretrained, pretrained_normalisation,
                           resolve_pretrained, set_train_mode)
from edgekd.models.pretrained import read_state
from edgekd.models.summary import count_parameters
from edgekd.recipe import Recipe, dump_recipe, recipe_differences
from edgekd.runs import (MetricsLog, atomic_write_json, atomic_write_text, check_writable, interrupts_deferred,
                         latest_run_dir, new_run_dir, owner_alive, process_identity, read_summary,
                         remove_stale_temporaries)
from edgekd.train import distributed
from edgekd.train.augment import batch_generator, draw_views, render_views, resize_for
from edgekd.train.batches import Batch, batch_count, iter_batches
from edgekd.train.checkpoint import describe_model, first_reason, read_checkpoint, save_checkpoint
from edgekd.train.ema import WeightAverage
from edgekd.train.losses import ce_loss, distill_loss
from edgekd.train.precision import (PrecisionPolicy, amax_histories, bitsandbytes_module, fp8_scales,
                                    load_amax_histories, make_policy)
from edgekd.train.teacher import Teacher, load_teacher, prepare_teacher, resolve_teachers
from edgekd.train.teacher_views import TeacherViews

log = logging.getLogger(__name__)


class Callbacks:
    """What the loop reports as it runs; the CLI draws progress bars from these, the default logs."""

    def on_start(self, info: dict) -> None:
        log.info("run %s: %s", info["run_dir"], info)

    def on_epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def on_batch(self, images: int, loss: float) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        log.info("epoch %d: %s", record["epoch"], record)

    def on_end(self, summary: dict) -> None:
        log.info("run finished: %s", summary["status"])


class _Silent(Callbacks):
    """Ranks other than 0 report nothing: rank 0 speaks for the run."""

    def on_start(self, info: dict) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        pass

    def on_end(self, summary: dict) -> None:
        pass


@dataclass
class EarlyStopping:
    patience: int | None
    best_acc: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, acc: float) -> bool:
        """Record an epoch; True when it is the best so far."""
        if acc > self.best_acc:
            self.best_acc, self.best_epoch, self.bad_epochs = acc, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience


@dataclass
class EpochProgress:
    """How far the loop is inside an epoch; saved mid-epoch so a resumed run continues at the next batch
    with the epoch's running sums, and its metrics line equals an uninterrupted run's."""
    epoch: int
    next_batch: int = 0
    total_loss: float = 0.0
    correct: int = 0
    labelled: int = 0
    seen: int = 0
    train_seconds: float = 0.0

    def add(self, index: int, loss: float, images: int, correct: int, labelled: int) -> None:
        self.next_batch = index + 1
        self.total_loss += loss * images
        self.correct += correct
        self.labelled += labelled
        self.seen += images


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """Trainable parameters; a pretrained backbone's at lr × train.backbone_lr_factor, the head's at lr."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    factor = recipe.train.backbone_lr_factor
    if factor == 1.0 or not recipe.model.pretrained:
        return [{"params": [p for _, p in trainable]}]
    backbone = [p for name, p in trainable if ".backbone." in f".{name}"]
    rest = [p for name, p in trainable if ".backbone." not in f".{name}"]
    return [{"params": backbone, "lr": recipe.train.lr * factor}, {"params": rest}]


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    cfg = recipe.train
    if cfg.optimizer == "adam8bit":
        return bitsandbytes_module().optim.Adam8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, batches_per_epoch: int):
    """The lr schedule: StepLR steps once per epoch; warm-up and cosine step once per batch (a small
    dataset has only a handful of batches per epoch, too coarse for a smooth curve)."""
    cfg = recipe.train
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.gamma)
    warmup = round(cfg.warmup_epochs * batches_per_epoch)
    if cfg.scheduler == "none" and warmup == 0:
        return None
    if cfg.warmup_epochs >= cfg.epochs:
        log.warning("train.warmup_epochs (%g) >= train.epochs (%d): the lr never reaches its peak",
                    cfg.warmup_epochs, cfg.epochs)
    decay_steps = max(1, cfg.epochs * batches_per_epoch - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "none":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / decay_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _mean(values: list) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) / len(numbers) if numbers else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Trainer:
    def __init__(self, recipe: Recipe, mode: str, run_dir: Path, dataset: Dataset, device: torch.device,
                 teacher: Teacher | None, callbacks: Callbacks,
                 dist: distributed.Distributed | None = None, train_split: Split | None = None):
        self.recipe, self.mode, self.run_dir, self.dataset = recipe, mode, run_dir, dataset
        # The photos batches come from: the dataset's own train split, or the same photos decoded at
        # augment.render_size (views are rendered there, then resized to the model's image size).
        self.train_split = train_split if train_split is not None else dataset.splits["train"]
        self.views: TeacherViews | None = None
        self.device, self.dist = device, dist or distributed.Distributed()
        self.callbacks = callbacks if self.dist.main else _Silent()
        self.teacher_model, self.teacher_meta = teacher if teacher else (None, None)
        self.teacher_logits: RowStore | None = None  # (rows, classes) fp16 when cached
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.stopper = EarlyStopping(recipe.train.patience)
        self.epoch = 0
        self.history: list[dict] = []
        self.started = _now()
        self.frozen = recipe.model.freeze == "backbone"
        self.augment = recipe.augment if recipe.augment.active else None
        self.ema: WeightAverage | None = None
        self.policy: PrecisionPolicy = make_policy(recipe.precision, device)
        self.precision = self.policy.describe()
        self.resume_point: EpochProgress | None = None  # where a mid-epoch last.pt left off
        self.last_save = time.monotonic()
        self.save_seconds = 0.0  # how long the last save took, and the last validation: to save in time
        self.validate_seconds = 0.0
        self.saved: dict | None = None  # what last.pt holds now (epoch, batch, when)
        self.checkpointing = {"mid_epoch_saves": 0, "seconds": 0.0}  # their cost, in this process

    # ----- set-up -------------------------------------------------------------------------------------

    def build(self, mean: tuple[float, ...], std: tuple[float, ...], pretrained: bool) -> None:
        cfg = self.recipe.model
        seed_everything(self.recipe.train.seed)
        net = create_model(cfg.name, len(self.dataset.class_names), **cfg.args)
        if pretrained and cfg.pretrained:
            load_pretrained(net, resolve_pretrained(cfg.name, cfg.pretrained), cfg.name)
        if self.frozen:
            freeze_backbone(net)
        self.policy.prepare(net)
        self.model = Classifier(net, mean, std).to(self.device)
        self.meta = describe_model(cfg.name, cfg.args, self.dataset.class_names, self.dataset.image_size, mean, std)
        self.optimizer = make_optimizer(parameter_groups(self.model, self.recipe), self.recipe)
        train_cfg = self.recipe.train
        self.batches_per_epoch = batch_count(len(self.train_split), train_cfg.batch_size, drop_last=True)
        self.scheduler = make_scheduler(self.optimizer, self.recipe, self.batches_per_epoch)
        self.per_batch_schedule = self.scheduler is not None and train_cfg.scheduler != "step"
        if train_cfg.ema_decay is not None:
            self.ema = WeightAverage(self.model, train_cfg.ema_decay)
        self.train_model = self.model  # DistributedDataParallel around it once restored (parallelize)

    def parallelize(self) -> None:
        self.train_model = distributed.wrap(self.model, self.dist, self.device, self.recipe.train.sync_batchnorm)

    def restore(self, last: dict) -> None:
        """Continue from last.pt: weights, optimizer, scheduler, RNG, early stopping, metrics."""
        state = last["train_state"]
        # With an EMA, the checkpoint's state_dict is the average and the raw weights ride in train_state.
        self.model.load_state_dict(state.get("raw_state_dict") or last["state_dict"])
        if self.ema is not None:
            self.ema.model.load_state_dict(last["state_dict"])
            self.ema.updates = state.get("ema_updates", 0)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.policy.scaler is not None and state.get("grad_scaler"):
            self.policy.scaler.load_state_dict(state["grad_scaler"])
        load_amax_histories(self.model, state.get("amax_histories") or {})
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.stopper = EarlyStopping(self.recipe.train.patience, **state["early_stopping"])
        self.epoch = last["epoch"]
        progress = state.get("epoch_progress")
        self.resume_point = EpochProgress(**progress) if progress else None
        self.started = state.get("started", self.started)
        self.history = self.metrics.truncate_to_epoch(self.epoch)

    @property
    def eval_model(self) -> Classifier:
        """The model that is validated, checkpointed and exported: the weight average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    # ----- the loop -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        epochs = self.recipe.train.epochs
        self._write_summary("running")
        self.last_save = time.monotonic()
        try:
            while self.epoch < epochs and not self.stopper.should_stop:
                record = self._run_epoch(self.epoch + 1)
                self._finish_epoch(record)
        except KeyboardInterrupt:
            self._write_summary("interrupted")
            raise
        except Exception as exc:
            self._write_summary("failed", error=f"{exc.__class__.__name__}: {exc}")
            raise
        status = "early_stopped" if self.stopper.should_stop and self.epoch < epochs else "finished"
        if self.dist.active:
            self.ranks_identical = len(set(self.dist.gather(distributed.weights_digest(self.model)))) == 1
        summary = self._write_summary(status)
        self.callbacks.on_end(summary)
        return summary

    def _run_epoch(self, epoch: int) -> dict:
        cfg = self.recipe.train
        progress = self._take_resume_point(epoch)
        batches = batch_count(len(self.train_split), cfg.batch_size, drop_last=True)
        self.callbacks.on_epoch_start(epoch, cfg.epochs, batches)
        set_train_mode(self.train_model, self.frozen)
        start, earlier_seconds = time.perf_counter(), progress.train_seconds
        first = progress.next_batch
        for index, batch in enumerate(iter_batches(self.train_split, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                                   epoch=epoch, drop_last=True, start=first,
                                                   shard=(self.dist.rank, self.dist.world)), start=first):
            step_start = time.perf_counter()
            loss, batch_correct, batch_labelled = self._step(batch, epoch, index)
            progress.add(index, loss, len(batch.rows), batch_correct, batch_labelled)
            self.callbacks.on_batch(len(batch.rows), loss)
            # the last batch counts the validation still to come: the epoch's own save follows it
            ahead = time.perf_counter() - step_start + (self.validate_seconds if index + 1 == batches else 0.0)
            if self._save_due(ahead):
                progress.train_seconds = earlier_seconds + time.perf_counter() - start
                self._save_mid_epoch(progress)
        train_seconds = earlier_seconds + time.perf_counter() - start
        total_loss, correct, labelled, seen = self.dist.sum(progress.total_loss, progress.correct,
                                                            progress.labelled, progress.seen)
        distributed.sync_buffers(self.model, self.dist)
        if self.scheduler is not None and not self.per_batch_schedule:
            self.scheduler.step()
        validate_start = time.perf_counter()
        val = self.dist.broadcast(self._validate() if self.dist.main else None)
        self.validate_seconds = time.perf_counter() - validate_start
        # train_acc: on the (augmented) training batches as the weights moved during the epoch.
        return {"epoch": epoch, "train_loss": total_loss / seen, "train_acc": correct / max(labelled, 1),
                "val_loss": val.loss, "val_acc": val.accuracy,
                "lr": self.optimizer.param_groups[-1]["lr"], "seconds": earlier_seconds + time.perf_counter() - start,
                "train_seconds": train_seconds, "images_per_s": seen / train_seconds,
                "precision": self.precision["mode"], "precision_native": self.precision["native"],
                "device": self.device.type}

    def _take_resume_point(self, epoch: int) -> EpochProgress:
        point, self.resume_point = self.resume_point, None
        if point is None or point.epoch != epoch:
            return EpochProgress(epoch)
        if not self.dist.main:  # the saved sums are every rank's together: rank 0 carries them on
            return EpochProgress(epoch, point.next_batch, train_seconds=point.train_seconds)
        return point

    def _save_due(self, seconds_ahead: float) -> bool:
        """Whether to save now: early enough that the work ahead (the next step, or the validation) and the
        save itself still end within train.checkpoint_seconds of the last save, so a kill at any moment
        loses less than that."""
        interval = self.recipe.train.checkpoint_seconds
        if interval is None:
            return False
        due = time.monotonic() - self.last_save + seconds_ahead + self.save_seconds >= interval
        return self.dist.broadcast(due)  # under DDP rank 0's clock decides, so every rank joins the save

    def _save_mid_epoch(self, progress: EpochProgress) -> None:
        started = time.monotonic()
        if self.dist.active:  # the epoch's sums so far, over every rank; rank 0's state is the run's
            sums = self.dist.sum(progress.total_loss, progress.correct, progress.labelled, progress.seen)
            progress = dataclasses.replace(progress, **dict(zip(("total_loss", "correct", "labelled", "seen"), sums)))
            if not self.dist.main:
                self._record_save(progress.epoch, progress.next_batch, started)
                return
        with interrupts_deferred():
            save_checkpoint(self.run_dir / "last.pt", self._payload(with_train_state=True, progress=progress))
            self._record_save(progress.epoch, progress.next_batch, started)
            self.checkpointing["mid_epoch_saves"] += 1
            self.checkpointing["seconds"] += self.save_seconds
            self._write_summary("running")

    def _record_save(self, epoch: int, batch: int | None, started: float) -> None:
        self.last_save = time.monotonic()
        self.save_seconds = self.last_save - started
        self.saved = {"epoch": epoch, "next_batch": batch, "at": _now()}

    def _validate(self):
        with self.policy.autocast():  # validation measures the model as it trains: same precision
            return evaluate_model(self.eval_model, self.dataset.splits["val"], self.dataset.class_names,
                                  self.recipe.train.batch_size, self.device)

    def _teacher_logits(self, batch: Batch, pixels: torch.Tensor) -> torch.Tensor | None:
        if self.teacher_logits is not None:
            return torch.from_numpy(self.teacher_logits[batch.rows].astype(np.float32)).to(self.device)
        if self.teacher_model is None:
            return None
        # pixels: the view at the resolution it was rendered at; a teacher of another size gets it resized
        pixels = resize_for(pixels, self.teacher_meta["image_size"])
        with torch.no_grad():
            return self.teacher_model(pixels)

    def _inputs(self, batch: Batch, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's pixels at its own size and the teacher's logits for the same view (or None)."""
        pixels = batch.pixels.to(self.device, non_blocking=True)
        size = self.dataset.image_size
        if self.views is not None:
            views, logits = self.views.views(batch.rows, epoch)
            return render_views(pixels, views, self.augment, size), logits.to(self.device)
        if self.augment is not None:
            generator = batch_generator(self.recipe.train.seed, epoch, index)
            pixels = render_views(pixels, draw_views(len(pixels), pixels.shape[-1], self.augment, generator),
                                  self.augment)
        with self.policy.autocast():
            teacher_logits = self._teacher_logits(batch, pixels)
        return resize_for(pixels, size), teacher_logits

    def _step(self, batch: Batch, epoch: int, index: int) -> tuple[float, int, int]:
        """One optimizer step; returns the batch's loss and how many of its labelled images the model got right."""
        labels = batch.labels.to(self.device)
        pixels, teacher_logits = self._inputs(batch, epoch, index)
        with self.policy.autocast():
            logits = self.train_model(pixels)
        loss = self._loss(logits, teacher_logits, labels, epoch, index)
        value = float(loss.detach())
        self._stop_if_diverged(value, epoch, index)
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.backward_and_step(loss, self.optimizer, self.recipe.train.grad_clip)
        if self.per_batch_schedule:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        known = labels >= 0  # unlabeled photos (label -1) count in the loss only, through the teacher
        return value, int((logits.detach().argmax(1) == labels)[known].sum()), int(known.sum())

    def _stop_if_diverged(self, loss: float, epoch: int, index: int, what: str = "training loss") -> None:
        """A NaN or infinite loss ends the run now: every later step, checkpoint and export would carry it.
        Under DDP every rank learns of any rank's NaN, so none waits forever for the others."""
        bad = not math.isfinite(loss)
        if self.dist.active:
            bad = self.dist.sum(float(bad))[0] > 0
        if bad:
            where = f"epoch {epoch}, batch {index + 1} of {self.batches_per_epoch}" if index >= 0 else f"epoch {epoch}"
            value = f"is {loss}" if not math.isfinite(loss) else "is not finite on another process"
            raise EdgekdError(f"training diverged: the {what} {value} at {where}",
                              hint=f"lower train.lr (now {self.recipe.train.lr:g}), set train.grad_clip, or train "
                                   "in fp32; the run is marked failed and keeps the checkpoints from before")

    def _loss(self, logits, teacher_logits, labels, epoch: int, index: int) -> torch.Tensor:
        # The losses cast to fp32 themselves, whatever precision the forward pass ran in.
        smoothing = self.recipe.train.label_smoothing
        if teacher_logits is None:
            return ce_loss(logits, labels, smoothing)
        warmup = self.recipe.distill.warmup_epochs
        ramp = min(1.0, (epoch - 1 + (index + 1) / self.batches_per_epoch) / warmup) if warmup > 0 else 1.0
        return distill_loss(logits, teacher_logits, labels, self.recipe.distill, smoothing, ramp)

    def _finish_epoch(self, record: dict) -> None:
        self._stop_if_diverged(record["val_loss"], record["epoch"], -1, "validation loss")
        improved = self.stopper.update(record["epoch"], record["val_acc"])
        self.epoch = record["epoch"]
        self.history.append(record)
        if not self.dist.main:
            return
        started = time.monotonic()
        with interrupts_deferred():  # Ctrl-C while saving: finish the epoch's files, then stop
            self.metrics.append(record)
            if improved:
                save_checkpoint(self.run_dir / "best.pt", self._payload(with_train_state=False))
            save_checkpoint(self.run_dir / "last.pt", self._payload(with_train_state=True))
            self._record_save(self.epoch, None, started)
            self._write_summary("running")
        self.callbacks.on_epoch_end(record)

    # ----- what lands on disk -------------------------------------------------------------------------

    def _payload(self, with_train_state: bool, progress: EpochProgress | None = None) -> dict:
        """A checkpoint: the model alone (best.pt), or with the whole training state (last.pt); `epoch` counts
        finished epochs, and a mid-epoch last.pt says in train_state.epoch_progress how far the next one got."""
        payload = {**self.meta, "state_dict": self.eval_model.state_dict(), "recipe": self.recipe.to_dict(),
                   "mode": self.mode, "role": "student" if self.mode == "distill" else "teacher",
                   "epoch": self.epoch, "val_acc": self.history[-1].get("val_acc") if self.history else None,
                   "precision": self.precision,
                   "run": self.run_dir.name, "teacher": self._teacher_info(), "saved": _now()}
        if self.policy.fake_quant == "fp8":
            payload["fp8_weight_scales"] = fp8_scales(self.eval_model)
        if with_train_state:
            payload["train_state"] = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "grad_scaler": self.policy.scaler.state_dict() if self.policy.scaler is not None else None,
                "amax_histories": amax_histories(self.model),
                "raw_state_dict": self.model.state_dict() if self.ema is not None else None,
                "ema_updates": self.ema.updates if self.ema is not None else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "early_stopping": {k: v for k, v in dataclasses.asdict(self.stopper).items() if k != "patience"},
                "epoch_progress": dataclasses.asdict(progress) if progress is not None else None,
                "started": self.started}
        return payload

    def _teacher_info(self) -> dict | None:
        if self.teacher_meta is None:
            return None
        return {"checkpoint": self.teacher_meta["path"], "sha256": self.teacher_meta["sha256"],
                "model": self.teacher_meta["model"], "run": self.teacher_meta.get("run")}

    def _loss_description(self) -> str:
        smoothing = self.recipe.train.label_smoothing
        ce = f"CE (label smoothing {smoothing:g})" if smoothing else "CE"
        if self.teacher_model is None:
            return ce
        d = self.recipe.distill
        if d.method == "kd":
            text = f"kd: {d.alpha:g}*T^2*KL(teacher || student) + {1 - d.alpha:g}*{ce}, T={d.temperature:g}"
        elif d.method == "dkd":
            text = f"dkd: {ce} + T^2*({d.dkd_alpha:g}*TCKD + {d.dkd_beta:g}*NCKD), T={d.temperature:g}"
        else:
            text = (f"dist: {ce} + T^2*({d.dist_beta:g}*inter + {d.dist_gamma:g}*intra Pearson), "
                    f"T={d.temperature:g}")
        return text + (f", distillation ramped in over {d.warmup_epochs:g} epochs" if d.warmup_epochs else "")

    def _write_summary(self, status: str, error: str | None = None) -> dict:
        summary = {
            "run": self.run_dir.name, "recipe": self.recipe.name, "recipe_file": self.recipe.source,
            "mode": self.mode, "status": status, "error": error, "loss": self._loss_description(),
            "device": self.device.type,
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(), "precision": self.precision,
            "model": {**self.meta["model"], "parameters": count_parameters(self.model),
                      "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad)},
            "dataset": self.dataset.summary(), "mean": self.meta["mean"], "std": self.meta["std"],
            "teacher": self._teacher_info(),
            "teacher_views_fill": self.views.fill if self.views is not None else None,
            "epochs_done": self.epoch, "epochs_planned": self.recipe.train.epochs,
            "best_epoch": self.stopper.best_epoch, "best_val_acc": self.stopper.best_acc if self.epoch else None,
            "seconds_per_epoch": _mean([r.get("seconds") for r in self.history]),
            "distributed": {**self.dist.describe(), "ranks_identical": getattr(self, "ranks_identical", None)},
            "last_saved": self.saved, "checkpointing": self.checkpointing, "process": process_identity(), "started": self.started, "updated": _now()}
        if self.dist.main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


# ----- entry point --------------------------------------------------------------------------------------

def input_normalisation(recipe: Recipe, dataset: Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """What a pretrained backbone's weights expect; otherwise the training split's own statistics."""
    if recipe.model.pretrained:
        expected = pretrained_normalisation(recipe.model.name)
        if expected is not None:
            log.info("input normalisation: mean %s, std %s (what %s's pretrained weights expect)",
                     expected[0], expected[1], recipe.model.name)
            return expected
    return channel_stats(dataset.splits["train"])


def _render_split(recipe: Recipe, dataset: Dataset) -> Split:
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


def _run_dir_for(recipe: Recipe, mode: str, artifacts: Path, resume: bool) -> tuple[Path, dict | None]:
    """The run folder and, when resuming, the last.pt to continue from (None: start from the beginning)."""
    run_dir = latest_run_dir(artifacts, recipe.name) if resume else None
    if resume and run_dir is None:
        log.warning("nothing to resume: no run of %r under %s/; starting a new run", recipe.name, artifacts)
    if run_dir is None:
        run_dir = _failed_before_any_epoch(artifacts, recipe.name) or new_run_dir(artifacts, recipe.name)
        _claim(run_dir, recipe, mode)
        return run_dir, None
    summary = read_summary(run_dir)  # a run whose process died is settled as interrupted here
    if summary.get("status") == "running" and owner_alive(summary):
        owner = summary["process"]
        raise EdgekdError(f"{run_dir} is still being trained (pid {owner['pid']} on {owner['host']})",
                          hint="wait for it to finish, or stop that process before resuming")
    for stale in remove_stale_temporaries(run_dir):  # a SIGKILL during a save leaves its temporary behind
        log.info("removed %s, left by a save the last process did not finish", stale.name)
    if not (run_dir / "last.pt").is_file():
        if (run_dir / "best.pt").exists() or MetricsLog(run_dir / "metrics.jsonl").read():
            # epochs finished, yet the state to continue them is gone (deleted to save room?): never
            # start over on top of what they left
            raise CheckpointError(f"{run_dir} has finished epochs but no last.pt to continue them from",
                                  hint="start a new run without --resume; this folder is kept as it is")
        log.warning("%s was stopped before its first save: restarting it from the beginning in the same folder",
                    run_dir)
        for leftover in ("metrics.jsonl", "best.pt"):
            (run_dir / leftover).unlink(missing_ok=True)
        _claim(run_dir, recipe, mode)
        return run_dir, None
    last = read_checkpoint(run_dir / "last.pt")
    if not isinstance(last.get("train_state"), dict):
        raise CheckpointError(f"{run_dir / 'last.pt'} holds no training state to resume from")
    if not isinstance(last.get("recipe"), dict) or not isinstance(last.get("epoch"), int):
        raise CheckpointError(f"{run_dir / 'last.pt'} does not say which recipe and epoch it holds")
    _refuse_recipe_changes(last["recipe"], recipe, run_dir, last["epoch"])
    # Remembered until the loop begins: a resume that fails before it leaves a finished run finished.
    _claim(run_dir, recipe, mode, {**summary, "resumed_from": {k: summary.get(k) for k in ("status", "error")}})
    progress = last["train_state"].get("epoch_progress")
    where = (f"epoch {progress.get('epoch')}, batch {progress.get('next_batch')}" if isinstance(progress, dict)
             else f"the end of epoch {last['epoch']}")
    log.warning("resuming %s from %s (saved %s)", run_dir, where, last.get("saved", "?"))
    return run_dir, last


def _failed_before_any_epoch(artifacts: Path, name: str) -> Path | None:
    """The newest run of `name` when it failed before finishing an epoch (it holds only its summary and
    recipe): the next attempt takes its folder, so retrying a setup problem leaves no pile of failed runs."""
    newest = latest_run_dir(artifacts, name)
    if newest is None or read_summary(newest).get("status") != "failed":
        return None
    if any((newest / f).exists() for f in ("last.pt", "best.pt")) or MetricsLog(newest / "metrics.jsonl").read():
        return None
    log.info("reusing %s: its last attempt failed before finishing an epoch", newest)
    return newest


def _claim(run_dir: Path, recipe: Recipe, mode: str, summary: dict | None = None) -> None:
    """Mark the folder as this process's before any long work (decoding, the teacher's views), so no other
    `--resume` takes it over and a kill from here on is recognised as one."""
    now = _now()
    summary = {"run": run_dir.name, "recipe": recipe.name, "mode": mode, "epochs_done": 0,
               "epochs_planned": recipe.train.epochs, "started": now, **(summary or {}),
               "status": "running", "error": None, "process": process_identity(), "updated": now}
    atomic_write_json(run_dir / "summary.json", summary)


# What a resumed run may do differently: how long it trains and how it saves, not what it trains.
MAY_CHANGE_ON_RESUME = ("description", "train.epochs", "train.patience", "train.checkpoint_seconds",
                        "train.workers", "train.device", "data.cache_dir", "distill.teacher_forward")


def _refuse_recipe_changes(stored: dict, recipe: Recipe, run_dir: Path, epochs_done: int) -> None:
    """Refuse to continue a run under settings it was not trained with (epochs at two resolutions, say);
    the keys a resume may change are logged."""
    changed = recipe_differences(stored, recipe.to_dict())
    fixed = [c for c in changed if c.split(":")[0] not in MAY_CHANGE_ON_RESUME]
    if fixed:
        raise RecipeError(f"cannot resume {run_dir} with another recipe: {'; '.join(fixed[:6])}",
                          hint=f"resume with the run's own values (see {run_dir / 'recipe.yaml'}; only "
                               f"{', '.join(MAY_CHANGE_ON_RESUME[1:5])} may change), or start a new run "
                               "without --resume")
    if recipe.train.epochs < epochs_done:
        raise RecipeError(f"cannot resume {run_dir} at train.epochs {recipe.train.epochs}: it has done "
                          f"{epochs_done} epochs", hint=f"--set train.epochs={epochs_done} or more")
    if changed:
        log.warning("resuming with a recipe that differs from the run's in: %s", "; ".join(changed))


def _check_resumable(recipe: Recipe, run_dir: Path | None) -> None:
    """The early look at the run a --resume continues (its recipe.yaml), before any image is decoded."""
    if run_dir is None or not (run_dir / "recipe.yaml").is_file():
        return
    try:
        stored = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # its last.pt holds the recipe too, checked later
        return
    done = read_summary(run_dir).get("epochs_done")
    if isinstance(stored, dict):
        _refuse_recipe_changes(stored, recipe, run_dir, done if isinstance(done, int) else 0)


def run(recipe: Recipe, mode: str, artifacts: Path, resume: bool = False,
        callbacks: Callbacks | None = None) -> dict:
    """Train (mode "train") or distill (mode "distill") one recipe; returns the run summary.

    Under torchrun every process calls this; they share the work through DistributedDataParallel.
    """
    dist, device = distributed.start(recipe.train.device)
    try:
        return _run(recipe, mode, artifacts, resume, callbacks or Callbacks(), dist, device)
    finally:
        distributed.stop(dist)


def _check_before_work(recipe: Recipe, mode: str, artifacts: Path, dist: distributed.Distributed,
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
            _check_resumable(recipe, latest_run_dir(artifacts, recipe.name))


def _run(recipe: Recipe, mode: str, artifacts: Path, resume: bool, callbacks: Callbacks,
         dist: distributed.Distributed, device: torch.device) -> dict:
    _check_before_work(recipe, mode, artifacts, dist, device, resume)
    with dist.node_main_first():  # one process per node decodes; the others then read its cache
        dataset = open_dataset(recipe.data, splits=("train", "val"), workers=recipe.train.workers)
    teacher = load_teacher(recipe, artifacts, device, dataset) if mode == "distill" else None
    run_dir, last = _run_dir_for(recipe, mode, artifacts, resume) if dist.main else (None, None)
    run_dir, resumed = dist.broadcast((run_dir, last is not None))  # rank 0 picks the folder
    if resumed and last is None:
        last = read_checkpoint(run_dir / "last.pt")
    try:
        return _prepare_and_fit(recipe, mode, callbacks, dist, device, dataset, teacher, run_dir, last)
    except BaseException as exc:
        if dist.main:
            _record_setup_failure(run_dir, exc)
        raise


def _record_setup_failure(run_dir: Path, exc: BaseException) -> None:
    """A run stopped before its loop began says so in its summary (the loop records its own ends)."""
    summary = read_summary(run_dir)
    if summary.get("status") != "running":
        return
    stopped = isinstance(exc, KeyboardInterrupt)
    error = None if stopped else f"{exc.__class__.__name__}: {exc}"
    before = summary.pop("resumed_from", None)
    if isinstance(before, dict) and before.get("status") in ("finished", "early_stopped"):
        # the run's own result stands; only this attempt to continue it failed
        atomic_write_json(run_dir / "summary.json", {**summary, **before, "updated": _now(),
                                                     "resume_failed": error or "interrupted"})
        return
    atomic_write_json(run_dir / "summary.json", {
        **summary, "status": "interrupted" if stopped else "failed", "updated": _now(), "error": error})


def _restore(trainer: Trainer, last: dict, run_dir: Path) -> None:
    """Rebuild the model and put last.pt's state into it; a file whose weights or state do not fit the
    run's model (tampered, or from another edgekd) is a CheckpointError, not a traceback."""
    try:
        trainer.build(tuple(last["mean"]), tuple(last["std"]), pretrained=False)
        trainer.restore(last)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{run_dir / 'last.pt'} does not fit this run's model ({first_reason(exc)})",
                              hint="start a new run without --resume (the folder is kept as it is)") from None


def _prepare_and_fit(recipe: Recipe, mode: str, callbacks: Callbacks, dist: distributed.Distributed,
                     device: torch.device, dataset: Dataset, teacher: Teacher | None, run_dir: Path,
                     last: dict | None) -> dict:
    if mode == "train" and dataset.splits["train"].unlabeled_count:
        log.info("training without a teacher: the %d unlabeled photos are left out (only distillation learns "
                 "from them)", dataset.splits["train"].unlabeled_count)
        dataset.splits["train"] = dataset.splits["train"].labeled_only()
    with dist.node_main_first():
        train_split = _render_split(recipe, dataset)
    trainer = Trainer(recipe, mode, run_dir, dataset, device, teacher, callbacks, dist, train_split)
    if teacher is not None:
        with dist.node_main_first():
            trainer.teacher_logits, trainer.views = prepare_teacher(recipe, dataset, teacher, device,
                                                                    trainer.train_split)
    if last is not None:
        _restore(trainer, last, run_dir)
    else:
        mean, std = input_normalisation(recipe, dataset)
        trainer.build(mean, std, pretrained=True)
    trainer.parallelize()
    if dist.main:
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    trainer.callbacks.on_start({
        "run_dir": str(run_dir), "mode": mode, "device": device.type, "precision": trainer.precision,
        "torch_threads": torch.get_num_threads(), "dataset": dataset.describe(),
        "model": f"{recipe.model.name}({', '.join(f'{k}={v}' for k, v in recipe.model.args.items())})",
        "parameters": count_parameters(trainer.model), "resumed_from_epoch": trainer.epoch if last else None,
        "resumed_at_batch": trainer.resume_point.next_batch if trainer.resume_point else None,
        "teacher": teacher[1]["path"] if teacher else None, "distributed": dist.describe(),
        "teacher_views_fill": trainer.views.fill if trainer.views is not None else None,
        "skipped_images": sum(len(v) for v in dataset.skipped.values()),
        "unlabeled_images": dataset.splits["train"].unlabeled_count})
    return trainer.fit()
