"""The distillation losses against hand computations from their papers' definitions (pure Python math)."""

import math
from types import SimpleNamespace

import pytest
import torch

from edgekd.train.losses import ce_loss, dist_term, distill_loss, dkd_term, kd_loss

STUDENT = [[1.0, 2.0, 0.5, -0.5], [0.0, -1.0, 3.0, 1.0]]
TEACHER = [[2.0, 1.0, 0.0, 0.5], [0.5, 0.5, 2.0, -1.0]]
LABELS = [1, 2]


def _softmax(row, T):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _tensors():
    return torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)


def test_dkd_matches_the_papers_decomposition():
    T, alpha, beta = 2.0, 1.0, 8.0
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(STUDENT, TEACHER, LABELS):
        p_s, p_t = _softmax(s_row, T), _softmax(t_row, T)
        tckd += _kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        # p̂: softmax over the non-target classes only
        others = [j for j in range(len(s_row)) if j != y]
        q_s = _softmax([s_row[j] for j in others], T)
        q_t = _softmax([t_row[j] for j in others], T)
        nckd += _kl(q_t, q_s)
    n = len(STUDENT)
    expected = T * T * (alpha * tckd / n + beta * nckd / n)
    assert dkd_term(*_tensors(), T, alpha, beta).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_with_equal_weights_of_one_recovers_classic_kd_up_to_the_target_share():
    # The paper's Eq. 5: KD = TCKD + (1 - p_t^target) * NCKD.
    s, t, y = _tensors()
    T = 3.0
    p_t = torch.softmax(t / T, 1)[torch.arange(2), y]
    tckd = dkd_term(s, t, y, T, 1.0, 0.0)
    per_sample_nckd = [dkd_term(s[i:i + 1], t[i:i + 1], y[i:i + 1], T, 0.0, 1.0) for i in range(2)]
    rebuilt = tckd + sum((1 - p_t[i]) * per_sample_nckd[i] for i in range(2)) / 2
    assert rebuilt.item() == pytest.approx(kd_loss(s, t, y, T, 1.0).item(), rel=1e-5)


def _pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (z - mb) for x, z in zip(a, b))
    return cov / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((z - mb) ** 2 for z in b)))


def test_dist_matches_inter_and_intra_class_pearson_correlation():
    T, beta, gamma = 2.0, 1.0, 2.0
    y_s = [_softmax(row, T) for row in STUDENT]
    y_t = [_softmax(row, T) for row in TEACHER]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(y_s, y_t)) / len(y_s)
    columns = range(len(STUDENT[0]))
    intra = 1 - sum(_pearson([r[j] for r in y_s], [r[j] for r in y_t]) for j in columns) / len(columns)
    expected = T * T * (beta * inter + gamma * intra)
    s, t, _ = _tensors()
    assert dist_term(s, t, T, beta, gamma).item() == pytest.approx(expected, rel=1e-5)


def test_dist_is_zero_only_when_the_student_matches_the_teacher():
    t = torch.tensor(TEACHER)
    assert dist_term(t, t, 1.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-5)  # fp32 rounding
    assert dist_term(torch.tensor(STUDENT), t, 1.0, 1.0, 1.0).item() > 0.05


def _config(method, **extra):
    values = {"method": method, "temperature": 2.0, "alpha": 0.5, "dkd_alpha": 1.0, "dkd_beta": 8.0,
              "dist_beta": 1.0, "dist_gamma": 1.0}
    return SimpleNamespace(**{**values, **extra})


@pytest.mark.parametrize("method", ["dkd", "dist"])
def test_dkd_and_dist_add_their_term_to_a_full_cross_entropy(method):
    s, t, y = _tensors()
    config = _config(method)
    term = (dkd_term(s, t, y, 2.0, 1.0, 8.0) if method == "dkd" else dist_term(s, t, 2.0, 1.0, 1.0))
    smoothed_ce = ce_loss(s, y, 0.1)
    assert distill_loss(s, t, y, config, 0.1).item() == pytest.approx((smoothed_ce + term).item(), rel=1e-6)
    # During the warm-up ramp only the distillation term is scaled.
    assert distill_loss(s, t, y, config, 0.1, ramp=0.25).item() == pytest.approx(
        (smoothed_ce + 0.25 * term).item(), rel=1e-6)


def test_label_smoothing_applies_to_the_hard_term_of_kd():
    s, t, y = _tensors()
    n_classes, eps = 4, 0.2
    expected_ce = 0.0
    for row, label in zip(STUDENT, LABELS):
        log_p = [math.log(p) for p in _softmax(row, 1.0)]
        target = [eps / n_classes + (1 - eps) * (j == label) for j in range(n_classes)]
        expected_ce -= sum(q * lp for q, lp in zip(target, log_p))
    expected_ce /= len(STUDENT)
    assert kd_loss(s, t, y, 2.0, 0.0, label_smoothing=eps).item() == pytest.approx(expected_ce, rel=1e-6)


# ----- unlabeled rows (label -1): the distillation terms see them, the cross-entropy does not -------------------

UNLABELED_STUDENT = [0.5, -2.0, 1.5, 0.0]
UNLABELED_TEACHER = [-1.0, 0.0, 0.5, 3.0]


def _with_unlabeled_row():
    s = torch.tensor([*STUDENT, UNLABELED_STUDENT], requires_grad=True)
    t = torch.tensor([*TEACHER, UNLABELED_TEACHER])
    return s, t, torch.tensor([*LABELS, -1])


