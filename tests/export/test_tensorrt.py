"""TensorRT build settings (pure, tested everywhere) and the real build (only where TensorRT + a GPU exist)."""
from __future__ import annotations

import json

import pytest

from stlm_export.pipeline import ExportError, resolve_targets
from stlm_export.tensorrt_build import FP32_LAYER_TYPES, builder_settings


def test_trt10_fp16_dynamic_pins_fp32_layers():
    s = builder_settings(10, True, "dynamic", max_batch=8, opt_batch=4, img_size=256, workspace_mb=2048,
                         timing_cache="engines/.x.cache", version_compatible=False, hardware_compatible=False,
                         fused_pre=True, fp32_layer_names=["/fa_head/Sigmoid", "/TopK", "/TopK"])
    assert s.onnx_file == "model.onnx" and not s.strongly_typed and s.precision == "fp16"
    assert s.flags == ("FP16", "OBEY_PRECISION_CONSTRAINTS")
    assert s.fp32_layer_types == FP32_LAYER_TYPES and s.fp32_layer_names == ("/fa_head/Sigmoid", "/TopK")
    assert (s.min_shape, s.opt_shape, s.max_shape) == ((1, 256, 256, 3), (4, 256, 256, 3), (8, 256, 256, 3))
    assert s.workspace_bytes == 2048 * 1024 * 1024 and s.timing_cache == "engines/.x.cache"
    assert s.hardware_compatibility_level == "NONE" and not s.version_compatible
    assert s.trtexec == ("trtexec --onnx=model.onnx --saveEngine=model.plan --minShapes=image:1x256x256x3 "
                         "--optShapes=image:4x256x256x3 --maxShapes=image:8x256x256x3 --fp16 "
                         "--precisionConstraints=obey --layerPrecisions=/fa_head/Sigmoid:fp32,/TopK:fp32 "
                         "--layerOutputTypes=/fa_head/Sigmoid:fp32,/TopK:fp32 --memPoolSize=workspace:2048M "
                         "--timingCacheFile=engines/.x.cache")
    assert s.profile() == {"min": [1, 256, 256, 3], "opt": [4, 256, 256, 3], "max": [8, 256, 256, 3]}


def test_trt11_fp16_is_strongly_typed_from_the_fp16_onnx():
    s = builder_settings(11, True, "dynamic", 16, 2, 1024, 4096, None, False, False, True,
                         fp32_layer_names=["/TopK"])
    assert s.strongly_typed and s.onnx_file == "model.fp16.onnx"
    assert "FP16" not in s.flags and s.fp32_layer_names == () and s.fp32_layer_types == ()
    assert "--stronglyTyped" in s.trtexec and "--fp16" not in s.trtexec and "--onnx=model.fp16.onnx" in s.trtexec
    assert "--maxShapes=image:16x1024x1024x3" in s.trtexec and "--timingCacheFile" not in s.trtexec


def test_trt11_fp32_and_trt10_fp32_fixed_batch_unfused():
    s11 = builder_settings(11, False, "dynamic", 8, 4, 256, 1024, None, False, False, True)
    assert s11.strongly_typed and s11.onnx_file == "model.onnx" and s11.flags == ()
    s = builder_settings(10, False, 2, 8, 4, 256, 1024, None, True, True, False)
    assert s.min_shape == s.opt_shape == s.max_shape == (2, 3, 256, 256)
    assert s.flags == ("VERSION_COMPATIBLE",) and s.hardware_compatibility_level == "AMPERE_PLUS"
    assert "--minShapes" not in s.trtexec and "--fp16" not in s.trtexec
    assert "--versionCompatible" in s.trtexec and "--hardwareCompatibilityLevel=ampere+" in s.trtexec
    assert json.loads(json.dumps(s.to_dict()))["max_shape"] == [2, 3, 256, 256]


@pytest.mark.parametrize("kw,match", [({"trt_major": 8}, "TensorRT >= 10"), ({"batch": 0}, "batch"),
                                      ({"opt_batch": 9}, "opt_batch"), ({"img_size": 100}, "multiple of 64"),
                                      ({"workspace_mb": 0}, "workspace")])
