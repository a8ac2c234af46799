"""The runtime must work where PyTorch (and the training/export packages) are not installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = {"torch", "torchvision", "stlm_train", "stlm_export", "export", "stlm_bench", "benchmarks"}
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        # Simulates an install without torch: any import attempt is recorded and fails.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError("blocked for this test: " + name)
            return None

    sys.meta_path.insert(0, Block())
    import numpy as np
    import stlm_deploy
    from stlm_deploy import Detector
    from stlm_deploy import cli, visualize, client, normalization, decision  # noqa: F401
    from stlm_deploy.serving import cli as serve_cli, client as serving_client, server  # noqa: F401
    from stlm_deploy.backends import available_backends
    from stlm_deploy.backends import ort, openvino, tensorrt  # noqa: F401
    scores = {}
    for backend in ("ort", "openvino", "auto"):
        det = Detector.load(sys.argv[1], backend=backend)
        pred = det.predict(np.full((50, 60, 3), 128, np.uint8))
        scores[backend] = pred.score
        visualize.overlay(np.zeros((50, 60, 3), np.uint8), pred.anomaly_map, threshold=0.5)
    available_backends()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"attempts": attempts, "loaded": loaded, "scores": scores}))
""")


def test_runtime_never_imports_torch(engines, tmp_path):
    env = dict(os.environ)  # the package is installed: no PYTHONPATH needed
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(engines["plain"])], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and report["loaded"] == []
    expected = 128 / 255
    assert all(abs(s - expected) < 1e-2 for s in report["scores"].values()), report["scores"]
