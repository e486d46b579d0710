"""What the loop reports as it runs (Callbacks) and what it carries across a resume besides the weights:
early stopping and how far an epoch got; and the stop a diverged loss forces."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from edgekd.errors import EdgekdError

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


class Silent(Callbacks):
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
    agreed: int = 0  # images whose student top-1 matched the teacher's (fidelity on training views)

    def add(self, index: int, loss: float, images: int, correct: int, labelled: int, agreed: int = 0) -> None:
        self.next_batch = index + 1
        self.total_loss += loss * images
        self.correct += correct
        self.labelled += labelled
        self.seen += images
        self.agreed += agreed



def raise_if_diverged(loss: float, what: str, where: str, lr: float, dist) -> None:
    """A NaN or infinite loss ends the run now: every later step, checkpoint and export would carry it.
    Under DDP (`dist` active) every rank learns of any rank's NaN, so none waits forever for the others."""
    bad = not math.isfinite(loss)
    if dist.active:
        bad = dist.sum(float(bad))[0] > 0
    if bad:
        value = f"is {loss}" if not math.isfinite(loss) else "is not finite on another process"
        raise EdgekdError(f"training diverged: the {what} {value} at {where}",
                          hint=f"lower train.lr (now {lr:g}), set train.grad_clip, or train in fp32; the run is "
                               "marked failed and keeps the checkpoints from before")
