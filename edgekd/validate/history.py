"""A rerun of validate never silently loses what an earlier one measured.

The earlier validation.json's rows that this run did not measure again (another provider, a file not
re-measured) are kept in the new one, marked with when they were measured, when they describe the same
checkpoint, split, machine and file. When they cannot be merged (another checkpoint, split or machine, or
a file since replaced), the earlier validation.json/.md/.png are kept beside under their own date. A damaged
validation.json is kept beside as well, never read as if it were whole.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgekd.validate.checks import not_regular

log = logging.getLogger(__name__)

REPORT_FILES = ("validation.json", "validation.md", "validation.png")


def validation_shape_problem(data, merging: bool = False) -> str | None:
    """What is wrong with the shape of a validation.json's content (None when it has the shape its readers
    use: `edgekd report` its rows' precision, size and latency; a rerun (`merging`) their variant and file too)."""
    if not isinstance(data, dict):
        return f"a {type(data).__name__}, not an object"
    if not isinstance(data.get("rows"), list) or not all(isinstance(r, dict) for r in data["rows"]):
        return "'rows' is not a list of objects"
    keys = (("variant", str), ("file", str)) if merging else ()
    for row in data["rows"]:
        for key, kind in (*keys, ("precision", str), ("latency", dict)):
            if not isinstance(row.get(key), kind):
                return f"a row's {key!r} is not a {kind.__name__}"
        if not all(isinstance(t, dict) and isinstance(t.get("p50_ms"), (int, float)) for t in row["latency"].values()):
            return "a row's latency is not {batch: {p50_ms: number}}"
        if not isinstance(row.get("file_mb", 0), (int, float)):
            return "a row's 'file_mb' is not a number"
    settings, failures = data.get("settings", {}), data.get("failures", {})
    if not isinstance(settings, dict) or not isinstance(settings.get("batch_sizes", [1]), list):
        return "'settings' is not an object with a list of batch sizes"
    if not isinstance(failures, dict) or not all(isinstance(v, list) and all(isinstance(r, str) for r in v)
                                                 for v in failures.values()):
        return "'failures' is not {variant: [reasons]}"
    return None


@dataclass
class Earlier:
    """What became of the earlier validation files, for the output to say."""
    kept_rows: list[str] = field(default_factory=list)  # variants merged into this validation
    kept_beside: list[Path] = field(default_factory=list)  # earlier files moved aside under their date
    why_beside: str = ""


def _stamp(data: dict | None, path: Path) -> str:
    measured = (data or {}).get("measured_at")
    if isinstance(measured, str) and measured:
        return "".join(c for c in measured if c.isalnum())
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _move_beside(run_dir: Path, stamp: str, names=REPORT_FILES, tag: str = "") -> list[Path]:
    moved = []
    for name in names:
        path = run_dir / name
        if not os.path.lexists(path):
            continue
        stem, suffix = name.rsplit(".", 1)
        target, n = run_dir / f"{stem}.{tag}{stamp}.{suffix}", 2
        while os.path.lexists(target):  # never over an earlier copy
            target, n = run_dir / f"{stem}.{tag}{stamp}-{n}.{suffix}", n + 1
        os.replace(path, target)
        moved.append(target)
    return moved


def read_earlier(run_dir: Path) -> tuple[dict | None, Earlier]:
    """The earlier validation.json when whole; a damaged one is moved beside (with a warning) and None returned."""
    path = run_dir / "validation.json"
    if not os.path.lexists(path):
        return None, Earlier()
    reason = not_regular(path)
    data = None
    if reason is None:
        try:
            data = json.loads(path.read_text())
            reason = validation_shape_problem(data, merging=True)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            reason = f"not readable JSON ({exc.__class__.__name__})"
    if reason is None:
        return data, Earlier()
    moved = _move_beside(run_dir, _stamp(None, path) if os.path.isfile(path) else "unreadable",
                         names=("validation.json",), tag="damaged-")
    log.warning("the earlier %s is damaged (%s): kept as %s, a new one is written", path, reason, moved[0].name)
    return None, Earlier(kept_beside=moved, why_beside=f"damaged: {reason}")


def _same_context(earlier: dict, now: dict) -> str | None:
    """Why the earlier rows do not describe what this run measured (None when they do)."""
    settings = earlier.get("settings", {})
    if settings.get("checkpoint_sha256") != now["settings"]["checkpoint_sha256"]:
        return "another best.pt" if settings.get("checkpoint_sha256") else "it does not record its checkpoint"
    if (earlier.get("split"), earlier.get("images")) != (now["split"], now["images"]):
        return f"another split ({earlier.get('split')}, {earlier.get('images')} images)"
    device = earlier.get("device") if isinstance(earlier.get("device"), dict) else {}
    if (device.get("cpu"), device.get("gpu")) != (now["device"]["cpu"], now["device"]["gpu"]):
        return f"another machine ({device.get('cpu')}, GPU {device.get('gpu')})"
    return None


def combine(validation, run_dir: Path, file_hashes: dict[str, str]) -> Earlier:
    """Merge the earlier rows this run did not measure into `validation`, or keep the earlier files beside."""
    earlier, outcome = read_earlier(run_dir)
    if earlier is None:
        return outcome
    measured = {(r["variant"], r["file"]) for r in validation.rows}
    missing = [r for r in earlier["rows"] if (r["variant"], r["file"]) not in measured]
    if not missing:
        return outcome  # every earlier row was measured again: nothing is lost by replacing it
    now = {"settings": validation.settings, "split": validation.split, "images": validation.images,
           "device": validation.device}
    reason = _same_context(earlier, now)
    replaced = [r["file"] for r in missing if r.get("file_sha256") != file_hashes.get(r["file"])]
    if reason is None and replaced:
        reason = f"{', '.join(sorted(set(replaced)))} changed or gone since"
    if reason:
        outcome.kept_beside = _move_beside(run_dir, _stamp(earlier, run_dir / "validation.json"))
        outcome.why_beside = reason
        return outcome
    for row in missing:
        failures = row.get("gate_failures", earlier.get("failures", {}).get(row["variant"], []))
        validation.rows.append({**row, "kept_from_earlier": True, "gate_failures": failures,
                                "measured_at": row.get("measured_at", earlier.get("measured_at"))})
        outcome.kept_rows.append(row["variant"])
    return outcome
