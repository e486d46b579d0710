"""Loss functions: pure, computed in fp32 whatever precision the forward pass ran in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
            alpha: float) -> Tensor:
    """Hinton's distillation loss, as both seeds write it:

        α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, y)

    KL with batchmean reduction (the true KL divergence per sample); T² keeps the soft term's gradient
    scale independent of T. α = 1 is seed 000's pure KL; seed 001 uses α = 0.25, T = 2.
    """
    s = student_logits.float()
    t = teacher_logits.float()
    soft = torch.zeros((), device=s.device)
    if alpha > 0:
        log_p_student = F.log_softmax(s / temperature, dim=1)
        log_p_teacher = F.log_softmax(t / temperature, dim=1)
        soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    hard = F.cross_entropy(s, targets) if alpha < 1 else torch.zeros((), device=s.device)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard


def ce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets)
