"""fp16 policy: what stays fp32 (and really is fp32 in the converted graph), I/O types, parity."""
from __future__ import annotations

import onnx
import pytest

from stlm_export.precision import FP32_OP_TYPES, convert_fp16, float_nodes, fp32_nodes, name_nodes

TP = onnx.TensorProto
REQUIRED_FP32_OPS = {"LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Sqrt", "Pow", "Sigmoid", "TopK",
                     "Resize", "Div", "Sub"}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    t = {v.name: v.type.tensor_type.elem_type
         for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    t.update({i.name: i.data_type for i in model.graph.initializer})
    return t


@pytest.fixture(scope="module")
def fp16_result(full_engine):
    fp32 = onnx.load(str(full_engine.engine_dir / "model.onnx"))
    return fp32, convert_fp16(fp32)


def test_policy_finds_every_sensitive_part(fp16_result):
    fp32, res = fp16_result
    reasons = fp32_nodes(fp32)
    names = set(reasons)
    # fused preprocessing
    assert {"/normalize/Sub", "/normalize/Div", "/normalize/Cast"} <= names
    # decomposed LayerNorm2d of both necks (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div)
    for stream in ("plain", "denoising"):
        for ln in ("neck.1", "neck.3"):
            for op in ("ReduceMean", "Sub", "Pow", "ReduceMean_1", "Add", "Sqrt", "Div"):
                assert f"/{stream}/neck/{ln}/{op}" in names, (stream, ln, op)
    why = set(reasons.values())
    assert {"l2 norm", "cosine / feature product", "postprocessing", "layernorm (decomposed)",
            "preprocessing"} <= why
    # l2n of 2 levels x 2 streams: x*x, +eps and the Div matched by pattern (ReduceSum, Sqrt by op type)
    assert sum(r == "l2 norm" for r in reasons.values()) == 4 * 3
    assert sum(n.op_type == "ReduceSum" for n in fp32.graph.node if n.name in names) >= 4
    # TLM path (1 - <a, b>) and the product of the two levels, up to the output
    assert any(reasons[n] == "cosine / feature product" for n in names if "Sub" in n)


def test_kept_fp32_report(fp16_result):
    _, res = fp16_result
    hist = res.histogram()
    assert REQUIRED_FP32_OPS <= set(hist), hist
    assert res.count == sum(hist.values()) == sum(len(v) for v in res.kept_fp32.values())
    assert "Conv" not in hist and "MatMul" not in hist  # the heavy ops do run in fp16
    assert set(FP32_OP_TYPES) <= set(res.op_block_list)
    assert res.summary()["kept_fp32_count"] == res.count


def test_kept_nodes_really_compute_in_fp32(fp16_result):
    """Every float input/output of a kept node is fp32 in the converted graph; heavy ops are fp16."""
    fp32, res = fp16_result
    types = _types(res.model)
    nodes = {n.name: n for n in res.model.graph.node}
    checked = 0
    for op, names in res.kept_fp32.items():
        for name in names:
            node = nodes[name]
            for t in (*node.input, *node.output):
                if t and types.get(t) in (TP.FLOAT, TP.FLOAT16):
                    assert types[t] == TP.FLOAT, (name, t)
                    checked += 1
    assert checked > 100
    convs = [n for n in res.model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == TP.FLOAT16 for n in convs)
    matmuls = [n for n in res.model.graph.node if n.op_type == "MatMul"]
    assert sum(types.get(n.output[0]) == TP.FLOAT16 for n in matmuls) > 0.9 * len(matmuls)


def test_io_types_unchanged_and_checker_passes(fp16_result, full_engine):
    _, res = fp16_result
    onnx.checker.check_model(res.model, full_check=True)
    assert [(i.name, i.type.tensor_type.elem_type) for i in res.model.graph.input] == [("image", TP.UINT8)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in res.model.graph.output] == \
        [("anomaly_map", TP.FLOAT), ("score", TP.FLOAT), ("tlm_map", TP.FLOAT)]
    # no lossy fp32 -> fp16 -> fp32 hop left between two kept nodes (the converter leaves those)
    def cast_to(n):
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    consumers = {}
    for n in res.model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in res.model.graph.node:
        if cast_to(n) == TP.FLOAT16:
            assert not [c.name for c in consumers.get(n.output[0], []) if cast_to(c) == TP.FLOAT], n.name
    fp32_bytes = (full_engine.engine_dir / "model.onnx").stat().st_size
    fp16_bytes = (full_engine.engine_dir / "model.fp16.onnx").stat().st_size
    assert fp16_bytes < 0.7 * fp32_bytes


def test_fp16_parity_within_policy(full_engine):
    rec = next(r for r in full_engine.parity if r["artifact"] == "model.fp16.onnx")
    assert rec["pass"] and rec["precision"] == "fp16"
    assert rec["max_abs_map"] <= 5e-3 and rec["max_abs_score"] <= 5e-3 and rec["max_abs_tlm"] <= 2e-2
    assert rec["max_abs_map"] > 0  # really reduced precision, not a copy of the fp32 graph
    assert rec["kept_fp32_count"] == full_engine.fp16_policy["kept_fp32_count"]


def test_name_nodes_makes_names_unique():
    a = onnx.helper.make_node("Relu", ["x"], ["y"])
    b = onnx.helper.make_node("Relu", ["y"], ["z"], name="r")
    c = onnx.helper.make_node("Relu", ["z"], ["w"], name="r")
    g = onnx.helper.make_graph([a, b, c], "g", [onnx.helper.make_tensor_value_info("x", TP.FLOAT, [1])],
                               [onnx.helper.make_tensor_value_info("w", TP.FLOAT, [1])])
    m = onnx.helper.make_model(g)
    name_nodes(m)
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == 3 and all(names)
    assert float_nodes(m) == set(names)


@pytest.mark.parametrize("mode", ["product+tlm", "tlm"])
def test_fp16_graph_of_an_fa_prior_model_keeps_its_log_fp32_and_parity(small_stlm, small_images, mode):
    """A model trained with the TLM prior (the trainer's default) converts under the same policy: its Log stays
    fp32 and the fp16 map is within the policy's 5e-3 of PyTorch."""
    import numpy as np

    from stlm_export.gate import ort_outputs, reference_outputs
    from stlm_export.onnx_export import export_onnx
    from tests.stlm_train.helpers import with_tlm_prior

    m = with_tlm_prior(small_stlm, mode)
    res = convert_fp16(export_onnx(m, simplify=True).model)
    assert res.histogram().get("Log", 0) == 2  # one per level
    imgs = small_images.images[:2]
    got = ort_outputs(res.model, imgs, "dynamic")
    ref = reference_outputs(m, imgs, with_tlm=False)
    assert 0 < np.abs(got["anomaly_map"] - ref["anomaly_map"]).max() <= 5e-3
