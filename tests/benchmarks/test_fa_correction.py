"""The FA-correction sweep scales exactly the head's learned correction: alpha 1 is the checkpoint as trained,
and a checkpoint without the prior path is refused in one line."""
from __future__ import annotations

import subprocess
import sys


def test_alpha_one_is_the_trained_model(small_stlm, sample_dir, tmp_path):
    from stlm_bench.fa_correction import _metrics, sweep
    from stlm_train import save_checkpoint
    from stlm_train.evaluate import load_for_eval, metrics_from_predictions, model_split, predict_dataset
    from tests.stlm_train.helpers import with_tlm_prior

    ckpt = tmp_path / "prior" / "model.ckpt"
    save_checkpoint(ckpt, with_tlm_prior(small_stlm))
    out = sweep(ckpt, str(sample_dir), None, (0.0, 1.0))
    model, _ = load_for_eval(ckpt)
    pred = predict_dataset(model, model_split(model, sample_dir, "mvtec", None, "test"))
    assert out["fa"]["1"] == _metrics(pred)["fa"] and out["tlm"] == _metrics(pred)["tlm"]
    evaluator = metrics_from_predictions(pred)
    assert out["fa"]["1"]["pixel_auroc"] == evaluator["fa"]["p_auroc"]
    assert out["tlm"]["aupro"] == evaluator["tlm"]["aupro"]
    assert out["fa"]["0"] != out["fa"]["1"]  # the correction of this model does change the map
    assert out["prior_weight"] == [0.7, 1.3] and out["prior_bias"] == 2.0


def test_a_checkpoint_without_the_prior_path_is_one_line_error(small_ckpt, sample_dir):
    r = subprocess.run([sys.executable, "-m", "stlm_bench.fa_correction", "--runs", str(small_ckpt),
                        "--data", str(sample_dir)], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert str(small_ckpt) in lines[0] and "prior path" in lines[0]