def test_builder_settings_rejects_bad_values(kw, match):
    args = dict(trt_major=10, fp16=True, batch="dynamic", max_batch=8, opt_batch=4, img_size=256)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        builder_settings(**args)


def test_default_targets_follow_what_is_installed():
    assert resolve_targets(None, fp16=False, trt_importable=True) == ("onnx", "openvino")
    assert resolve_targets(None, fp16=True, trt_importable=False) == ("onnx", "openvino")
    assert resolve_targets(None, fp16=True, trt_importable=True) == ("onnx", "openvino", "tensorrt")
    assert resolve_targets("all", fp16=False, trt_importable=True) == ("onnx", "openvino", "tensorrt")
    assert resolve_targets("all", fp16=True, trt_importable=False) == ("onnx", "openvino")  # same command on CPU
    assert resolve_targets("openvino", fp16=False, trt_importable=False) == ("onnx", "openvino")
    with pytest.raises(ExportError, match=r"--target tensorrt: .*pip install 'stlm-deploy\[trt\]'"):
        resolve_targets("tensorrt", fp16=True, trt_importable=False)


@pytest.mark.tensorrt
def test_real_tensorrt_build(small_ckpt, tmp_path):
    """Only with TensorRT and a GPU: plan = raw serialized engine, sidecar complete, parity gated."""
    trt = pytest.importorskip("tensorrt")
    from stlm_export.pipeline import ExportOptions, export_engine

    try:
        res = export_engine(ExportOptions(ckpt=small_ckpt, out=tmp_path / "e", fp16=True, target="tensorrt",
                                          parity_images=2, timing_cache=tmp_path / "tc.cache"))
    except ExportError as e:
        pytest.skip(str(e))  # TensorRT importable but no GPU
    plan = (res.engine_dir / "model.plan").read_bytes()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    assert engine is not None  # the file is exactly what TensorRT serialised (no header)
    side = json.loads((res.engine_dir / "model.plan.json").read_text())
    assert {"tensorrt_version", "gpu_name", "compute_capability", "precision", "flags", "profiles",
            "onnx_sha256"} <= set(side)
    assert (tmp_path / "tc.cache").stat().st_size > 0
    assert any(r["artifact"] == "model.plan" and r["pass"] for r in res.parity)


def test_int8_is_explicit_quantisation_of_the_qdq_onnx():
    """TRT 10: INT8 flag (+FP16 for the float remainder with --fp16), no calibrator; TRT 11: strongly typed."""
    s = builder_settings(10, False, "dynamic", 8, 4, 256, 1024, None, False, False, True, int8=True)
    assert s.precision == "int8" and s.onnx_file == "model.int8.onnx" and s.plan_file == "model.int8.plan"
    assert s.flags == ("INT8",) and s.calibrator is None and not s.strongly_typed
    assert "--int8" in s.trtexec and "--saveEngine=model.int8.plan" in s.trtexec and "--calib" not in s.trtexec
    mixed = builder_settings(10, True, 1, 8, 4, 256, 1024, None, False, False, True, fp32_layer_names=["/TopK"],
                             int8=True)
    assert mixed.flags == ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS") and mixed.fp32_layer_names == ("/TopK",)
    assert "--int8 --fp16" in mixed.trtexec
    s11 = builder_settings(11, False, "dynamic", 8, 4, 256, 1024, None, False, False, True, int8=True)
    assert s11.strongly_typed and s11.flags == () and s11.onnx_file == "model.int8.onnx"
    assert "--stronglyTyped" in s11.trtexec and "--int8" not in s11.trtexec
    assert s11.to_dict()["plan_file"] == "model.int8.plan"
    plain = builder_settings(10, False, "dynamic", 8, 4, 256, 1024, None, False, False, True)
    assert plain.plan_file == "model.plan" and "INT8" not in plain.flags and plain.precision == "fp32"
