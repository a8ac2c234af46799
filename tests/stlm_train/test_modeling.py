"""Numbers for the STLM graph: parameter counts, batch invariance, maps and scores at 256 and 512."""
from __future__ import annotations

import pytest
import torch

from stlm_train import STLM, get_config
from stlm_train.modeling import FeatureDecoder, TinyViT, topk_score

from .helpers import naive_reference, randomize


def test_parameter_counts_match_the_paper_configuration():
    m = STLM(get_config("paper"))
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(m.plain) == count(m.denoising) == 5_743_892
    assert count(m.decoder) == 3_160_576
    assert count(m.fa_head) == 1_870_465
    assert count(m) == 16_518_825  # every parameter of STLM reaches the map


@pytest.mark.parametrize("img_size,feat", [(64, 4), (128, 8), (256, 16), (320, 20)])
def test_tinyvit_any_multiple_of_64(img_size, feat):
    enc = TinyViT(get_config("small").student, img_size, out_chans=64).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 3, img_size, img_size))
    assert out.shape == (1, 64, feat, feat)


def test_img_size_must_be_multiple_of_64():
    with pytest.raises(ValueError, match="multiple of 64.*300"):
        get_config("paper", 300)


def test_batched_decoder_equals_per_image_calls():
    cfg = get_config("small")
    dec = randomize(FeatureDecoder(cfg.decoder), 3).eval()
    emb = torch.randn(4, cfg.decoder.dim, 8, 8)
    with torch.no_grad():
        f1, f2 = dec(emb)
        singles = [dec(emb[i:i + 1]) for i in range(4)]
    assert torch.equal(f1, emb)  # feature1 is the embedding before the no-mask embedding is added
    assert torch.allclose(f2, torch.cat([s[1] for s in singles]), atol=1e-5)


def test_batch_invariance_small():
    m = randomize(STLM(get_config("small")), 1).eval()
    imgs = torch.randint(0, 256, (3, 128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = m.predict(imgs)
    for i in range(3):
        one = m.predict(imgs[i:i + 1])
        assert torch.allclose(one.anomaly_map[0], batch.anomaly_map[i], atol=1e-5)
        assert torch.allclose(one.score[0], batch.score[i], atol=1e-6)
        assert torch.allclose(one.tlm_map[0], batch.tlm_map[i], atol=1e-5)


@pytest.fixture(scope="module")
def paper_weights():
    return randomize(STLM(get_config("paper", 256)), 7).state_dict()


@pytest.mark.parametrize("img_size", [256, 512])
def test_paper_model_matches_naive_reference(paper_weights, img_size):
    """Fused/batched implementation == the official longhand evaluation, at 256 and 512."""
    m = STLM(get_config("paper", img_size))
    m.load_state_dict(paper_weights)  # weights do not depend on the image size
    m.eval()
    g = torch.Generator().manual_seed(img_size)
    imgs = torch.randint(0, 256, (2, img_size, img_size, 3), dtype=torch.uint8, generator=g)
    out = m.predict(imgs)
    ref_map, ref_score, ref_tlm = naive_reference(m, imgs)
    assert out.anomaly_map.shape == (2, img_size, img_size) and out.score.shape == (2,)
    assert (out.anomaly_map >= 0).all() and (out.anomaly_map <= 1).all()
    assert (out.anomaly_map - ref_map).abs().max().item() <= 1e-5
    assert (out.tlm_map - ref_tlm).abs().max().item() <= 1e-5
    assert (out.score - ref_score).abs().max().item() <= 1e-6
    # the two images differ, so must their maps
    assert (out.anomaly_map[0] - out.anomaly_map[1]).abs().max().item() > 1e-4
    assert (out.tlm_map[0] - out.tlm_map[1]).abs().max().item() > 1e-3


def test_topk_score_is_mean_of_largest_pixels():
    m = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = torch.sort(m.flatten(1), dim=1, descending=True).values[:, :100].mean(1)
    assert torch.allclose(topk_score(m, 100), expected)


def test_predict_resizes_to_and_from_img_size():
    m = randomize(STLM(get_config("small")), 2).eval()
    imgs = torch.randint(0, 256, (1, 150, 90, 3), dtype=torch.uint8)
    out = m.predict(imgs)
    assert out.anomaly_map.shape == (1, 150, 90) and out.tlm_map.shape == (1, 150, 90)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(1, 64, 64, 3), "uint8"),
    (torch.zeros(64, 64, 3, dtype=torch.uint8), r"\(N, H, W, 3\)"),
    (torch.zeros(1, 64, 64, 4, dtype=torch.uint8), "got torch.uint8 \\(1, 64, 64, 4\\)"),
])
def test_predict_rejects_bad_input(bad, match):
    m = STLM(get_config("small")).eval()
    with pytest.raises(ValueError, match=match):
        m.predict(bad)


