"""The task gate: a reduced-precision variant (INT8, bf16, fp16) against the fp32 graph on labelled gate images.

Reduced-precision maps differ from fp32 by more than the fp32 parity tolerance (INT8: 1e-2 rather than
1e-4; OpenVINO bf16: about 2e-2 at 1024 px), so these variants are not gated on map closeness but on
what a user of the detector sees (docs/DESIGN.md, docs/int8.md):

* image AUROC and pixel AUROC within ``auroc_drop`` (0.01) of the fp32 graph's, where the gate
  images have both classes (image) and pixel masks (pixel); otherwise reported as null and not
  gated, and the record says so;
* the decisions ``score > thresholds.image`` agree with fp32 on >= ``min_agreement`` (98 %) of the
  images; without a stored image threshold the fp32 median score is used (and said);
* recorded, not gated: max/mean |Δmap|, max |Δscore|, score Spearman (the parity gate's rule).

Every record also says how much evidence it had (:class:`Evidence`): images judged, good and
defective, pixel labels, and a warning for each limit the images cannot resolve (fewer than 50
images cannot tell 98 % agreement from 100 %; fewer than 100 good x defective pairs cannot resolve
an AUROC step of 0.01). Too little evidence is a warning, not a failure: the export prints it and
parity.json / stlm.json keep it next to the verdict.

The reference is the fp32 ONNX graph run through ONNX Runtime (the artifact the variant replaces),
not PyTorch: the question is what the reduced precision costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .gate import spearman

__all__ = ["TaskTolerance", "TASK_TOLERANCE", "Evidence", "TaskRecord", "task_compare", "decision_threshold",
           "gate_margin", "Int8Tolerance", "INT8_TOLERANCE", "Int8Record", "int8_compare"]


@dataclass(frozen=True)
class TaskTolerance:
    """Limits of the task gate (the DESIGN numbers; tests and experiments may tighten them)."""

    auroc_drop: float = 0.01
    min_agreement: float = 0.98

    def to_dict(self) -> dict[str, float]:
        return {"auroc_drop": self.auroc_drop, "min_agreement": self.min_agreement}

    @property
    def min_images(self) -> int:
        """Images needed before one flipped decision stays within ``min_agreement`` (50 for 98 %)."""
        return math.ceil(1.0 / max(1e-9, 1.0 - self.min_agreement) - 1e-9) if self.min_agreement < 1 else 0

    @property
    def min_pairs(self) -> int:
        """good x defective pairs needed for one swapped pair to move the AUROC by at most ``auroc_drop``."""
        return math.ceil(1.0 / self.auroc_drop - 1e-9) if self.auroc_drop > 0 else 0


TASK_TOLERANCE = TaskTolerance()


@dataclass(frozen=True)
class Evidence:
    """How much a task gate could see: the images it judged and what is known about them."""

    n_images: int
    n_good: int | None  # None: the images carry no labels
    n_defective: int | None
    pixel_labels: bool
    source: str

    @classmethod
    def of(cls, labels: np.ndarray | None, masks: np.ndarray | None, n_images: int, source: str) -> "Evidence":
        """Count the classes of ``labels`` (0 good, 1 defective; None = unlabelled)."""
        if labels is None:
            return cls(int(n_images), None, None, False, source)
        n_def = int(np.sum(np.asarray(labels) > 0))
        has_px = masks is not None and 0 < int(np.asarray(masks).sum()) < np.asarray(masks).size
        return cls(int(n_images), int(n_images) - n_def, n_def, bool(has_px), source)

    def warnings(self, tol: TaskTolerance = TASK_TOLERANCE) -> list[str]:
        """One line per limit of ``tol`` these images cannot resolve (empty: enough evidence)."""
        out: list[str] = []
        n = self.n_images
        if n < tol.min_images:
            share = f"{1 / n:.0%}" if n else "all"
            out.append(f"{n} gate images: one flipped decision is {share} of them (the gate allows "
                       f"{1 - tol.min_agreement:.0%}); {tol.min_images} or more resolve the agreement limit")
        if self.n_good is None:
            out.append("the gate images are unlabelled: image and pixel AUROC not judged")
        elif not (self.n_good and self.n_defective):
            out.append(f"the gate images are all {'good' if self.n_good else 'defective'}: image AUROC not judged "
                       "(pass --val-data DIR with a labelled test split)")
        else:
            pairs = self.n_good * self.n_defective
            if pairs < tol.min_pairs:
                out.append(f"image AUROC on {self.n_good} good x {self.n_defective} defective images moves in steps "
                           f"of {1 / pairs:.3f}, coarser than the {tol.auroc_drop:g} allowed; {tol.min_pairs} or more "
                           "pairs resolve it")
            if not self.pixel_labels:
                out.append("no pixel masks: pixel AUROC not judged")
        return out

    def to_dict(self, tol: TaskTolerance = TASK_TOLERANCE) -> dict[str, Any]:
        warn = self.warnings(tol)
        return {"n_images": self.n_images, "n_good": self.n_good, "n_defective": self.n_defective,
                "pixel_labels": self.pixel_labels, "source": self.source, "sufficient": not warn, "warnings": warn}

    def line(self, tol: TaskTolerance = TASK_TOLERANCE) -> str:
        """'10 images (5 good, 5 defective, pixel masks) from SOURCE'."""
        what = "unlabelled" if self.n_good is None else \
            f"{self.n_good} good, {self.n_defective} defective{', pixel masks' if self.pixel_labels else ''}"
        return f"{self.n_images} images ({what}) from {self.source}"


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass
class TaskRecord:
    """One variant's gate result (a ``parity.json`` entry of ``int8`` or ``precision_gates``)."""

    artifact: str
    backend: str
    n_images: int
    image_source: str
    threshold: float
    threshold_source: str
    metrics: dict[str, float | None]
    tolerance: TaskTolerance
    passed: bool
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    precision: str = "int8"
    evidence: Evidence | None = None

    def to_dict(self) -> dict[str, Any]:
        ev = {"evidence": self.evidence.to_dict(self.tolerance)} if self.evidence is not None else {}
        return {"artifact": self.artifact, "backend": self.backend, "precision": self.precision,
                "reference": "model.onnx (fp32, onnxruntime-cpu)", **self.metrics, "threshold": self.threshold,
                "threshold_source": self.threshold_source, "tolerance": self.tolerance.to_dict(), "pass": self.passed,
                "failures": list(self.failures), "notes": list(self.notes), "n_images": self.n_images,
                "image_source": self.image_source, **ev, **self.details}

    def summary(self) -> dict[str, Any]:
        """The verdict and its numbers for stlm.json (the full record stays in parity.json)."""
        m = self.metrics
        out: dict[str, Any] = {"pass": self.passed, "agreement": m["agreement"],
                               "image_auroc_drop": m["image_auroc_drop"], "pixel_auroc_drop": m["pixel_auroc_drop"],
                               "max_abs_map": m["max_abs_map"], "spearman": m["spearman"], "n_images": self.n_images}
        if self.evidence is not None:
            ev = self.evidence.to_dict(self.tolerance)
            out.update(n_good=ev["n_good"], n_defective=ev["n_defective"], evidence_sufficient=ev["sufficient"],
                       evidence_warnings=ev["warnings"])
        return {**out, "report": "parity.json"}

    def line(self) -> str:
        m = self.metrics
        p = self.precision

        def f(k: str, fmt: str = ".4f") -> str:
            return "n/a" if m.get(k) is None else format(m[k], fmt)

        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (f"{self.artifact} [{self.backend} {p}] image AUROC {f(f'image_auroc_{p}')} vs fp32 "
                f"{f('image_auroc_fp32')}, pixel AUROC {f(f'pixel_auroc_{p}')} vs {f('pixel_auroc_fp32')}, "
                f"decisions agree {f('agreement', '.1%')}, max|Δmap| {f('max_abs_map', '.2e')}, spearman "
                f"{f('spearman')} on {self.n_images} images: {verdict}")


