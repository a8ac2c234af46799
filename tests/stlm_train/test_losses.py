"""STLM losses: hand-computed values on tiny tensors, invariances, and where gradients go."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stlm_train import STLM, get_config
from stlm_train.losses import (LossTerms, cosine_distance_loss, focal_loss, l1_loss, mask_to_feature_size,
                               soft_dice_loss, stlm_loss)
from stlm_train.modeling import build_builtin_teacher
from stlm_train.training import TrainGraph, teacher_features


def _feat(rows: list[list[float]]) -> torch.Tensor:
    """Per-position channel vectors -> (1, C, 1, W)."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, len(rows[0]), 1, len(rows))


def test_cosine_loss_known_values():
    # level 1: positions (1,0)v(1,0) -> 0 and (0,1)v(1,0) -> 1: mean 0.5
    # level 2: (2,0)v(-1,0) -> 1-(-1) = 2 and (3,4)v(4,3) -> 1-24/25 = 0.04: mean 1.02
    s = [_feat([[1, 0], [0, 1]]), _feat([[2, 0], [3, 4]])]
    t = [_feat([[1, 0], [1, 0]]), _feat([[-1, 0], [4, 3]])]
    assert cosine_distance_loss(s, t).item() == pytest.approx(0.5 + 1.02, abs=1e-6)
    assert cosine_distance_loss(s[:1], t[:1]).item() == pytest.approx(0.5, abs=1e-7)


def test_cosine_loss_mean_over_batch_and_positions_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(3, 8, 4, 5, generator=g), torch.randn(3, 8, 4, 5, generator=g)]
    t = [torch.randn(3, 8, 4, 5, generator=g), torch.randn(3, 8, 4, 5, generator=g)]
    ref = sum((1 - F.cosine_similarity(a, b, dim=1, eps=0)).mean() for a, b in zip(s, t))
    assert cosine_distance_loss(s, t).item() == pytest.approx(ref.item(), abs=1e-5)
    scaled = cosine_distance_loss([3.0 * x for x in s], [0.5 * x for x in t])
    assert scaled.item() == pytest.approx(ref.item(), abs=1e-5)


def test_cosine_loss_identical_inputs_is_zero():
    g = torch.Generator().manual_seed(1)
    f = [torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)]
    assert abs(cosine_distance_loss(f, [x.clone() for x in f]).item()) < 1e-6


def test_cosine_loss_shape_errors():
    with pytest.raises(ValueError, match="levels"):
        cosine_distance_loss([torch.zeros(1, 2, 1, 1)], [])
    with pytest.raises(ValueError, match="student"):
        cosine_distance_loss([torch.zeros(1, 2, 1, 1)], [torch.zeros(1, 3, 1, 1)])


def test_focal_and_l1_known_values():
    # p = 0.5, y = 1: BCE = ln 2, p_t = 0.5, (1 - p_t)^4 = 1/16
    # p = 0.9, y = 0: BCE = -ln 0.1, p_t = 0.1, (0.9)^4 = 0.6561
    p = torch.tensor([0.5, 0.9])
    y = torch.tensor([1.0, 0.0])
    expected = (math.log(2) / 16 + -math.log(0.1) * 0.6561) / 2
    assert focal_loss(p, y).item() == pytest.approx(expected, rel=1e-6)
    assert focal_loss(p, y, gamma=0).item() == pytest.approx((math.log(2) - math.log(0.1)) / 2, rel=1e-6)
    assert l1_loss(p, y).item() == pytest.approx((0.5 + 0.9) / 2, rel=1e-6)


