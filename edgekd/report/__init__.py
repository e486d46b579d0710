"""`edgekd report`: Park & Kotla's Tables I–IV and Nguyen's training curves for your own runs.

Writes report.md (figures in figures/), a self-contained report.html (figures inline) and report.json
(the tables, for machines) from run folders or a sweep folder.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekd.errors import EdgekdError
from edgekd.report import paper
from edgekd.report.collect import Collection, RunRecord, collect
from edgekd.report.render import Figure, Report, Section, markdown, to_html
from edgekd.report.tables import LEGEND, Table, build_tables
from edgekd.runs import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["ReportResult", "build_report", "write_report"]


@dataclass
class ReportResult:
    report: Report
    collection: Collection
    files: list[Path]


def build_report(collection: Collection) -> Report:
    built = build_tables(collection)
    sections = [_kd_section(built, collection), _curves_section(collection), _confusion_section(collection)]
    with_paper = any(r.on_paper_dataset for r in collection.runs)
    scale, warning = _scale(collection, with_paper)
    sweep = collection.sweep
    title = f"edgekd report: {sweep['sweep']}" if sweep else f"edgekd report: {len(collection.runs)} runs"
    overrides = "".join(f" --set {o}" for o in (sweep or {}).get("overrides", []))
    source = (f"Sweep {sweep['sweep_file']}{overrides}" if sweep
              else "Runs: " + ", ".join(r.name for r in collection.runs))
    source += f". Reference columns (shaded): {paper.CITATION}." if with_paper else ""
    tables = [t for t in built if t.rows]  # an empty table says nothing its reason cannot say in a line
    omitted = [f"{t.title}: {t.notes[0]}" for t in built if not t.rows]
    return Report(title, scale, warning, LEGEND, tables, [s for s in sections if s.figures or s.notes],
                  collection.not_included, source, omitted)


def write_report(paths: list[str | Path], out_dir: str | Path | None = None) -> ReportResult:
    """Collect the runs, build the report and write report.md, report.html, report.json and figures/."""
    paths = [Path(p) for p in paths]
    collection = collect(paths)
    out = Path(out_dir) if out_dir else _default_out(paths)
    _check_writable(out)  # before the evaluations and figures, which take a while
    report = build_report(collection)
    files = []
    try:
        for section in report.sections:
            for figure in section.figures:
                path = out / "figures" / f"{figure.name}.png"
                atomic_write(path, lambda tmp, png=figure.png: tmp.write_bytes(png))
        for name, text in (("report.md", markdown(report)), ("report.html", to_html(report))):
            atomic_write_text(out / name, text)
            files.append(out / name)
        atomic_write_json(out / "report.json", _json(report, collection))
    except OSError as exc:
        raise _unwritable(out, exc) from exc
    files.append(out / "report.json")
    return ReportResult(report, collection, files)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".report-", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _unwritable(out, exc) from exc


def _unwritable(out: Path, exc: OSError) -> EdgekdError:
    return EdgekdError(f"cannot write the report into {out} ({exc.strerror or exc.__class__.__name__})",
                       hint="choose a folder you can write to with --out DIR")


def _default_out(paths: list[Path]) -> Path:
    return paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.absolute() for p in paths]))


def _json(report: Report, collection: Collection) -> dict:
    return {"title": report.title, "source": report.source, "scale_warning": report.scale_warning,
            "scale": [{"what": w, "these_runs": o, "paper": t} for w, o, t in report.scale],
            "tables": [t.to_dict() for t in report.tables],
            "runs": [{"name": r.name, "role": r.role, "base": r.base, "baseline_of": r.baseline_of,
                      "precision": r.precision, "precision_native": r.precision_native, "status": r.summary.get("status"),
                      "run_dir": str(r.run_dir)} for r in collection.runs],
            "figures": [f"figures/{f.name}.png" for s in report.sections for f in s.figures],
            "not_included": report.not_included, "tables_not_shown": report.omitted,
            "paper_setting": paper.SETTING if any(r.on_paper_dataset for r in collection.runs) else None}


# ----- sections -----------------------------------------------------------------------------------------

def _kd_section(tables: list[Table], collection: Collection) -> Section:
    from edgekd.report import plots

    rows = [r for r in next(t for t in tables if t.key == "II").rows if r["nokd_acc_pct"] is not None]
    section = Section("KD gain", "Best validation accuracy of each distilled student and of the same model, "
                      "budget and seed trained with cross-entropy alone: the ablation Park & Kotla lack.")
    if rows:
        teacher = next((t.rows[0]["best_acc_pct"] for t in tables if t.key == "I" and t.rows), None)
        section.figures.append(Figure("kd_gain", "KD gain", plots.kd_gain(rows, teacher)))
    return section


def _curves_section(collection: Collection) -> Section:
    from edgekd.report import plots

    section = Section("Training curves", "Loss and accuracy per epoch, train and validation, as in Nguyen's "
                      "figures. A distilled run's train loss is its KD loss; its validation loss is cross-entropy.")
    for record in _ordered(collection.runs):
        caption = (f"{record.name}: best val acc {100 * record.best_acc:.2f}% at epoch "
                   f"{record.summary.get('best_epoch')} of {len(record.metrics)}, last {100 * record.last_acc:.2f}%")
        section.figures.append(Figure(f"curves_{record.name}", record.name, plots.curves(record), caption))
    lacking = [r.name for r in collection.runs if not all("train_acc" in m for m in r.metrics)]
    if lacking:
        section.notes.append(f"train accuracy not recorded by {', '.join(lacking)} (older runs log only "
                             f"validation accuracy).")
    return section


def _confusion_section(collection: Collection) -> Section:
    from edgekd.report import plots

    section = Section("Confusion matrices", "Each student's best.pt on the validation split, with fp32 weights "
                      "as it is exported (rows: true class, columns: predicted; colour: share of the true class).")
    for record in _ordered([r for r in collection.runs if r.role == "student"]):
        try:
            evaluation = _evaluation(record)
        except EdgekdError as exc:
            section.notes.append(f"{record.name}: no confusion matrix ({exc.message})")
            continue
        title = f"{record.name}: {100 * evaluation['accuracy']:.2f}% on {evaluation['images']} {evaluation['split']} images"
        per_class = ", ".join(f"{name} {'–' if acc is None else f'{100 * acc:.0f}%'}"
                              for name, acc in zip(evaluation["class_names"], evaluation["per_class_accuracy"]))
        section.figures.append(Figure(f"confusion_{record.name}", title, plots.confusion(
            evaluation["confusion"], evaluation["class_names"], title), f"per-class accuracy: {per_class}"))
    return section


def _evaluation(record: RunRecord) -> dict:
    """The val-split evaluation of best.pt: eval_val.json when newer than best.pt, else evaluated and stored."""
    from edgekd.evaluate import evaluate_checkpoint

    checkpoint, stored = record.run_dir / "best.pt", record.run_dir / "eval_val.json"
    if not checkpoint.is_file():
        raise EdgekdError("best.pt is missing")
    if stored.is_file() and stored.stat().st_mtime >= checkpoint.stat().st_mtime:
        try:
            data = json.loads(stored.read_text())
            if _evaluation_shape_ok(data):
                return data
            log.warning("%s has the wrong shape: evaluating again", stored)
        except (OSError, UnicodeDecodeError, ValueError):
            pass
    log.info("evaluating %s on the val split for its confusion matrix", checkpoint)
    result = {"checkpoint": str(checkpoint), **evaluate_checkpoint(checkpoint, "val").to_dict()}
    try:
        atomic_write_json(stored, result)
    except OSError as exc:  # a cache: a read-only run folder only means evaluating again next time
        log.warning("could not keep %s (%s)", stored, exc.strerror)
    return result


def _evaluation_shape_ok(data) -> bool:
    number = (int, float)
    return (isinstance(data, dict) and isinstance(data.get("accuracy"), number)
            and isinstance(data.get("images"), int) and isinstance(data.get("split"), str)
            and isinstance(data.get("class_names"), list) and isinstance(data.get("per_class_accuracy"), list)
            and len(data["per_class_accuracy"]) == len(data["class_names"])
            and all(a is None or isinstance(a, number) for a in data["per_class_accuracy"])
            and isinstance(data.get("confusion"), list) and len(data["confusion"]) == len(data["class_names"])
            and all(isinstance(row, list) and len(row) == len(data["class_names"])
                    and all(isinstance(v, int) for v in row) for row in data["confusion"]))


def _ordered(records: list[RunRecord]) -> list[RunRecord]:
    rank = {"teacher": 0, "student": 1, "baseline": 2}
    return sorted(records, key=lambda r: rank.get(r.role, 3))


# ----- scale --------------------------------------------------------------------------------------------

def _scale(collection: Collection, with_paper: bool = True) -> tuple[list[tuple[str, str, str | None]], str | None]:
    runs = collection.runs
    datasets = [r.summary.get("dataset", {}) for r in runs]
    sizes = sorted({d.get("image_size") for d in datasets if d.get("image_size")})
    counts = sorted({(d.get("sizes", {}).get("train", 0), d.get("sizes", {}).get("val", 0)) for d in datasets})
    classes = sorted({len(d.get("classes", [])) for d in datasets})
    planned = sorted({r.summary.get("epochs_planned") for r in runs if r.summary.get("epochs_planned")})
    done = sorted({len(r.metrics) for r in runs})
    batches = sorted({b for r in runs if isinstance(b := r.recipe.get("train", {}).get("batch_size"), int)})
    devices = sorted({_device_text(r.summary) for r in runs})
    precisions = sorted({f"{r.precision} {'native' if r.precision_native else 'simulated'}" for r in runs},
                        key=lambda p: ("fp32", "bf16", "fp16", "fp8").index(p.split()[0]))
    roots = sorted({str(d.get("root")) for d in datasets})
    setting = paper.SETTING
    scale = [
        ("image size", _join(f"{s} px" for s in sizes), f"{setting['image_size']} px"),
        ("data", (f"{_join(f'{t:,} train / {v:,} val' for t, v in counts)} images, "
                  f"{_join(map(str, classes))} classes; {_join(roots)}"), setting["dataset"]),
        ("epochs", f"{_join(map(str, planned))} planned, {_join(map(str, done))} run", setting["epochs"]),
        ("batch size", _join(map(str, batches)), str(setting["batch_size"])),
        ("device", _join(devices), setting["device"]),
        ("precision", _join(precisions), setting["precision"]),
    ]
    if not with_paper:  # another dataset: the paper's setting is no yardstick
        return [(what, ours, None) for what, ours, _ in scale], None
    small = (sizes and max(sizes) < setting["image_size"]) or any(t < 10_000 for t, _ in counts) \
        or not any(r.summary.get("device") == "cuda" for r in runs)
    warning = ("These runs are not at the paper's setting (see the scale below): compare trends, not "
               "numbers, with the paper's reference columns.") if small else None
    return scale, warning


def _join(values) -> str:
    return ", ".join(values) or "–"


def _device_text(summary: dict) -> str:
    threads = summary.get("torch_threads")
    return (f"{summary.get('device_name') or summary.get('device')} "
            f"({threads} torch thread{'' if threads == 1 else 's'})")
