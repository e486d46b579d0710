"""`edgekd sweep`: a teacher, its students, precision variants and no-KD baselines, as one resumable run.

A sweep file (YAML, validated like a recipe) names the member recipes. Every member becomes one run
folder under `<artifacts>/<sweep name>/`, beside a `sweep.json` state file rewritten atomically after each
member. Running the sweep again skips members whose run finished, resumes an interrupted one from its
newest saved state (mid-epoch included; one killed before its first save restarts in its folder), and refuses a finished run whose recipe differs from what the sweep would run now (the tables
would mix settings).

Members, in the order they run:
  teacher (train) → its precision variants (train) → for each student: the student (distill from this
  sweep's teacher best.pt), its precision variants (distill), its no-KD baseline (train, cross-entropy
  only: same model, budget and seed).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from edgekd.errors import EdgekdError, RecipeError
from edgekd.recipe import (  # the recipe's own validators: a sweep file is checked as a recipe is
    PRECISIONS,
    Recipe,
    load_recipe,
    read_yaml_mapping,
    recipe_differences,
    reject_unknown,
    section_from_mapping,
    validate_value,
)
from edgekd.runs import atomic_write_json, check_writable, latest_run_dir, read_summary

log = logging.getLogger(__name__)

DONE = ("finished", "early_stopped")
EXPORT_PRECISIONS = ("fp16", "int8", "fp8")


@dataclass
class SweepExport:
    # Export and validate runs after training, for the report's size and latency columns.
    enabled: bool = False
    # Exported besides fp32 (and each run's own training precision when it is fp16 or fp8).
    precisions: list[str] = field(default_factory=lambda: ["int8"], metadata={"check": (
        lambda v: set(v) <= set(EXPORT_PRECISIONS), f"may only name {', '.join(EXPORT_PRECISIONS)}")})
    # students: every distilled run; all: the teacher runs too.
    runs: str = field(default="students", metadata={"choices": ("students", "all")})
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"check": (
        lambda v: bool(v) and min(v) >= 1, "must be positive integers")})
    latency_seconds: float = field(default=1.0, metadata={"check": (lambda v: v > 0, "must be > 0")})


@dataclass
class Sweep:
    name: str
    # The teacher's recipe file (relative to the sweep file); trained first.
    teacher: str
    description: str = ""
    # Student recipe files, each distilled from this sweep's teacher run.
    students: list[str] = field(default_factory=list)
    # Extra training precisions per member, keyed by the recipe file as written above.
    precisions: dict[str, list[str]] = field(default_factory=dict)
    # No-distillation baselines (same model, budget and seed; cross-entropy only): of every fp32 student
    # (students), of every student run including its precision variants (all), or none.
    baselines: str = field(default="students", metadata={"choices": ("students", "all", "none")})
    export: SweepExport = field(default_factory=SweepExport)
    source: str | None = field(default=None, compare=False)


@dataclass
class Member:
    name: str  # the run name: <recipe name>[_fp16|_fp8|_nokd]
    recipe: Recipe
    mode: str  # train or distill
    role: str  # teacher, student or baseline
    base: str  # the recipe name it varies (itself for a base member)
    precision: str
    baseline_of: str | None = None  # for a baseline: the distilled member it is the control of


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; member recipe paths become absolute (relative to the sweep file)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep", "recipes/intel_sweep.yaml", "keys (name:, teacher:, students:, ...)")
    where = str(path)
    keys = [f.name for f in dataclasses.fields(Sweep) if f.name != "source"]
    reject_unknown(raw, keys, where, "")
    if not raw.get("teacher"):
        raise RecipeError(f"{where}: a sweep needs a teacher recipe", hint="teacher: intel_teacher.yaml")
    hints = typing.get_type_hints(Sweep)
    fields = {f.name: f for f in dataclasses.fields(Sweep)}
    kwargs = {k: validate_value(v, hints[k], fields[k].metadata, f"{where}: {k}") for k, v in raw.items() if k != "export"}
    kwargs["export"] = section_from_mapping(SweepExport, raw.get("export"), f"{where}: export")
    sweep = Sweep(**kwargs, source=str(path.resolve()))
    _check_precisions(sweep, where)
    sweep.teacher = _recipe_path(sweep.teacher, path.parent, f"{where}: teacher")
    sweep.precisions = {_recipe_path(k, path.parent, f"{where}: precisions"): v for k, v in sweep.precisions.items()}
    sweep.students = [_recipe_path(s, path.parent, f"{where}: students") for s in sweep.students]
    return sweep


def _check_precisions(sweep: Sweep, where: str) -> None:
    members = [sweep.teacher, *sweep.students]
    reject_unknown(sweep.precisions, members, f"{where}: precisions", "")
    extra = tuple(p for p in PRECISIONS if p != "fp32")
    for key, values in sweep.precisions.items():
        validate_value(values, list[str], {"check": (lambda v: set(v) <= set(extra), f"may only name {', '.join(extra)}")},
                  f"{where}: precisions.{key}")


def _recipe_path(value: str, base: Path, where: str) -> str:
    candidate = Path(value).expanduser()
    candidate = candidate if candidate.is_absolute() else base / candidate
    if not candidate.is_file():
        raise RecipeError(f"{where}: recipe {value!r} does not exist (looked for {candidate})")
    return str(candidate.resolve())


def plan_members(sweep: Sweep, overrides: typing.Sequence[str], sweep_dir: Path) -> list[Member]:
    """Every member's resolved recipe, in run order; every override is checked before any training.

    Students distil from this sweep's teacher run: teacher.checkpoint is set to its best.pt (the newest
    teacher run with one, else the folder its first run will have; `use_teacher_run` confirms it once the
    teacher has run).
    """
    def member(path: str, suffix: str, precision: str, mode: str) -> Recipe:
        name = load_recipe(path).name
        recipe = load_recipe(path, [*overrides, f"precision={precision}", f"name={name}{suffix}"])
        recipe.teacher.recipe = None
        recipe.teacher.checkpoint = str(teacher_checkpoint) if mode == "distill" else None
        return recipe

    teacher_name = load_recipe(sweep.teacher).name
    teacher_run = latest_run_dir(sweep_dir, teacher_name, needs="best.pt") or sweep_dir / teacher_name
    teacher_checkpoint = (teacher_run / "best.pt").absolute()
    members = []
    for precision in ["fp32", *sweep.precisions.get(sweep.teacher, [])]:
        recipe = member(sweep.teacher, _suffix(precision), precision, "train")
        members.append(Member(recipe.name, recipe, "train", "teacher", teacher_name, precision))
    for path in sweep.students:
        base = load_recipe(path).name
        for precision in ["fp32", *sweep.precisions.get(path, [])]:
            recipe = member(path, _suffix(precision), precision, "distill")
            members.append(Member(recipe.name, recipe, "distill", "student", base, precision))
            if sweep.baselines == "all" or sweep.baselines == "students" and precision == "fp32":
                control = member(path, f"{_suffix(precision)}_nokd", precision, "train")
                members.append(Member(control.name, control, "train", "baseline", base, precision, recipe.name))
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RecipeError(f"{sweep.source}: two members would both be named {duplicates[0]!r}",
                          hint="give the member recipes distinct names")
    return members


def _suffix(precision: str) -> str:
    return "" if precision == "fp32" else f"_{precision}"


def use_teacher_run(members: list[Member], teacher_run: Path) -> None:
    """Point every distilled member at the teacher run this sweep actually made."""
    for m in members:
        if m.mode == "distill":
            m.recipe.teacher.checkpoint = str((teacher_run / "best.pt").absolute())


# ----- running ------------------------------------------------------------------------------------------

@dataclass
class MemberState:
    """What a member's run folder says now: done, resumable, or not started."""
    action: str  # skip, resume or run
    run_dir: Path | None
    summary: dict


