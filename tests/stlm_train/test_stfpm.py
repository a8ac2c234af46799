"""STFPM: numerics against a longhand re-statement of the official test()/loss, loaders, one-line errors,
and the shared trainer (selection, resume, DDP) at small sizes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stlm_train import CheckpointError, get_config, load_model, save_checkpoint
from stlm_train.checkpoint import read_file
from stlm_train.modeling import STFPM, stfpm_loss
from tests.stlm_train.helpers import built_stfpm as built_model
from tests.stlm_train.helpers import full_resnet18, official_snapshot, torchvision_sd

def official_test(teacher: nn.Module, student: nn.Module, images: torch.Tensor, cfg) -> tuple[np.ndarray, np.ndarray]:
    """gdwang08/STFPM main.py test() + the reported map, longhand: children 4..6 of a Sequential trunk,
    F.normalize, per-layer squared distance, bilinear to 64, product; cv2.resize to 256; max."""
    mean = torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(1, 3, 1, 1)
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    seq_t, seq_s = nn.Sequential(*teacher.children()), nn.Sequential(*student.children())

    def feats(seq, xi):
        out = []
        for name, module in seq._modules.items():
            xi = module(xi)
            if name in ("4", "5", "6"):
                out.append(xi)
        return out

    maps, scores = [], []
    with torch.no_grad():
        for i in range(x.shape[0]):  # the official loader: batch 1
            t_feat, s_feat = feats(seq_t, x[i:i + 1]), feats(seq_s, x[i:i + 1])
            score_map = 1.0
            for j in range(len(t_feat)):
                t, s = F.normalize(t_feat[j], dim=1), F.normalize(s_feat[j], dim=1)
                sm = torch.sum((t - s) ** 2, 1, keepdim=True)
                sm = F.interpolate(sm, size=(64, 64), mode="bilinear", align_corners=False)
                score_map = score_map * sm
            m = cv2.resize(score_map.squeeze().numpy(), (256, 256))
            maps.append(m)
            scores.append(m.max())
    return np.stack(maps), np.asarray(scores)


@pytest.fixture(scope="module")
def sample_images(sample_dir) -> torch.Tensor:
    from stlm_deploy.preprocess import resize_image

    paths = sorted((sample_dir / "test").glob("*/000.png"))[:2]
    return torch.from_numpy(np.stack([resize_image(cv2.imread(str(p))[..., ::-1], 256) for p in paths]))


def test_predict_matches_the_official_test_longhand(sample_images):
    model = built_model()
    out = model.predict(sample_images)
    ref_maps, ref_scores = official_test(model.teacher, model.student, sample_images, model.cfg)
    assert out.anomaly_map.shape == (2, 256, 256) and out.score.shape == (2,) and out.tlm_map is None
    assert float(np.abs(out.anomaly_map.numpy() - ref_maps).max()) <= 1e-5 * max(1.0, float(ref_maps.max()))
    assert np.abs(out.score.numpy() - ref_scores).max() <= 1e-5 * max(1.0, float(ref_scores.max()))
    assert ref_maps.std() > 0 and abs(float(ref_scores[0] - ref_scores[1])) > 1e-6  # image-dependent


def test_loss_matches_the_official_training_loss():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(3, c, s, s, generator=g) for c, s in ((64, 16), (128, 8), (256, 4))]
    s = [torch.randn(3, c, s, s, generator=g) for c, s in ((64, 16), (128, 8), (256, 4))]
    ref = 0
    for ti, si in zip(t, s):
        ref += torch.sum((F.normalize(ti, dim=1) - F.normalize(si, dim=1)) ** 2, 1).mean()
    assert float(stfpm_loss(t, s)) == pytest.approx(float(ref), rel=1e-6)


def test_teacher_stays_frozen_in_eval_mode_while_the_student_trains():
    model = STFPM(get_config("stfpm", 64)).train()
    assert model.student.training and not model.teacher.training
    assert not any(p.requires_grad for p in model.teacher.parameters())


@pytest.mark.parametrize("with_fc", [True, False], ids=["torchvision", "timm-headless"])
def test_official_snapshot_and_resnet18_teacher_load_to_the_same_model(tmp_path, with_fc):
    teacher, student = full_resnet18(1), full_resnet18(2)
    torch.save(torchvision_sd(teacher, with_fc), tmp_path / "resnet18-f37072fd.pth")
    torch.save(official_snapshot(student), tmp_path / "best.pth.tar")
    loaded = load_model(tmp_path / "best.pth.tar", img_size=64, teacher=tmp_path / "resnet18-f37072fd.pth")
    want = built_model(1, 2, img_size=64)
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.predict(x).anomaly_map, want.predict(x).anomaly_map)
    # a project checkpoint carries the teacher: it reloads without any teacher file
    save_checkpoint(tmp_path / "model.ckpt", loaded)
    again = load_model(tmp_path / "model.ckpt")
    assert isinstance(again, STFPM) and torch.equal(again.predict(x).anomaly_map, want.predict(x).anomaly_map)
    assert read_file(tmp_path / "model.ckpt")["config"]["family"] == "stfpm"


def test_every_bad_file_is_one_line_naming_it(tmp_path):
    teacher, student = full_resnet18(1), full_resnet18(2)
    good_t, snap = tmp_path / "r18.pth", tmp_path / "best.pth.tar"
    torch.save(torchvision_sd(teacher), good_t)
    torch.save(official_snapshot(student), snap)
    bad_shape = torchvision_sd(teacher)
    bad_shape["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    extra = official_snapshot(student)
    extra["state_dict"]["model.9.weight"] = torch.zeros(1)
    missing = official_snapshot(student)
    missing["state_dict"] = {k: v for k, v in missing["state_dict"].items() if not k.startswith("model.5.")}
    cases = {
        "shape.pth": (bad_shape, dict(teacher=None), r"wrong shapes: layer2\.0\.conv1\.weight"),
        "extra.pth": (extra, dict(teacher=good_t), r"unexpected keys model\.9"),
        "missing.pth": (missing, dict(teacher=good_t), r"missing keys model\.5\."),
    }
    for name, (obj, kw, pattern) in cases.items():
        torch.save(obj, tmp_path / name)
        target = tmp_path / name
        if name == "shape.pth":  # a bad teacher file, loaded for a good snapshot
            kw, target = dict(teacher=tmp_path / name), snap
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_model(target, img_size=64, **kw)
        assert "\n" not in str(e.value) and str(tmp_path / name) in str(e.value)
    with pytest.raises(CheckpointError, match=r"needs its ImageNet teacher") as e:
        load_model(snap)
    assert str(snap) in str(e.value)
    with pytest.raises(CheckpointError, match=r"not a ResNet-18 state dict"):
        load_model(snap, teacher=snap)
    (tmp_path / "trunc.pth").write_bytes(good_t.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"trunc\.pth: not a readable PyTorch checkpoint"):
        load_model(snap, teacher=tmp_path / "trunc.pth")


# --------------------------------------------------------------------------------------- training
def _opts(data: str, out, **kw):
    from stlm_train.training import TrainOptions

    base = dict(data=data, out=str(out), config="stfpm", img_size=64, steps=4, batch_size=2, progress=False,
                evaluate=False, save_every=0)
    base.update(kw)
    return TrainOptions(**base)


def test_stfpm_trains_selects_and_resumes_to_the_uninterrupted_weights(sample_dir, tmp_path):
    from stlm_train.training import train

    straight = train(_opts(str(sample_dir), tmp_path / "a", evaluate=True))
    ckpt = read_file(tmp_path / "a" / "model.ckpt")
    info = ckpt["train"]
    assert info["model_family"] == "stfpm" and info["optimizers"]["student"]["lr"] == 0.4
    assert info["teacher"]["kind"] == "builtin" and info["teacher"]["seed"] == 1000
    assert set(info["losses"]["last"]) == {"layer1", "layer2", "layer3", "total"}
    sel = info["selection"]
    errs = dict((int(s), e) for s, e in sel["validations"])
    assert sel["selected_step"] in errs and sel["validation_error"] == pytest.approx(min(errs.values()))
    assert straight.metrics["model_family"] == "stfpm" and straight.metrics["tlm"] is None
    assert "image" in straight.thresholds and "tlm_image" not in straight.thresholds
    # the checkpoint holds the selected student, not necessarily the last one
    assert load_model(tmp_path / "a" / "model.ckpt").student.state_dict().keys() == straight.model.student.state_dict().keys()

    train(_opts(str(sample_dir), tmp_path / "b", steps=2))
    resumed = train(_opts(str(sample_dir), tmp_path / "b", steps=4, resume=True), explicit={"steps", "resume"})
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-6
    assert read_file(tmp_path / "b" / "model.ckpt")["train"]["selection"]["validations"] == sel["validations"]


def test_stfpm_distributed_two_processes_end_identical(sample_dir, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from stlm_train.training import TrainOptions, train
        out = sys.argv[1]
        r = train(TrainOptions(data={str(sample_dir)!r}, out=out, config="stfpm", img_size=64, steps=2,
                               batch_size=1, progress=False, evaluate=False, save_every=0))
        torch.save({{k: v.detach().clone() for k, v in r.model.state_dict().items()}},
                   os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
    """))
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], env=dict(os.environ), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    ckpt = read_file(out / "model.ckpt")
    assert ckpt["train"]["world_size"] == 2 and ckpt["train"]["model_family"] == "stfpm"


