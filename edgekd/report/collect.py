"""The runs a report covers: read from run folders, a folder of runs, or a sweep folder (sweep.json).

Each run's role (teacher, student or no-KD baseline) comes from sweep.json when there is one; for loose
run folders it is inferred: a distilled run is a student, a trained run whose recipe equals a student's
but for name, teacher and distillation is that student's baseline, any other trained run is a teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgekd.errors import EdgekdError
from edgekd.runs import MetricsLog, read_summary

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
        try:
            state = json.loads((path / "sweep.json").read_text())
        except ValueError as exc:
            raise EdgekdError(f"{path / 'sweep.json'} is not valid JSON ({exc})") from exc
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
    if (path / "summary.json").is_file():
        return [(path, None)]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "summary.json").is_file())
    if not runs:
        raise EdgekdError(f"{path} is neither a run folder (no summary.json) nor a sweep folder (no sweep.json), "
                          f"and holds no run folder", hint="name run folders under artifacts/, or a sweep folder")
    return [(run, None) for run in runs]


def _read_run(run_dir: Path, out: Collection) -> RunRecord | None:
    summary = read_summary(run_dir)
    if not summary:
        out.not_included.append(f"{run_dir.name}: summary.json missing or unreadable")
        return None
    metrics = MetricsLog(run_dir / "metrics.jsonl").read()
    if not metrics:
        out.not_included.append(f"{run_dir.name}: {summary.get('status', '?')}, no finished epoch")
        return None
    recipe_file = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    validation = None
    if (run_dir / "validation.json").is_file():
        try:
            validation = json.loads((run_dir / "validation.json").read_text())
        except ValueError:
            validation = None
    return RunRecord(run_dir.name, run_dir, summary, metrics, recipe or {}, validation=validation)


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
