"""The one stateful loop: train a teacher with cross-entropy, or distill a student from a teacher.

Each finished epoch appends a line to metrics.jsonl, then writes best.pt (when validation accuracy
improved) and last.pt, each atomically. last.pt carries the optimizer, scheduler, RNG and early-stopping
state, and is also written inside an epoch every train.checkpoint_seconds with the position in the epoch's
batch order, so `--resume` continues from the newest saved state exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from edgekd.data import Dataset, RowStore, Split, open_dataset
from edgekd.evaluate import evaluate_model
from edgekd.models import (Classifier, create_model, freeze_backbone, load_pretrained, resolve_pretrained,
                           set_train_mode)
from edgekd.recipe import Recipe, dump_recipe
from edgekd.runs import MetricsLog, atomic_write_text, interrupts_deferred
from edgekd.train import distributed
from edgekd.train.augment import (Mix, batch_generator, draw_mix, draw_views, mix_generator, mix_pixels, render_views,
                                  resize_for)
from edgekd.train.batches import Batch, batch_count, iter_batches
from edgekd.train.checkpoint import describe_model, read_checkpoint, save_checkpoint
from edgekd.train.ema import WeightAverage
from edgekd.train.losses import ce_loss, distill_loss
from edgekd.train.optim import make_optimizer, make_scheduler, parameter_groups, seed_everything
from edgekd.train.precision import PrecisionPolicy, make_policy
from edgekd.train.prepare import check_before_work, input_normalisation, render_split, teacher_sources
from edgekd.train.progress import Callbacks, EarlyStopping, EpochProgress, Silent, raise_if_diverged
from edgekd.train.record import checkpoint_payload, restore, start_info, write_summary
from edgekd.train.run_folder import claim_run_dir, now, record_setup_failure
from edgekd.train.stop_signals import StopSignals, stop_signals
from edgekd.train.teacher import Teacher, load_teacher
from edgekd.train.teacher_forward import TeacherForward
from edgekd.train.teacher_views import TeacherViews

__all__ = ["Callbacks", "EarlyStopping", "Trainer", "make_scheduler", "run"]  # what other modules import here

log = logging.getLogger(__name__)


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
        self.callbacks = callbacks if self.dist.main else Silent()
        self.teacher_model, self.teacher_meta = teacher if teacher else (None, None)
        self.teacher_logits: RowStore | None = None  # (rows, classes) fp16 when cached
        self.teacher_forward: TeacherForward | None = None  # the live teacher's fastest forward pass here
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.stopper = EarlyStopping(recipe.train.patience)
        self.epoch = 0
        self.history: list[dict] = []
        self.started = now()
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
        self.stops = StopSignals()  # run() passes the process's: Ctrl-C and SIGTERM stop at a batch boundary

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

    @property
    def eval_model(self) -> Classifier:
        """The model that is validated, checkpointed and exported: the weight average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    # ----- the loop -----------------------------------------------------------------------------------

    def fit(self) -> dict:
        epochs = self.recipe.train.epochs
        write_summary(self, "running")
        self.last_save = time.monotonic()
        self.stops.listening = True
        try:
            while self.epoch < epochs and not self.stopper.should_stop:
                record = self._run_epoch(self.epoch + 1)
                self._finish_epoch(record)
                if self._stop_requested():  # heard during validation or the epoch's save, which is done
                    raise self.stops.stopped(f"the end of epoch {self.epoch}")
        except KeyboardInterrupt:
            write_summary(self, "interrupted")
            raise
        except Exception as exc:
            write_summary(self, "failed", error=f"{exc.__class__.__name__}: {exc}")
            raise
        finally:
            self.stops.listening = False
        status = "early_stopped" if self.stopper.should_stop and self.epoch < epochs else "finished"
        if self.dist.active:
            self.ranks_identical = len(set(self.dist.gather(distributed.weights_digest(self.model)))) == 1
        summary = write_summary(self, status)
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
            loss, *counts = self._step(batch, epoch, index)
            progress.add(index, loss, len(batch.rows), *counts)
            self.callbacks.on_batch(len(batch.rows), loss)
            # the last batch counts the validation still to come: the epoch's own save follows it
            ahead = time.perf_counter() - step_start + (self.validate_seconds if index + 1 == batches else 0.0)
            stop = self._stop_requested()
            if stop or self._save_due(ahead):
                progress.train_seconds = earlier_seconds + time.perf_counter() - start
                self._save_mid_epoch(progress)
            if stop:
                raise self.stops.stopped(f"epoch {epoch}, batch {index + 1} of {batches}")
        train_seconds = earlier_seconds + time.perf_counter() - start
        total_loss, correct, labelled, seen, agreed = self.dist.sum(
            progress.total_loss, progress.correct, progress.labelled, progress.seen, progress.agreed)
        distributed.sync_buffers(self.model, self.dist)
        if self.scheduler is not None and not self.per_batch_schedule:
            self.scheduler.step()
        validate_start = time.perf_counter()
        val = self.dist.broadcast(self._validate() if self.dist.main else None)
        self.validate_seconds = time.perf_counter() - validate_start
        # train_acc: on the (augmented) training batches as the weights moved during the epoch; with a
        # teacher, train_agreement: how often the student's top-1 was the teacher's on those views (fidelity)
        return {"epoch": epoch, "train_loss": total_loss / seen, "train_acc": correct / max(labelled, 1),
                "train_agreement": agreed / seen if self.teacher_model is not None else None,
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

    def _stop_requested(self) -> bool:
        return self.dist.broadcast(self.stops.requested is not None)  # under DDP rank 0's signal stops all

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
            names = ("total_loss", "correct", "labelled", "seen", "agreed")
            sums = self.dist.sum(*(getattr(progress, name) for name in names))
            progress = dataclasses.replace(progress, **dict(zip(names, sums)))
            if not self.dist.main:
                self._record_save(progress.epoch, progress.next_batch, started)
                return
        with interrupts_deferred():
            save_checkpoint(self.run_dir / "last.pt", checkpoint_payload(self, True, progress))
            self._record_save(progress.epoch, progress.next_batch, started)
            self.checkpointing["mid_epoch_saves"] += 1
            self.checkpointing["seconds"] += self.save_seconds
            write_summary(self, "running")

    def _record_save(self, epoch: int, batch: int | None, started: float) -> None:
        self.last_save = time.monotonic()
        self.save_seconds = self.last_save - started
        self.saved = {"epoch": epoch, "next_batch": batch, "at": now()}

    def _validate(self):
        with self.policy.autocast():  # validation measures the model as it trains: same precision
            return evaluate_model(self.eval_model, self.dataset.splits["val"], self.dataset.class_names,
                                  self.recipe.train.batch_size, self.device)

    def _teacher_logits(self, batch: Batch, pixels: torch.Tensor, mix: Mix | None) -> torch.Tensor | None:
        if self.teacher_logits is not None:
            return torch.from_numpy(self.teacher_logits[batch.rows].astype(np.float32)).to(self.device)
        if self.teacher_model is None:
            return None
        # pixels: the view at the resolution it was rendered at; a teacher of another size gets it resized
        pixels = mix_pixels(resize_for(pixels, self.teacher_meta["image_size"]), mix)  # the student's mix
        if self.teacher_forward is not None:  # it runs in its own precision, outside the student's autocast
            return self.teacher_forward.run(pixels).to(self.device).clone()  # clone: not an inference tensor
        with torch.no_grad(), self.policy.autocast():
            return self.teacher_model(pixels)

    def _inputs(self, batch: Batch, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor | None, Mix | None]:
        """The student's pixels at its own size, the teacher's logits for the same view (or None), and the
        batch's mix (mixup/cutmix: the same for both, drawn from (seed, epoch, batch); None: unmixed)."""
        pixels = batch.pixels.to(self.device, non_blocking=True)
        size = self.dataset.image_size
        if self.views is not None:
            views, logits = self.views.views(batch.rows, epoch)
            return render_views(pixels, views, self.augment, size), logits.to(self.device), None
        mix = None
        if self.augment is not None:
            seed = self.recipe.train.seed
            views = draw_views(len(pixels), pixels.shape[-1], self.augment, batch_generator(seed, epoch, index))
            pixels = render_views(pixels, views, self.augment)
            mix = draw_mix(len(pixels), size, self.augment, mix_generator(seed, epoch, index))
        return mix_pixels(resize_for(pixels, size), mix), self._teacher_logits(batch, pixels, mix), mix

    def _step(self, batch: Batch, epoch: int, index: int) -> tuple[float, int, int, int]:
        """One optimizer step; returns the batch's loss, how many of its labelled images the model got right,
        how many labelled images it had, and on how many the model's top-1 was the teacher's."""
        labels = batch.labels.to(self.device)
        pixels, teacher_logits, mix = self._inputs(batch, epoch, index)
        with self.policy.autocast():
            logits = self.train_model(pixels)
        mixed = (labels[mix.partners.to(self.device)], mix.lam) if mix is not None else None
        loss = self._loss(logits, teacher_logits, labels, epoch, index, mixed)
        value = float(loss.detach())
        raise_if_diverged(value, "training loss", f"epoch {epoch}, batch {index + 1} of {self.batches_per_epoch}",
                          self.recipe.train.lr, self.dist)
        self.optimizer.zero_grad(set_to_none=True)
        self.policy.backward_and_step(loss, self.optimizer, self.recipe.train.grad_clip)
        if self.per_batch_schedule:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        known = labels >= 0  # unlabeled photos (label -1) count in the loss only, through the teacher
        top = logits.detach().argmax(1)
        agreed = int((top == teacher_logits.argmax(1)).sum()) if teacher_logits is not None else 0
        return value, int((top == labels)[known].sum()), int(known.sum()), agreed

    def _loss(self, logits, teacher_logits, labels, epoch: int, index: int, mixed=None) -> torch.Tensor:
        # The losses cast to fp32 themselves, whatever precision the forward pass ran in.
        smoothing = self.recipe.train.label_smoothing
        if teacher_logits is None:
            return ce_loss(logits, labels, smoothing, mixed)
        warmup = self.recipe.distill.warmup_epochs
        ramp = min(1.0, (epoch - 1 + (index + 1) / self.batches_per_epoch) / warmup) if warmup > 0 else 1.0
        return distill_loss(logits, teacher_logits, labels, self.recipe.distill, smoothing, ramp, mixed)

    def _finish_epoch(self, record: dict) -> None:
        raise_if_diverged(record["val_loss"], "validation loss", f"epoch {record['epoch']}", self.recipe.train.lr,
                          self.dist)
        improved = self.stopper.update(record["epoch"], record["val_acc"])
        self.epoch = record["epoch"]
        self.history.append(record)
        if not self.dist.main:
            return
        started = time.monotonic()
        with interrupts_deferred():  # Ctrl-C while saving: finish the epoch's files, then stop
            self.metrics.append(record)
            if improved:
                save_checkpoint(self.run_dir / "best.pt", checkpoint_payload(self, with_train_state=False))
            save_checkpoint(self.run_dir / "last.pt", checkpoint_payload(self, with_train_state=True))
            self._record_save(self.epoch, None, started)
            write_summary(self, "running")
        self.callbacks.on_epoch_end(record)


# ----- entry point --------------------------------------------------------------------------------------

def run(recipe: Recipe, mode: str, artifacts: Path, resume: bool = False,
        callbacks: Callbacks | None = None) -> dict:
    """Train (mode "train") or distill (mode "distill") one recipe; returns the run summary.

    Under torchrun every process calls this; they share the work through DistributedDataParallel.
    """
    dist, device = distributed.start(recipe.train.device)
    try:
        with stop_signals() as stops:
            return _run(recipe, mode, artifacts, resume, callbacks or Callbacks(), dist, device, stops)
    finally:
        distributed.stop(dist)


def _run(recipe: Recipe, mode: str, artifacts: Path, resume: bool, callbacks: Callbacks,
         dist: distributed.Distributed, device: torch.device, stops: StopSignals) -> dict:
    check_before_work(recipe, mode, artifacts, dist, device, resume)
    with dist.node_main_first():  # one process per node decodes; the others then read its cache
        dataset = open_dataset(recipe.data, splits=("train", "val"), workers=recipe.train.workers)
    teacher = load_teacher(recipe, artifacts, device, dataset) if mode == "distill" else None
    run_dir, last = claim_run_dir(recipe, mode, artifacts, resume) if dist.main else (None, None)
    run_dir, resumed = dist.broadcast((run_dir, last is not None))  # rank 0 picks the folder
    if resumed and last is None:
        last = read_checkpoint(run_dir / "last.pt")
    try:
        return _prepare_and_fit(recipe, mode, callbacks, dist, device, dataset, teacher, run_dir, last, stops)
    except BaseException as exc:
        if dist.main:
            record_setup_failure(run_dir, exc)
        raise


def _prepare_and_fit(recipe: Recipe, mode: str, callbacks: Callbacks, dist: distributed.Distributed,
                     device: torch.device, dataset: Dataset, teacher: Teacher | None, run_dir: Path,
                     last: dict | None, stops: StopSignals) -> dict:
    if mode == "train" and dataset.splits["train"].unlabeled_count:
        log.info("training without a teacher: the %d unlabeled photos are left out (only distillation learns "
                 "from them)", dataset.splits["train"].unlabeled_count)
        dataset.splits["train"] = dataset.splits["train"].labeled_only()
    with dist.node_main_first():
        train_split = render_split(recipe, dataset)
    trainer = Trainer(recipe, mode, run_dir, dataset, device, teacher, callbacks, dist, train_split)
    trainer.stops = stops
    if teacher is not None:
        trainer.teacher_logits, trainer.views, trainer.teacher_forward = teacher_sources(
            recipe, dataset, teacher, device, trainer.train_split, last, dist)
    if last is not None:
        restore(trainer, last, run_dir)
    else:
        mean, std = input_normalisation(recipe, dataset)
        trainer.build(mean, std, pretrained=True)
    trainer.parallelize()
    if dist.main:
        atomic_write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    trainer.callbacks.on_start(start_info(trainer, last is not None))
    return trainer.fit()