def test_stlm_eval_reports_the_one_map_of_an_official_snapshot(sample_dir, tmp_path, capsys):
    import json

    from stlm_train.cli import eval_main

    torch.save(torchvision_sd(full_resnet18(1)), tmp_path / "r18.pth")
    torch.save(official_snapshot(full_resnet18(2)), tmp_path / "best.pth.tar")
    out = tmp_path / "eval.json"
    code = eval_main(["--ckpt", str(tmp_path / "best.pth.tar"), "--teacher", str(tmp_path / "r18.pth"), "--data",
                      str(sample_dir), "--img-size", "64", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "STFPM" in text and "TLM" not in text
    res = json.loads(out.read_text())
    assert res["model_family"] == "stfpm" and res["tlm"] is None and 0.0 <= res["fa"]["i_auroc"] <= 1.0
    assert eval_main(["--ckpt", str(tmp_path / "best.pth.tar"), "--data", str(sample_dir)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs its ImageNet teacher" in err[0]


def test_a_checkpoint_config_of_an_unknown_family_or_foreign_fields_is_one_line(tmp_path):
    model = STFPM(get_config("stfpm", 64))
    for name, change, pattern in (("fam.ckpt", {"family": "patchcore"}, r"unknown model family 'patchcore'"),
                                  ("fields.ckpt", {"fa_head": {}}, r"unknown STFPMConfig fields \['fa_head'\]")):
        save_checkpoint(tmp_path / name, model)
        obj = read_file(tmp_path / name)
        obj["config"].update(change)
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_model(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: invalid 'config'") and "\n" not in str(e.value)


def test_stfpm_amp_bf16_on_cpu_runs_with_finite_losses(sample_dir, tmp_path, monkeypatch):
    import stlm_train.training.stfpm_step as step
    from stlm_train.training import train

    real, dtypes = step.stfpm_loss, []

    def spy(teacher, student):  # the loss sees fp32 features though the networks ran under bf16 autocast
        dtypes.append({t.dtype for t in (*teacher, *student)})
        return real(teacher, student)

    monkeypatch.setattr(step, "stfpm_loss", spy)
    r = train(_opts(str(sample_dir), tmp_path / "amp", steps=1, amp=True))
    assert dtypes and all(d == {torch.float32} for d in dtypes)
    assert set(r.losses) == {"layer1", "layer2", "layer3", "total"}
    assert all(np.isfinite(v) for v in r.losses.values())
    assert all(torch.isfinite(p).all() for p in r.model.parameters())
