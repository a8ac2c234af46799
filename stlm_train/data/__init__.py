"""Data loading for STLM training and evaluation: image I/O, data-set layouts, two procedural sets."""

from stlm_train.data.datasets import (
    FORMATS,
    AnomalyDataset,
    Record,
    Sample,
    build_dataset,
)
from stlm_train.data.generated import make_generated_dataset
from stlm_train.data.io import (
    bundled_sample_root,
    IMAGE_EXTENSIONS,
    DataError,
    list_images,
    read_image_rgb,
    read_mask,
    resize_mask,
    resize_rgb,
)

__all__ = [
    "bundled_sample_root",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "AnomalyDataset",
    "DataError",
    "Record",
    "Sample",
    "build_dataset",
    "list_images",
    "make_generated_dataset",
    "make_texture_dataset",
    "read_image_rgb",
    "read_mask",
    "resize_mask",
    "resize_rgb",
]


def __getattr__(name: str):
    """``make_texture_dataset`` on first use, so ``python -m stlm_train.data.texture`` runs its module once."""
    if name == "make_texture_dataset":
        from stlm_train.data.texture import make_texture_dataset

        return make_texture_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