def decision_threshold(stored: float | None, fp32_scores: np.ndarray) -> tuple[float, str]:
    """The stored image threshold, else the fp32 median score (so decisions split the set)."""
    if stored is not None and math.isfinite(stored):
        return float(stored), "stlm.json thresholds.image"
    return float(np.median(fp32_scores)), "fp32 median score (no stored image threshold)"


def task_compare(fp32: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: np.ndarray | None,
                 masks: np.ndarray | None, threshold: float | None, *, artifact: str, backend: str,
                 image_source: str, tolerance: TaskTolerance = TASK_TOLERANCE, details: dict[str, Any] | None = None,
                 precision: str = "int8") -> TaskRecord:
    """Gate ``got`` (anomaly_map, score of a ``precision`` variant) against the ``fp32`` graph's on the same images."""
    from stlm_train.metrics import image_auroc, pixel_auroc

    failures: list[str] = []
    notes: list[str] = []
    s32, s8 = np.asarray(fp32["score"], np.float64), np.asarray(got["score"], np.float64)
    m32, m8 = np.asarray(fp32["anomaly_map"], np.float64), np.asarray(got["anomaly_map"], np.float64)
    n = int(s32.shape[0])
    if not (np.isfinite(s8).all() and np.isfinite(m8).all()):
        failures.append(f"non-finite {precision} outputs")
    thr, thr_src = decision_threshold(threshold, s32)
    agree = float(np.mean((s32 > thr) == (s8 > thr))) if n else 0.0
    d = np.abs(m8 - m32)
    rho = spearman(s32, s8)
    metrics: dict[str, float | None] = {
        "image_auroc_fp32": None, f"image_auroc_{precision}": None, "image_auroc_drop": None,
        "pixel_auroc_fp32": None, f"pixel_auroc_{precision}": None, "pixel_auroc_drop": None,
        "agreement": agree, "max_abs_map": _finite(float(d.max())) if d.size else None,
        "mean_abs_map": _finite(float(d.mean())) if d.size else None,
        "max_abs_score": _finite(float(np.abs(s8 - s32).max())) if n else None, "spearman": rho}
    if labels is not None and 0 < int(np.sum(labels)) < len(labels):
        a32, a8 = image_auroc(s32, labels), image_auroc(s8, labels)
        metrics.update({"image_auroc_fp32": _finite(a32), f"image_auroc_{precision}": _finite(a8),
                        "image_auroc_drop": _finite(a32 - a8)})
        if not a32 - a8 <= tolerance.auroc_drop:  # NaN fails too
            failures.append(f"image AUROC {a8:.4f} is {a32 - a8:.4f} below fp32 {a32:.4f} "
                            f"(allowed {tolerance.auroc_drop:g}; short by {a32 - a8 - tolerance.auroc_drop:.4f})")
    else:
        notes.append("image AUROC not gated: the validation images are of one class")
    if masks is not None and 0 < int(np.asarray(masks).sum()) < np.asarray(masks).size:
        p32, p8 = pixel_auroc(m32, masks), pixel_auroc(m8, masks)
        metrics.update({"pixel_auroc_fp32": _finite(p32), f"pixel_auroc_{precision}": _finite(p8),
                        "pixel_auroc_drop": _finite(p32 - p8)})
        if not p32 - p8 <= tolerance.auroc_drop:
            failures.append(f"pixel AUROC {p8:.4f} is {p32 - p8:.4f} below fp32 {p32:.4f} "
                            f"(allowed {tolerance.auroc_drop:g}; short by {p32 - p8 - tolerance.auroc_drop:.4f})")
    else:
        notes.append("pixel AUROC not gated: no pixel masks with both classes")
    if agree < tolerance.min_agreement:
        failures.append(f"decisions agree with fp32 on {agree:.1%} < {tolerance.min_agreement:.0%} "
                        f"(short by {tolerance.min_agreement - agree:.1%}) at threshold {thr:.5g}")
    evidence = Evidence.of(labels, masks, n, image_source)
    return TaskRecord(artifact, backend, n, image_source, thr, thr_src, metrics, tolerance, not failures,
                      failures, notes, details or {}, precision, evidence)


