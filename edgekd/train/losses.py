"""Loss functions: pure, computed in fp32 whatever precision the forward pass ran in.

A label of -1 marks an unlabeled image (data.unlabeled, or a label hidden by data.label_fraction): the
cross-entropy averages over the labelled rows only, the distillation terms use every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


Mixed = tuple[Tensor, float]  # a mixed batch's labels: each row's partner's label, and λ (its own share)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
            alpha: float, label_smoothing: float = 0.0, mixed: Mixed | None = None) -> Tensor:
    """Hinton's distillation loss, as both seeds write it:

        α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, y)

    KL with batchmean reduction (the true KL divergence per sample); T² keeps the soft term's gradient
    scale independent of T. α = 1 is seed 000's pure KL; seed 001 uses α = 0.25, T = 2. The KL averages over
    every row, the CE over the labelled rows (see ce_loss); on a mixed batch the CE is the mixed labels'.
    """
    s = student_logits.float()
    t = teacher_logits.float()
    soft = torch.zeros((), device=s.device)
    if alpha > 0:
        log_p_student = F.log_softmax(s / temperature, dim=1)
        log_p_teacher = F.log_softmax(t / temperature, dim=1)
        soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    hard = ce_loss(s, targets, label_smoothing, mixed) if alpha < 1 else torch.zeros((), device=s.device)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard


def ce_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, mixed: Mixed | None = None) -> Tensor:
    """Cross-entropy averaged over the labelled rows; rows labelled -1 (unlabeled) take no part, and a batch
    without a labelled row gives 0 (with a graph, so backward still runs). A mixed batch (mixup, cutmix)
    learns λ·CE(own label) + (1 − λ)·CE(partner's label): see mixed_ce_loss."""
    if mixed is not None:
        return mixed_ce_loss(logits, targets, mixed[0], mixed[1], label_smoothing)
    logits = logits.float()
    labeled = targets >= 0
    # One host sync per batch, so that an all-labelled batch runs exactly the original computation.
    if bool(labeled.all()):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    if not bool(labeled.any()):
        return logits[:0].sum()  # 0, and no 0/0 mean
    return F.cross_entropy(logits[labeled], targets[labeled], label_smoothing=label_smoothing)


def mixed_ce_loss(logits: Tensor, targets: Tensor, partner_targets: Tensor, lam: float,
                  label_smoothing: float = 0.0) -> Tensor:
    """λ·CE(y_a) + (1 − λ)·CE(y_b) per row, averaged over the labelled weight: a side labelled -1 adds
    nothing (never a -1 into the CE) and its weight leaves the mean, so a row whose partner is unlabeled
    learns its own label's part alone, and an all-labelled batch is the usual mean of the two CEs."""
    logits = logits.float()
    total, weight = logits[:0].sum(), 0.0  # 0 with a graph: a batch without a label still runs backward
    for labels, share in ((targets, lam), (partner_targets, 1.0 - lam)):
        known = labels >= 0
        count = int(known.sum())
        if count and share > 0:
            total = total + share * F.cross_entropy(logits[known], labels[known], label_smoothing=label_smoothing,
                                                    reduction="sum")
            weight += share * count
    return total / weight if weight > 0 else total


def dkd_term(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
             alpha: float, beta: float) -> Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022, Eq. 7): KD split into what it says about the target class and
    what it says about the others, weighted separately,

        DKD = α·TCKD + β·NCKD,  TCKD = KL(b_t ‖ b_s),  NCKD = KL(p̂_t ‖ p̂_s)

    where b = (p_target, 1 − p_target) is the binary target/non-target split of softmax(z/T) and p̂ the
    softmax over the non-target classes only; both terms × T² and averaged over the batch, as in the
    authors' code. The training loss adds a full-weight cross-entropy.

    An unlabeled row (target -1) has no target class, yet the split needs one: it takes the teacher's top
    class, the label the teacher would give it. Then, as for a correctly classified labelled image, TCKD
    teaches the teacher's confidence and NCKD its ranking of the other classes (dark knowledge); any other
    choice would split off a class the teacher does not believe in.
    """
    targets = torch.where(targets >= 0, targets, teacher_logits.argmax(1))
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    target = F.one_hot(targets, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
    b_s = torch.stack([p_s[target], 1 - p_s[target]], dim=1).clamp_min(1e-12)
    b_t = torch.stack([p_t[target], 1 - p_t[target]], dim=1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean()
    # Non-target softmax: the target logit pushed to -inf drops it from the normalisation.
    log_q_s = F.log_softmax(s.masked_fill(target, float("-inf")), dim=1)
    log_q_t = F.log_softmax(t.masked_fill(target, float("-inf")), dim=1)
    q_t = log_q_t.exp()
    nckd = (q_t * (log_q_t - log_q_s)).masked_fill(target, 0.0).sum(1).mean()
    return temperature ** 2 * (alpha * tckd + beta * nckd)


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_term(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float,
              gamma: float) -> Tensor:
    """DIST (Huang et al., NeurIPS 2022, Eq. 6–9): match the teacher's relations rather than its exact
    probabilities, with Pearson correlation ρ of Y = softmax(Z/τ) (batch × classes),

        inter = 1 − mean_i ρ(Y_s[i, :], Y_t[i, :])    (each image's ranking of the classes)
        intra = 1 − mean_j ρ(Y_s[:, j], Y_t[:, j])    (each class's ranking of the images)
        DIST  = τ²·(β·inter + γ·intra)

    The training loss adds a full-weight cross-entropy.
    """
    y_s = F.softmax(student_logits.float() / temperature, dim=1)
    y_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.T, y_t.T).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, config,
                 label_smoothing: float = 0.0, ramp: float = 1.0, mixed: Mixed | None = None) -> Tensor:
    """The training loss of `distill.method` (config is the recipe's DistillConfig); `ramp` (0–1) scales the
    distillation term during its warm-up. Targets of -1 (unlabeled rows) reach the distillation term only.
    `mixed`: a mixed batch's partner labels and λ, for the label term (dkd, which needs one target class,
    is refused with mixing when the recipe loads)."""
    if config.method == "kd":  # during warm-up the weight moves from cross-entropy to the KD term
        return kd_loss(student_logits, teacher_logits, targets, config.temperature, config.alpha * min(ramp, 1.0),
                       label_smoothing, mixed)
    if config.method == "dkd":
        term = dkd_term(student_logits, teacher_logits, targets, config.temperature, config.dkd_alpha,
                        config.dkd_beta)
    else:
        term = dist_term(student_logits, teacher_logits, config.temperature, config.dist_beta, config.dist_gamma)
    return ce_loss(student_logits, targets, label_smoothing, mixed) + ramp * term
