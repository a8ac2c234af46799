"""Tiled training (--work-size): crops of the work image as samples, deterministic and resumable, both families;
thresholds and the calibration range on stitched held-out maps; the checkpoint records the tiling; bad options
are one line. Small configs at 64 px tiles of 128 px work images: seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stlm_deploy.preprocess import work_image
from stlm_deploy.tiling import Tiling, run_tiled
from stlm_train.anomalies import PseudoAnomalySynthesizer, sample_rng
from stlm_train.checkpoint import load_model, read_file
from stlm_train.data import build_dataset, make_generated_dataset
from stlm_train.evaluate import evaluate_checkpoint
from stlm_train.modeling.predict import predict_tiled, tile_runner
from stlm_train.training import TrainError, TrainOptions, train

TILE, WORK = 64, 128


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_generated_dataset(tmp_path_factory.mktemp("gen") / "d", n_train=8, n_test_good=3, n_test_bad=3,
                                  size=WORK, seed=0)


def opts(data_root: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=str(data_root), out=str(out), config="small", img_size=TILE, work_size=WORK, steps=2,
                progress=False, evaluate=False, save_every=0)
    base.update(kw)
    return TrainOptions(**base)


def test_samples_are_crops_of_the_work_image_drawn_per_sample():
    rng0 = np.random.default_rng(0)
    image = rng0.integers(0, 256, (150, 100, 3), dtype=np.uint8)  # not square: work shape 128 x 85 -> 128 x 64
    tiling = Tiling(TILE, WORK)
    synth = PseudoAnomalySynthesizer(TILE, probability=0.0, tiling=tiling)
    work = work_image(image, tiling, "area")
    assert work.shape[:2] == tiling.work_shape(150, 100) == (128, 85)
    seen = set()
    for k in range(12):
        clean, pseudo, mask = synth(image, sample_rng(0, 0, k))
        assert clean.shape == (TILE, TILE, 3) and np.array_equal(clean, pseudo) and not mask.any()
        hits = [(y, x) for y in range(work.shape[0] - TILE + 1) for x in range(work.shape[1] - TILE + 1)
                if np.array_equal(work[y:y + TILE, x:x + TILE], clean)]
        assert hits, "the sample is not a crop of the work image"
        seen.add(hits[0])
        again, _, _ = synth(image, sample_rng(0, 0, k))
        assert np.array_equal(again, clean)  # the position comes from the sample's generator
    assert len(seen) > 3
    whole, pseudo, mask = PseudoAnomalySynthesizer(TILE, probability=1.0, tiling=tiling, crop=False)(
        image, sample_rng(0, 1, 0))
    assert whole.shape == work.shape and pseudo.shape == work.shape and mask.shape == work.shape[:2]
    assert np.array_equal(whole, work)


@pytest.mark.parametrize("config", ["small", "stfpm"])
def test_tiled_run_records_its_tiling_and_thresholds_come_from_stitched_maps(data_root, tmp_path, config):
    res = train(opts(data_root, tmp_path / "run", config=config, evaluate=True))
    obj = read_file(res.model_path)
    assert {k: obj["preprocessing"][k] for k in ("work_size", "tile_overlap", "tile_blend")} == \
        {"work_size": WORK, "tile_overlap": 0.25, "tile_blend": "mean"}
    assert obj["train"]["work_size"] == WORK and obj["config"]["img_size"] == TILE
    model = load_model(res.model_path)
    assert model.tiling == Tiling(TILE, WORK)
    # the held-out good scores, recomputed here from the tiles and stlm_deploy.tiling alone
    ds = build_dataset(data_root, "mvtec", None, "train", None)
    held = [ds[i] for i in range(len(ds)) if Path(ds[i].path).name in obj["thresholds"]["held_out"]]
    ours = [float(run_tiled(work_image(s.image, model.tiling, "area"), model.tiling, tile_runner(model), 8,
                            model.cfg.top_k).score) for s in held]
    np.testing.assert_allclose(obj["thresholds"]["calibration_scores"]["good"], ours, atol=2e-6)
    with torch.no_grad():  # an untiled computation (whole image at 64 px) gives other scores
        untiled = model.predict(torch.from_numpy(np.stack([s.image for s in held]))).score.numpy()
    assert np.abs(untiled - np.asarray(ours)).max() > 1e-4
    assert res.metrics["tiling"]["work_size"] == WORK and res.metrics["eval_grid"] == [WORK, WORK]
    again = evaluate_checkpoint(res.model_path, data_root)  # stlm-eval stitches the same way
    assert again["fa"]["i_auroc"] == pytest.approx(res.metrics["fa"]["i_auroc"])
    assert again["eval_grid"] == [WORK, WORK]
    assert predict_tiled(model, held[0].image).score == pytest.approx(ours[0], abs=1e-6)


def test_tiled_runs_are_deterministic_and_resume_to_the_uninterrupted_weights(data_root, tmp_path):
    straight = train(opts(data_root, tmp_path / "straight", steps=4))
    train(opts(data_root, tmp_path / "resumed", steps=2))
    resumed = train(opts(data_root, tmp_path / "resumed", steps=4, resume=True), explicit={"steps", "resume"})
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()) <= 1e-6
    untiled = train(opts(data_root, tmp_path / "untiled", steps=4, work_size=None))
    c = untiled.model.state_dict()
    assert max(float((a[k].double() - c[k].double()).abs().max()) for k in a if a[k].numel()) > 1e-4
    assert "work_size" not in read_file(untiled.model_path)["preprocessing"]
    assert "work_size" not in read_file(tmp_path / "untiled" / "last.ckpt")["options"]
    with pytest.raises(TrainError, match=r"--resume: --work-size 256 differs from the run's 128"):
        train(opts(data_root, tmp_path / "resumed", steps=5, resume=True, work_size=256),
              explicit={"steps", "resume", "work_size"})
    with pytest.raises(TrainError, match=r"--resume: --work-size 128 differs from the run's None"):
        train(opts(data_root, tmp_path / "untiled", steps=5, resume=True), explicit={"steps", "resume", "work_size"})


@pytest.mark.parametrize("kw, needle", [
    (dict(work_size=32), "--work-size: must be at least the tile size 64 (the model input, img_size), got 32"),
    (dict(tile_overlap=0.9), "--tile-overlap: must be a number in [0, 0.9), got 0.9"),
    (dict(tile_overlap=-0.5), "--tile-overlap: must be a number in [0, 0.9), got -0.5"),
])
def test_bad_tiling_options_are_one_line(data_root, tmp_path, kw, needle):
    with pytest.raises(TrainError) as e:
        opts(data_root, tmp_path / "x", **kw).validate()
    assert str(e.value) == needle
    assert opts(data_root, tmp_path / "y", work_size=TILE).validate().tiling() is None  # = img_size: untiled


def test_the_original_grid_compares_untiled_and_tiled_models_on_the_images_own_size(data_root, tmp_path):
    from stlm_train.evaluate import model_split, predict_dataset

    res = train(opts(data_root, tmp_path / "untiled", steps=1, work_size=None))
    model = load_model(res.model_path)
    on_model = predict_dataset(model, model_split(model, data_root, "mvtec", None, "test"))
    on_image = predict_dataset(model, model_split(model, data_root, "mvtec", None, "test", "original"),
                               grid="original")
    assert on_model.fa_maps.shape[1:] == (TILE, TILE) and on_image.fa_maps.shape[1:] == (WORK, WORK)
    np.testing.assert_allclose(on_image.fa_scores, on_model.fa_scores, atol=1e-6)  # scores: the img_size map
    assert on_image.masks.shape == on_image.fa_maps.shape
    ev = evaluate_checkpoint(res.model_path, data_root, grid="original")
    assert ev["grid"] == "original" and ev["eval_grid"] == [WORK, WORK]
    with pytest.raises(ValueError, match="--grid: must be one of model, original"):
        evaluate_checkpoint(res.model_path, data_root, grid="work")
