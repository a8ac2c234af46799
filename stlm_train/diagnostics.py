"""Map diagnostics: does a trained model's map follow the image content or the network's frame?

Three measurements, each a number with a documented pass level, kept as fast tests and printed by
``python -m stlm_train.diagnostics`` for a checkpoint:

- **positional flatness** (:func:`edge_ratio`, :func:`border_ratio`): the mean FA (and TLM) map over good images,
  pooled on a coarse grid and divided by its mean, should be flat. A hot right column / bottom row is
  the network frame (at 256 px TinyViT's right/bottom attention windows are mostly zero padding), not
  content; a hot ring on every side is the frame too.
- **BatchNorm consistency** (:func:`batchnorm_consistency`): the students' running statistics, which
  inference uses, describe clean images. With the official train-mode BatchNorm they are an average of
  the last steps' pseudo-anomalous pairs, which inference never sees.
- **teacher locality** (:func:`teacher_locality`): a pasted defect should change the teacher's
  features more inside the defect than outside it, at every distilled level; if the teacher moves
  everywhere the students learn to disagree everywhere (good image AUROC, maps that do not localise).

Two more describe where the map is hot, with no pass level (they explain a table, they do not gate):

- **peak in defect** (:func:`peak_in_defect`): the share of defective test images whose map maximum lies in
  the ground-truth mask. The image score is the mean of the hottest pixels, so when the peak is elsewhere the
  score measures something other than the defect, whatever the pixel AUROC says.
- **detail correlation** (:func:`detail_correlation`): how closely the map of a good image follows its fine
  detail (Spearman rank correlation with ``|image - blur(image)|`` on a coarse grid). High values mean the
  students disagree on edges and texture as such: false alarms wherever a part has detail.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Pass levels used by the tests and printed by the command.
MAX_EDGE_RATIO = 1.5
MIN_TEACHER_LOCALITY = 1.4
MAX_BN_INCONSISTENCY = 0.25


def grid_profile(maps: np.ndarray | torch.Tensor, grid: int = 8) -> np.ndarray:
    """Mean of (N, H, W) maps, average-pooled to grid x grid and divided by its own mean."""
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32)).mean(dim=0)[None, None]  # (1, 1, H, W)
    pooled = F.adaptive_avg_pool2d(m, grid)[0, 0].double().numpy()
    return pooled / max(float(pooled.mean()), 1e-12)


def edge_ratio(profile: np.ndarray) -> float:
    """Mean of the right column and bottom row cells over the mean of the other cells."""
    edge = np.zeros(profile.shape, dtype=bool)
    edge[:, -1] = edge[-1, :] = True
    return _cells_over_rest(profile, edge)


def border_ratio(profile: np.ndarray) -> float:
    """Mean of the outer ring of cells over the mean of the inner cells: a frame hot on every side (zero
    padding, stretched borders) that :func:`edge_ratio`'s right/bottom band does not single out."""
    ring = np.ones(profile.shape, dtype=bool)
    ring[1:-1, 1:-1] = False
    return _cells_over_rest(profile, ring)


def _cells_over_rest(profile: np.ndarray, cells: np.ndarray) -> float:
    return float(profile[cells].mean() / max(float(profile[~cells].mean()), 1e-12))


#: the maps the positional diagnostics read: the deployed FA map and the students' TLM map
MAP_OUTPUTS = ("anomaly_map", "tlm_map")


def peak_in_defect(maps: np.ndarray, masks: np.ndarray) -> float:
    """Share of (N, H, W) maps whose maximum falls inside their (N, H, W) mask (images with an empty mask are
    skipped; NaN when none has one)."""
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must have the same shape")
    flat = masks.reshape(len(masks), -1) > 0
    keep = flat.any(axis=1)
    if not keep.any():
        return float("nan")
    peaks = maps.reshape(len(maps), -1)[keep].argmax(axis=1)
    return float(flat[keep][np.arange(len(peaks)), peaks].mean())


