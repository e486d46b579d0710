"""The runs a report covers: read from run folders, a folder of runs, or a sweep folder (sweep.json).

Each run's role (teacher, student or no-KD baseline) comes from sweep.json when there is one; for loose
run folders it is inferred: a distilled run is a student, a trained run whose recipe equals a student's
but for name, teacher and distillation is that student's baseline, any other trained run is a teacher.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgekd.errors import EdgekdError
from edgekd.report import paper
from edgekd.runs import MetricsLog, read_summary

log = logging.getLogger(__name__)

ROLES = ("teacher", "student", "baseline")


@dataclass
class RunRecord:
    name: str
    run_dir: Path
    summary: dict
    metrics: list[dict]
    recipe: dict
    role: str = "teacher"
    base: str = ""  # the run it varies (its fp32 sibling; itself for an fp32 run)
    baseline_of: str | None = None
    validation: dict | None = None

    @property
    def precision(self) -> str:
        return self.summary.get("precision", {}).get("mode", "fp32")

    @property
    def precision_native(self) -> bool:
        return bool(self.summary.get("precision", {}).get("native", True))

    @property
    def model(self) -> dict:
        return self.summary.get("model", {})

    @property
    def best_acc(self) -> float | None:
        return self.summary.get("best_val_acc")

    @property
    def last_acc(self) -> float | None:
        return self.metrics[-1]["val_acc"] if self.metrics else None

    @property
    def image_size(self) -> int | None:
        return self.summary.get("dataset", {}).get("image_size")

    @property
    def on_paper_dataset(self) -> bool:
        return paper.on_paper_dataset(self.summary.get("dataset", {}).get("classes"))

    def exports(self) -> list[Path]:
        return sorted((self.run_dir / "exports").glob("*.onnx"))


@dataclass
class Collection:
    runs: list[RunRecord]
    sweep: dict | None = None  # sweep.json of a sweep folder
    source: list[Path] = field(default_factory=list)
    not_included: list[str] = field(default_factory=list)  # "name: reason"

    def by_name(self, name: str | None) -> RunRecord | None:
        return next((r for r in self.runs if r.name == name), None)


def collect(paths: list[Path]) -> Collection:
    """Every run under `paths` (run folders, folders of runs, sweep folders), with roles assigned."""
    if not paths:
        raise EdgekdError("no run or sweep folder given", hint="edgekd report artifacts/<sweep> or RUN_DIR...")
    out = Collection([], source=list(paths))
    seen: set[Path] = set()
    for path in paths:
        for run_dir, member in _expand(Path(path), out):
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            record = _read_run(run_dir, out)
            if record is not None:
                _assign(record, member)
                out.runs.append(record)
    if not out.runs:
        raise EdgekdError(f"no run with a finished epoch in {', '.join(str(p) for p in paths)}",
                          hint="; ".join(out.not_included) or "train or sweep first")
    _infer_roles([r for r in out.runs if not r.base])
    return out


def _expand(path: Path, out: Collection) -> list[tuple[Path, dict | None]]:
    """(run folder, its sweep.json entry or None) for a run, a sweep or a folder of runs."""
    if not path.is_dir():
        raise EdgekdError(f"{path} is not a folder", hint="name run folders (artifacts/<run>) or a sweep folder")
    if (path / "sweep.json").is_file():
        state, problem = _read_json(path / "sweep.json", SWEEP_SHAPE)
        if problem is None:
            return _sweep_members(path, state, out)
        out.not_included.append(f"{path / 'sweep.json'} {problem}; its run folders are read as loose runs")
        log.warning("%s", out.not_included[-1])
    if (path / "summary.json").is_file():
        return [(path, None)]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "summary.json").is_file())
    if not runs:
        raise EdgekdError(f"{path} is neither a run folder (no summary.json) nor a sweep folder (no sweep.json), "
                          f"and holds no run folder", hint="name run folders under artifacts/, or a sweep folder")
    return [(run, None) for run in runs]


def _sweep_members(path: Path, state: dict, out: Collection) -> list[tuple[Path, dict]]:
    out.sweep = state
    found = []
    for entry in state.get("members", {}).values():
        if entry.get("run_dir") and (path / entry["run_dir"]).is_dir():
            found.append((path / entry["run_dir"], entry))
        elif entry.get("run_dir"):
            out.not_included.append(f"{entry.get('name')}: its run folder {path / entry['run_dir']} is missing")
        else:
            out.not_included.append(f"{entry.get('name')}: {entry.get('status', 'pending')}, not run yet")
    return found


def _read_run(run_dir: Path, out: Collection) -> RunRecord | None:
    """The run's record, or None (and the reason in out.not_included) when it has none or a damaged one."""
    summary, problem = _read_json(run_dir / "summary.json", SUMMARY_SHAPE)
    if problem is None:
        summary = read_summary(run_dir)  # settles a dead owner's `running` on the way
        problem = None if summary else "unreadable"
    if problem:
        return _left_out(out, f"{run_dir.name}: summary.json {problem}")
    metrics = MetricsLog(run_dir / "metrics.jsonl").read()
    if not metrics and (problem := _first_record_problem(run_dir / "metrics.jsonl")):
        return _left_out(out, f"{run_dir.name}: metrics.jsonl damaged ({problem})")
    if not metrics:
        return _left_out(out, f"{run_dir.name}: {summary.get('status', '?')}, no finished epoch", warn=False)
    problem = next((p for m in metrics if (p := _shape_problem(m, METRICS_SHAPE, required=METRICS_REQUIRED))), None)
    if problem is None and not all(_fraction(m.get(k, 0)) for m in metrics for k in ("val_acc", "train_acc")):
        problem = "an accuracy is not a number from 0 to 1"
    if problem:
        return _left_out(out, f"{run_dir.name}: metrics.jsonl damaged ({problem})")
    if not _fraction(summary.get("best_val_acc")):
        return _left_out(out, f"{run_dir.name}: summary.json damaged (no best_val_acc from 0 to 1 after "
                              f"{len(metrics)} epochs)")
    precision = summary.get("precision", {}).get("mode", "fp32")
    if precision not in PRECISIONS:
        return _left_out(out, f"{run_dir.name}: summary.json damaged (precision {precision!r} is none of "
                              f"{', '.join(PRECISIONS)})")
    recipe = {}
    if (run_dir / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            return _left_out(out, f"{run_dir.name}: recipe.yaml unreadable ({exc.__class__.__name__})")
        problem = _shape_problem(recipe, RECIPE_SHAPE)
        if problem:
            return _left_out(out, f"{run_dir.name}: recipe.yaml damaged ({problem})")
    return RunRecord(run_dir.name, run_dir, summary, metrics, recipe, validation=_validation(run_dir, out))


def _validation(run_dir: Path, out: Collection) -> dict | None:
    from edgekd.validate.history import validation_shape_problem

    if not (run_dir / "validation.json").is_file():
        return None
    data, problem = _read_json(run_dir / "validation.json", None)
    if problem is None and validation_shape_problem(data):
        problem = f"damaged ({validation_shape_problem(data)})"
    if problem:
        _left_out(out, f"{run_dir.name}: validation.json {problem}; its ONNX columns are left out")
        return None
    return data


def _first_record_problem(path: Path) -> str | None:
    """Why the log's first line is no epoch record (MetricsLog.read stops there without saying); None for no
    line at all or a line torn by a crash, which mean only that no epoch finished."""
    try:
        first = next((line for line in path.read_text(errors="replace").splitlines() if line.strip()), None)
        record = None if first is None else json.loads(first)
    except (OSError, ValueError):
        return None
    if first is None:
        return None
    return _shape_problem(record, METRICS_SHAPE, required=METRICS_REQUIRED) or "not an epoch record"


def _left_out(out: Collection, line: str, warn: bool = True) -> None:
    out.not_included.append(line)
    if warn:
        log.warning("%s", line)
    return None


# ----- the shapes of the records read: a record of another shape is damaged, never a crash ---------------

NUMBER = (int, float)
SUMMARY_SHAPE = {
    "mode": str, "status": str, "best_val_acc": (*NUMBER, type(None)), "best_epoch": (int, type(None)),
    "seconds_per_epoch": (*NUMBER, type(None)), "epochs_planned": (int, type(None)), "device": str,
    "device_name": (str, type(None)), "torch_threads": (int, type(None)), "updated": str,
    "model": {"name": str, "args": dict, "parameters": int},
    "dataset": {"image_size": int, "classes": [str], "sizes": {"train": int, "val": int}, "root": (str, type(None))},
    "precision": {"mode": str, "native": bool},
}
METRICS_SHAPE = {"epoch": int, "train_loss": NUMBER, "val_loss": NUMBER, "val_acc": NUMBER, "train_acc": NUMBER}
METRICS_REQUIRED = ("epoch", "train_loss", "val_loss", "val_acc")
RECIPE_SHAPE = {"name": str, "train": {"batch_size": int}}
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


def _fraction(value) -> bool:
    return isinstance(value, NUMBER) and 0 <= value <= 1  # NaN compares false
MEMBER_SHAPE = {"name": str, "role": str, "run_dir": (str, type(None)), "base": (str, type(None)),
                "baseline_of": (str, type(None)), "status": str}
SWEEP_SHAPE = {"sweep": str, "sweep_file": str, "overrides": [str], "members": {"*": MEMBER_SHAPE}}


def _shape_problem(value, shape, where: str = "", required: tuple = ()) -> str | None:
    """Where `value` departs from `shape` (None when it does not): a dict shape names the keys it checks when
    present ("*": every value), a one-item list a list of that shape, anything else the allowed types."""
    name = where or "it"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{name} is {type(value).__name__}, not an object"
        missing = [k for k in required if k not in value]
        if missing:
            return f"{name} lacks {', '.join(missing)}"
        for key, item in value.items():
            inner = shape.get("*", shape.get(key))
            problem = inner is not None and _shape_problem(item, inner, f"{where}.{key}" if where else str(key))
            if problem:
                return problem
        return None
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{name} is {type(value).__name__}, not a list"
        return next((p for v in value if (p := _shape_problem(v, shape[0], f"{name}[]"))), None)
    if not isinstance(value, shape):
        return f"{name} is {type(value).__name__}, not {' or '.join(t.__name__ for t in _types(shape))}"
    return None


def _types(shape) -> tuple:
    return shape if isinstance(shape, tuple) else (shape,)


def _read_json(path: Path, shape, required: tuple = ()) -> tuple[object, str | None]:
    """(content, None), or (None, what is wrong): not a regular file, not JSON, or not of `shape`."""
    from edgekd.validate.checks import not_regular

    reason = not_regular(path)
    if reason:
        return None, reason
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"is not valid JSON ({exc.__class__.__name__})"
    problem = _shape_problem(data, shape, required=required) if shape is not None else None
    return (None, f"damaged ({problem})") if problem else (data, None)


def _assign(record: RunRecord, member: dict | None) -> None:
    if member is None:
        return
    record.role = member.get("role", "teacher")
    record.base = member.get("base") or record.name
    record.baseline_of = member.get("baseline_of")


def recipe_signature(recipe: dict, with_precision: bool = True) -> str:
    """The recipe without what differs between a student, its baseline and (optionally) its precisions."""
    drop = {"name", "description", "teacher", "distill", *(() if with_precision else ("precision",))}
    return json.dumps({k: v for k, v in recipe.items() if k not in drop}, sort_keys=True, default=str)


def _infer_roles(records: list[RunRecord]) -> None:
    students = {recipe_signature(r.recipe): r for r in records if r.summary.get("mode") == "distill"}
    for record in records:
        if record.summary.get("mode") == "distill":
            record.role = "student"
        elif recipe_signature(record.recipe) in students:
            record.role, record.baseline_of = "baseline", students[recipe_signature(record.recipe)].name
        else:
            record.role = "teacher"
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.role, recipe_signature(record.recipe, with_precision=False)), []).append(record)
    for group in groups.values():
        fp32 = next((r for r in group if r.precision == "fp32"), group[0])
        for record in group:
            record.base = fp32.name