def member_state(member: Member, sweep_dir: Path) -> MemberState:
    newest = latest_run_dir(sweep_dir, member.name)
    summary = read_summary(newest) if newest else {}
    if newest and summary.get("status") in DONE:
        _check_same_recipe(member, newest)
        return MemberState("skip", newest, summary)
    if newest:  # resumed from its newest saved state, or restarted in the same folder if it saved none
        return MemberState("resume", newest, summary)
    return MemberState("run", None, {})


def _check_same_recipe(member: Member, run_dir: Path) -> None:
    try:
        stored = yaml.safe_load((run_dir / "recipe.yaml").read_text()) if (run_dir / "recipe.yaml").is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        stored = "damaged"
    if not isinstance(stored, dict):
        if stored is not None:
            log.warning("%s is damaged: the finished run's settings cannot be compared with this sweep's",
                        run_dir / "recipe.yaml")
        return
    changed = recipe_differences(stored, member.recipe.to_dict())
    if changed:
        raise EdgekdError(f"{run_dir} finished with other settings than this sweep would use now "
                          f"({'; '.join(changed[:4])})",
                          hint="use the same --set values as before, or start a new sweep folder with --artifacts DIR")


@dataclass
class SweepPlan:
    sweep_file: str | Path
    overrides: list[str] = field(default_factory=list)
    artifacts: Path = Path("artifacts")
    export: bool | None = None  # None: the sweep file's export.enabled


