"""The published numbers of Park & Kotla, shown beside ours as reference columns on their dataset.

Every number below is copied from ../shared/seeds/000_251c1be39df953ba.txt; nothing is derived.
Table I (teacher), Table II (weight reduction), Table III (precision on the teacher) and Table IV
(precision on the 8-block student): parameters, accuracy, training seconds per epoch. The paper does not
say on which split its accuracy is measured; Tables III and IV do not restate parameter counts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    table: str
    label: str  # the paper's own name for the model
    parameters: int | None  # None where the table does not print it
    accuracy_pct: float
    seconds_per_epoch: float


# (blocks, precision) → the paper's row. Labels as in section III-C (Table II's "(236, 64, 16)" is an OCR
# slip of the section's "(256, 64, 16)").
ROWS = {
    (12, "fp32"): PaperRow("I", "Teacher model (12 blocks)", 26_534_358, 85.77, 72.32),
    (10, "fp32"): PaperRow("II", "10 blocks, (512, 256, 64, 16)", 6_601_686, 83.23, 68.6),
    (8, "fp32"): PaperRow("II", "8 blocks, (256, 64, 16)", 1_648_470, 86.43, 67.0),
    (6, "fp32"): PaperRow("II", "6 blocks, (128, 64, 16)", 408_854, 85.77, 66.7),
    (4, "fp32"): PaperRow("II", "4 blocks, (64, 32)", 98_294, 84.57, 64.7),
    (12, "fp16"): PaperRow("III", "Teacher model, fp16", None, 85.54, 61.3),
    (12, "fp8"): PaperRow("III", "Teacher model, fp8", None, 86.38, 70.5),
    (8, "fp16"): PaperRow("IV", "8 blocks, fp16", None, 87.00, 60.8),
    (8, "fp8"): PaperRow("IV", "8 blocks, fp8", None, 86.07, 69.0),
}

# The setting the paper's numbers come from (sections III-A and IV-A).
SETTING = {
    "dataset": "Intel Image Classification, ~14,000 training images, 6 classes",
    "image_size": 150,
    "batch_size": 224,
    "epochs": "until early stopping (patience 3)",
    "device": "one NVIDIA GeForce RTX 4070 Laptop GPU",
    "precision": "fp32; fp16 and fp8 via torch.set_default_dtype() and bitsandbytes (section III-D)",
}
CITATION = "Park & Kotla, Tables I–IV"
# Intel Image Classification's classes: the paper's numbers mean something beside runs on this dataset only.
PAPER_CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")


def on_paper_dataset(classes) -> bool:
    """Whether a run's classes are those of the paper's dataset (names in any case, in any order)."""
    return isinstance(classes, list) and sorted(str(c).lower() for c in classes) == list(PAPER_CLASSES)


def reference(model: dict, precision: str) -> PaperRow | None:
    """The paper's row for one of its own architectures (paper_cnn at the default width), else None."""
    args = model.get("args", {})
    if not isinstance(args, dict) or model.get("name") != "paper_cnn" or args.get("width", 16) != 16:
        return None
    blocks = args.get("blocks", 8) if isinstance(args, dict) else None  # 8: paper_cnn's default
    return ROWS.get((blocks, precision)) if isinstance(blocks, int) else None
