"""STLM modules, one concept per file (segment-anything style)."""
from .decoder import FeatureDecoder, PositionEmbeddingRandom
from .fa_head import FAHead
from .stlm import STLM, InferenceOutput, fa_input, l2n, tlm_map, topk_score, upsample
from .teacher import Teacher, build_builtin_teacher, build_tinyvit_teacher, build_vit_teacher, calibrate_batchnorm
from .tiny_vit import TinyViT
from .vit import ImageEncoderViT

__all__ = ["STLM", "InferenceOutput", "TinyViT", "ImageEncoderViT", "FeatureDecoder", "PositionEmbeddingRandom",
           "FAHead", "Teacher", "build_builtin_teacher", "build_tinyvit_teacher", "build_vit_teacher",
           "calibrate_batchnorm", "l2n", "fa_input", "tlm_map", "topk_score", "upsample"]