def gate_margin(fp32: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: np.ndarray | None,
                masks: np.ndarray | None, threshold: float | None,
                tolerance: TaskTolerance = TASK_TOLERANCE) -> float:
    """One number for accuracy-controlled quantisation: 1 for the fp32 graph itself, and
    ``1 - metric <= tolerance.auroc_drop`` exactly when the gate passes. (1, not 0: NNCF computes the
    relative drop too, ``quantized / initial``, and divides by zero when the initial metric is 0 —
    seen on an STFPM model whose initial float model matched fp32 exactly.)

    It is the smallest of (fp32 AUROC - AUROC, per gated AUROC) negated and
    ``agreement - min_agreement - auroc_drop``, so NNCF's "metric drop <= max_drop" with
    ``max_drop = auroc_drop`` is the gate itself, not a proxy.
    """
    rec = task_compare(fp32, got, labels, masks, threshold, artifact="", backend="", image_source="",
                       tolerance=tolerance)
    m = rec.metrics
    terms = [-float(m[k]) for k in ("image_auroc_drop", "pixel_auroc_drop") if m[k] is not None]
    terms.append(float(m["agreement"]) - tolerance.min_agreement - tolerance.auroc_drop)
    if any(f.startswith("non-finite") for f in rec.failures):
        terms.append(-1.0)
    return 1.0 + min(0.0, *terms)


# The INT8 names this gate was first written under (stlm_export.int8.gate re-exports them).
Int8Tolerance = TaskTolerance
INT8_TOLERANCE = TASK_TOLERANCE
Int8Record = TaskRecord
int8_compare = task_compare
