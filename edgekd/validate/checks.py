"""What validate checks before it trusts a measurement: that an export can run on the run's own images,
that its metadata fits its graph, that it was made from the run's best.pt; and whether the numbers it
measured can carry the weight put on them (timing spread, a busy machine, a gate finer than one image).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
# The three ways an export fails before any accuracy is compared, as validate names them.
CANNOT_RUN = "cannot run on this run's images"
METADATA = "its metadata does not fit its graph"
STALE = "made from another checkpoint"


def not_regular(path: Path) -> str | None:
    """Why `path` is no regular file (None when it is); a named pipe would block whoever opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = "a named pipe" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
    return f"is {kind}, not a file"


@dataclass
class ExportCheck:
    path: Path
    precision: str = "?"
    problems: list[str] = field(default_factory=list)  # each starts with one of the three names above
    warnings: list[str] = field(default_factory=list)


def check_export(path: Path, class_names: list[str], image_size: int, checkpoint_sha256: str,
                 sample=None) -> ExportCheck:
    """Every reason `path` cannot stand for the run's best.pt; `sample` (one of the run's images, (1, S, S, 3)
    uint8) is run through onnxruntime's CPU provider, the runtime classify uses, when the metadata fits."""
    from edgekd.runtime.model_info import NotAnEdgekdModel, model_info_from_metadata
    from edgekd.runtime.session import open_session

    check = ExportCheck(path)
    reason = not_regular(path)
    if reason:
        check.problems.append(f"{CANNOT_RUN}: it {reason}")
        return check
    try:
        session = open_session(path)
    except Exception as exc:  # onnxruntime raises its own types for a damaged file
        check.problems.append(f"{CANNOT_RUN}: onnxruntime cannot load it ({_first_line(exc)})")
        return check
    try:
        info = model_info_from_metadata(dict(session.get_modelmeta().custom_metadata_map), path.name)
    except NotAnEdgekdModel as exc:
        check.problems.append(f"{METADATA}: {exc}")
        return check
    values = metadata_value_problems(info)
    if values:
        check.problems += [f"{METADATA}: {problem}" for problem in values]
        return check
    check.precision = info.precision
    check.problems += graph_mismatches(session, info)
    check.problems += _run_mismatches(info, class_names, image_size)
    if sample is not None and not check.problems:
        check.problems += _dry_run(session, info, sample)
    made_from = info.extra.get("checkpoint_sha256")
    if made_from is None:
        check.warnings.append(f"{path.name} does not say which checkpoint it was made from (no checkpoint_sha256)")
    elif made_from != checkpoint_sha256:
        check.problems.append(f"{STALE}: its checkpoint_sha256 {made_from[:12]}… is not best.pt's "
                              f"{checkpoint_sha256[:12]}… (re-export it: `edgekd export RUN`)")
    return check


MAX_IMAGE_SIZE = 4096  # metadata past it is damage, not a model: a photo would be resized to gigapixels


