"""Data loading for STLM training and evaluation: image I/O, data-set layouts, a procedural set."""

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
    "read_image_rgb",
    "read_mask",
    "resize_mask",
    "resize_rgb",
]
