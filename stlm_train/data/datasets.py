"""Anomaly-detection data sets behind one loader interface.

:func:`build_dataset` turns a folder on disk into an :class:`AnomalyDataset`, whatever the layout, so
training, evaluation and benchmarks never look at file names themselves. Every sample is a
:class:`Sample`: ``image`` uint8 HxWx3 RGB resized to ``img_size`` (the ``resize`` policy), ``mask`` uint8 HxW in
{0, 1} (nearest; zeros for good images), ``label`` (0 good, 1 anomalous), ``path`` and ``defect``
("good" for normal images). Files are read lazily, one sample at a time. Training splits hold only
good images: the model is unsupervised and synthesises its own anomalies.

Supported layouts (``format=``):

``mvtec`` (MVTec AD)::

    ROOT/[CATEGORY/]train/good/*.png
    ROOT/[CATEGORY/]test/good/*.png
    ROOT/[CATEGORY/]test/<defect>/<stem>.png
    ROOT/[CATEGORY/]ground_truth/<defect>/<stem>_mask.png

  ROOT may be the category folder itself (it has train/ or test/) or the data-set root, with
  ``category`` naming the sub-folder. Every defect image must have its mask.

``visa`` (VisA with the official split file)::

    ROOT/split_csv/1cls.csv   columns object,split,label,image,mask (label 'normal'|'anomaly',
                              paths relative to ROOT, mask empty for normal rows)

  Rows are filtered by ``category`` (the object column; None keeps all objects) and split; the train
  split keeps only 'normal' rows.

``dagm`` (DAGM 2007)::

    ROOT/[ClassN/]Train/*.PNG   ROOT/[ClassN/]Train/Label/<stem>_label.PNG   [Label/Labels.txt]
    ROOT/[ClassN/]Test/*.PNG    ROOT/[ClassN/]Test/Label/<stem>_label.PNG    [Label/Labels.txt]

  An image is defective when Labels.txt says so (column 2 = 1) or, without Labels.txt, when its
  label file exists. train = the non-defective images of Train/; test = every image of Test/.

``folder`` (any custom set)::

    ROOT/train/good/*          training images (optional; without it ROOT/good/ is used for training)
    ROOT/good/*                good test images
    ROOT/<defect>/*            defective test images, one folder per defect type (optional)
    ROOT/masks/<defect>/<stem>.png | <stem>_mask.png      masks (optional), or
    ROOT/ground_truth/<defect>/<stem>_mask.png

  When ROOT/train/good/ is absent the same ROOT/good/ images serve training and testing, which makes
  image-level test numbers optimistic; add ROOT/train/good/ to keep them apart. Defect images without
  a mask are allowed here: their mask is all zeros and ``dataset.has_pixel_labels`` is False, so
  pixel metrics must be skipped.

Images are found with :func:`list_images` (.png/.jpg/.jpeg/.bmp/.tif/.tiff, any case, sorted).
A missing root or an empty split raises :class:`DataError` with one line naming the folder and the
expected layout.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from stlm_train.data.io import (
    DEFAULT_RESIZE,
    IMAGE_EXTENSIONS,
    DataError,
    PathLike,
    list_images,
    read_image_rgb,
    read_mask,
    resize_mask,
    resize_rgb,
)

#: Data-set layouts understood by :func:`build_dataset`.
FORMATS: tuple[str, ...] = ("mvtec", "visa", "dagm", "folder")
SPLITS: tuple[str, ...] = ("train", "test")

_LAYOUT_HINT = {
    "mvtec": "expected MVTec AD layout <root>/[<category>/]{train/good,test/<type>,ground_truth/<type>}",
    "visa": "expected VisA layout <root>/split_csv/1cls.csv with paths relative to <root>",
    "dagm": "expected DAGM layout <root>/[ClassN/]{Train,Test}/*.PNG with Label/<stem>_label.PNG",
    "folder": "expected <root>/[train/]good/*.png plus optional <root>/<defect>/ "
    "and <root>/masks/<defect>/",
}


class Sample(NamedTuple):
    """One loaded sample. A NamedTuple so torch's default collate batches it field by field."""

    image: np.ndarray  # uint8 HxWx3 RGB
    mask: np.ndarray  # uint8 HxW in {0, 1}
    label: int  # 0 good, 1 anomalous
    path: str
    defect: str  # "good" for normal images