def metadata_value_problems(info) -> list[str]:
    """Metadata values of the wrong type or out of range (class names that are no list of plain strings,
    an image size past any model's, mean/std that are no three finite numbers, an unknown precision)."""
    names, problems = info.class_names, []
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() and n.isprintable()
                                                           for n in names):
        problems.append(f"class_names {str(names)[:80]!r} is no list of printable names")
    elif len(set(names)) != len(names):
        problems.append("class_names repeats a name")
    if not isinstance(info.image_size, int) or not 1 <= info.image_size <= MAX_IMAGE_SIZE:
        problems.append(f"image_size {info.image_size!r} is not from 1 to {MAX_IMAGE_SIZE}")
    for key in ("mean", "std"):
        value = getattr(info, key)
        if not (isinstance(value, list) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
            problems.append(f"{key} {str(value)[:60]!r} is not three finite numbers")
    if info.precision not in PRECISIONS:
        problems.append(f"precision {str(info.precision)[:20]!r} is none of {', '.join(PRECISIONS)}")
    return problems


def graph_mismatches(session, info) -> list[str]:
    """Where the metadata does not describe the graph: input name, image size, number of classes."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if info.input_name not in inputs:
        return [f"{METADATA}: it names input {info.input_name!r}, the graph takes {', '.join(inputs)}"]
    fixed = [d for d in inputs[info.input_name][1:] if isinstance(d, int)]
    if fixed not in ([3, info.image_size, info.image_size], [3], []):
        return [f"{METADATA}: it says {info.image_size} px RGB, the graph takes {inputs[info.input_name]}"]
    outputs = session.get_outputs()[0].shape
    if outputs and isinstance(outputs[-1], int) and outputs[-1] != len(info.class_names):
        return [f"{METADATA}: it lists {len(info.class_names)} classes, the graph outputs {outputs[-1]}"]
    return []


def _run_mismatches(info, class_names: list[str], image_size: int) -> list[str]:
    problems = []
    if info.image_size != image_size:
        problems.append(f"{CANNOT_RUN}: it takes {info.image_size} px images, the run's are {image_size} px")
    if info.class_names != class_names:
        problems.append(f"{METADATA}: its classes {info.class_names} are not the run's {class_names}")
    return problems


def _dry_run(session, info, sample) -> list[str]:
    from edgekd.runtime.session import as_input

    try:
        logits = session.run(None, {info.input_name: as_input(sample)})[0]
    except Exception as exc:  # onnxruntime's own exception types
        return [f"{CANNOT_RUN}: onnxruntime cannot run it on one of them ({_first_line(exc)})"]
    if logits.shape != (len(sample), len(info.class_names)):
        return [f"{METADATA}: it outputs {list(logits.shape)} for {len(sample)} image(s) of "
                f"{len(info.class_names)} classes"]
    return []  # outputs that are not finite are the gate's to name, with the row's numbers beside them


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{exc.__class__.__name__}: {lines[-1] if lines else 'no message'}"[:300]


# ----- can the numbers carry the weight put on them -------------------------------------------------------

def machine_load() -> tuple[float | None, int]:
    """(1-minute load average, logical cores); None where the system does not say."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    return load, os.cpu_count() or 1


def timing_warnings(rows: list[dict], load: float | None, cores: int) -> list[str]:
    """A busy machine, and every row whose latency spread is wide (p90 over twice p50)."""
    warnings = []
    if load is not None and load > cores:
        warnings.append(f"the machine was busy while measuring (load average {load:.1f} on {cores} cores): "
                        f"latencies are slower and noisier than on an idle machine; rerun when it is idle")
    noisy = []
    for row in rows:
        wide = [f"b{batch} p90 {t['p90_ms'] / t['p50_ms']:.1f}x p50" for batch, t in row.get("latency", {}).items()
                if t["p50_ms"] > 0 and t["p90_ms"] > 2 * t["p50_ms"]]
        if wide:
            noisy.append(f"{row['variant']} ({', '.join(wide)})")
    if noisy:
        warnings.append(f"wide latency spread (p90 over twice p50) in {len(noisy)} of {len(rows)} rows: "
                        f"{'; '.join(noisy)}: those p50s are no steady numbers; rerun on an idle machine or "
                        f"with a longer --latency-seconds")
    return warnings


def resolution_warning(images: int, split: str, max_drop_pts: dict[str, float], precisions: list[str]) -> str | None:
    """When one image is worth more points than a gated precision's max drop, the gate cannot tell apart a
    variant that loses a single photo from one that breaks: it passes only those that lose none."""
    if images < 1:
        return None
    one = 100 / images
    finer = [p for p in PRECISIONS if p in precisions and max_drop_pts.get(p, one) < one]
    if not finer:
        return None
    limits = ", ".join(f"{p} {max_drop_pts[p]:g}" for p in finer)
    return (f"one image of the {images} in the {split} split is {one:.2f} points, more than the gate's max drop "
            f"({limits} points): the gate cannot resolve a drop under one image, so any variant that loses a "
            f"single photo fails; validate on a larger split (--split test, or more images) for a finer gate")
