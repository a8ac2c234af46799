"""STLM and STFPM modules, one concept per file (segment-anything style)."""
from .decoder import FeatureDecoder, PositionEmbeddingRandom
from .fa_head import FAHead
from .predict import InferenceOutput, predict_images, predict_tiled, tiling_of, upsample
from .resnet import ResNet18Features
from .stfpm import STFPM, max_score, stfpm_loss, stfpm_map
from .stlm import STLM, fa_input, l2n, tlm_map, topk_score
from .teacher import Teacher, build_builtin_teacher, build_tinyvit_teacher, build_vit_teacher, calibrate_batchnorm
from .tiny_vit import TinyViT
from .vit import ImageEncoderViT

__all__ = ["STLM", "InferenceOutput", "TinyViT", "ImageEncoderViT", "FeatureDecoder", "PositionEmbeddingRandom",
           "FAHead", "Teacher", "build_builtin_teacher", "build_tinyvit_teacher", "build_vit_teacher",
           "calibrate_batchnorm", "l2n", "fa_input", "tlm_map", "topk_score", "upsample", "predict_images",
           "predict_tiled", "tiling_of",
           "STFPM", "ResNet18Features", "stfpm_loss", "stfpm_map", "max_score"]


def build_model(cfg, teacher_generator=None):  # noqa: ANN001, ANN201 - typed in the docstring (no cycles)
    """The model of ``cfg``'s family with fresh weights: :class:`STLM` or :class:`STFPM` (``teacher_generator``
    draws the STFPM teacher's init)."""
    if getattr(cfg, "family", "stlm") == "stfpm":
        return STFPM(cfg, teacher_generator)
    return STLM(cfg)


__all__ += ["build_model"]
