"""Run folders as the trainer uses them: claiming a new one or the one a `--resume` continues, settling who
owns it, refusing a resume under another recipe, and recording a run that stopped before its loop began.

runs.py knows folders and files (torch-free); this module knows what a training run keeps in them.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import yaml

from edgekd.errors import CheckpointError, EdgekdError, RecipeError
from edgekd.recipe import Recipe, recipe_differences
from edgekd.runs import (MetricsLog, atomic_write_json, latest_run_dir, new_run_dir, owner_alive, process_identity,
                         read_summary, remove_stale_temporaries)
from edgekd.train.checkpoint import read_checkpoint

log = logging.getLogger(__name__)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def claim_run_dir(recipe: Recipe, mode: str, artifacts: Path, resume: bool) -> tuple[Path, dict | None]:
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
    refuse_recipe_changes(last["recipe"], recipe, run_dir, last["epoch"])
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
    at = now()
    summary = {"run": run_dir.name, "recipe": recipe.name, "mode": mode, "epochs_done": 0,
               "epochs_planned": recipe.train.epochs, "started": at, **(summary or {}),
               "status": "running", "error": None, "process": process_identity(), "updated": at}
    atomic_write_json(run_dir / "summary.json", summary)


# What a resumed run may do differently: how long it trains and how it saves, not what it trains.
MAY_CHANGE_ON_RESUME = ("description", "train.epochs", "train.patience", "train.checkpoint_seconds",
                        "train.workers", "train.device", "data.cache_dir", "distill.teacher_forward")


def refuse_recipe_changes(stored: dict, recipe: Recipe, run_dir: Path, epochs_done: int) -> None:
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


def check_resumable(recipe: Recipe, run_dir: Path | None) -> None:
    """The early look at the run a --resume continues (its recipe.yaml), before any image is decoded."""
    if run_dir is None or not (run_dir / "recipe.yaml").is_file():
        return
    try:
        stored = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):  # its last.pt holds the recipe too, checked later
        return
    done = read_summary(run_dir).get("epochs_done")
    if isinstance(stored, dict):
        refuse_recipe_changes(stored, recipe, run_dir, done if isinstance(done, int) else 0)


def record_setup_failure(run_dir: Path, exc: BaseException) -> None:
    """A run stopped before its loop began says so in its summary (the loop records its own ends)."""
    summary = read_summary(run_dir)
    if summary.get("status") != "running":
        return
    stopped = isinstance(exc, KeyboardInterrupt)
    error = None if stopped else f"{exc.__class__.__name__}: {exc}"
    before = summary.pop("resumed_from", None)
    if isinstance(before, dict) and before.get("status") in ("finished", "early_stopped"):
        # the run's own result stands; only this attempt to continue it failed
        atomic_write_json(run_dir / "summary.json", {**summary, **before, "updated": now(),
                                                     "resume_failed": error or "interrupted"})
        return
    atomic_write_json(run_dir / "summary.json", {
        **summary, "status": "interrupted" if stopped else "failed", "updated": now(), "error": error})

