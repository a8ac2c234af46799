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


def test_trainer_teacher_shares_no_tensor_with_the_students_init(tmp_path):
    """Teacher independence: built as a run builds it, no teacher tensor equals a student's initial one
    (with the students' own seed, 109 of 217 encoder tensors did and the FA map learned nothing)."""
    from stlm_train.modeling import STLM
    from stlm_train.training import TrainOptions, build_teacher

    cfg = get_config("small")
    opts = TrainOptions(data="builtin", out=str(tmp_path), config="small", seed=5)
    torch.manual_seed(opts.seed)
    student = STLM(cfg)
    teacher, desc = build_teacher(opts, cfg, lambda: iter([_images(2, cfg.img_size, 0)]), torch.device("cpu"),
                                  log=lambda s: None)
    assert desc["seed"] == 5 + 1000 and desc["recipe"] == "local"  # the default recipe
    student_tensors = [t for t in student.plain.state_dict().values() if t.is_floating_point() and t.numel() > 8]
    shared = [k for k, t in teacher.encoder.state_dict().items()
              if t.is_floating_point() and any(t.shape == s.shape and torch.equal(t, s) for s in student_tensors)]
    assert shared == []
    # the coupled set-up of the first trainer (teacher seeded like the students) is what this guards against
    coupled = build_builtin_teacher(cfg, seed=5, recipe="v1")
    same = [k for k, t in coupled.encoder.state_dict().items()
            if t.is_floating_point() and t.numel() > 8 and any(t.shape == s.shape and torch.equal(t, s)
                                                               for s in student_tensors)]
    assert len(same) > 10


def test_builtin_teacher_reference_recipe_draws_every_free_parameter():
    cfg = get_config("small")
    t = build_builtin_teacher(cfg, seed=1)
    torch.manual_seed(1)
    official = build_tinyvit_teacher(cfg)  # the same init before the recipe
    zero = {n for n, m in official.named_modules()
            if isinstance(m, torch.nn.Linear) and m.bias is not None and not m.bias.any()}
    linear_biases = [m.bias for n, m in t.named_modules() if n in zero]
    assert len(linear_biases) > 5 and all(b.abs().max() > 0 for b in linear_biases)
    std = torch.cat([b.flatten() for b in linear_biases]).std()
    assert 0.01 < float(std) < 0.04  # N(0, 0.02)
    att = torch.cat([m.attention_biases.flatten() for m in t.modules() if hasattr(m, "attention_biases")])
    assert 0.35 < float(att.std()) < 0.65  # N(0, 0.5)
    norms = [m for m in t.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))]
    w = torch.cat([m.weight.flatten() for m in norms])
    assert float(w.min()) >= 0.5 and float(w.max()) <= 1.5
    # the global RNG is untouched: building a teacher never shifts what the students draw next
    torch.manual_seed(3)
    a = torch.rand(4)
    torch.manual_seed(3)
    build_builtin_teacher(cfg, seed=9)
    assert torch.equal(a, torch.rand(4))


def test_calibrate_batchnorm_runs_only_batchnorm_in_train_mode():
    cfg = get_config("small")
    teacher = build_builtin_teacher(cfg, seed=0)
    modes = []
    hook = teacher.encoder.register_forward_hook(lambda m, i, o: modes.append(m.training))
    calibrate_batchnorm(teacher, [_images(2, cfg.img_size, 0)])
    hook.remove()
    assert modes == [False] and not teacher.training


def test_student_init_teacher_copies_the_tinyvit_teacher_and_refuses_a_vit():
    """--student-init teacher: both students and the decoder compute the teacher's features at the start (up to
    float order: the decoder runs on both streams stacked); a SAM ViT teacher has nothing to copy: one line."""
    import pytest

    from stlm_train.config import ViTConfig
    from stlm_train.modeling import STLM
    from stlm_train.modeling.teacher import build_vit_teacher
    from stlm_train.training import TrainError
    from stlm_train.training.teachers import init_students_from_teacher

    cfg = get_config("small")
    torch.manual_seed(0)
    model, teacher = STLM(cfg).eval(), build_builtin_teacher(cfg, 1000).eval()
    x = _images(2, cfg.img_size, 1)
    with torch.no_grad():
        before = model.student_features(x)[0][1]
        init_students_from_teacher(model, teacher)
        (p1, p2), (d1, d2) = model.student_features(x)
        t1, t2 = teacher(x)
    assert float((before - t2).abs().max()) > 0.1  # random students differ from the teacher
    for ours, theirs in ((p1, t1), (p2, t2), (d1, t1), (d2, t2)):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert all(p.requires_grad for p in model.plain.parameters())  # still trainable; the teacher stays frozen
    vit = build_vit_teacher(ViTConfig(embed_dim=32, depth=1, num_heads=2, global_attn_indexes=(0,)), cfg.img_size,
                            cfg.decoder)
    with pytest.raises(TrainError, match="--student-init teacher: the sam teacher's encoder is ImageEncoderViT"):
        init_students_from_teacher(model, vit)
