"""`edgekd evaluate`: accuracy, per-class accuracy and the confusion matrix of a checkpoint on a split."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgekd.data import Split
from edgekd.errors import DataError, EdgekdError
from edgekd.train.batches import iter_batches

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    split: str
    images: int
    loss: float
    accuracy: float
    class_names: list[str]
    per_class_accuracy: list[float | None]  # None for a class with no image in the split
    confusion: list[list[int]]  # rows: true class, columns: predicted class

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, batch_size: int, device: torch.device):
    """Logits (N, C) float32 and labels (N,) for a split, in split order."""
    model.eval()
    logits, labels = [], []
    for batch in iter_batches(split, batch_size):
        logits.append(model(batch.pixels.to(device)).float().cpu())
        labels.append(batch.labels)
    return torch.cat(logits), torch.cat(labels)


def summarize(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], split: str) -> Evaluation:
    num_classes = len(class_names)
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes)
    support = confusion.sum(1)
    per_class = [float(confusion[i, i] / support[i]) if support[i] else None for i in range(num_classes)]
    return Evaluation(split, len(labels), float(F.cross_entropy(logits, labels)),
                      float((predicted == labels).float().mean()), list(class_names), per_class,
                      confusion.tolist())


def evaluate_model(model: torch.nn.Module, split: Split, class_names: list[str], batch_size: int,
                   device: torch.device) -> Evaluation:
    logits, labels = predict(model, split, batch_size, device)
    return summarize(logits, labels, class_names, split.name)


def evaluate_checkpoint(checkpoint: str | Path, split: str = "test", data_root: str | None = None,
                        batch_size: int | None = None, device: str = "cpu", int8_head: bool = False) -> Evaluation:
    """Rebuild the model from its checkpoint and the dataset from the recipe stored inside it.

    The weights are evaluated in fp32 (a model trained at fp16/fp8 is evaluated as it is exported); with
    `int8_head` the classifier's Linear layers are held in bitsandbytes' int8 form (Linear8bitLt).
    """
    from edgekd.train.checkpoint import checkpoint_dataset, load_model, refuse_nonfinite

    model, payload = load_model(checkpoint, device)
    refuse_nonfinite(payload, "evaluated")
    if int8_head:
        from edgekd.train.precision import bitsandbytes_module, int8_linear_layers

        converted = int8_linear_layers(model.net.head, bitsandbytes_module())
        log.info("classifier: %d Linear layer(s) held in bitsandbytes int8 (Linear8bitLt)", converted)
    recipe, dataset = checkpoint_dataset(payload, (split,), data_root)
    data_split = dataset.splits[split]
    if data_split.labels is None:
        raise DataError(f"the {split} split has no labels (its images are not in class folders)",
                        hint="evaluate on --split val, or use `edgekd classify` for unlabeled images")
    result = evaluate_model(model, data_split, payload["class_names"], batch_size or recipe.train.batch_size,
                            torch.device(device))
    if not math.isfinite(result.loss):  # argmax of NaN is class 0: the accuracy would be a number meaning nothing
        raise EdgekdError(f"{payload['path']} gives NaN or infinite outputs on the {split} split",
                          hint="its weights overflow on these images; retrain it with a lower train.lr, or in fp32")
    log.debug("%s: %s accuracy %.4f on %d images", payload["path"], split, result.accuracy, result.images)
    return result


def confusion_table(result: Evaluation) -> str:
    names = [n[:10] for n in result.class_names]
    width = max(6, *(len(n) for n in names)) + 1
    lines = ["true \\ pred".ljust(width) + "".join(n.rjust(width) for n in names) + "  accuracy".rjust(11)]
    for name, row, acc in zip(names, result.confusion, result.per_class_accuracy):
        shown = f"{acc:.2%}" if acc is not None else "-"
        lines.append(name.ljust(width) + "".join(str(v).rjust(width) for v in row) + shown.rjust(11))
    return "\n".join(lines)
