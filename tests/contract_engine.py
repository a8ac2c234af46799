"""Tiny REAL engine directories that obey the fused-graph contract, shared by the runtime tests.

``anomaly_map = mean_c(image) / 255`` (in [0, 1]) and ``score = mean(top_k(anomaly_map))``; the unfused
variant takes the normalised NCHW float input and undoes ``(x - mean) / std`` first, so a runtime that
normalises wrongly gives visibly wrong numbers. stlm.json is written through ``stlm_deploy.spec``
(``EngineSpec.create`` + ``add_artifact`` + ``write_spec``), exactly as the exporter does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

from stlm_deploy.spec import DEFAULT_MEAN, DEFAULT_STD, EngineSpec, write_spec

IMG = 64
TOP_K = 100
OPSET = 17


def build_onnx(path: Path, *, img_size: int = IMG, top_k: int = TOP_K, fused: bool = True, batch: int | None = None,
               with_tlm: bool = False, fp16_inside: bool = False, half_input: bool = False,
               nan_on_white: bool = False) -> Path:
    """Write the contract graph. ``fp16_inside``: a distinct "fp16" file (uint8 -> f16 -> f32 is exact for
    0..255); ``half_input``: unfused float16 input; ``nan_on_white``: pixels whose channel mean is 255
    (pure white) come out as NaN, as an fp16 overflow would (other pixels are unchanged)."""
    n: Any = batch if batch else "N"
    s = img_size
    nodes, inits = [], [h.make_tensor("c255", T.FLOAT, [], [255.0]), h.make_tensor("flat_shape", T.INT64, [2], [0, -1]),
                        h.make_tensor("k", T.INT64, [1], [top_k])]
    if fused:
        inp = h.make_tensor_value_info("image", T.UINT8, [n, s, s, 3])
        if fp16_inside:
            nodes += [h.make_node("Cast", ["image"], ["x16"], to=T.FLOAT16),
                      h.make_node("Cast", ["x16"], ["xf"], to=T.FLOAT)]
        else:
            nodes.append(h.make_node("Cast", ["image"], ["xf"], to=T.FLOAT))
        nodes.append(h.make_node("ReduceMean", ["xf"], ["m"], axes=[3], keepdims=0))
    else:
        inp = h.make_tensor_value_info("image", T.FLOAT16 if half_input else T.FLOAT, [n, 3, s, s])
        inits += [h.make_tensor("std", T.FLOAT, [1, 3, 1, 1], list(DEFAULT_STD)),
                  h.make_tensor("mean", T.FLOAT, [1, 3, 1, 1], list(DEFAULT_MEAN))]
        if half_input:
            nodes.append(h.make_node("Cast", ["image"], ["x32"], to=T.FLOAT))
        nodes += [h.make_node("Mul", ["x32" if half_input else "image", "std"], ["xs"]),
                  h.make_node("Add", ["xs", "mean"], ["xf"]),
                  h.make_node("ReduceMean", ["xf"], ["m"], axes=[1], keepdims=0)]
    if nan_on_white:
        inits.append(h.make_tensor("nan", T.FLOAT, [], [float("nan")]))
        nodes += [h.make_node("Equal", ["m", "c255"], ["white"]),
                  h.make_node("Where", ["white", "nan", "m"], ["m_or_nan"])]
    nodes += [h.make_node("Div", ["m_or_nan" if nan_on_white else "m", "c255"], ["anomaly_map"]),
              h.make_node("Reshape", ["anomaly_map", "flat_shape"], ["flat"]),
              h.make_node("TopK", ["flat", "k"], ["top", "top_idx"], axis=1),
              h.make_node("ReduceMean", ["top"], ["score"], axes=[1], keepdims=0)]
    outputs = [h.make_tensor_value_info("anomaly_map", T.FLOAT, [n, s, s]),
               h.make_tensor_value_info("score", T.FLOAT, [n])]
    if with_tlm:
        inits.append(h.make_tensor("one", T.FLOAT, [], [1.0]))
        nodes.append(h.make_node("Sub", ["one", "anomaly_map"], ["tlm_map"]))
        outputs.append(h.make_tensor_value_info("tlm_map", T.FLOAT, [n, s, s]))
    graph = h.make_graph(nodes, "tiny_stlm", [inp], outputs, inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="stlm-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_engine(root: Path, name: str = "tiny", *, fused: bool = True, batch: int | str = "dynamic",
                with_tlm: bool = False, fp16: bool = False, openvino_ir: bool = False, half_input: bool = False,
                image_threshold: float | None = None, pixel_threshold: float | None = None,
                nan_on_white: bool = False, score_range: tuple[float, float] | None = None,
                work_size: int | None = None, tile_overlap: float = 0.25) -> Path:
    """An engine directory exactly as the exporter writes it (stlm.json via write_spec + checksums).

    ``score_range``: the calibration (score_min, score_max) behind the normalized score (None: an older
    engine without them). ``work_size``: a tiled engine (tiles of IMG px, ``tile_overlap``)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    b = None if batch == "dynamic" else int(batch)
    build_onnx(d / "model.onnx", fused=fused, batch=b, with_tlm=with_tlm, half_input=half_input,
               nan_on_white=nan_on_white)
    tools = {"onnx": onnx.__version__}
    spec = EngineSpec.create(name, IMG, opset=OPSET, fused_preprocessing=fused, batch=batch, with_tlm=with_tlm,
                             top_k=TOP_K, tools=tools)
    if half_input:
        spec.input.dtype = "float16"
    spec.thresholds.image, spec.thresholds.pixel = image_threshold, pixel_threshold
    spec.thresholds.method = "test" if image_threshold is not None else "none"
    if score_range is not None:
        spec.thresholds.score_min, spec.thresholds.score_max = map(float, score_range)
    spec.source.checkpoint, spec.source.sha256 = "runs/tiny/model.ckpt", "0" * 64
    if work_size is not None:
        from stlm_deploy.tiling import Tiling

        spec.set_tiling(Tiling(IMG, work_size, tile_overlap))
    spec.add_artifact(d, "model.onnx", "onnx", "fp32")
    if fp16:
        build_onnx(d / "model.fp16.onnx", fused=fused, batch=b, with_tlm=with_tlm, fp16_inside=True)
        spec.add_artifact(d, "model.fp16.onnx", "onnx", "fp16")
    if openvino_ir:
        import openvino as ov

        (d / "openvino").mkdir(exist_ok=True)
        ov.save_model(ov.convert_model(str(d / "model.onnx")), str(d / "openvino" / "model.xml"), compress_to_fp16=False)
        tools["openvino"] = ov.__version__
        spec.add_artifact(d, "openvino/model.xml", "openvino", "fp32")
        spec.add_artifact(d, "openvino/model.bin", "openvino", "fp32")
    (d / "parity.json").write_text('{"pass": true}\n')
    spec.add_artifact(d, "parity.json", "json", None)
    write_spec(d, spec)
    return d


def sample_image(h: int, w: int, seed: int = 0, noise: float = 4.0) -> np.ndarray:
    """A structured RGB uint8 image (gradient + blobs + noise) so top-k and both resizes are non-trivial."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx / max(w - 1, 1) * 120 + yy / max(h - 1, 1) * 60).astype(np.float32)
    img = np.stack([base, base * 0.8 + 20, 180 - base], axis=2)
    for _ in range(3):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, max(4, min(h, w) // 4))
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(100, 256, 3)
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
