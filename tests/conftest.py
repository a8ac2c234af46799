"""Shared fixtures: the bundled real MVTec sample (read from ../shared, never copied) and seeds."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sample_root() -> Path | None:
    from stlm_train.data.io import bundled_sample_root

    return bundled_sample_root()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    root = sample_root()
    if root is None:
        pytest.skip("bundled MVTec sample not found (set STLM_SAMPLE_DATA or place it at ../shared/data/mvtec_bottle_xs)")
    return root


# ---- one small randomised model and one complete export, shared by the export and benchmark tests
THRESHOLDS = {"image": 0.61, "pixel": 0.7, "method": "held-out good (test fixture)", "tlm_image": 0.2,
              "tlm_pixel": 0.3, "n_images": 2, "score_min": 0.4, "score_max": 0.9}


@pytest.fixture(scope="session")
def small_stlm():
    """The `small` config at 128 px with seeded non-trivial weights (zero inits hide bugs)."""
    import torch

    from stlm_train import STLM, get_config
    from tests.stlm_train.helpers import randomize

    torch.manual_seed(0)
    return randomize(STLM(get_config("small")), 1).eval()


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory, small_stlm) -> Path:
    """A project checkpoint in a run folder (so the default engine name is the folder's)."""
    from stlm_train import save_checkpoint

    path = tmp_path_factory.mktemp("runs") / "bottle" / "model.ckpt"
    save_checkpoint(path, small_stlm, thresholds=dict(THRESHOLDS))
    return path


@pytest.fixture(scope="session")
def full_engine(tmp_path_factory, small_ckpt):
    """One complete export: model.onnx, model.fp16.onnx, openvino/, parity + Polygraphy files."""
    from stlm_export.pipeline import ExportOptions, export_engine

    out = tmp_path_factory.mktemp("engines") / "bottle"
    return export_engine(ExportOptions(ckpt=small_ckpt, out=out, fp16=True, with_tlm=True, parity_images=6))


@pytest.fixture(scope="session")
def tiled_ckpt(tmp_path_factory, small_stlm) -> Path:
    """small_stlm as a tiled checkpoint: 128 px tiles of a 256 px work image, overlap 0.25."""
    import copy

    from stlm_deploy.tiling import Tiling
    from stlm_train import save_checkpoint

    model = copy.deepcopy(small_stlm)
    model.tiling = Tiling(128, 256, 0.25)
    path = tmp_path_factory.mktemp("runs") / "tiled" / "model.ckpt"
    save_checkpoint(path, model, thresholds=dict(THRESHOLDS))
    return path


@pytest.fixture(scope="session")
def tiled_engine(tiled_ckpt, tmp_path_factory):
    """The tiled checkpoint exported (ONNX + OpenVINO IR, TLM map), gated on stitched maps."""
    from stlm_export.pipeline import ExportOptions, export_engine

    return export_engine(ExportOptions(ckpt=tiled_ckpt, out=tmp_path_factory.mktemp("engines") / "tiled",
                                       target="openvino", parity_images=2, with_tlm=True))


@pytest.fixture(scope="session")
def int8_engine(full_engine, sample_dir, tmp_path_factory):
    """full_engine + INT8 artifacts built with a tolerance every artifact passes (runtime tests need them)."""
    import shutil

    from stlm_deploy.spec import load_spec, write_spec
    from stlm_export.int8.gate import Int8Tolerance
    from stlm_export.int8.build import build_gated_int8, int8_data
    from stlm_export.pipeline import spec_metadata

    d = tmp_path_factory.mktemp("int8") / "bottle"
    shutil.copytree(full_engine.engine_dir, d)
    spec = load_spec(d)
    sets = int8_data(sample_dir, sample_dir, None, spec.img_size, spec.preprocessing.resize)
    out = build_gated_int8(d, spec, *sets, targets=("onnx", "openvino"),
                           metadata=spec_metadata(spec, "int8"), tolerance=Int8Tolerance(auroc_drop=1.0, min_agreement=0.0),
                           accuracy_control=True, say=lambda _m: None)
    write_spec(d, spec)
    return d, out