def test_fa_input_absdiff_reads_only_the_students_disagreement():
    """``absdiff`` is |l2n(Sp) - l2n(Sd)| per level: zero where the students agree (where the official
    product still holds the squared feature, i.e. the content); a config without the field is the official
    product, and the model follows its config."""
    from dataclasses import replace

    from stlm_train.config import STLMConfig
    from stlm_train.modeling import fa_input, l2n

    g = torch.Generator().manual_seed(3)
    p = (torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g))
    d = (p[0].clone(), torch.randn(2, 8, 4, 4, generator=g))
    got = fa_input(p, d, "absdiff")
    assert got.shape == (2, 16, 4, 4)
    assert got[:, :8].abs().max().item() == 0.0  # level 1: the students agree
    assert torch.allclose(got[:, 8:], (l2n(p[1]) - l2n(d[1])).abs())
    assert fa_input(p, d, "product")[:, :8].abs().max().item() > 1e-3  # the official input: the content
    with pytest.raises(ValueError, match="fa_input must be one of product, absdiff"):
        fa_input(p, d, "sum")

    cfg = get_config("small")
    assert cfg.fa_input == "product"
    d_old = {k: v for k, v in cfg.to_dict().items() if k != "fa_input"}
    assert STLMConfig.from_dict(d_old).fa_input == "product"  # checkpoints written before the field existed
    assert STLMConfig.from_dict({**d_old, "fa_input": "absdiff"}).fa_input == "absdiff"
    with pytest.raises(ValueError, match="fa_input must be one of product, absdiff"):
        replace(cfg, fa_input="sum")
    torch.manual_seed(0)
    m = randomize(STLM(replace(cfg, fa_input="absdiff")), 1).eval()
    imgs = torch.randint(0, 256, (1, 128, 128, 3), dtype=torch.uint8, generator=g)
    x = m.normalize(imgs)
    plain, denoising = m.student_features(x)
    want = torch.nn.functional.interpolate(m.fa_head(fa_input(plain, denoising, "absdiff")), size=(128, 128),
                                           mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(m(x).anomaly_map, want, atol=1e-6)
    official = torch.nn.functional.interpolate(m.fa_head(fa_input(plain, denoising, "product")), size=(128, 128),
                                               mode="bilinear", align_corners=False)[:, 0]
    assert (m(x).anomaly_map - official).abs().max().item() > 1e-4  # the head does read the other input


def test_fa_input_tlm_prior_starts_as_the_tlm_map():
    """``product+tlm``: the FA head gets a prior path over the per-level log cosine distances, initialised so
    the untrained FA map is sigmoid(log TLM) (the TLM map's ranking); the official head has no such weights,
    and a head with the path refuses to run without its prior."""
    from dataclasses import replace

    from stlm_train.modeling import fa_input
    from stlm_train.modeling.stlm import PRIOR_EPS, cosine_distance_map, fa_prior

    cfg = get_config("small")
    assert not [k for k in STLM(cfg).state_dict() if "prior" in k]
    torch.manual_seed(0)
    m = STLM(replace(cfg, fa_input="product+tlm")).eval()
    assert sorted(k for k in m.state_dict() if "prior" in k) == ["fa_head.prior.bias", "fa_head.prior.weight"]
    imgs = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = m.normalize(imgs)
    plain, denoising = m.student_features(x)
    prior = fa_prior(plain, denoising)
    assert prior.shape == (2, 2, *plain[0].shape[2:])
    want = sum(torch.log(cosine_distance_map(p, d) + PRIOR_EPS) for p, d in zip(plain, denoising))
    torch.testing.assert_close(prior.sum(dim=1, keepdim=True), want)
    out = m(x)
    expect = torch.nn.functional.interpolate(torch.sigmoid(want), size=(128, 128), mode="bilinear",
                                             align_corners=False)[:, 0]
    torch.testing.assert_close(out.anomaly_map, expect, atol=1e-6, rtol=1e-5)
    assert torch.equal(fa_input(plain, denoising, "product+tlm"), fa_input(plain, denoising, "product"))
    with pytest.raises(ValueError, match="prior path and needs the prior input"):
        m.fa_head(fa_input(plain, denoising, "product"))


def test_fa_input_tlm_head_reads_the_students_disagreement_only():
    """``tlm``: the FA head's input is the per-level log distances alone (2 channels, not the 2C product), it
    starts as the TLM map like ``product+tlm``, and images whose students disagree alike get the same map
    whatever their features' content."""
    from dataclasses import replace

    from stlm_train.modeling.stlm import fa_prior

    cfg = get_config("small")
    torch.manual_seed(0)
    m = STLM(replace(cfg, fa_input="tlm")).eval()
    assert m.fa_head.res[0].conv1.weight.shape[1] == 2
    imgs = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = m.normalize(imgs)
    plain, denoising = m.student_features(x)
    head_in, prior = m.fa_head_inputs(plain, denoising)
    torch.testing.assert_close(head_in, fa_prior(plain, denoising))
    assert head_in is prior  # computed once
    expect = torch.nn.functional.interpolate(torch.sigmoid(prior.sum(dim=1, keepdim=True)), size=(128, 128),
                                             mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(m(x).anomaly_map, expect, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # a trained-looking correction: the map now depends on the head, still only on prior
        m.fa_head.head[-1].weight.normal_(0, 0.1)
        out = m.fa_logits(plain, denoising)
        assert (out - prior.sum(dim=1, keepdim=True)).abs().max() > 1e-3
        torch.testing.assert_close(m.fa_head.logits(prior, prior), out)


def test_fa_output_prior_is_the_trained_prior_path_alone():
    """``fa_output="prior"``: the FA map is sigmoid(prior conv over the log distances); the head's other layers
    no longer change it (and are not computed); only a head with the prior path can output it."""
    from dataclasses import replace

    from stlm_train.modeling.stlm import fa_prior
    from tests.stlm_train.helpers import randomize

    cfg = get_config("small")
    torch.manual_seed(0)
    head_model = randomize(STLM(replace(cfg, fa_input="product+tlm")), 2).eval()
    prior_model = STLM(replace(cfg, fa_input="product+tlm", fa_output="prior")).eval()
    prior_model.load_state_dict(head_model.state_dict())
    imgs = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = prior_model.normalize(imgs)
    plain, denoising = prior_model.student_features(x)
    want = prior_model.fa_head.prior(fa_prior(plain, denoising))
    torch.testing.assert_close(prior_model.fa_logits(plain, denoising), want)
    assert (head_model.fa_logits(plain, denoising) - want).abs().max() > 1e-3  # the head's correction differs
    calls = []
    prior_model.fa_head.res.register_forward_hook(lambda *a: calls.append(1))
    out = prior_model(x)
    assert not calls
    torch.testing.assert_close(out.tlm_map, head_model(x).tlm_map)
    with pytest.raises(ValueError, match="fa_output 'prior' needs an FA head with the prior path"):
        replace(cfg, fa_output="prior")
    with pytest.raises(ValueError, match="fa_output must be one of head, prior"):
        replace(cfg, fa_output="x")
