"""Tables I–IV in Park & Kotla's shape (parameters, accuracy, seconds per epoch), with the columns it lacked.

Added: multiply-accumulates, best and last epoch accuracy, the no-KD baseline and the KD gain over it,
exported ONNX sizes and onnxruntime latency (from `edgekd validate`), and the paper's published numbers as
reference columns where the runs are on the paper's dataset (Intel Image Classification): on another
dataset they would compare unlike with unlike, so those columns are left out. A cell with nothing measured
is None (shown "–"), and the table's notes say why.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from edgekd.report import paper
from edgekd.report.collect import Collection, RunRecord, recipe_signature

log = logging.getLogger(__name__)

PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8")


@dataclass
class Column:
    key: str
    header: str
    fmt: str = "{}"  # for numbers; a {precision: number} cell shows "fp32 0.41 · int8 0.12"
    paper: bool = False  # a reference column: the paper's published number


@dataclass
class Table:
    key: str  # I, II, III, IV
    title: str
    columns: list[Column]
    rows: list[dict]
    notes: list[str] = field(default_factory=list)

    def cell(self, row: dict, column: Column) -> str:
        value = row.get(column.key)
        if value is None:
            return "–"
        if isinstance(value, dict):
            return " · ".join(f"{k} {column.fmt.format(v)}" for k, v in value.items()) or "–"
        return column.fmt.format(value) if isinstance(value, (int, float)) else str(value)

    def to_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "columns": [asdict(c) for c in self.columns],
                "rows": self.rows, "notes": self.notes}


RUN = Column("run", "run")
MODEL = Column("model", "model")
PARAMS = Column("parameters", "parameters", "{:,}")
MACS = Column("mmacs", "MMACs", "{:,.1f}")
BEST = Column("best_acc_pct", "best acc %", "{:.2f}")
EPOCH = Column("best_epoch", "best epoch")
LAST = Column("last_acc_pct", "last acc %", "{:.2f}")
SECONDS = Column("s_per_epoch", "s/epoch", "{:.2f}")
PRECISION = Column("precision", "precision")
DELTA = Column("delta_fp32_pts", "Δ vs fp32 pts", "{:+.2f}")
SPEED = Column("speed_vs_fp32", "time vs fp32", "{:.2f}×")
NOKD = Column("nokd_acc_pct", "no-KD best acc %", "{:.2f}")
GAIN = Column("kd_gain_pts", "KD gain pts", "{:+.2f}")
ONNX_MB = Column("onnx_mb", "ONNX MB", "{:.2f}")
ORT_MS = Column("ort_ms", "ORT cpu b1 p50 ms", "{:.2f}")
PAPER_PARAMS = Column("paper_parameters", "paper: parameters", "{:,}", paper=True)
PAPER_ACC = Column("paper_acc", "paper: acc %", "{:.2f}", paper=True)
PAPER_SECONDS = Column("paper_s_per_epoch", "paper: s/epoch", "{:.2f}", paper=True)
LEGEND = ("Accuracy: top-1 on the validation split, at the best epoch and at the last. KD gain: best accuracy "
          "minus that of the no-KD baseline (same model, budget, seed and precision; cross-entropy only). "
          "s/epoch: wall time of an epoch, its validation included. MMACs: multiply-accumulates of one image "
          "at the run's image size. ONNX MB and ORT latency (batch 1, median, onnxruntime CPU provider) come "
          "from `edgekd validate`.")


def build_tables(collection: Collection) -> list[Table]:
    runs = collection.runs
    teachers = [r for r in runs if r.role == "teacher"]
    students = [r for r in runs if r.role == "student"]
    with_paper = any(r.on_paper_dataset for r in runs)

    def _table(key, title, records, collection, columns):  # the paper's columns only beside its dataset
        return _make_table(key, title, records, collection, [c for c in columns if with_paper or not c.paper])

    tables = [
        # Tables I and II hold each model at its reference precision (fp32 when it ran, else the highest
        # that did), beside the paper's fp32 numbers; III and IV the models trained at several precisions.
        _table("I", "Table I — teacher", _reference_runs(teachers), collection,
               [RUN, MODEL, PARAMS, MACS, BEST, EPOCH, LAST, SECONDS, ONNX_MB, ORT_MS, PAPER_PARAMS, PAPER_ACC,
                PAPER_SECONDS]),
        _table("II", "Table II — weight reduction: distilled students",
               sorted(_reference_runs(students), key=lambda r: -r.model.get("parameters", 0)),
               collection, [RUN, MODEL, PARAMS, MACS, BEST, EPOCH, LAST, NOKD, GAIN, SECONDS, ONNX_MB, ORT_MS,
                            PAPER_PARAMS, PAPER_ACC, PAPER_SECONDS]),
        _table("III", "Table III — training precision: teacher", _by_precision(_varied(teachers)), collection,
               [RUN, PRECISION, BEST, EPOCH, LAST, DELTA, SECONDS, SPEED, ONNX_MB, ORT_MS, PAPER_ACC, PAPER_SECONDS]),
        _table("IV", "Table IV — training precision: students",
               _by_precision(_varied(students)), collection,
               [RUN, PRECISION, BEST, EPOCH, LAST, DELTA, NOKD, GAIN, SECONDS, SPEED, ONNX_MB, ORT_MS, PAPER_ACC,
                PAPER_SECONDS]),
    ]
    return tables


def _reference_runs(records: list[RunRecord]) -> list[RunRecord]:
    """Every run at its model's reference precision (several runs of one recipe may share it)."""
    best: dict[str, int] = {}
    for record in records:
        best[record.base] = min(best.get(record.base, len(PRECISION_ORDER)), _precision_rank(record.precision))
    return [r for r in records if _precision_rank(r.precision) == best[r.base]]


