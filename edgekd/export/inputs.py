"""What export reads, checked before any work: the checkpoint (it fits its model, it is finite, it was read
whole), the run it belongs to (still being trained?), and the dataset its comparisons draw on."""

from __future__ import annotations

import logging
from pathlib import Path

from edgekd.errors import CheckpointError, DataError

log = logging.getLogger(__name__)


def load_finite_model(checkpoint: Path, attempts: int = 3):
    """The model, its payload and the SHA-256 of the very bytes they were read from.

    A run still training replaces best.pt whenever it improves; hashing before and after the read catches
    a replacement in between, so the file's checkpoint_sha256 always names the weights it holds. A model
    that cannot be rebuilt from its own description, or holds NaN/inf, is refused before any work.
    """
    from edgekd.train.checkpoint import file_sha256, load_model

    for _ in range(attempts):
        before = file_sha256(checkpoint)
        model, payload = load_model(checkpoint)  # a CheckpointError names what does not fit
        if file_sha256(checkpoint) == before:
            _check_finite(checkpoint, model)
            return model, payload, before
        log.warning("%s was replaced while it was read (a run still training saved a new best); reading it again",
                    checkpoint)
    raise CheckpointError(f"{checkpoint} kept changing while it was read", hint="export it when its run has finished")


def first_lines(exc: BaseException, lines: int = 3, width: int = 300) -> str:
    text = [line.strip()[:width] for line in str(exc).splitlines() if line.strip()][:lines]
    return f"{exc.__class__.__name__}: {' '.join(text)}".rstrip(": ")


def _check_finite(checkpoint: Path, model) -> None:
    from edgekd.train.checkpoint import nonfinite_weights

    broken = nonfinite_weights(model.state_dict())
    if broken:
        raise CheckpointError(f"{checkpoint} holds non-finite weights (NaN or inf) in {len(broken)} tensor(s), "
                              f"e.g. {', '.join(broken[:3])}: its training diverged, and it is never exported",
                              hint="retrain it (e.g. with a lower train.lr); a run whose loss became NaN cannot "
                                   "be repaired by exporting it")


def training_status(checkpoint: Path) -> str | None:
    """The status of the run folder holding the checkpoint; a warning when it is still being trained.

    Exporting a run in training is allowed, not refused: best.pt is always a whole, atomically written
    snapshot, and exporting one early (to try a device while a long run goes on) is a real workflow. But
    it must not pass unnoticed: the warning says so, and the file's metadata records run_status.
    """
    from edgekd.runs import read_summary

    if not (checkpoint.parent / "summary.json").is_file():
        return None
    try:
        summary = read_summary(checkpoint.parent)
        status = summary.get("status")
        if status == "running":
            owner = summary.get("process") or {}
            log.warning("%s is still being trained (pid %s on %s, epoch %s of %s): exporting %s as it is now; "
                        "export again when the run has finished", checkpoint.parent, owner.get("pid"),
                        owner.get("host"), summary.get("epochs_done"), summary.get("epochs_planned"),
                        checkpoint.name)
    except (AttributeError, TypeError, ValueError):  # a damaged summary: the status is unknown, not fatal
        return None
    return status if isinstance(status, str) else None


def export_dataset(payload: dict, data_root: str | None):
    """The checkpoint's dataset (train and val), with hints that name export's own option."""
    from edgekd.train import checkpoint

    try:
        return checkpoint.checkpoint_dataset(payload, ("train", "val"), data_root)
    except DataError as exc:
        if "--set" not in (exc.hint or "") and "data.root" not in (exc.hint or ""):
            raise
        trained_on = payload.get("recipe", {}).get("data", {}).get("root")
        raise DataError(exc.message, hint=f"export reads real images of the model's dataset (trained on "
                                          f"{trained_on}); if it moved, pass its new root with --data PATH") from exc
