"""STLM training losses (paper eqs. 2-8, official ``model/losses.py`` + ``trainSTLM.py``).

- Distillation, per stream: ``sum_k mean_{b,i,j}(1 - <l2n(S_k), l2n(T_k)>)`` over the two feature
  levels (plain stream vs the teacher on I_a, denoising stream vs the teacher on the clean N).
- FA head: focal loss (gamma 4, built on BCE of the sigmoid output, mean) + L1 (mean) against the
  pseudo mask resized bilinearly to the feature size and re-binarised at 0.5.
- Total: the four terms with equal weights.
- ``dice=True`` (``fa_loss="focal+l1+dice"``, not the official code): a soft Dice term on the FA output over
  the samples that carry a pseudo mask is added to the total. Focal and L1 are per-pixel means, so a missed
  region costs in proportion to its area and small pasted regions hardly count; Dice is the share of each
  region covered, whatever its size (measured in README, "Localisation").
- ``fa_target="changed"`` (not the official code): the FA terms count only the pixels where the pseudo
  mask and the teacher agree (a masked pixel whose teacher features changed, an unmasked one whose
  features did not, :func:`fa_weights`); the rest is left out, so the head is never asked to fire where
  the students have nothing to disagree on, nor to stay silent where the paste moved the teacher.

All losses are computed in float32 (cast on the way in), so they can sit outside an autocast region.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .modeling.stlm import cosine_distance_map


class LossTerms(NamedTuple):
    """The four loss terms and their equal-weight sum, each a 0-d tensor."""

    plain: torch.Tensor  # L_p: Sp(I_a) vs T(I_a)
    denoising: torch.Tensor  # L_de: Sd(I_a) vs T(N)
    focal: torch.Tensor  # focal loss on the FA output
    l1: torch.Tensor  # L1 on the FA output
    total: torch.Tensor
    dice: torch.Tensor | None = None  # the soft Dice term, when the FA loss has one (in ``total`` then)

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in self._asdict().items() if v is not None}


def cosine_distance_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k mean(1 - <l2n(S_k), l2n(T_k)>)``; mean over batch and positions (official sum / (b h w)).

    Teacher features are detached: no gradient ever reaches the teacher through this loss.
    """
    if len(student) != len(teacher):
        raise ValueError(f"cosine_distance_loss: {len(student)} student levels vs {len(teacher)} teacher levels")
    total = None
    for s, t in zip(student, teacher):  # each (B, C, h, w)
        if s.shape != t.shape:
            raise ValueError(f"cosine_distance_loss: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        term = torch.mean(cosine_distance_map(s.float(), t.detach().float()))
        total = term if total is None else total + term
    if total is None:
        raise ValueError("cosine_distance_loss: no feature levels")
    return total


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 4.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Official focal loss: ``mean(BCE(p, y) * (1 - p_t)^gamma)``, ``p_t = p y + (1 - p)(1 - y)``.

    ``prob`` is the sigmoid output (not logits), as in the official code; BCE clamps log at -100.
    ``weight`` (same shape, 0/1): pixels left out count as zero in the mean (the scale stays the official one).
    """
    prob, target = prob.float(), target.float()
    ce = F.binary_cross_entropy(prob, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    term = ce * (1 - p_t) ** gamma
    return torch.mean(term if weight is None else term * weight)


def l1_loss(prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(|p - y|)`` (``weight`` as in :func:`focal_loss`)."""
    if weight is None:
        return F.l1_loss(prob.float(), target.float(), reduction="mean")
    return torch.mean((prob.float() - target.float()).abs() * weight)


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                   smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s)`` per sample, averaged over the samples whose target is
    not empty (a clean sample has no region to cover; the focal term already keeps its map low); 0 when none.

    ``weight`` (0/1, as in :func:`focal_loss`) leaves pixels out of all three sums."""
    prob, target = prob.float().flatten(1), target.float().flatten(1)
    if weight is not None:
        w = weight.float().flatten(1)
        prob, target = prob * w, target * w
    has_region = (target.sum(dim=1) > 0).to(prob.dtype)
    inter = (prob * target).sum(dim=1)
    dice = 1 - (2 * inter + smooth) / (prob.sum(dim=1) + target.sum(dim=1) + smooth)
    # no host sync (no branch on the data): a batch of clean samples gives 0 and keeps the graph
    return (dice * has_region).sum() / has_region.sum().clamp(min=1.0)


#: ``fa_weights``: a pixel's teacher features "changed" when their change exceeds this factor times the
#: median change over the image's unmasked pixels, and at least MIN_TEACHER_CHANGE (clean samples: none).
CHANGE_FACTOR = 2.0
MIN_TEACHER_CHANGE = 0.01


@torch.no_grad()
def teacher_change(teacher_pseudo: Sequence[torch.Tensor], teacher_clean: Sequence[torch.Tensor],
                   size: tuple[int, int]) -> torch.Tensor:
    """``sum_k (1 - <l2n(T_k(I_a)), l2n(T_k(N))>)`` at ``size`` -> (B, 1, h, w): where the paste moved the teacher."""
    total = None
    for tp, tc in zip(teacher_pseudo, teacher_clean):
        d = cosine_distance_map(tp.float(), tc.float())
        if tuple(d.shape[-2:]) != tuple(size):
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    if total is None:
        raise ValueError("teacher_change: no feature levels")
    return total


@torch.no_grad()
def fa_weights(change: torch.Tensor, target: torch.Tensor, factor: float = CHANGE_FACTOR) -> torch.Tensor:
    """1 where the mask and the teacher agree (masked and changed, or unmasked and unchanged), else 0.

    ``change`` and ``target`` (B, 1, h, w). The reference level is each image's median change over its
    unmasked pixels (over all pixels when the mask covers the image)."""
    b = change.shape[0]
    flat, outside = change.flatten(1), (target == 0).flatten(1)
    outside_only = torch.where(outside, flat, torch.full_like(flat, float("nan")))
    ref = torch.nanmedian(outside_only, dim=1).values
    ref = torch.where(torch.isnan(ref), flat.median(dim=1).values, ref)
    level = torch.clamp(factor * ref, min=MIN_TEACHER_CHANGE).view(b, 1, 1, 1)
    changed = change > level
    return (changed == (target > 0)).to(torch.float32)


def mask_to_feature_size(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) mask -> (B, 1, h, w) in {0, 1}: bilinear (align_corners=False), >= 0.5."""
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask: expected (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    small = F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False)
    return (small >= 0.5).to(torch.float32)