class SweepEvents:
    """What a sweep reports as it runs (the CLI prints these); `training` gives each run's callbacks."""

    def on_member(self, index: int, total: int, member: Member, state: MemberState) -> None:
        pass

    def training(self, member: Member):
        return None

    def on_export(self, member: Member, detail: str) -> None:
        pass


def run_sweep(plan: SweepPlan, events: SweepEvents | None = None) -> dict:
    """Run (or continue) every member of a sweep; returns the sweep state also written to sweep.json."""
    from edgekd.train.trainer import run

    events = events or SweepEvents()
    sweep = load_sweep(plan.sweep_file)
    sweep_dir = Path(plan.artifacts) / sweep.name
    members = plan_members(sweep, plan.overrides, sweep_dir)
    check_writable(sweep_dir, keep=False)
    export = sweep.export.enabled if plan.export is None else plan.export
    state = _initial_state(sweep, plan, members, sweep_dir)
    for index, member in enumerate(members, 1):
        current = member_state(member, sweep_dir)
        events.on_member(index, len(members), member, current)
        if current.action != "skip":
            _write_state(sweep_dir, state, member, "running", current.run_dir)
            try:
                summary = run(member.recipe, member.mode, sweep_dir, resume=current.action == "resume",
                              callbacks=events.training(member))
            except BaseException as exc:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                _write_state(sweep_dir, state, member, status, latest_run_dir(sweep_dir, member.name))
                raise
            current = MemberState("done", sweep_dir / summary["run"], summary)
        _write_state(sweep_dir, state, member, current.summary.get("status", "?"), current.run_dir)
        if member is members[0]:
            use_teacher_run(members, current.run_dir)
        if export and _exported(member, sweep.export):
            entry = _export_and_validate(member, current.run_dir, sweep.export, events)
            _write_state(sweep_dir, state, member, current.summary.get("status", "?"), current.run_dir, entry)
    return state


def _exported(member: Member, config: SweepExport) -> bool:
    return member.mode == "distill" or config.runs == "all" and member.role == "teacher"


def _initial_state(sweep: Sweep, plan: SweepPlan, members: list[Member], sweep_dir: Path) -> dict:
    state = {"sweep": sweep.name, "sweep_file": sweep.source, "description": sweep.description,
             "overrides": list(plan.overrides), "members": {}}
    for m in members:
        run_dir = latest_run_dir(sweep_dir, m.name)
        state["members"][m.name] = {
            "name": m.name, "recipe_file": m.recipe.source, "mode": m.mode, "role": m.role, "base": m.base,
            "precision": m.precision, "baseline_of": m.baseline_of,
            "status": read_summary(run_dir).get("status", "pending") if run_dir else "pending",
            "run_dir": run_dir.name if run_dir else None}
    return state


