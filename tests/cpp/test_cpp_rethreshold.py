"""The C++ runtime decides with a threshold set by stlm-threshold after export (stlm.json rewritten, no re-export)."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from stlm_deploy.spec import load_spec
from stlm_train.rethreshold import rethreshold
from tests.contract_engine import sample_image

from .conftest import CppBuild
from .test_cpp_runtime import run_app


def test_cpp_decides_with_the_rewritten_threshold(cpp_build: CppBuild, cpp_engines: dict[str, Path],
                                                  tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    shutil.copytree(cpp_engines["fused"], engine)
    data = tmp_path / "val"
    paths = []
    for sub, gain in (("good", 0.6), ("scratch", 1.0)):  # the contract map is the channel mean: brighter scores higher
        (data / sub).mkdir(parents=True)  # the "folder" layout: good/ and one folder per defect, masks optional
        for i in range(4):
            img = np.clip(sample_image(80, 96, seed=10 * i + (sub == "scratch")) * gain, 0, 255).astype(np.uint8)
            p = data / sub / f"{i}.png"
            cv2.imwrite(str(p), img[..., ::-1])
            paths.append(p)
    old = load_spec(engine).thresholds.image
    res = rethreshold("f1", data, engine=engine, format="folder", backend="openvino", log=lambda s: None)
    t = res["choice"]["threshold"]
    assert load_spec(engine).thresholds.image == t != old and res["choice"]["f1"] == 1.0
    proc = run_app(cpp_build, engine, *paths)
    assert proc.returncode == 0, proc.stderr
    decisions = {Path(line.split(" ")[0]).parent.name + "/" + Path(line.split(" ")[0]).name: line.split(" ")[2]
                 for line in proc.stdout.splitlines()}
    assert decisions == {f"{p.parent.name}/{p.name}": "anomalous" if p.parent.name == "scratch" else "normal"
                         for p in paths}
    for line in proc.stdout.splitlines():  # the same rule as Python: score > threshold
        _, score, decision, _ = line.split(" ")
        assert (decision == "anomalous") == (float(score) > t)