def _varied(records: list[RunRecord]) -> list[RunRecord]:
    """The runs of models trained at more than one precision."""
    precisions: dict[str, set[str]] = {}
    for record in records:
        precisions.setdefault(record.base, set()).add(record.precision)
    return [r for r in records if len(precisions[r.base]) > 1]


def _by_precision(records: list[RunRecord]) -> list[RunRecord]:
    order = {base: i for i, base in enumerate(dict.fromkeys(r.base for r in records))}
    return sorted(records, key=lambda r: (order[r.base], _precision_rank(r.precision)))


def _precision_rank(precision: str) -> int:
    return PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)


def _make_table(key: str, title: str, records: list[RunRecord], collection: Collection,
                columns: list[Column]) -> Table:
    paper_precision = "fp32" if key in ("I", "II") else None  # the paper's Tables I-II are its fp32 runs
    table = Table(key, title, columns, [_row(r, collection, paper_precision) for r in records])
    table.notes = _notes(records, collection, {c.key for c in columns}, paper_precision)
    if not records:
        table.notes.insert(0, _empty_reason(key))
    return table


def _row(record: RunRecord, collection: Collection, paper_precision: str | None = None) -> dict:
    reference = (paper.reference(record.model, paper_precision or record.precision) if record.on_paper_dataset
                 else None)
    fp32 = _fp32_sibling(record, collection)
    baseline = _baseline(record, collection)
    onnx_mb, ort_ms = _onnx(record)
    return {
        "run": record.name, "model": _model_text(record.model), "parameters": record.model.get("parameters"),
        "mmacs": _mmacs(record), "precision": f"{record.precision} ({'native' if record.precision_native else 'simulated'})",
        "best_acc_pct": _pct(record.best_acc), "best_epoch": record.summary.get("best_epoch"),
        "last_acc_pct": _pct(record.last_acc), "epochs": len(record.metrics), "s_per_epoch": record.summary.get("seconds_per_epoch"),
        "delta_fp32_pts": _diff(record.best_acc, fp32.best_acc) if fp32 else None,
        "speed_vs_fp32": _ratio(record.summary.get("seconds_per_epoch"),
                                fp32.summary.get("seconds_per_epoch") if fp32 else None),
        "nokd_acc_pct": _pct(baseline.best_acc) if baseline else None,
        "kd_gain_pts": _diff(record.best_acc, baseline.best_acc) if baseline else None,
        "onnx_mb": onnx_mb, "ort_ms": ort_ms,
        "paper_table": reference.table if reference else None,
        "paper_parameters": reference.parameters if reference else None,
        "paper_acc": reference.accuracy_pct if reference else None,
        "paper_s_per_epoch": reference.seconds_per_epoch if reference else None}


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100 * (a - b)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _model_text(model: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in model.get("args", {}).items())
    return f"{model.get('name', '?')}({args})"


