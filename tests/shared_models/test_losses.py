"""Each loss against a small case computed by hand (plain Python math, not the code under test)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from shared_models import losses


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def ce(logits_row, target):
    return -logits_row[target] + math.log(sum(math.exp(z) for z in logits_row))


def test_clip_loss_matches_hand_computation():
    v = t([[1.0, 0.0], [0.0, 1.0]])
    w = t([[0.6, 0.8], [1.0, 0.0]])
    scale = torch.tensor(2.0, dtype=torch.float64)
    # logits = 2 * v @ w.T = [[1.2, 2.0], [1.6, 0.0]]
    rows = [[1.2, 2.0], [1.6, 0.0]]
    cols = [[1.2, 1.6], [2.0, 0.0]]
    expected = 0.5 * ((ce(rows[0], 0) + ce(rows[1], 1)) / 2 + (ce(cols[0], 0) + ce(cols[1], 1)) / 2)
    assert losses.clip_loss(v, w, scale).item() == pytest.approx(expected, abs=1e-12)


def test_clip_loss_is_symmetric_in_volume_and_text():
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    w = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    assert losses.clip_loss(v, w, scale).item() == pytest.approx(losses.clip_loss(w, v, scale).item(), abs=1e-6)


def test_clip_loss_is_minimal_for_matched_pairs():
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    matched = losses.clip_loss(v, v, scale).item()
    for perm in itertools.permutations(range(4)):
        if list(perm) != [0, 1, 2, 3]:
            assert losses.clip_loss(v, v[list(perm)], scale).item() > matched


def test_siglip_loss_matches_hand_computation():
    v = t([[1.0, 0.0], [0.0, 1.0]])
    w = t([[1.0, 0.0], [0.6, 0.8]])
    scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    # logits = 3 * v @ w.T - 1 = [[2.0, 0.8], [-1.0, 1.4]]
    logits = [[2.0, 0.8], [-1.0, 1.4]]
    log_sig = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
    total = sum(log_sig(logits[i][j] if i == j else -logits[i][j]) for i in range(2) for j in range(2))
    assert losses.siglip_loss(v, w, scale, bias).item() == pytest.approx(-total / 2, abs=1e-12)


def test_opposite_sentence_loss_matches_hand_computation():
    v = t([[1.0, 0.0], [0.0, 1.0]])
    pos = t([[1.0, 0.0], [0.6, 0.8]])
    neg = t([[0.0, 1.0], [0.8, 0.6]])
    scale = torch.tensor(5.0, dtype=torch.float64)
    # pair 0: [5*1, 5*0]; pair 1: [5*0.8, 5*0.6]
    expected = (ce([5.0, 0.0], 0) + ce([4.0, 3.0], 0)) / 2
    assert losses.opposite_sentence_loss(v, pos, neg, scale).item() == pytest.approx(expected, abs=1e-12)
    # swapping the polarity of every pair makes the loss larger
    assert losses.opposite_sentence_loss(v, neg, pos, scale).item() > expected


def test_opposite_sentence_loss_without_pairs_is_zero_and_differentiable():
    scale = torch.tensor(2.0, requires_grad=True)
    empty = torch.zeros(0, 4)
    loss = losses.opposite_sentence_loss(empty, empty, empty, scale)
    loss.backward()
    assert loss.item() == 0.0 and scale.grad is not None


def test_multiview_loss_matches_hand_computation_and_stops_prototype_gradient():
    views = t([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]]]).requires_grad_(True)  # [B=2, M=2, E=2]
    prototypes = t([[1.0, 0.0], [0.0, 1.0]]).requires_grad_(True)
    scale = torch.tensor(2.0, dtype=torch.float64)
    # rows (view -> prototypes): [2, 0] t0, [1.2, 1.6] t0, [0, 2] t1, [1.6, 1.2] t1
    expected = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 0) + ce([0.0, 2.0], 1) + ce([1.6, 1.2], 1)) / 4
    loss = losses.multiview_loss(views, prototypes, scale)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert prototypes.grad is None and views.grad.abs().sum() > 0


def test_mae_loss_counts_masked_patches_only():
    target = t([[[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]]])  # [1, L=3, P=2]
    pred = t([[[0.0, 0.0], [5.0, 5.0], [1.0, 1.0]]])
    mask = t([[1.0, 0.0, 1.0]])
    # raw targets: patch 0 mse ((0-1)^2 + (0-3)^2)/2 = 5; patch 2: ((1-0)^2 + (1-4)^2)/2 = 5
    assert losses.mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(5.0)
    changed = pred.clone()
    changed[0, 1] = torch.tensor([-100.0, 100.0])  # an unmasked patch: no effect
    assert losses.mae_loss(changed, target, mask, norm_pix_loss=False).item() == pytest.approx(5.0)
    # normalized targets: patch 0 -> [-1, 1] (mean 2, std 1); patch 2 -> [-1, 1] (mean 2, std 2)
    eps_scale = 1 / math.sqrt(1 + 1e-6)
    p0 = ((0 + eps_scale) ** 2 + (0 - eps_scale) ** 2) / 2
    p2 = ((1 + 1 / math.sqrt(1 + 0.25e-6)) ** 2 + (1 - 1 / math.sqrt(1 + 0.25e-6)) ** 2) / 2
    assert losses.mae_loss(pred, target, mask).item() == pytest.approx((p0 + p2) / 2, abs=1e-9)


def test_report_generation_loss_shifts_and_ignores_padding():
    logits = torch.log(t([[[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]]]))  # [1, T=3, V=3]
    labels = torch.tensor([[0, 1, -100]])
    # position 0 predicts label 1 (p = 0.7); position 1 would predict -100: ignored
    assert losses.report_generation_loss(logits, labels).item() == pytest.approx(-math.log(0.7), abs=1e-6)


def test_findings_loss_respects_mask():
    logits = t([[0.0, 2.0], [-1.0, 3.0]])
    labels = t([[1.0, 0.0], [0.0, 1.0]])
    mask = t([[1.0, 0.0], [1.0, 1.0]])
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))  # noqa: E731
    expected = (bce(0.0, 1) + bce(-1.0, 0) + bce(3.0, 1)) / 3
    assert losses.findings_loss(logits, labels, mask).item() == pytest.approx(expected, abs=1e-6)
    unmasked = (bce(0.0, 1) + bce(2.0, 0) + bce(-1.0, 0) + bce(3.0, 1)) / 4
    assert losses.findings_loss(logits, labels).item() == pytest.approx(unmasked, abs=1e-6)  # float32 inside
