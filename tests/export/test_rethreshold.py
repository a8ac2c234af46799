"""stlm-threshold: a checkpoint and its engine re-thresholded from labelled images; every runtime decides with it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from stlm_deploy.files import sha256_file
from stlm_deploy.spec import load_spec, verify_artifacts
from stlm_train.cli import threshold_main
from stlm_train.rethreshold import ThresholdError, rethreshold


def _mvtec(root: Path, good: list[np.ndarray], bad: list[np.ndarray]) -> Path:
    """A labelled MVTec-layout folder (test/good, test/defect) from RGB arrays."""
    for sub, imgs in (("good", good), ("defect", bad)):
        (root / "test" / sub).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            cv2.imwrite(str(root / "test" / sub / f"{i:03d}.png"), im[..., ::-1])
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture()
def pair(tmp_path, small_ckpt, full_engine):
    """A private copy of the session checkpoint and the engine exported from it."""
    ckpt = tmp_path / "run" / "model.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(small_ckpt, ckpt)
    engine = tmp_path / "engine"
    shutil.copytree(full_engine.engine_dir, engine)
    return ckpt, engine


@pytest.fixture()
def labelled(sample_dir):
    """The bundled sample: test/good and test/broken_large."""
    return sample_dir


def test_checkpoint_and_engine_get_the_same_new_threshold(pair, labelled):
    from stlm_deploy import Detector
    from stlm_train.checkpoint import read_file

    ckpt, engine = pair
    before = load_spec(engine)
    res = rethreshold("f1", labelled, ckpt=ckpt, engine=engine, log=lambda s: None)
    t = res["choice"]["threshold"]
    obj = read_file(ckpt)
    spec = load_spec(engine)
    assert obj["thresholds"]["image"] == t and spec.thresholds.image == t != before.thresholds.image
    assert spec.thresholds.extra["target"] == "f1" and "stlm-threshold" in spec.thresholds.method
    assert spec.thresholds.extra["previous"]["image"] == before.thresholds.image
    assert spec.thresholds.score_min <= t <= spec.thresholds.score_max
    assert spec.thresholds.pixel <= t  # every flagged image shows where
    # provenance follows the rewritten checkpoint; the model files and their checksums are untouched
    assert spec.source.sha256 == sha256_file(ckpt) != before.source.sha256
    assert spec.artifacts == before.artifacts and verify_artifacts(engine, spec)
    with Detector.load(engine, backend="ort", precision="fp32") as det:
        images = [cv2.imread(str(p))[..., ::-1] for p in sorted(Path(labelled, "test").glob("*/*.png"))]
        preds = det.predict(images)
    assert all(p.is_anomalous == (p.score > t) for p in preds)
    assert any(p.is_anomalous for p in preds) and not all(p.is_anomalous for p in preds)


def test_engine_alone_is_scored_by_the_runtime_and_agrees_with_the_checkpoint(pair, labelled):
    ckpt, engine = pair
    by_ckpt = rethreshold("fnr<=0.2", labelled, ckpt=ckpt, dry_run=True, log=lambda s: None)
    by_engine = rethreshold("fnr<=0.2", labelled, engine=engine, backend="ort", log=lambda s: None)
    assert by_engine["choice"]["threshold"] == pytest.approx(by_ckpt["choice"]["threshold"], abs=1e-4)
    assert load_spec(engine).thresholds.image == by_engine["choice"]["threshold"]
    assert "scored by engine" in load_spec(engine).thresholds.method


def test_stlm_infer_decides_with_the_new_threshold(pair, labelled, tmp_path):
    from click.testing import CliRunner

    from stlm_deploy.cli import main as infer_main

    _, engine = pair
    rethreshold("fpr<=0", labelled, engine=engine, backend="ort", log=lambda s: None)
    t = load_spec(engine).thresholds.image
    out = tmp_path / "out"
    r = CliRunner().invoke(infer_main, ["--engine", str(engine), "--backend", "ort", "--out", str(out),
                                        str(Path(labelled, "test"))])
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "scores.json").read_text())["results"]
    assert rows and all(r["is_anomalous"] == (r["score"] > t) for r in rows)
    good = [r for r in rows if "/good/" in r["path"].replace("\\", "/")]
    assert good and not any(r["is_anomalous"] for r in good)  # fpr<=0 on these very images


def test_missing_class_and_mismatched_pair_are_one_line_and_write_nothing(pair, labelled, tmp_path, capsys):
    ckpt, engine = pair
    good_only = _mvtec(tmp_path / "goodonly", [np.full((64, 64, 3), 90, np.uint8)] * 3, [])
    shas = (sha256_file(ckpt), sha256_file(engine / "stlm.json"))
    rc = threshold_main(["--target", "f1", "--data", str(good_only), "--ckpt", str(ckpt), "--engine", str(engine)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0 and "no defective images" in err and str(good_only) in err
    assert rethreshold("fpr<=0.1", good_only, ckpt=ckpt, dry_run=True, log=lambda s: None)["written"] == []
    import torch

    other = tmp_path / "other.ckpt"  # same weights, other thresholds: not the file the engine came from
    obj = torch.load(ckpt, weights_only=True)
    torch.save({**obj, "thresholds": {**obj["thresholds"], "image": 0.5}}, other)
    with pytest.raises(ThresholdError, match="exported from another checkpoint"):
        rethreshold("fpr<=0.1", labelled, ckpt=other, engine=engine, log=lambda s: None)
    assert (sha256_file(ckpt), sha256_file(engine / "stlm.json")) == shas
    rc = threshold_main(["--target", "fpr<=2", "--data", str(labelled), "--engine", str(engine)])
    assert rc != 0 and "--target" in capsys.readouterr().err
