"""STFPM: a frozen ResNet-18 teacher and a same-shape student, matched on layer1..layer3.

Numerics of the official code (gdwang08/STFPM, ``main.py``): features of every matched stage are
L2-normalised over channels (``F.normalize``, eps 1e-12) on both sides; the training loss is
sum over stages of mean over (image, position) of sum over channels of (t - s)^2; the test map per
stage is sum over channels of (t - s)^2, resized bilinearly (align_corners=False) to layer1's
resolution (64 x 64 at 256 px), multiplied over the stages and resized to the image size; the image
score is the maximum of that map. Both networks run at inference, so both live in this module (the
exported graph contains the teacher too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import STFPMConfig
from .common import Normalize
from .predict import InferenceOutput, predict_images, upsample
from .resnet import ResNet18Features

Pyramid = list[torch.Tensor]  # one (B, C_l, h_l, w_l) map per matched stage


def stfpm_loss(teacher: Pyramid, student: Pyramid) -> torch.Tensor:
    """Training loss: sum_l mean_{b,h,w} sum_c (n(t_l) - n(s_l))^2 (a scalar)."""
    total = torch.zeros((), device=student[0].device, dtype=torch.float32)
    for t, s in zip(teacher, student):
        total = total + (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1).float().mean()
    return total


def stfpm_map(teacher: Pyramid, student: Pyramid, map_size: int) -> torch.Tensor:
    """Test map at ``map_size``: prod_l resize(sum_c (n(t_l) - n(s_l))^2) -> (B, 1, m, m)."""
    out: torch.Tensor | None = None
    for t, s in zip(teacher, student):
        d = (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1, keepdim=True)
        d = F.interpolate(d, size=(map_size, map_size), mode="bilinear", align_corners=False)
        out = d if out is None else out * d
    assert out is not None
    return out


def max_score(anomaly_map: torch.Tensor) -> torch.Tensor:
    """Image score: the largest pixel of the full-size map (B, H, W) -> (B,)."""
    return anomaly_map.flatten(1).amax(dim=1)


class STFPM(nn.Module):
    """Teacher + student ResNet-18 trunks; ``forward`` maps normalised images to map and score.

    Args:
        cfg: image size, matched stages, normalisation.
        teacher_generator: draws the teacher's initial weights (the built-in teacher uses a generator of
            its own so it never shares the students' random stream); None: the global RNG.
    """

    def __init__(self, cfg: STFPMConfig, teacher_generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = ResNet18Features(cfg.layers)  # first: the teacher's build never shifts the students' init
        self.teacher = ResNet18Features(cfg.layers, generator=teacher_generator).requires_grad_(False)
        self.normalize = Normalize(cfg.pixel_mean, cfg.pixel_std)
        self.teacher.eval()

    def train(self, mode: bool = True) -> "STFPM":
        """Only the student ever trains; the teacher keeps its BatchNorm statistics (official ``teacher.eval()``)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def features(self, x: torch.Tensor) -> tuple[Pyramid, Pyramid]:
        """(teacher, student) pyramids of normalised (B, 3, S, S) images; no gradient reaches the teacher."""
        with torch.no_grad():
            t = self.teacher(x)
        return t, self.student(x)

    def forward(self, x: torch.Tensor) -> InferenceOutput:
        """x: normalised (B, 3, S, S) -> anomaly_map (B, S, S) and score (B,)."""
        t, s = self.features(x)
        anomaly_map = upsample(stfpm_map(t, s, self.cfg.map_size), (x.shape[2], x.shape[3]))
        return InferenceOutput(anomaly_map, max_score(anomaly_map))

    def predict(self, images: torch.Tensor) -> InferenceOutput:
        """uint8 RGB (N, H, W, 3) of any size -> maps at (H, W) (:func:`predict_images`)."""
        return predict_images(self, images)
