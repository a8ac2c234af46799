"""The INT8 accuracy gate: an INT8 artifact against the fp32 graph on labelled validation images.

INT8 maps differ from fp32 by far more than the fp16/bf16 parity tolerances (1e-2 rather than 1e-3),
so INT8 is not gated on map closeness but on what a user of the detector sees (docs/DESIGN.md):

* image AUROC and pixel AUROC within ``auroc_drop`` (0.01) of the fp32 graph's, where the
  validation set has both classes (image) and pixel masks (pixel); otherwise reported as null and
  not gated, and the record says so;
* the decisions ``score > thresholds.image`` agree with fp32 on >= ``min_agreement`` (98 %) of the
  images; without a stored image threshold the fp32 median score is used (and said);
* recorded, not gated: max/mean |Δmap|, max |Δscore|, score Spearman (the parity gate's rule).

The reference is the fp32 ONNX graph run through ONNX Runtime (the artifact INT8 replaces), not
PyTorch: the question is what quantisation costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .gate import spearman

__all__ = ["Int8Tolerance", "INT8_TOLERANCE", "Int8Record", "int8_compare", "decision_threshold", "gate_margin"]


@dataclass(frozen=True)
class Int8Tolerance:
    """Limits of the INT8 gate (the DESIGN numbers; tests and experiments may tighten them)."""

    auroc_drop: float = 0.01
    min_agreement: float = 0.98

    def to_dict(self) -> dict[str, float]:
        return {"auroc_drop": self.auroc_drop, "min_agreement": self.min_agreement}


INT8_TOLERANCE = Int8Tolerance()


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass
class Int8Record:
    """One INT8 artifact's gate result (a ``parity.json`` ``int8`` entry)."""

    artifact: str
    backend: str
    n_images: int
    image_source: str
    threshold: float
    threshold_source: str
    metrics: dict[str, float | None]
    tolerance: Int8Tolerance
    passed: bool
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "backend": self.backend, "precision": "int8", "reference": "model.onnx (fp32, onnxruntime-cpu)",
                **self.metrics, "threshold": self.threshold, "threshold_source": self.threshold_source,
                "tolerance": self.tolerance.to_dict(), "pass": self.passed, "failures": list(self.failures),
                "notes": list(self.notes), "n_images": self.n_images, "image_source": self.image_source,
                **self.details}

    def line(self) -> str:
        m = self.metrics

        def f(k: str, fmt: str = ".4f") -> str:
            return "n/a" if m.get(k) is None else format(m[k], fmt)

        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (f"{self.artifact} [{self.backend} int8] image AUROC {f('image_auroc_int8')} vs fp32 "
                f"{f('image_auroc_fp32')}, pixel AUROC {f('pixel_auroc_int8')} vs {f('pixel_auroc_fp32')}, "
                f"decisions agree {f('agreement', '.1%')}, max|Δmap| {f('max_abs_map', '.2e')}, spearman "
                f"{f('spearman')} on {self.n_images} images: {verdict}")


def decision_threshold(stored: float | None, fp32_scores: np.ndarray) -> tuple[float, str]:
    """The stored image threshold, else the fp32 median score (so decisions split the set)."""
    if stored is not None and math.isfinite(stored):
        return float(stored), "stlm.json thresholds.image"
    return float(np.median(fp32_scores)), "fp32 median score (no stored image threshold)"