def test_focal_matches_official_formula():
    g = torch.Generator().manual_seed(2)
    p = torch.rand(2, 1, 4, 4, generator=g)
    y = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    # official model/losses.py focal_loss(alpha=-1, gamma=4, reduction="mean")
    ce = F.binary_cross_entropy(p, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    assert focal_loss(p, y).item() == pytest.approx((ce * (1 - p_t) ** 4).mean().item(), rel=1e-6)
    assert focal_loss(y, y).item() == 0.0  # perfect prediction


def test_mask_resized_bilinear_and_rebinarised_at_half():
    m = torch.zeros(1, 4, 4)
    m[0, :2, :2] = 1  # full 2x2 block -> 1.0
    m[0, 0, 2:] = 1  # half of the block -> exactly 0.5 -> 1 (official: where(mask < 0.5, 0, 1))
    m[0, 3, 3] = 1  # a quarter -> 0.25 -> 0
    out = mask_to_feature_size(m, (2, 2))
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert mask_to_feature_size(m[:, None], (2, 2)).equal(out)
    with pytest.raises(ValueError):
        mask_to_feature_size(torch.zeros(4, 4), (2, 2))


def _streams(g: torch.Generator) -> list[list[torch.Tensor]]:
    """Random two-level features for the plain and denoising students and the teacher on I_a and N."""
    return [[torch.randn(2, 8, 4, 4, generator=g) for _ in range(2)] for _ in range(4)]


def test_stlm_loss_pairs_streams_with_the_right_teacher_and_sums_equally():
    g = torch.Generator().manual_seed(3)
    plain, den, t_pseudo, t_clean = _streams(g)
    prob = torch.rand(2, 1, 4, 4, generator=g)
    mask = torch.zeros(2, 64, 64)
    mask[:, :32, :32] = 1
    terms = stlm_loss(plain, den, t_pseudo, t_clean, prob, mask)
    assert isinstance(terms, LossTerms)
    target = mask_to_feature_size(mask, (4, 4))
    assert terms.plain.item() == pytest.approx(cosine_distance_loss(plain, t_pseudo).item(), abs=1e-6)
    assert terms.denoising.item() == pytest.approx(cosine_distance_loss(den, t_clean).item(), abs=1e-6)
    assert terms.focal.item() == pytest.approx(focal_loss(prob, target).item(), abs=1e-7)
    assert terms.l1.item() == pytest.approx(l1_loss(prob, target).item(), abs=1e-7)
    assert terms.total.item() == pytest.approx(sum(terms[:4]).item(), abs=1e-6)
    assert set(terms.as_floats()) == {"plain", "denoising", "focal", "l1", "total"}


def test_focal_only_fa_loss_leaves_l1_out_of_the_total_but_reports_it():
    """fa_loss "focal": the total is L_p + L_de + L_focal; L1 is still computed (logged) but sends no gradient."""
    g = torch.Generator().manual_seed(5)
    plain, den, t_pseudo, t_clean = _streams(g)
    logits = torch.randn(2, 1, 4, 4, generator=g, requires_grad=True)
    mask = torch.zeros(2, 64, 64)
    mask[:, 16:48, 16:48] = 1
    full = stlm_loss(plain, den, t_pseudo, t_clean, torch.sigmoid(logits), mask)
    focal = stlm_loss(plain, den, t_pseudo, t_clean, torch.sigmoid(logits), mask, l1=False)
    assert focal.l1.item() == pytest.approx(full.l1.item()) and focal.l1.item() > 0
    assert focal.total.item() == pytest.approx((focal.plain + focal.denoising + focal.focal).item(), abs=1e-6)
    assert full.total.item() - focal.total.item() == pytest.approx(full.l1.item(), abs=1e-6)
    (g_focal,) = torch.autograd.grad(focal.total, logits, retain_graph=True)
    (g_only,) = torch.autograd.grad(focal.focal, logits)
    assert torch.allclose(g_focal, g_only)


def test_soft_dice_known_values_and_clean_samples():
    """Per sample 1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1), averaged over the samples with a region only."""
    y = torch.zeros(3, 1, 2, 2)
    y[0, 0, 0, :] = 1  # region of 2 pixels
    y[1, 0, :, :] = 1  # whole image
    p = torch.zeros(3, 1, 2, 2)
    p[0, 0, 0, 0] = 1.0  # covers half the region: 1 - (2 + 1) / (1 + 2 + 1) = 0.25
    p[1] = 0.5  # 1 - (4 + 1) / (2 + 4 + 1) = 2/7
    p[2] = 0.9  # a clean sample: left out, however high its map
    assert soft_dice_loss(p, y).item() == pytest.approx((0.25 + 2 / 7) / 2, abs=1e-6)
    assert soft_dice_loss(y[:2], y[:2]).item() == pytest.approx(0.0, abs=1e-7)
    # a batch of clean samples: zero, and still differentiable
    q = torch.full((2, 1, 2, 2), 0.3, requires_grad=True)
    out = soft_dice_loss(q, torch.zeros(2, 1, 2, 2))
    assert out.item() == 0.0 and out.requires_grad
    # pixels left out by a weight count in none of the sums: sample 0 with its uncovered pixel left out is perfect
    w = torch.ones(3, 1, 2, 2)
    w[0, 0, 0, 1] = 0
    assert soft_dice_loss(p[:1], y[:1], w[:1]).item() == pytest.approx(0.0, abs=1e-7)


def test_dice_weighs_a_missed_region_by_its_share_not_its_area():
    """Why the Dice term exists: the per-pixel focal + L1 means charge a missed region by its area, so a small
    pasted region the head ignores costs about 1/16 of a large one; Dice charges both about the same."""
    def missed(size: int) -> torch.Tensor:
        y = torch.zeros(1, 1, 16, 16)
        y[..., :size, :size] = 1
        return y

    small, large = missed(2), missed(8)  # 4 and 64 cells
    silent = torch.full((1, 1, 16, 16), 0.02)  # the head fires nowhere
    per_pixel = lambda y: (focal_loss(silent, y) + l1_loss(silent, y)).item()  # noqa: E731
    assert per_pixel(large) / per_pixel(small) > 10
    assert soft_dice_loss(silent, large).item() / soft_dice_loss(silent, small).item() < 1.5


def test_dice_fa_loss_adds_the_term_to_the_total_and_reports_it():
    """dice=True: total = L_p + L_de + L_focal + L_l1 + L_dice, ``dice`` reported; the default reports no dice."""
    g = torch.Generator().manual_seed(7)
    plain, den, t_pseudo, t_clean = _streams(g)
    prob = torch.rand(2, 1, 4, 4, generator=g)
    mask = torch.zeros(2, 64, 64)
    mask[0, 16:48, 16:48] = 1  # sample 1 clean
    base = stlm_loss(plain, den, t_pseudo, t_clean, prob, mask)
    with_dice = stlm_loss(plain, den, t_pseudo, t_clean, prob, mask, dice=True)
    target = mask_to_feature_size(mask, (4, 4))
    assert with_dice.dice.item() == pytest.approx(soft_dice_loss(prob[:1], target[:1]).item(), abs=1e-6)
    assert with_dice.total.item() == pytest.approx(base.total.item() + with_dice.dice.item(), abs=1e-6)
    assert set(with_dice.as_floats()) == {"plain", "denoising", "focal", "l1", "total", "dice"}
    assert base.dice is None and "dice" not in base.as_floats()


def test_fa_weights_keep_only_pixels_where_mask_and_teacher_change_agree():
    """fa_target "changed": a masked pixel counts when the teacher moved there, an unmasked one when it did
    not; clean samples (no change anywhere) keep every pixel."""
    from stlm_train.losses import fa_weights

    change = torch.full((2, 1, 4, 4), 0.1)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2, :2] = 1
    change[0, 0, 0, 0] = 0.5  # masked, changed: kept
    change[0, 0, 1, 1] = 0.1  # masked, unchanged: left out
    change[0, 0, 3, 3] = 0.9  # unmasked, changed (the paste moved its neighbour): left out
    change[1] = 0.0  # a clean sample
    w = fa_weights(change, target)
    assert w[0, 0, 0, 0] == 1 and w[0, 0, 1, 1] == 0 and w[0, 0, 3, 3] == 0 and w[0, 0, 2, 2] == 1
    assert w[0].sum() == 16 - 3 - 1  # three unchanged masked pixels and the changed neighbour dropped
    assert torch.all(w[1] == 1)