def stlm_loss(
    plain: Sequence[torch.Tensor],
    denoising: Sequence[torch.Tensor],
    teacher_pseudo: Sequence[torch.Tensor],
    teacher_clean: Sequence[torch.Tensor],
    fa_prob: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 4.0,
    l1: bool = True,
    fa_target: str = "mask",
    dice: bool = False,
) -> LossTerms:
    """All four terms. ``fa_prob`` (B, 1, h, w) is the FA sigmoid output at feature resolution;
    ``mask`` the pseudo mask at image resolution (B, H, W) or already (B, 1, h, w).

    ``l1=False`` leaves the L1 term out of ``total`` (it is still reported). On a pseudo-normal pixel with
    output p the L1 gradient on the logit is about p (as BCE's), the focal loss's (gamma 4) about 5 p^5: with
    L1 every low output keeps being pushed down, the head's low end flattens and the map loses its ranking of
    the weak student disagreement real defects cause (measured in README, "Localisation"). ``dice=True`` adds
    :func:`soft_dice_loss` to ``total`` (reported as ``dice``)."""
    size = tuple(fa_prob.shape[-2:])
    target = mask_to_feature_size(mask, size)
    weight = None
    if fa_target == "changed":
        weight = fa_weights(teacher_change(teacher_pseudo, teacher_clean, size), target)
    elif fa_target != "mask":
        raise ValueError(f"fa_target must be mask or changed, got {fa_target!r}")
    lp = cosine_distance_loss(plain, teacher_pseudo)
    lde = cosine_distance_loss(denoising, teacher_clean)
    lf = focal_loss(fa_prob, target, gamma, weight)
    l1_term = l1_loss(fa_prob, target, weight)
    total = lp + lde + lf + (l1_term if l1 else 0.0)
    if not dice:
        return LossTerms(lp, lde, lf, l1_term, total)
    dice_term = soft_dice_loss(fa_prob, target, weight)
    return LossTerms(lp, lde, lf, l1_term, total + dice_term, dice_term)


__all__ = ["LossTerms", "cosine_distance_loss", "fa_weights", "focal_loss", "l1_loss", "mask_to_feature_size",
           "soft_dice_loss", "stlm_loss", "teacher_change"]