def test_kd_gradient_of_an_unlabeled_row_is_the_kd_term_alone():
    T, alpha = 2.0, 0.5
    s, t, y = _with_unlabeled_row()
    kd_loss(s, t, y, T, alpha).backward()
    rows = [*STUDENT, UNLABELED_STUDENT]
    teacher_rows = [*TEACHER, UNLABELED_TEACHER]
    batch, labelled = len(rows), len(LABELS)
    for i, (s_row, t_row) in enumerate(zip(rows, teacher_rows)):
        # d/ds of α·T²·mean_i KL(p_t ‖ p_s) at temperature T: α·T/B·(p_s − p_t)
        expected = [alpha * T / batch * (ps - pt) for ps, pt in zip(_softmax(s_row, T), _softmax(t_row, T))]
        if i < labelled:  # d/ds of (1 − α)·mean over labelled rows of CE: (1 − α)/n·(softmax(s) − onehot(y))
            expected = [e + (1 - alpha) / labelled * (p - (j == LABELS[i]))
                        for j, (e, p) in enumerate(zip(expected, _softmax(s_row, 1.0)))]
        assert s.grad[i].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_kd_loss_with_an_unlabeled_row_is_kl_over_all_rows_plus_ce_over_the_labelled():
    T, alpha = 2.0, 0.5
    s, t, y = _with_unlabeled_row()
    rows = [*STUDENT, UNLABELED_STUDENT]
    kl = sum(_kl(_softmax(t_row, T), _softmax(s_row, T)) for s_row, t_row in zip(rows, [*TEACHER, UNLABELED_TEACHER]))
    ce = -sum(math.log(_softmax(row, 1.0)[label]) for row, label in zip(STUDENT, LABELS))
    expected = alpha * T * T * kl / len(rows) + (1 - alpha) * ce / len(LABELS)
    assert kd_loss(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-6)
    # Whatever the unlabeled image really shows, the loss cannot tell: no label of it is read.
    assert ce_loss(s, y).item() == pytest.approx(ce / len(LABELS), rel=1e-6)


def test_an_all_unlabeled_batch_gives_zero_cross_entropy_and_finite_gradients():
    s = torch.tensor(STUDENT, requires_grad=True)
    t, y = torch.tensor(TEACHER), torch.tensor([-1, -1])
    assert ce_loss(s, y).item() == 0.0
    for method in ("kd", "dkd", "dist"):
        s.grad = None
        loss = distill_loss(s, t, y, _config(method), 0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, method
    s.grad = None
    ce_loss(s, y).backward()
    assert s.grad.abs().sum().item() == 0.0


def test_dkd_splits_an_unlabeled_row_at_the_teachers_top_class():
    s, t, y = _with_unlabeled_row()
    pseudo = torch.tensor([*LABELS, int(torch.tensor(UNLABELED_TEACHER).argmax())])
    assert torch.equal(dkd_term(s, t, y, 2.0, 1.0, 8.0), dkd_term(s, t, pseudo, 2.0, 1.0, 8.0))


@pytest.mark.parametrize("method", ["dkd", "dist"])
def test_dkd_and_dist_cross_entropy_skips_unlabeled_rows(method):
    s, t, y = _with_unlabeled_row()
    config = _config(method)
    term = dkd_term(s, t, y, 2.0, 1.0, 8.0) if method == "dkd" else dist_term(s, t, 2.0, 1.0, 1.0)
    labelled_ce = ce_loss(s[:2], y[:2], 0.1)
    assert distill_loss(s, t, y, config, 0.1).item() == pytest.approx((labelled_ce + term).item(), rel=1e-6)


def test_without_unlabeled_rows_the_losses_are_bit_identical_to_the_plain_formulas():
    s, t, y = _tensors()
    assert torch.equal(ce_loss(s, y, 0.1), torch.nn.functional.cross_entropy(s, y, label_smoothing=0.1))
    plain_kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.log_softmax(t / 2, 1),
                                          reduction="batchmean", log_target=True)
    plain = 0.5 * 4.0 * plain_kl + 0.5 * torch.nn.functional.cross_entropy(s, y)
    assert torch.equal(kd_loss(s, t, y, 2.0, 0.5), plain)


def test_a_mixed_label_term_weighs_both_labels_and_never_feeds_an_unlabeled_one_to_the_ce():
    import torch.nn.functional as F

    from edgekd.train.losses import mixed_ce_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    own, partner = torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 1])
    both = 0.7 * F.cross_entropy(logits, own) + 0.3 * F.cross_entropy(logits, partner)
    torch.testing.assert_close(ce_loss(logits, own, mixed=(partner, 0.7)), both)
    # row 1's partner and row 3 itself are unlabeled: only the labelled sides count, each at its share
    own_u, partner_u = torch.tensor([0, 1, 2, -1]), torch.tensor([2, -1, 1, 1])
    ce = F.cross_entropy(logits, torch.tensor([0, 1, 2, 1]), reduction="none")
    ce_b = F.cross_entropy(logits, torch.tensor([2, 0, 1, 1]), reduction="none")
    expected = (0.7 * ce[:3].sum() + 0.3 * (ce_b[0] + ce_b[2] + ce_b[3])) / (0.7 * 3 + 0.3 * 3)
    torch.testing.assert_close(mixed_ce_loss(logits, own_u, partner_u, 0.7), expected)
    nobody = torch.full((4,), -1)
    assert float(mixed_ce_loss(logits.requires_grad_(), nobody, nobody, 0.5).detach()) == 0.0
    # with alpha 1 the KD loss never reaches the label term: any labels give the same loss
    teacher = torch.randn(4, 3)
    a = kd_loss(logits, teacher, own, 1.0, 1.0, mixed=(partner, 0.7))
    b = kd_loss(logits, teacher, nobody, 1.0, 1.0, mixed=(torch.tensor([1, 1, 1, 1]), 0.2))
    assert torch.equal(a, b)