def test_fa_target_changed_counts_only_the_kept_pixels_in_the_fa_terms():
    """The FA terms under "changed" are the weighted means (left-out pixels add zero); the official "mask" rule
    and the distillation terms are unchanged, and an unknown rule is an error."""
    from stlm_train.losses import fa_weights, teacher_change

    g = torch.Generator().manual_seed(7)
    rnd = lambda: [torch.randn(2, 8, 4, 4, generator=g) for _ in range(2)]  # noqa: E731
    plain, den, t_clean = rnd(), rnd(), rnd()
    t_pseudo = [t.clone() for t in t_clean]
    for t in t_pseudo:
        t[0, :, :2, :2] = torch.randn(8, 2, 2, generator=g)  # the paste moves the teacher in one corner
    prob = torch.sigmoid(torch.randn(2, 1, 4, 4, generator=g))
    mask = torch.zeros(2, 64, 64)
    mask[0, :32, :48] = 1  # wider than where the teacher moved
    target = mask_to_feature_size(mask, (4, 4))
    w = fa_weights(teacher_change(t_pseudo, t_clean, (4, 4)), target)
    assert 0 < w.sum() < w.numel() and torch.all(w[1] == 1)
    changed = stlm_loss(plain, den, t_pseudo, t_clean, prob, mask, fa_target="changed")
    official = stlm_loss(plain, den, t_pseudo, t_clean, prob, mask)
    assert changed.focal.item() == pytest.approx(focal_loss(prob, target, weight=w).item(), abs=1e-7)
    assert changed.l1.item() == pytest.approx(l1_loss(prob, target, weight=w).item(), abs=1e-7)
    assert changed.l1.item() < official.l1.item() and changed.plain.item() == official.plain.item()
    with pytest.raises(ValueError, match="fa_target must be mask or changed"):
        stlm_loss(plain, den, t_pseudo, t_clean, prob, mask, fa_target="teacher")