@dataclass(frozen=True)
class Record:
    """Where one sample lives on disk; cheap to build for thousands of files."""

    image_path: Path
    mask_path: Optional[Path]
    label: int
    defect: str


class AnomalyDataset:
    """A list of :class:`Record` loaded lazily as :class:`Sample`.

    Compatible with ``torch.utils.data.Dataset`` (``__len__``/``__getitem__``) without importing
    torch. ``img_size=None`` keeps each image's own size (masks follow the image).
    """

    def __init__(
        self,
        records: Sequence[Record],
        img_size: Optional[int] = 256,
        name: str = "",
        root: Optional[PathLike] = None,
        resize: str = DEFAULT_RESIZE,
    ) -> None:
        self.records: list[Record] = list(records)
        self.img_size = img_size
        self.resize = resize
        self.name = name
        self.root = Path(root) if root is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        rec = self.records[index]
        image = read_image_rgb(rec.image_path)
        h, w = image.shape[:2]
        if rec.mask_path is not None:
            mask = read_mask(rec.mask_path)
            if mask.shape != (h, w):
                mask = resize_mask(mask, (h, w))
        else:
            mask = np.zeros((h, w), dtype=np.uint8)
        if self.img_size is not None:
            image = resize_rgb(image, self.img_size, self.resize)
            mask = resize_mask(mask, self.img_size)
        return Sample(image, mask, int(rec.label), str(rec.image_path), rec.defect)

    def __repr__(self) -> str:
        n_bad = int(self.labels.sum()) if self.records else 0
        return (
            f"AnomalyDataset(name={self.name!r}, n={len(self)}, good={len(self) - n_bad}, "
            f"anomalous={n_bad}, img_size={self.img_size})"
        )

    @property
    def labels(self) -> np.ndarray:
        """Image labels (int64, 0 good / 1 anomalous) without reading any file."""
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def paths(self) -> list[str]:
        return [str(r.image_path) for r in self.records]

    @property
    def defects(self) -> list[str]:
        return [r.defect for r in self.records]

    @property
    def has_pixel_labels(self) -> bool:
        """True when every anomalous sample has a mask file (pixel metrics are meaningful)."""
        return all(r.mask_path is not None for r in self.records if r.label == 1)


# ----------------------------------------------------------------------------------------------
# helpers


