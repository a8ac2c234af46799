"""The fused-graph contract: names, dtypes, shapes, dynamic/fixed batch, variants, no dead parts, parity."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from stlm_export.deploy_model import DeployModel
from stlm_export.onnx_export import MAX_OPSET, check_opset, export_onnx, graph_report, trace_onnx
from stlm_export.gate import normalize_images, ort_outputs, reference_outputs
from stlm_train.modeling.tiny_vit import Attention

TP = onnx.TensorProto


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def _io(model: onnx.ModelProto) -> tuple[dict, dict]:
    ins = {i.name: (i.type.tensor_type.elem_type, _dims(i)) for i in model.graph.input}
    outs = {o.name: (o.type.tensor_type.elem_type, _dims(o)) for o in model.graph.output}
    return ins, outs


def test_default_graph_contract(dynamic_export):
    model = dynamic_export.model
    onnx.checker.check_model(model, full_check=True)
    ins, outs = _io(model)
    assert ins == {"image": (TP.UINT8, ["N", 128, 128, 3])}
    assert list(outs) == ["anomaly_map", "score"]
    assert outs["anomaly_map"] == (TP.FLOAT, ["N", 128, 128])
    assert outs["score"] == (TP.FLOAT, ["N"])
    assert graph_report(model).opset == 17
    assert dynamic_export.simplified and dynamic_export.simplifier == "onnxslim"
    assert dynamic_export.report.nodes < dynamic_export.raw_report.nodes  # constants folded, shapes simplified


@pytest.mark.parametrize("n", [1, 3])
def test_dynamic_batch_matches_pytorch(dynamic_export, small_stlm, small_images, n):
    imgs = small_images.images[:n]
    got = ort_outputs(dynamic_export.model, imgs, "dynamic", )
    ref = reference_outputs(small_stlm, imgs, with_tlm=False)
    assert got["anomaly_map"].shape == (n, 128, 128) and got["score"].shape == (n,)
    assert got["anomaly_map"].dtype == np.float32 and got["score"].dtype == np.float32
    assert np.abs(got["anomaly_map"] - ref["anomaly_map"]).max() <= 1e-4
    assert np.abs(got["score"] - ref["score"]).max() <= 1e-4
    assert got["anomaly_map"].min() >= 0 and got["anomaly_map"].max() <= 1
    # the images differ, so do their maps: the parity above is not trivially satisfied
    if n > 1:
        assert np.abs(got["anomaly_map"][0] - got["anomaly_map"][1]).max() > 1e-4


def test_fixed_batch_and_no_per_sample_loop(small_stlm, small_images):
    """--batch N fixes the input; the node count does not depend on N (no unrolled per-sample loop)."""
    import onnxruntime as ort

    deploy = DeployModel(small_stlm)
    one, three = trace_onnx(deploy, batch=1), trace_onnx(deploy, batch=3)
    assert _io(three)[0]["image"] == (TP.UINT8, [3, 128, 128, 3])
    assert _io(three)[1]["score"] == (TP.FLOAT, [3])
    assert len(one.graph.node) == len(three.graph.node)
    sess = ort.InferenceSession(three.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": small_images.images[:3]})
    ref = reference_outputs(small_stlm, small_images.images[:3], with_tlm=False)
    assert np.abs(out[0] - ref["anomaly_map"]).max() <= 1e-4
    with pytest.raises(Exception):
        sess.run(None, {"image": small_images.images[:2]})


def test_streams_and_decoder_appear_once(dynamic_export):
    """Both encoders exactly once, one decoder call for both streams, no control flow."""
    raw_names = [n.name for n in dynamic_export.model.graph.node]
    ops = {n.op_type for n in dynamic_export.model.graph.node}
    assert not ops & {"Loop", "Scan", "If", "ConvTranspose"}
    for scope in ("/plain/patch_embed/seq/seq.0/c/Conv", "/denoising/patch_embed/seq/seq.0/c/Conv"):
        assert sum(n.startswith(scope) for n in raw_names) == 1, scope
    q_proj = [n for n in raw_names if n.startswith("/decoder/transformer/layers.0/self_attn/q_proj/MatMul")]
    assert len(q_proj) == 1, q_proj


def _expected_onnx_params(stlm) -> int:
    """STLM parameters as the folded graph stores them: attention-bias tables gathered to (heads, N, N),
    BatchNorm folded into the preceding conv (2C -> C), the dense positional encoding as a constant."""
    n = sum(p.numel() for p in stlm.parameters())
    for mod in stlm.modules():
        if isinstance(mod, Attention):
            k = mod.attention_bias_idxs.shape[0]
            n += mod.num_heads * k * k - mod.attention_biases.numel()
        if isinstance(mod, nn.BatchNorm2d):
            n -= mod.num_features
    f = stlm.cfg.feature_size
    return n + stlm.cfg.decoder.dim * f * f


def test_no_teacher_no_dead_decoder_parts(dynamic_export, small_stlm):
    inits = [i.name for i in dynamic_export.model.graph.initializer]
    dead = ("output_upscaling", "output_hypernetworks", "iou_prediction_head", "final_attn", "teacher",
            "image_encoder", "mask_downscaling", "point_embeddings")
    assert not [n for n in inits if any(d in n for d in dead)]
    expected = _expected_onnx_params(small_stlm)
    got = dynamic_export.report.params
    assert abs(got - expected) <= 1e-3 * expected, (got, expected)  # 16 extra: mean/std and scalar constants


def test_no_fuse_pre_takes_normalised_nchw(small_stlm, small_images):
    exp = export_onnx(small_stlm, fuse_pre=False, simplify=False)
    ins, outs = _io(exp.model)
    assert ins == {"image": (TP.FLOAT, ["N", 3, 128, 128])}
    assert not [n for n in exp.model.graph.node if n.name.startswith("/normalize/")]
    imgs = small_images.images[:2]
    got = ort_outputs(exp.model, normalize_images(small_stlm, imgs))
    ref = reference_outputs(small_stlm, imgs, with_tlm=False)
    assert np.abs(got["anomaly_map"] - ref["anomaly_map"]).max() <= 1e-4


def test_with_tlm_adds_the_tlm_map(small_stlm, small_images):
    exp = export_onnx(small_stlm, with_tlm=True, simplify=False)
    _, outs = _io(exp.model)
    assert list(outs) == ["anomaly_map", "score", "tlm_map"]
    assert outs["tlm_map"] == (TP.FLOAT, ["N", 128, 128])
    imgs = small_images.images[:2]
    got = ort_outputs(exp.model, imgs)
    ref = reference_outputs(small_stlm, imgs, with_tlm=True)
    assert np.abs(got["tlm_map"] - ref["tlm_map"]).max() <= 1e-4
    assert np.abs(got["tlm_map"] - got["anomaly_map"]).max() > 1e-3  # a different map, not a copy


def test_opset_range_and_override(small_stlm):
    for bad in (16, MAX_OPSET + 1, "17"):
        with pytest.raises(ValueError, match="--opset"):
            check_opset(bad)
    model = trace_onnx(DeployModel(small_stlm), opset=18)
    assert graph_report(model).opset == 18
    onnx.checker.check_model(model, full_check=True)


def test_deploy_model_shares_weights_and_matches_predict(small_stlm, small_images):
    deploy = DeployModel(small_stlm, with_tlm=True)
    assert deploy.stlm is small_stlm and deploy.output_names == ("anomaly_map", "score", "tlm_map")
    x = torch.from_numpy(small_images.images[:2])
    with torch.no_grad():
        amap, score, tlm = deploy(x)
        ref = small_stlm.predict(x)
    assert torch.equal(amap, ref.anomaly_map) and torch.equal(score, ref.score) and torch.equal(tlm, ref.tlm_map)


@pytest.mark.parametrize("mode", ["absdiff", "product+tlm", "tlm", "product+tlm:prior"])
def test_fa_input_model_exports_with_parity(small_stlm, small_images, mode):
    """A model trained with another ``fa_input`` (``absdiff``, or the TLM prior path) exports its own FA
    head: ORT == PyTorch <= 1e-4, and it is not the official product graph."""
    from dataclasses import replace

    from stlm_train import STLM

    from tests.stlm_train.helpers import with_tlm_prior

    if mode != "absdiff":
        m = with_tlm_prior(small_stlm, mode.split(":")[0])
        if mode.endswith(":prior"):  # the FA map is the prior path alone: the graph has no other FA head layer
            m.cfg = replace(m.cfg, fa_output="prior")
    else:
        m = STLM(replace(small_stlm.cfg, fa_input=mode))
        m.load_state_dict(small_stlm.state_dict())
        m.eval()
    exp = export_onnx(m, simplify=True)
    imgs = small_images.images[:2]
    got = ort_outputs(exp.model, imgs, "dynamic")
    ref = reference_outputs(m, imgs, with_tlm=False)
    official = reference_outputs(small_stlm, imgs, with_tlm=False)
    assert np.abs(got["anomaly_map"] - ref["anomaly_map"]).max() <= 1e-4
    assert np.abs(ref["anomaly_map"] - official["anomaly_map"]).max() > 1e-3  # not the product graph
    scopes = {n.name.split("/")[1] for n in exp.model.graph.node if n.name.count("/") > 1}  # FA head: res, head, prior
    assert ("prior" in scopes) == (mode != "absdiff")
    assert ({"res", "head"} & scopes == set()) if mode.endswith(":prior") else {"res", "head"} <= scopes