def _mmacs(record: RunRecord) -> float | None:
    from edgekd.models.summary import model_stats

    classes = record.summary.get("dataset", {}).get("classes") or []
    if not record.model.get("name") or not classes or not record.image_size:
        return None
    try:
        return model_stats(record.model["name"], len(classes), record.model.get("args", {}),
                           record.image_size).macs / 1e6
    except Exception as exc:  # a summary naming a model or arguments this edgekd cannot build: the cell stays –
        log.debug("no MACs for %s: %s", record.name, exc)
        return None


def _fp32_sibling(record: RunRecord, collection: Collection) -> RunRecord | None:
    return next((r for r in collection.runs if r.base == record.base and r.role == record.role
                 and r.precision == "fp32"), None)


def _baseline(record: RunRecord, collection: Collection) -> RunRecord | None:
    if record.role != "student":
        return None
    baselines = [r for r in collection.runs if r.role == "baseline"]
    named = next((r for r in baselines if r.baseline_of == record.name), None)
    # Loose runs: several students of one recipe (kd, dkd, ...) share the baseline their recipe matches.
    return named or next((r for r in baselines if r.recipe and recipe_signature(r.recipe) == recipe_signature(
        record.recipe)), None)


def _onnx(record: RunRecord) -> tuple[dict | None, dict | None]:
    """{precision: file MB} and {precision: batch-1 p50 ms} of the exports on onnxruntime's CPU provider."""
    if record.validation:
        rows = [r for r in record.validation.get("rows", []) if r.get("runtime") == "onnxruntime"
                and r.get("provider") == "cpu"]
        batch = str(min(record.validation.get("settings", {}).get("batch_sizes", [1])))
        sizes = {r["precision"]: r["file_mb"] for r in rows}
        latency = {r["precision"]: r["latency"][batch]["p50_ms"] for r in rows if batch in r.get("latency", {})}
        return sizes or None, latency or None
    files = record.exports()
    if files:
        return {f.name.rsplit(".", 2)[-2]: f.stat().st_size / 1e6 for f in files}, None
    return None, None


def _notes(records: list[RunRecord], collection: Collection, columns: set[str],
           paper_precision: str | None) -> list[str]:
    notes = []
    if "onnx_mb" in columns:
        unexported = [r.name for r in records if not r.validation and not r.exports()]
        unvalidated = [r.name for r in records if not r.validation and r.exports()]
        if unexported:
            notes.append(f"ONNX columns –: {', '.join(unexported)} not exported (a sweep exports its distilled "
                         f"students when export is enabled; by hand: `edgekd export RUN --int8`, then "
                         f"`edgekd validate RUN`).")
        if unvalidated:
            notes.append(f"ORT latency –: {', '.join(unvalidated)} exported but not validated "
                         f"(`edgekd validate RUN` measures it).")
        for r in records:
            for variant, reasons in ((r.validation or {}).get("failures") or {}).items():
                notes.append(f"{r.name}: {variant} fails the validate gate ({'; '.join(reasons)}).")
    if "kd_gain_pts" in columns:
        lacking = [r.name for r in records if not _baseline(r, collection)]
        if lacking:
            notes.append(f"KD gain –: no no-KD baseline of {', '.join(lacking)} among these runs.")
    if "paper_acc" in columns:
        foreign = [r.name for r in records if r.on_paper_dataset
                   and not paper.reference(r.model, paper_precision or r.precision)]
        elsewhere = [r.name for r in records if not r.on_paper_dataset]
        if elsewhere:
            notes.append(f"paper columns –: {', '.join(elsewhere)} ran on another dataset than the paper's "
                         f"(Intel Image Classification).")
        if foreign:
            notes.append(f"paper columns –: the paper has no row for {', '.join(foreign)} "
                         f"(its rows: paper_cnn at width 16 with 12/10/8/6/4 blocks; fp16/fp8 for 12 and 8).")
    return notes


def _empty_reason(key: str) -> str:
    return {"I": "no teacher run (a trained run that is no student's baseline) among these runs.",
            "II": "no distilled student among these runs.",
            "III": "no teacher trained at more than one precision among these runs.",
            "IV": "no student trained at more than one precision among these runs."}[key]
