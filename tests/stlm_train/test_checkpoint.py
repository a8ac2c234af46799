"""Key-compatible loading of official STLM / SAM / MobileSAM layouts and one-line checkpoint errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from stlm_train import STLM, CheckpointError, get_config, load_model, load_official_stlm, save_checkpoint
from stlm_train.checkpoint.stlm import _vit_variant
from stlm_train.checkpoint import (MOBILE_SAM_STUDENT_KEYMAP, OFFICIAL_STLM_KEYMAP, SAM_TEACHER_KEYMAP,
                                   init_students_from_mobile_sam, load_teacher, official_state_dict)
from stlm_train.config import SAM_VIT_CONFIGS
from stlm_train.modeling import build_tinyvit_teacher, build_vit_teacher

from .helpers import randomize

KEYS_TSV = Path(__file__).resolve().parents[1] / "data" / "official_stlm_state_dict_keys.tsv"


def official_layout(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A state dict with exactly the official key names and shapes (from the reference list), random values."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, torch.Tensor]] = {"twostream": {}, "segmentation_net": {}}
    for line in KEYS_TSV.read_text().splitlines():
        top, key, shape, dtype = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        if dtype == "int64":
            out[top][key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            out[top][key] = 0.5 + torch.rand(dims, generator=g)
        else:
            out[top][key] = 0.1 * torch.randn(dims, generator=g)
    return out


@pytest.fixture(scope="module")
def official_sd():
    return official_layout()


def test_reference_key_list_has_1105_keys(official_sd):
    assert sum(len(v) for v in official_sd.values()) == 1105


def test_official_round_trip(official_sd):
    model = load_official_stlm(official_sd, img_size=256)
    back = official_state_dict(model)
    used = 0
    for top, sd in back.items():
        for k, v in sd.items():
            assert torch.equal(v, official_sd[top][k]), k
            used += 1
    # what is not carried over is exactly the documented dead weight
    dropped = [f"{t}.{k}" for t in official_sd for k in official_sd[t] if k not in back[t]]
    assert len(dropped) == 1105 - used
    assert all(any(d.startswith(p) for p in OFFICIAL_STLM_KEYMAP.ignore) for d in dropped)
    assert not any(d.startswith(("twostream.encoderT.layers", "segmentation_net.", "twostream.model.mask_decoder.transformer.layers"))
                   for d in dropped)
    assert "twostream.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" not in dropped
    # the student streams map to the right modules
    assert torch.equal(model.plain.patch_embed.seq[0].c.weight,
                       official_sd["twostream"]["encoderT.patch_embed.seq.0.c.weight"])
    assert torch.equal(model.denoising.neck[0].weight, official_sd["twostream"]["encoderS.neck.0.weight"])


def test_load_model_reads_official_file(tmp_path, official_sd):
    p = tmp_path / "official.pth"
    torch.save(official_sd, p)
    model = load_model(p, img_size=128)
    assert model.cfg.img_size == 128 and not model.training
    assert torch.equal(model.fa_head.head[4].weight, official_sd["segmentation_net"]["head.4.weight"])


def test_project_checkpoint_round_trip(tmp_path):
    m = randomize(STLM(get_config("small")), 4).eval()
    p = save_checkpoint(tmp_path / "run" / "model.ckpt", m, thresholds={"image": 0.5, "pixel": 0.4})
    m2 = load_model(p)
    x = torch.randint(0, 256, (1, 128, 128, 3), dtype=torch.uint8)
    assert torch.equal(m.predict(x).anomaly_map, m2.predict(x).anomaly_map)
    assert m2.cfg == m.cfg
    assert not list(p.parent.glob(".*tmp"))  # atomic write left no temp file


def test_sam_teacher_key_layout(tmp_path, monkeypatch):
    import stlm_train.checkpoint.stlm as checkpoint  # where the teacher loaders read files

    reads: list[str] = []
    real_read = checkpoint.read_file
    monkeypatch.setattr(checkpoint, "read_file", lambda path: (reads.append(str(path)), real_read(path))[1])
    teacher = randomize(build_vit_teacher(SAM_VIT_CONFIGS["vit_b"], 256), 5)
    sd = SAM_TEACHER_KEYMAP.invert(teacher.state_dict())
    sd["mask_decoder.iou_prediction_head.layers.0.weight"] = torch.zeros(256, 256)  # dead parts are accepted
    sd["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)
    assert "image_encoder.blocks.11.attn.rel_pos_h" in sd and "mask_decoder.transformer.layers.1.norm4.bias" in sd
    p = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sd, p)
    loaded = load_teacher(p, get_config("paper", 256))
    assert reads == [str(p)]  # the SAM file (up to 2.5 GB) is read once, not once to sniff and once to load
    assert loaded.kind == "sam_vit_b"
    assert torch.equal(loaded.encoder.pos_embed, teacher.encoder.pos_embed)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        f1, f2 = loaded(x)
    assert f1.shape == f2.shape == (1, 256, 16, 16)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_sam_variant_detected_from_shapes(name):
    vit = SAM_VIT_CONFIGS[name]
    sd = {"image_encoder.patch_embed.proj.weight": torch.empty(vit.embed_dim, 3, 1, 1)}
    sd.update({f"image_encoder.blocks.{i}.norm1.weight": torch.empty(1) for i in range(vit.depth)})
    assert _vit_variant(sd, "x.pth") == name


def test_mobile_sam_initialises_both_students_and_decoder(tmp_path):
    cfg = get_config("paper", 256)
    mobile = randomize(build_tinyvit_teacher(cfg), 6)
    sd = MOBILE_SAM_STUDENT_KEYMAP.invert({("plain." + k[len("encoder."):] if k.startswith("encoder.") else k): v
                                           for k, v in mobile.state_dict().items()})
    sd["image_encoder.head.weight"] = torch.zeros(1000, 320)
    sd["mask_decoder.output_upscaling.0.weight"] = torch.zeros(256, 64, 2, 2)
    p = tmp_path / "mobile_sam.pt"
    torch.save(sd, p)
    model = init_students_from_mobile_sam(STLM(cfg), p)
    for a, b in zip(model.plain.state_dict().values(), mobile.encoder.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(model.denoising.state_dict().values(), mobile.encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(model.decoder.mask_tokens.weight, mobile.decoder.mask_tokens.weight)


# ---- one-line errors that name the file and the keys ----

def _save(tmp_path, obj, name="bad.pth"):
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_error_wrong_file_type(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a readable PyTorch checkpoint") as e:
        load_model(p)
    assert "\n" not in str(e.value)


def test_error_truncated(tmp_path, official_sd):
    good = _save(tmp_path, official_sd, "full.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable PyTorch checkpoint"):
        load_model(cut)


def test_error_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such checkpoint file"):
        load_model(tmp_path / "nope.pth")


def test_error_not_stlm(tmp_path):
    p = _save(tmp_path, {"model": {}})
    with pytest.raises(CheckpointError, match=r"bad\.pth: not a model checkpoint"):
        load_model(p)


def test_error_missing_key_group(tmp_path, official_sd):
    sd = {t: dict(v) for t, v in official_sd.items()}
    for k in [k for k in sd["twostream"] if k.startswith("encoderS.layers.2.")]:
        del sd["twostream"][k]
    with pytest.raises(CheckpointError, match=r"bad\.pth: missing keys twostream\.encoderS\.layers\.2\.\*") as e:
        load_model(_save(tmp_path, sd))
    assert "\n" not in str(e.value)


def test_error_unexpected_keys(tmp_path, official_sd):
    sd = {t: dict(v) for t, v in official_sd.items()}
    sd["twostream"]["extra_branch.conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"bad\.pth: unexpected keys twostream\.extra_branch\.conv\.\*"):
        load_model(_save(tmp_path, sd))


def test_error_wrong_shape(tmp_path, official_sd):
    sd = {t: dict(v) for t, v in official_sd.items()}
    sd["segmentation_net"]["res.0.conv1.weight"] = torch.zeros(128, 448, 3, 3)
    with pytest.raises(CheckpointError, match=r"bad\.pth: wrong shapes: fa_head\.res\.0\.conv1\.weight "
                                               r"\(128, 448, 3, 3\) \(expected \(128, 512, 3, 3\)\)"):
        load_model(_save(tmp_path, sd))


def test_error_wrong_image_size(tmp_path, official_sd):
    p = _save(tmp_path, official_sd)
    with pytest.raises(CheckpointError, match=r"bad\.pth: img_size must be a positive multiple of 64.*300"):
        load_model(p, img_size=300)


def test_error_newer_project_format(tmp_path):
    m = STLM(get_config("small"))
    p = save_checkpoint(tmp_path / "m.ckpt", m)
    obj = torch.load(p, weights_only=True)
    obj["format_version"] = 99
    torch.save(obj, p)
    with pytest.raises(CheckpointError, match=r"m\.ckpt: checkpoint format_version 99 is newer"):
        load_model(p)


# ---- issue 12 item 9: a pickle that would run code is refused without running it ----

class _Payload:
    """Unpickling this calls Path.touch(marker): code execution, as a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, writer):
    import pickle
    import subprocess
    import sys

    from stlm_train.checkpoint import read_file, read_file_and_sha256

    marker = tmp_path / "code-ran"
    evil = tmp_path / "model.ckpt"
    payload = {"format": "stlm-checkpoint", "state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)
    for reader in (read_file, read_file_and_sha256):
        with pytest.raises(CheckpointError) as ei:
            reader(evil)
        assert str(ei.value).startswith(f"{evil}: not a readable PyTorch checkpoint") and "\n" not in str(ei.value)
        assert not marker.exists(), "the payload ran while the checkpoint was being refused"
    p = subprocess.run([sys.executable, "-m", "stlm_export.cli", "--ckpt", str(evil), "--out", str(tmp_path / "e")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and not marker.exists() and "Traceback" not in p.stderr, p.stderr
    assert len([ln for ln in p.stderr.splitlines() if ln.startswith("Error")]) == 1
    # the control: a loader that trusts the file does run the payload
    pickle.loads(evil.read_bytes()) if writer == "pickle" else torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fa_input", ["absdiff", "product+tlm", "tlm"])
def test_only_the_official_fa_head_has_an_official_layout(fa_input):
    """An absdiff or TLM-prior model would be misread by the official code: converting it is refused."""
    from dataclasses import replace

    with pytest.raises(ValueError, match=f"fa_input='{re.escape(fa_input)}'"):
        official_state_dict(STLM(replace(get_config("small"), fa_input=fa_input)))
