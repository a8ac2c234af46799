"""The built-in weightless teacher: deterministic, and informative only after its randomisation."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stlm_train import get_config
from stlm_train.modeling import build_builtin_teacher, build_tinyvit_teacher, calibrate_batchnorm, l2n


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields (normalised NCHW), a stand-in for natural training images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1) * 255
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return (x - mean) / std


def _cos_distance(teacher, a, b) -> float:
    with torch.no_grad():
        fa, fb = teacher(a)[1], teacher(b)[1]
    return float((1 - (l2n(fa) * l2n(fb)).sum(1)).mean())


def test_builtin_teacher_is_deterministic_from_its_seed():
    cfg = get_config("small")
    a, b, c = (build_builtin_teacher(cfg, s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_calibrated_builtin_teacher_features_depend_on_the_image():
    cfg = get_config("paper", 128)
    train = _images(8, 128, 0)
    x1, x2 = _images(2, 128, 1).split(1)
    torch.manual_seed(0)
    official_init = build_tinyvit_teacher(cfg).eval()
    uncalibrated = build_builtin_teacher(cfg, seed=0).eval()
    teacher = build_builtin_teacher(cfg, seed=0)
    assert calibrate_batchnorm(teacher, train.split(4)) == 8
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    d_official = _cos_distance(official_init, x1, x2)
    d_builtin = _cos_distance(teacher, x1, x2)
    assert d_official < 0.05  # the useless teacher of DESIGN.md
    assert abs(_cos_distance(uncalibrated, x1, x2)) < 1e-3  # randomised norms alone are not enough
    assert d_builtin > 5 * d_official and d_builtin > 0.2
    # calibration really changed the statistics away from the defaults
    bn = teacher.encoder.patch_embed.seq[0].bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert np.isfinite(d_builtin)