def fine_detail(image: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """|grey - Gaussian blur(grey)| of a uint8 RGB (H, W, 3) image: its edges and fine texture, (H, W) float32."""
    import cv2

    grey = np.asarray(image, dtype=np.float32).mean(axis=-1)
    return np.abs(grey - cv2.GaussianBlur(grey, (0, 0), sigma))


def detail_correlation(maps: np.ndarray, images: np.ndarray, grid: int = 32) -> float:
    """Mean over images of the Spearman correlation between each map and the image's :func:`fine_detail`, both
    area-pooled to grid x grid (the map's own resolution is coarse; pooling compares like with like)."""
    import cv2
    from scipy.stats import spearmanr

    maps, images = np.asarray(maps, dtype=np.float32), np.asarray(images)
    if len(maps) != len(images) or len(maps) == 0:
        raise ValueError(f"need as many maps as images (at least one), got {len(maps)} and {len(images)}")
    pool = lambda a: cv2.resize(a, (grid, grid), interpolation=cv2.INTER_AREA).ravel()  # noqa: E731
    rhos = [spearmanr(pool(m), pool(fine_detail(im))).statistic for m, im in zip(maps, images)]
    return float(np.nanmean(rhos))


@torch.no_grad()
def model_maps(model: nn.Module, images: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Each of :data:`MAP_OUTPUTS` the model gives (STFPM has no TLM map), (N, S, S), from one forward pass per
    batch of uint8 RGB images already at the model's size (model in eval mode)."""
    was = model.training
    model.eval()
    try:
        out: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(images), batch_size):
            pred = model(model.normalize(torch.from_numpy(images[s:s + batch_size])))
            for name in MAP_OUTPUTS:
                if getattr(pred, name) is not None:
                    out.setdefault(name, []).append(getattr(pred, name).float().numpy())
    finally:
        model.train(was)
    return {name: np.concatenate(v) for name, v in out.items()}


def mean_maps(model: nn.Module, images: np.ndarray, batch_size: int = 8, output: str = "anomaly_map") -> np.ndarray:
    """FA maps (or with ``output="tlm_map"`` the TLM maps) of :func:`model_maps`: the TLM map can carry a frame of
    its own that the FA head hides or adds to."""
    if output not in MAP_OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(MAP_OUTPUTS)}, got {output!r}")
    maps = model_maps(model, images, batch_size)
    if output not in maps:
        raise ValueError(f"the model has no {output} (STFPM has one map)")
    return maps[output]


@torch.no_grad()
def batchnorm_consistency(model: nn.Module, images: np.ndarray) -> float:
    """Do the students' BatchNorm statistics describe clean images? Largest |Δ| of both students' decoder
    features between inference (running statistics) and the same forward with the students' BatchNorm
    using the batch statistics of the clean ``images`` (running statistics untouched), relative to the
    largest feature magnitude. Statistics estimated on clean images give 0.03-0.07 on the tire category
    (batch vs population; 0.15 on 6 tiny generated images); the official train-mode statistics of
    pseudo-anomalous pairs gave 0.3-1.2 there and 2.0 on the generated images.
    """
    was = model.training
    x = model.normalize(torch.from_numpy(images))
    bns = [m for enc in (model.plain, model.denoising) for m in enc.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    try:
        model.eval()
        ref = torch.cat([torch.cat(f, 1) for f in model.student_features(x)], 1)
        for m in bns:
            m.train()
            m.momentum = 0.0  # a batch-statistics forward must not touch the running statistics
        got = torch.cat([torch.cat(f, 1) for f in model.student_features(x)], 1)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.train(was)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@torch.no_grad()
def teacher_locality(teacher: nn.Module, normalize: nn.Module, pairs: Sequence[tuple[np.ndarray, np.ndarray,
                     np.ndarray]]) -> list[float]:
    """Per distilled level: mean 1 - cos(T(N), T(I_a)) inside the pasted mask over the mean outside it.

    ``pairs``: (clean N, pseudo-anomalous I_a, mask M) at the teacher's input size, as the
    synthesizer makes them; positions count as inside where more than half of the feature cell is
    masked. Per-image means are averaged, so a large defect does not outweigh a small one.
    """
    inside: list[list[float]] = []
    outside: list[list[float]] = []
    for clean, pseudo, mask in pairs:
        feats = teacher(normalize(torch.from_numpy(np.stack([clean, pseudo]))))
        cover = None
        for k, f in enumerate(feats):
            if cover is None or cover.shape != f.shape[2:]:
                cover = F.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], f.shape[2:])[0, 0]
            d = 1 - F.cosine_similarity(f[0], f[1], dim=0)  # (h, w)
            hit, miss = cover > 0.5, cover <= 0.5
            if not hit.any() or not miss.any():
                continue
            while len(inside) <= k:
                inside.append([])
                outside.append([])
            inside[k].append(float(d[hit].mean()))
            outside[k].append(float(d[miss].mean()))
    if not inside:
        raise ValueError("teacher_locality: no pair has positions both inside and outside its mask")
    return [float(np.mean(i) / max(np.mean(o), 1e-12)) for i, o in zip(inside, outside)]


def locality_pairs(images: Sequence[np.ndarray], img_size: int, seed: int = 0, n: int = 16) -> list[tuple[np.ndarray,
                                                                                                        np.ndarray,
                                                                                                        np.ndarray]]:
    """(N, I_a, M) triples with one pasted defect each, from the trainer's own synthesizer (no augmentation)."""
    from .anomalies import PseudoAnomalySynthesizer, sample_rng

    synth = PseudoAnomalySynthesizer(img_size, probability=1.0, seed=seed)
    return [synth(images[j % len(images)], sample_rng(seed, 0, j)) for j in range(n)]


