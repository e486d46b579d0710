"""The report's figures as PNG bytes: training curves (as in Nguyen's figures), confusion matrices, KD gain.

matplotlib is imported on first use, with the Agg backend (no display needed).
"""

from __future__ import annotations

import io

from edgekd.report.collect import RunRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    return buffer.getvalue()


def curves(record: RunRecord) -> bytes:
    """Loss and accuracy per epoch, train and validation; the best epoch marked."""
    plt = _pyplot()
    epochs = [m["epoch"] for m in record.metrics]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss_ax.plot(epochs, [m["train_loss"] for m in record.metrics], "o-", label="train")
    loss_ax.plot(epochs, [m["val_loss"] for m in record.metrics], "o-", label="validation")
    loss_ax.set_title("loss" + (" (train: KD loss)" if record.summary.get("mode") == "distill" else ""), fontsize=10)
    val_acc = [100 * m["val_acc"] for m in record.metrics]
    train_acc = [100 * m["train_acc"] for m in record.metrics] if all("train_acc" in m for m in record.metrics) else []
    if train_acc:
        acc_ax.plot(epochs, train_acc, "o-", label="train")
    else:
        acc_ax.plot([], [], " ", label="train: not recorded by this run")
    acc_ax.plot(epochs, val_acc, "o-", color="tab:orange", label="validation")
    best = record.summary.get("best_epoch")
    if best:
        acc_ax.axvline(best, color="grey", linestyle=":", linewidth=1, label=f"best epoch ({best})")
    acc_ax.set_title("accuracy (%)", fontsize=10)
    # A few points of margin, and no offset notation when every epoch scored the same.
    acc_ax.set_ylim(max(0.0, min(val_acc + train_acc) - 5), min(101.0, max(val_acc + train_acc) + 5))
    for ax in (loss_ax, acc_ax):
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{record.name} ({record.role}, {record.precision})", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def confusion(matrix: list[list[int]], class_names: list[str], title: str) -> bytes:
    """Counts, coloured by the share of each true class (row)."""
    plt = _pyplot()
    size = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * size, 1.0 + 0.7 * size))
    shares = [[v / max(1, sum(row)) for v in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                    color="white" if shares[i][j] > 0.6 else "black")
    ax.set_xticks(range(size), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(size), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def kd_gain(rows: list[dict], teacher_acc: float | None) -> bytes:
    """Best validation accuracy of each student, distilled and without KD, beside the teacher's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 1.4 * len(rows)), 3.8))
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [r["best_acc_pct"] or 0 for r in rows], 0.4, label="distilled (KD)")
    ax.bar([p + 0.2 for p in positions], [r["nokd_acc_pct"] or 0 for r in rows], 0.4, label="no KD (cross-entropy)")
    for p, r in zip(positions, rows):
        if r["kd_gain_pts"] is not None:
            ax.annotate(f"{r['kd_gain_pts']:+.1f}", (p, max(r["best_acc_pct"], r["nokd_acc_pct"])),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8)
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="grey", linestyle="--", linewidth=1, label=f"teacher {teacher_acc:.1f}%")
    ax.set_xticks(list(positions), [r["run"] for r in rows], fontsize=8)
    ax.set_ylabel("best val accuracy (%)")
    ax.set_title("KD gain (points above the bars)", fontsize=10)
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)