def _child_ci(folder: Path, name: str) -> Optional[Path]:
    """Sub-directory ``name`` of ``folder``, matched case-insensitively (DAGM/VisA case varies)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    if not folder.is_dir():
        return None
    low = name.lower()
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() == low:
            return child
    return None


def _category_dir(root: Path, category: Optional[str], markers: Sequence[str], fmt: str) -> Path:
    """The folder holding one category: ``root/category`` if it exists, else ``root`` itself."""
    if not root.is_dir():
        raise DataError(f"data root '{root}' does not exist or is not a folder ({_LAYOUT_HINT[fmt]})")
    if category:
        sub = _child_ci(root, category)
        if sub is not None:
            return sub
    if any(_child_ci(root, m) is not None for m in markers):
        return root
    what = f"no category folder '{category}' and no" if category else "no"
    raise DataError(
        f"data root '{root}' has {what} {'/'.join(markers)}/ folder ({_LAYOUT_HINT[fmt]}"
        f"{'' if category else '; pass the category'})"
    )


def _mask_index(folder: Optional[Path]) -> dict[str, Path]:
    """Map lower-case file stem -> mask path for every image file in ``folder``."""
    if folder is None:
        return {}
    return {p.stem.lower(): p for p in list_images(folder)}


def _find_mask(index: dict[str, Path], stem: str, suffixes: Sequence[str]) -> Optional[Path]:
    for suffix in suffixes:
        hit = index.get((stem + suffix).lower())
        if hit is not None:
            return hit
    return None


def _require(records: list[Record], folder: Path, split: str, fmt: str) -> list[Record]:
    if not records:
        raise DataError(f"no {split} images found in '{folder}' ({_LAYOUT_HINT[fmt]})")
    return records


# ----------------------------------------------------------------------------------------------
# formats


def _mvtec_records(root: Path, category: Optional[str], split: str) -> tuple[list[Record], Path]:
    cat = _category_dir(root, category, ("train", "test"), "mvtec")
    if split == "train":
        folder = cat / "train" / "good"
        recs = [Record(p, None, 0, "good") for p in list_images(folder)]
        return _require(recs, folder, split, "mvtec"), cat
    test_dir = cat / "test"
    recs: list[Record] = []
    types = sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
    for tdir in types:
        if tdir.name == "good":
            recs += [Record(p, None, 0, "good") for p in list_images(tdir)]
            continue
        gt_dir = cat / "ground_truth" / tdir.name
        masks = _mask_index(gt_dir if gt_dir.is_dir() else None)
        for p in list_images(tdir):
            mask = _find_mask(masks, p.stem, ("_mask",))
            if mask is None:
                raise DataError(
                    f"missing mask for '{p}': expected '{gt_dir / (p.stem + '_mask.png')}' "
                    f"({_LAYOUT_HINT['mvtec']})"
                )
            recs.append(Record(p, mask, 1, tdir.name))
    return _require(recs, test_dir, split, "mvtec"), cat


def _visa_records(root: Path, category: Optional[str], split: str) -> tuple[list[Record], Path]:
    if not root.is_dir():
        raise DataError(f"data root '{root}' does not exist or is not a folder ({_LAYOUT_HINT['visa']})")
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise DataError(f"missing split file '{csv_path}' ({_LAYOUT_HINT['visa']})")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"object", "split", "label", "image", "mask"}
        have = {c.strip().lower() for c in (reader.fieldnames or [])}
        if not need <= have:
            raise DataError(
                f"split file '{csv_path}' lacks columns {sorted(need - have)} ({_LAYOUT_HINT['visa']})"
            )
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    objects = sorted({r["object"] for r in rows})
    if category and category not in objects:
        raise DataError(
            f"category '{category}' not in '{csv_path}' (objects: {', '.join(objects) or 'none'})"
        )
    recs: list[Record] = []
    for r in rows:
        if (category and r["object"] != category) or r["split"].lower() != split:
            continue
        label = 1 if r["label"].lower() in ("anomaly", "anomalous", "bad", "1") else 0
        if split == "train" and label:
            continue  # unsupervised: never train on real anomalies
        mask = root / r["mask"] if (label and r["mask"]) else None
        if mask is not None and not mask.is_file():
            raise DataError(f"missing mask '{mask}' listed in '{csv_path}'")
        recs.append(Record(root / r["image"], mask, label, "anomaly" if label else "good"))
    where = f"{csv_path} (object={category or '*'}, split={split})"
    if not recs:
        raise DataError(f"no {split} images found in '{where}' ({_LAYOUT_HINT['visa']})")
    return recs, root


def _dagm_labels_txt(path: Path) -> dict[str, Optional[str]]:
    """Parse DAGM Labels.txt: lower-case image name -> label file name (None when not defective)."""
    out: dict[str, Optional[str]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tok = line.split()
        if len(tok) < 3 or tok[1] not in ("0", "1"):
            continue  # header line ("1") or junk
        label_file = tok[4] if len(tok) >= 5 and tok[4] != "0" else None
        out[tok[2].lower()] = label_file if tok[1] == "1" else None
    return out


def _dagm_split(folder: Path) -> list[Record]:
    label_dir = _child_ci(folder, "Label")
    masks = _mask_index(label_dir)
    listed: Optional[dict[str, Optional[str]]] = None
    if label_dir is not None:
        txt = [p for p in label_dir.iterdir() if p.name.lower() == "labels.txt"]
        if txt:
            listed = _dagm_labels_txt(txt[0])
    recs = []
    for p in list_images(folder):
        mask = _find_mask(masks, p.stem, ("_label", ""))
        if listed is not None:
            key = p.name.lower()
            defective = key in listed and listed[key] is not None
            if defective and mask is None:
                named = listed[key] or ""
                mask = _find_mask(masks, Path(named).stem, ("",))
            if defective and mask is None:
                raise DataError(f"missing DAGM label image for defective '{p}' in '{label_dir}'")
            if not defective:
                mask = None
        defective = mask is not None
        recs.append(Record(p, mask, int(defective), "defect" if defective else "good"))
    return recs


def _dagm_records(root: Path, category: Optional[str], split: str) -> tuple[list[Record], Path]:
    cls = _category_dir(root, category, ("Train", "Test"), "dagm")
    folder = _child_ci(cls, "Train" if split == "train" else "Test") or cls / (
        "Train" if split == "train" else "Test"
    )
    recs = _dagm_split(folder) if folder.is_dir() else []
    if split == "train":
        recs = [r for r in recs if r.label == 0]
    return _require(recs, folder, split, "dagm"), cls


_FOLDER_RESERVED = {"train", "test", "good", "masks", "ground_truth", "split_csv"}


def _folder_records(root: Path, category: Optional[str], split: str) -> tuple[list[Record], Path]:
    if not root.is_dir():
        hint = _LAYOUT_HINT["folder"]
        raise DataError(f"data root '{root}' does not exist or is not a folder ({hint})")
    base = root / category if category and (root / category).is_dir() else root
    if split == "train":
        folder = base / "train" / "good"
        if not folder.is_dir():
            folder = base / "good"
        recs = [Record(p, None, 0, "good") for p in list_images(folder)]
        return _require(recs, folder, split, "folder"), base
    recs = [Record(p, None, 0, "good") for p in list_images(base / "good")]
    defect_dirs = sorted(
        d for d in base.iterdir() if d.is_dir() and d.name.lower() not in _FOLDER_RESERVED
    )
    for ddir in defect_dirs:
        idx_masks = _mask_index(_child_ci(base / "masks", ddir.name))
        idx_gt = _mask_index(_child_ci(base / "ground_truth", ddir.name))
        for p in list_images(ddir):
            mask = _find_mask(idx_masks, p.stem, ("", "_mask"))
            mask = mask or _find_mask(idx_gt, p.stem, ("_mask",))
            recs.append(Record(p, mask, 1, ddir.name))
    return _require(recs, base, split, "folder"), base


_BUILDERS = {
    "mvtec": _mvtec_records,
    "visa": _visa_records,
    "dagm": _dagm_records,
    "folder": _folder_records,
}


def build_dataset(
    root: PathLike,
    format: str = "mvtec",
    category: Optional[str] = None,
    split: str = "train",
    img_size: Optional[int] = 256,
    resize: str = DEFAULT_RESIZE,
) -> AnomalyDataset:
    """Index one split of a data set on disk (see the module docstring for the layouts).

    Only file names are read here; images are decoded when a sample is requested.
    """
    fmt = format.lower()
    if fmt not in _BUILDERS:
        raise DataError(f"unknown data format '{format}' (expected one of {', '.join(FORMATS)})")
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    if img_size is not None and int(img_size) <= 0:
        raise DataError(f"img_size must be positive, got {img_size}")
    records, base = _BUILDERS[fmt](Path(root), category, split)
    name = f"{fmt}:{category or base.name}:{split}"
    return AnomalyDataset(records, img_size=img_size, name=name, root=base, resize=resize)


__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "AnomalyDataset",
    "Record",
    "Sample",
    "build_dataset",
]