def test_gradients_reach_students_decoder_and_fa_head_but_not_the_teacher():
    cfg = get_config("small", 64)
    torch.manual_seed(0)
    model = STLM(cfg).train()
    teacher = build_builtin_teacher(cfg, 0).eval()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (2, 64, 64, 3), generator=g, dtype=torch.uint8)
    pseudo = clean.clone()
    pseudo[0, :32, :32] = 255 - pseudo[0, :32, :32]
    mask = torch.zeros(2, 64, 64)
    mask[0, :32, :32] = 1
    same = (clean == pseudo).flatten(1).all(1)
    t_pseudo, t_clean = teacher_features(teacher, model.normalize(clean), model.normalize(pseudo), same)
    assert not any(t.requires_grad for t in (*t_pseudo, *t_clean))
    plain, den, logits = TrainGraph(model)(model.normalize(pseudo))
    terms = stlm_loss(plain, den, t_pseudo, t_clean, torch.sigmoid(logits), mask)
    terms.total.backward()
    for name, part in (("plain", model.plain), ("denoising", model.denoising), ("decoder", model.decoder),
                       ("fa_head.res", model.fa_head.res), ("fa_head.head", model.fa_head.head)):
        grads = [p.grad for p in part.parameters()]
        assert all(gr is not None for gr in grads), name
        assert sum(float(gr.abs().sum()) for gr in grads) > 0, name
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_teacher_features_one_call_equals_separate_calls():
    cfg = get_config("small", 64)
    teacher = build_builtin_teacher(cfg, 0).eval()
    g = torch.Generator().manual_seed(4)
    xc, xp = torch.randn(3, 3, 64, 64, generator=g), torch.randn(3, 3, 64, 64, generator=g)
    xp[1] = xc[1]  # no anomaly pasted on sample 1
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    same = torch.tensor([False, True, False])
    t_pseudo, t_clean = teacher_features(teacher, xc, xp, same)
    assert calls == [5]  # one call: 3 clean + the 2 pseudo images that differ
    with torch.no_grad():
        ref_p, ref_c = teacher(xp), teacher(xc)
    for a, b in zip((*t_pseudo, *t_clean), (*ref_p, *ref_c)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
