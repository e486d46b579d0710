"""What export reads, checked before any work: the checkpoint (it fits its model, it is finite, it was read
whole), the run it belongs to (still being trained?), and the dataset its comparisons draw on."""

from __future__ import annotations

import logging
from pathlib import Path

from edgekd.errors import CheckpointError, DataError, EdgekdError

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
        try:
            model, payload = load_model(checkpoint)
        except EdgekdError:
            raise
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = _weights_mismatch(checkpoint) if isinstance(exc, RuntimeError) else None
            raise CheckpointError(f"{checkpoint}: its stored model does not fit its weights: "
                                  f"{detail or first_lines(exc)}",
                                  hint="the checkpoint was edited or written by another program; export the "
                                       "best.pt or last.pt that `edgekd train|distill` wrote") from exc
        if file_sha256(checkpoint) == before:
            _check_finite(checkpoint, model)
            return model, payload, before
        log.warning("%s was replaced while it was read (a run still training saved a new best); reading it again",
                    checkpoint)
    raise CheckpointError(f"{checkpoint} kept changing while it was read", hint="export it when its run has finished")


def _weights_mismatch(checkpoint: Path) -> str | None:
    """What differs between the model a checkpoint describes and the weights it holds, in a few words."""
    from edgekd.train.checkpoint import build_model, read_checkpoint

    try:
        payload = read_checkpoint(checkpoint)
        expected, stored = build_model(payload).state_dict(), payload["state_dict"]
        missing = [k for k in expected if k not in stored]
        unexpected = [k for k in stored if k not in expected]
        shapes = [f"{k} is {list(stored[k].shape)} in the file, {list(expected[k].shape)} in the model"
                  for k in expected if k in stored and tuple(stored[k].shape) != tuple(expected[k].shape)]
    except Exception:  # noqa: BLE001 - only a better message is at stake; the caller has the first one
        return None
    model = payload["model"]
    parts = [f"{len(missing)} weight(s) the model {model.get('name')} {model.get('args')} needs are missing "
             f"(e.g. {', '.join(missing[:2])})" if missing else "",
             f"{len(unexpected)} weight(s) belong to no layer (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
             f"{len(shapes)} weight(s) have another shape (e.g. {shapes[0]})" if shapes else ""]
    return "; ".join(p for p in parts if p) or None


def first_lines(exc: BaseException, lines: int = 3, width: int = 300) -> str:
    text = [line.strip()[:width] for line in str(exc).splitlines() if line.strip()][:lines]
    return f"{exc.__class__.__name__}: {' '.join(text)}".rstrip(": ")


def _check_finite(checkpoint: Path, model) -> None:
    import torch

    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
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