def _write_state(sweep_dir: Path, state: dict, member: Member, status: str, run_dir: Path | None,
                 export: dict | None = None) -> None:
    entry = state["members"][member.name]
    entry.update(status=status, run_dir=run_dir.name if run_dir else None)
    if export is not None:
        entry["export"] = export
    state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(sweep_dir / "sweep.json", state)


def _export_and_validate(member: Member, run_dir: Path, config: SweepExport, events: SweepEvents) -> dict:
    """Export a run (fp32 + the configured precisions) and validate it on onnxruntime's CPU provider.

    Skipped when validation.json is newer than best.pt. A gate failure is recorded, not raised: the
    report shows it.
    """

    from edgekd.export import ExportError, ExportPlan, export_checkpoint
    from edgekd.validate import ValidationPlan, validate_run
    from edgekd.validate.report import write_reports

    checkpoint, validation = run_dir / "best.pt", run_dir / "validation.json"
    earlier = _earlier_validation(validation) if validation.is_file() else None
    if earlier is not None and validation.stat().st_mtime >= checkpoint.stat().st_mtime:
        events.on_export(member, "exported and validated before; kept")
        return {"status": "validated", "failures": earlier}
    precisions = sorted({*config.precisions, *([member.precision] if member.precision in EXPORT_PRECISIONS else [])},
                        key=("fp32", *EXPORT_PRECISIONS).index)
    events.on_export(member, f"exporting fp32, {', '.join(precisions)}")
    export_failure = None
    try:
        export_checkpoint(ExportPlan(checkpoint, precisions, run_dir / "exports"))
    except ExportError as exc:  # a precision no float layers could bring within the gate: the others were
        export_failure = str(exc)  # written; record it and validate those, the sweep goes on
        events.on_export(member, f"export: {export_failure}")
    events.on_export(member, "validating on onnxruntime cpu")
    result = validate_run(ValidationPlan(run_dir, providers=["cpu"], batch_sizes=list(config.batch_sizes),
                                         latency_seconds=config.latency_seconds))
    write_reports(result, run_dir)
    for name, reasons in result.failures.items():
        events.on_export(member, f"gate: {name} fails ({'; '.join(reasons)})")
    failures = {**result.failures, **({"export": [export_failure]} if export_failure else {})}
    return {"status": "validated", "failures": failures}


def _earlier_validation(path: Path) -> dict | None:
    """The failures a validation.json recorded; None when it is damaged (then export and validate again)."""
    import json

    try:
        failures = json.loads(path.read_text()).get("failures", {})
    except (OSError, ValueError, AttributeError):
        failures = None
    if not isinstance(failures, dict):
        log.warning("%s is damaged: exporting and validating again", path)
        return None
    return failures


def find_sweep_dirs(root: Path) -> list[Path]:
    """Sweep folders (holding a sweep.json of the right shape) directly under `root`, newest first; a damaged
    one is passed over with a warning, so it never hides the others."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        problem = _sweep_state_problem(folder / "sweep.json") if (folder / "sweep.json").is_file() else "absent"
        if problem is None:
            found.append(folder)
        elif problem != "absent":
            log.warning("%s is damaged (%s); that sweep is skipped", folder / "sweep.json", problem)
    return sorted(found, key=lambda p: (p / "sweep.json").stat().st_mtime, reverse=True)


def _sweep_state_problem(path: Path) -> str | None:
    import json

    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable: {exc.__class__.__name__}"
    if not isinstance(state, dict) or not isinstance(state.get("members"), dict):
        return "not a mapping with members"
    if not all(isinstance(m, dict) for m in state["members"].values()):
        return "a member is not a mapping"
    return None

