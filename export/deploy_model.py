"""``DeployModel``: a model's inference graph with pre/post-processing fused in.

It wraps an :class:`stlm_train.STLM` or :class:`stlm_train.modeling.STFPM` (sharing its submodules, no
copies) so that one traced graph goes from the camera's uint8 RGB batch to the outputs the runtime
needs. STLM (student-only):

    image uint8 (N, S, S, 3) RGB --cast, NHWC->NCHW, (x - mean) / std-->  (N, 3, S, S)
      -> Sp and Sd (two TinyViTs), one decoder call on both streams stacked on the batch axis
      -> FA head (sigmoid) -> bilinear upsample to S x S -> anomaly_map (N, S, S)
      -> mean of the top-k pixels -> score (N,)
      [-> no-FA (TLM) map -> upsample -> tlm_map (N, S, S)]   with ``with_tlm``

The teacher and the decoder parts that never reach the map (output upscaling, hypernetworks, IoU
head) are not part of ``STLM`` in the first place, so they cannot leak into the export. Everything
size-dependent uses ``cfg.img_size`` as a Python constant, so only the batch axis is symbolic.

STFPM (both networks are needed at inference, so both are in the graph):

    image -> normalise -> teacher and student ResNet-18 trunks (layer1..3) -> per stage
      sum_c (n(t) - n(s))^2 -> bilinear to S/4 -> product -> bilinear to S x S -> anomaly_map
      -> maximum -> score (N,)

The score is computed in the graph for both families, so runtimes never need to know which family
an engine holds (``stlm.json`` says it in ``model_family``, and ``top_k`` is 1 for STFPM's maximum).
"""
from __future__ import annotations

import torch
from torch import nn

from stlm_train import STLM
from stlm_train.modeling import STFPM, tlm_map, topk_score, upsample

from .window_layout import WindowedTinyViT

__all__ = ["DeployModel", "INPUT_NAME", "OUTPUT_NAMES", "TLM_OUTPUT"]

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")  # the ONNX output names (InferenceOutput field names)
TLM_OUTPUT = "tlm_map"


class DeployModel(nn.Module):
    """Fused inference graph around a (shared, not copied) ``STLM`` or ``STFPM``.

    Args:
        stlm: the trained model (eval mode is forced).
        fuse_pre: True: input uint8 NHWC RGB, normalisation inside the graph. False: input is the
            already normalised float32 NCHW tensor (for runtimes that do their own preprocessing).
        with_tlm: also output STLM's no-FA (TLM) map, e.g. for evaluation or a second opinion.
        window_layout: run the students as :class:`WindowedTinyViT` (window order carried across each
            stage's blocks; same numbers). Measured slower than the official block order on ONNX Runtime
            and OpenVINO (``stlm_bench.vs_plain --layouts``), so off by default; kept to reproduce that.
    """

    def __init__(self, stlm: STLM | STFPM, fuse_pre: bool = True, with_tlm: bool = False,
                 window_layout: bool = False) -> None:
        super().__init__()
        self.family = getattr(stlm.cfg, "family", "stlm")
        if with_tlm and self.family != "stlm":
            raise ValueError(f"with_tlm: a {self.family} model has a single map (the TLM map is STLM's)")
        self.stlm = stlm
        self.fuse_pre = bool(fuse_pre)
        self.with_tlm = bool(with_tlm)
        self.img_size = int(stlm.cfg.img_size)
        self.top_k = int(stlm.cfg.top_k)
        self.window_layout = bool(window_layout) and self.family == "stlm"
        if self.window_layout:  # inference views sharing the students' weights (no copies)
            self.plain = WindowedTinyViT(stlm.plain)
            self.denoising = WindowedTinyViT(stlm.denoising)
        # The wrapper itself must be in eval mode too: the exporter restores the wrapper's mode
        # recursively afterwards, which would otherwise switch the shared STLM to training (BN!).
        self.eval()

    @property
    def input_name(self) -> str:
        return INPUT_NAME

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + ((TLM_OUTPUT,) if self.with_tlm else ())

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """A deterministic input of the graph's dtype/layout (what the exporter traces with)."""
        g = torch.Generator().manual_seed(seed)
        s = self.img_size
        img = torch.randint(0, 256, (batch, s, s, 3), dtype=torch.uint8, generator=g)
        return img if self.fuse_pre else self.stlm.normalize(img)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 (N, S, S, 3) RGB (or normalised float32 (N, 3, S, S)) -> anomaly_map, score[, tlm_map]."""
        x = self.stlm.normalize(image) if self.fuse_pre else image  # (N, 3, S, S)
        if self.family == "stfpm":
            out = self.stlm(x)  # map at S x S and its maximum, both from the model's own forward
            return out.anomaly_map, out.score
        encoders = (self.plain, self.denoising) if self.window_layout else None
        plain, denoising = self.stlm.student_features(x, encoders)  # one batched decoder call for both streams
        size = (self.img_size, self.img_size)
        anomaly_map = upsample(torch.sigmoid(self.stlm.fa_logits(plain, denoising)), size)  # (N, S, S)
        score = topk_score(anomaly_map, self.top_k)  # (N,)
        if not self.with_tlm:
            return anomaly_map, score
        return anomaly_map, score, upsample(tlm_map(plain, denoising), size)
