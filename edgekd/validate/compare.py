"""Accuracy and agreement of a variant against the PyTorch fp32 original, and the gate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    exp = np.exp(z - z.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy per class (NaN for a class with no image in the split)."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[c] = (predicted[mask] == c).mean()
    return out


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
    """Every accuracy column of a row: against the labels and against the reference logits."""
    predicted, expected = logits.argmax(1), reference.argmax(1)
    accuracy = float((predicted == labels).mean())
    reference_accuracy = float((expected == labels).mean())
    class_change = (per_class_accuracy(predicted, labels, len(class_names))
                    - per_class_accuracy(expected, labels, len(class_names)))
    worst = int(np.nanargmin(class_change)) if not np.all(np.isnan(class_change)) else 0
    delta_prob = np.abs(softmax(logits) - softmax(reference))
    return {"accuracy": accuracy, "accuracy_change_pts": 100 * (accuracy - reference_accuracy),
            "agreement": float((predicted == expected).mean()),
            "max_abs_dprob": float(delta_prob.max()), "mean_abs_dprob": float(delta_prob.mean()),
            "worst_class": class_names[worst],
            "worst_class_change_pts": float(100 * np.nan_to_num(class_change[worst]))}


@dataclass
class Gate:
    max_drop_pts: dict[str, float]  # per precision
    min_agreement: float

    def failures(self, row: dict) -> list[str]:
        """Why a row breaks the thresholds (empty when it passes)."""
        reasons = []
        if not np.isfinite(row["max_abs_dprob"]):
            reasons.append("outputs are not finite (NaN or inf)")
        limit = self.max_drop_pts[row["precision"]]
        if -row["accuracy_change_pts"] > limit + 1e-9:
            reasons.append(f"accuracy drop {-row['accuracy_change_pts']:.2f} pts > {limit:g}")
        if row["agreement"] < self.min_agreement:
            reasons.append(f"agreement {row['agreement']:.4f} < {self.min_agreement:g}")
        return reasons