def diagnose_checkpoint(ckpt: str, data: str, category: str | None = None, format: str = "mvtec",
                        n_images: int = 24) -> dict[str, object]:
    """Every diagnostic for a trained STLM checkpoint on ``data`` (good test and training images; the defective test
    images for :func:`peak_in_defect`)."""
    from .checkpoint import read_checkpoint
    from .data import build_dataset
    from .modeling.teacher import build_builtin_teacher, calibrate_batchnorm

    record = read_checkpoint(ckpt)
    model = record.model()
    train = record.provenance
    size, resize = model.cfg.img_size, model.cfg.resize
    held = record.train_split.held_out
    tr = build_dataset(data, format, category, "train", size, resize)
    idx = [i for i, r in enumerate(tr.records) if r.image_path.name not in held]
    idx = idx[::max(1, len(idx) // n_images)][:n_images]
    train_images = np.stack([tr[i].image for i in idx])
    out: dict[str, object] = {"checkpoint": str(ckpt), "student_bn": train.get("student_bn", "train")}
    try:
        te = build_dataset(data, format, category, "test", size, resize)
        good = [te[i].image for i, r in enumerate(te.records) if r.label == 0]
        bad_samples = [te[i] for i, r in enumerate(te.records) if r.label == 1][:n_images]  # each file read once
        bad, bad_masks = [b.image for b in bad_samples], [b.mask for b in bad_samples]
    except Exception:  # no test split: the training images only
        good, bad, bad_masks = [], [], []
    for name, imgs in (("test_good", np.stack(good) if good else None), ("train", train_images)):
        if imgs is None:
            continue
        maps = model_maps(model, imgs)  # one pass for both maps
        for output, prefix in zip(MAP_OUTPUTS, ("", "tlm_")):  # keys of the FA map unprefixed, as before
            if output not in maps:
                continue
            prof = grid_profile(maps[output])
            out[f"{prefix}edge_ratio_{name}"] = edge_ratio(prof)
            out[f"{prefix}border_ratio_{name}"] = border_ratio(prof)
            out[f"{prefix}profile_{name}"] = np.round(prof, 2).tolist()
            out[f"{prefix}detail_correlation_{name}"] = detail_correlation(maps[output], imgs)
    if bad:
        maps = model_maps(model, np.stack(bad))
        for output, prefix in zip(MAP_OUTPUTS, ("", "tlm_")):
            if output in maps:
                out[f"{prefix}peak_in_defect"] = peak_in_defect(maps[output], np.stack(bad_masks))
    out["batchnorm_consistency"] = batchnorm_consistency(model, train_images[:8])
    t = train.get("teacher") or {}
    if t.get("kind") == "builtin":
        teacher = build_builtin_teacher(model.cfg, int(t["seed"]), t.get("recipe", "v1"))
        calibrate_batchnorm(teacher, (model.normalize(torch.from_numpy(train_images[s:s + 8]))
                                      for s in range(0, len(train_images), 8)))
        out["teacher_locality"] = teacher_locality(teacher, model.normalize, locality_pairs(train_images, size))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stlm_train.diagnostics --ckpt CKPT --data ROOT [--category C]``: print the diagnostics."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m stlm_train.diagnostics", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--category", default=None)
    p.add_argument("--format", default="mvtec")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args(argv)
    try:
        res = diagnose_checkpoint(a.ckpt, a.data, a.category, a.format)
    except (ValueError, OSError) as e:
        raise SystemExit(f"Error: {' '.join(str(e).split())}") from None
    for prefix in ("", "tlm_"):
        for k in ("edge_ratio_test_good", "edge_ratio_train", "border_ratio_test_good", "border_ratio_train"):
            if prefix + k in res:
                print(f"{prefix}{k}: {res[prefix + k]:.2f} (flat: <= {MAX_EDGE_RATIO})")
    for prefix in ("", "tlm_"):
        for k in ("detail_correlation_test_good", "detail_correlation_train"):
            if prefix + k in res:
                print(f"{prefix}{k}: {res[prefix + k]:.2f} (the map following edges and texture of good images)")
        if prefix + "peak_in_defect" in res:
            print(f"{prefix}peak_in_defect: {res[prefix + 'peak_in_defect']:.2f} (defective test images whose map "
                  "maximum is in the defect)")
    print(f"batchnorm_consistency: {res['batchnorm_consistency']:.4f} (max |running - clean-batch statistics "
          f"features| / max |feature|; <= {MAX_BN_INCONSISTENCY})")
    if "teacher_locality" in res:
        print("teacher_locality: " + ", ".join(f"level {k + 1} {v:.2f}" for k, v in enumerate(res["teacher_locality"]))
              + f" (local: >= {MIN_TEACHER_LOCALITY})")
    for prefix, label in (("", "FA"), ("tlm_", "TLM")):
        if prefix + "profile_test_good" in res:
            print(f"mean {label} map of good test images, 8x8, / mean:")
            print("\n".join(" ".join(f"{v:5.2f}" for v in row) for row in res[prefix + "profile_test_good"]))
    if a.json:
        from stlm_deploy.files import atomic_write_json

        atomic_write_json(a.json, res)
    return 0


__all__ = ["MAP_OUTPUTS", "MAX_BN_INCONSISTENCY", "MAX_EDGE_RATIO", "MIN_TEACHER_LOCALITY", "batchnorm_consistency",
           "border_ratio", "detail_correlation", "diagnose_checkpoint", "edge_ratio", "fine_detail", "grid_profile",
           "locality_pairs", "mean_maps", "model_maps", "peak_in_defect", "teacher_locality"]


if __name__ == "__main__":
    raise SystemExit(main())
