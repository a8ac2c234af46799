"""The carried window layout of the exported students (opt-in, measured slower): same numbers as the
official block order, one Pad per stage, shared (not copied) weights."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch

from stlm_export.gate import ort_outputs
from stlm_export.onnx_export import export_onnx
from stlm_export.window_layout import WindowedTinyViT
from stlm_train import STLM, get_config
from stlm_train.modeling import TinyViT
from tests.stlm_train.helpers import randomize


def _encoder(window: int, img_size: int = 128) -> TinyViT:
    cfg = get_config("small")
    student = dataclasses.replace(cfg.student, window_sizes=(window,) * 4)
    torch.manual_seed(0)
    return randomize(TinyViT(student, img_size), 3).eval()


@pytest.mark.parametrize("window", [7, 8])  # 7: every stage padded (32, 16, 8 tokens); 8: none is
def test_same_features_as_the_official_block_order(window):
    enc = _encoder(window)
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = enc(x), WindowedTinyViT(enc)(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_padding_must_be_re_zeroed():
    """Without the mask the padded tokens leak into attention keys and the conv border: a real difference,
    so the test above can fail."""
    enc = _encoder(7)
    windowed = WindowedTinyViT(enc)
    for stage in windowed.layers[1:]:
        assert stage.padded
        stage.mask.fill_(1.0)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (windowed(x) - enc(x)).abs().max().item() > 1e-3


def test_weights_are_shared_not_copied():
    enc = _encoder(7)
    windowed = WindowedTinyViT(enc)
    own = {id(p) for p in enc.parameters()}
    assert {id(p) for p in windowed.parameters()} == own
    with torch.no_grad():
        enc.neck[0].weight.mul_(2.0)  # a weight change reaches the view
        x = torch.randn(1, 3, 128, 128)
        assert (windowed(x) - enc(x)).abs().max().item() <= 1e-5


def test_exported_graph_pads_once_per_stage_at_equal_outputs(small_stlm, small_images):
    """The default export is the official block order; ``window_layout=True`` pads once per stage."""
    graphs = {wl: export_onnx(small_stlm, window_layout=wl, simplify=True).model for wl in (True, False)}
    default = export_onnx(small_stlm, simplify=True).model
    ops = {wl: collections.Counter(n.op_type for n in g.graph.node) for wl, g in graphs.items()}
    assert collections.Counter(n.op_type for n in default.graph.node) == ops[False]
    stages = 2 * (len(small_stlm.cfg.student.depths) - 1)  # padded TinyViT stages in both students
    assert ops[True]["Pad"] <= stages < ops[False]["Pad"]
    imgs = small_images.images[:2]
    new, old = ort_outputs(graphs[True], imgs), ort_outputs(graphs[False], imgs)
    assert np.abs(new["anomaly_map"] - old["anomaly_map"]).max() <= 1e-5
    assert np.abs(new["score"] - old["score"]).max() <= 1e-5


def test_stfpm_has_no_window_layout():
    from stlm_export.deploy_model import DeployModel
    from stlm_train.modeling import STFPM

    deploy = DeployModel(STFPM(get_config("stfpm", 128)))
    assert not deploy.window_layout and not hasattr(deploy, "plain")


def test_paper_student_at_256():
    """The paper student at 256 px (the configuration users train): identical features."""
    torch.manual_seed(0)
    model = randomize(STLM(get_config("paper", 256)), 5).eval()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = model.plain(x), WindowedTinyViT(model.plain)(x)
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
