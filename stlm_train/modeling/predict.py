"""``predict`` for every model family: uint8 RGB batch of any size -> maps at that size and scores.

The images are resized to the model's ``img_size`` with the runtime's own resize (so eager PyTorch and
an exported engine see the same pixels), normalised as the fused graph does, run through the model's
``forward`` (normalised (B, 3, S, S) -> :class:`InferenceOutput`), and the maps are resized back.
Scores are always taken on the ``img_size`` map, which is what the exported graph computes.

A tiled model (``model.tiling``, from its checkpoint's preprocessing) is run by :func:`predict_tiled` the way
every runtime runs a tiled engine (:func:`stlm_deploy.tiling.run_tiled`): ``predict`` stays the per-tile
primitive.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stlm_deploy.detector import DEFAULT_CHUNK
from stlm_deploy.preprocess import resize_image, work_image
from stlm_deploy.tiling import Runner, TiledResult, Tiling, run_tiled


class InferenceOutput(NamedTuple):
    """Field names are the ONNX output names; ``tlm_map`` exists for STLM only (None for STFPM)."""

    anomaly_map: torch.Tensor  # (B, H, W) the deployed map
    score: torch.Tensor  # (B,) image score taken on that map
    tlm_map: torch.Tensor | None = None  # (B, H, W) STLM's no-FA map


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) -> (B, H, W), bilinear with align_corners=False as in the official evaluations."""
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0]


def check_images(images: object) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a uint8 tensor (N, H, W, 3) RGB, got {got}")


@torch.no_grad()
def predict_images(model: nn.Module, images: torch.Tensor) -> InferenceOutput:
    """uint8 RGB (N, H, W, 3) -> :class:`InferenceOutput` at (H, W); ``model`` has ``cfg`` and ``normalize``."""
    check_images(images)
    device = next(model.parameters()).device
    h, w = images.shape[1:3]
    s = model.cfg.img_size
    if (h, w) != (s, s):
        small = [resize_image(im, s, model.cfg.resize) for im in images.cpu().numpy()]
        images = torch.from_numpy(np.stack(small))
    out = model(model.normalize(images.to(device)))
    if (h, w) != (s, s):
        out = InferenceOutput(*(m if m is None or m.ndim == 1 else upsample(m[:, None], (h, w)) for m in out))
    return out


def tiling_of(model: nn.Module) -> Tiling | None:
    """The tiling a model was trained/loaded with (None: untiled)."""
    return getattr(model, "tiling", None)


def tile_runner(model: nn.Module) -> Runner:
    """``run(uint8 tiles (n, S, S, 3)) -> {"anomaly_map", "score"[, "tlm_map"]}`` as numpy, for
    :func:`stlm_deploy.tiling.run_tiled` (the model in whatever mode the caller set, no gradients)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(tiles: np.ndarray) -> dict[str, Any]:
        out = model(model.normalize(torch.from_numpy(np.ascontiguousarray(tiles)).to(device)))
        res = {"anomaly_map": out.anomaly_map.float().cpu().numpy(), "score": out.score.float().cpu().numpy()}
        if out.tlm_map is not None:
            res["tlm_map"] = out.tlm_map.float().cpu().numpy()
        return res

    return run


def predict_tiled(model: nn.Module, image: np.ndarray, chunk: int = DEFAULT_CHUNK, tiling: Tiling | None = None,
                  work: np.ndarray | None = None) -> TiledResult:
    """One uint8 RGB (H, W, 3) image through a tiled model: stitched work maps and the top-k score.

    ``work``: the image already at its work shape (e.g. a pseudo-anomalous work image)."""
    tiling = tiling or tiling_of(model)
    if tiling is None:
        raise ValueError("predict_tiled: the model has no tiling (an untiled checkpoint): use predict")
    if work is None:
        work = work_image(image, tiling, model.cfg.resize)
    return run_tiled(work, tiling, tile_runner(model), chunk, model.cfg.top_k)