def int8_compare(fp32: Mapping[str, np.ndarray], int8: Mapping[str, np.ndarray], labels: np.ndarray | None,
                 masks: np.ndarray | None, threshold: float | None, *, artifact: str, backend: str,
                 image_source: str, tolerance: Int8Tolerance = INT8_TOLERANCE,
                 details: dict[str, Any] | None = None) -> Int8Record:
    """Gate ``int8`` outputs (anomaly_map, score) against the ``fp32`` graph's on the same images."""
    from stlm_train.metrics import image_auroc, pixel_auroc

    failures: list[str] = []
    notes: list[str] = []
    s32, s8 = np.asarray(fp32["score"], np.float64), np.asarray(int8["score"], np.float64)
    m32, m8 = np.asarray(fp32["anomaly_map"], np.float64), np.asarray(int8["anomaly_map"], np.float64)
    n = int(s32.shape[0])
    if not (np.isfinite(s8).all() and np.isfinite(m8).all()):
        failures.append("non-finite INT8 outputs")
    thr, thr_src = decision_threshold(threshold, s32)
    agree = float(np.mean((s32 > thr) == (s8 > thr))) if n else 0.0
    d = np.abs(m8 - m32)
    rho = spearman(s32, s8)
    metrics: dict[str, float | None] = {
        "image_auroc_fp32": None, "image_auroc_int8": None, "image_auroc_drop": None,
        "pixel_auroc_fp32": None, "pixel_auroc_int8": None, "pixel_auroc_drop": None,
        "agreement": agree, "max_abs_map": _finite(float(d.max())) if d.size else None,
        "mean_abs_map": _finite(float(d.mean())) if d.size else None,
        "max_abs_score": _finite(float(np.abs(s8 - s32).max())) if n else None, "spearman": rho}
    if labels is not None and 0 < int(np.sum(labels)) < len(labels):
        a32, a8 = image_auroc(s32, labels), image_auroc(s8, labels)
        metrics.update(image_auroc_fp32=_finite(a32), image_auroc_int8=_finite(a8), image_auroc_drop=_finite(a32 - a8))
        if not a32 - a8 <= tolerance.auroc_drop:  # NaN fails too
            failures.append(f"image AUROC {a8:.4f} is {a32 - a8:.4f} below fp32 {a32:.4f} "
                            f"(allowed {tolerance.auroc_drop:g}; short by {a32 - a8 - tolerance.auroc_drop:.4f})")
    else:
        notes.append("image AUROC not gated: the validation images are of one class")
    if masks is not None and 0 < int(np.asarray(masks).sum()) < np.asarray(masks).size:
        p32, p8 = pixel_auroc(m32, masks), pixel_auroc(m8, masks)
        metrics.update(pixel_auroc_fp32=_finite(p32), pixel_auroc_int8=_finite(p8), pixel_auroc_drop=_finite(p32 - p8))
        if not p32 - p8 <= tolerance.auroc_drop:
            failures.append(f"pixel AUROC {p8:.4f} is {p32 - p8:.4f} below fp32 {p32:.4f} "
                            f"(allowed {tolerance.auroc_drop:g}; short by {p32 - p8 - tolerance.auroc_drop:.4f})")
    else:
        notes.append("pixel AUROC not gated: no pixel masks with both classes")
    if agree < tolerance.min_agreement:
        failures.append(f"decisions agree with fp32 on {agree:.1%} < {tolerance.min_agreement:.0%} "
                        f"(short by {tolerance.min_agreement - agree:.1%}) at threshold {thr:.5g}")
    return Int8Record(artifact, backend, n, image_source, thr, thr_src, metrics, tolerance, not failures,
                      failures, notes, details or {})


def gate_margin(fp32: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], labels: np.ndarray | None,
                masks: np.ndarray | None, threshold: float | None,
                tolerance: Int8Tolerance = INT8_TOLERANCE) -> float:
    """One number for accuracy-controlled quantisation: 1 for the fp32 graph itself, and
    ``1 - metric <= tolerance.auroc_drop`` exactly when the gate passes. (1, not 0: NNCF computes the
    relative drop too, ``quantized / initial``, and divides by zero when the initial metric is 0 —
    seen on an STFPM model whose initial float model matched fp32 exactly.)

    It is the smallest of (fp32 AUROC - AUROC, per gated AUROC) negated and
    ``agreement - min_agreement - auroc_drop``, so NNCF's "metric drop <= max_drop" with
    ``max_drop = auroc_drop`` is the gate itself, not a proxy.
    """
    rec = int8_compare(fp32, got, labels, masks, threshold, artifact="", backend="", image_source="",
                       tolerance=tolerance)
    m = rec.metrics
    terms = [-float(m[k]) for k in ("image_auroc_drop", "pixel_auroc_drop") if m[k] is not None]
    terms.append(float(m["agreement"]) - tolerance.min_agreement - tolerance.auroc_drop)
    if any(f.startswith("non-finite") for f in rec.failures):
        terms.append(-1.0)
    return 1.0 + min(0.0, *terms)
