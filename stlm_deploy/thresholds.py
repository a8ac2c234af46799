"""Choosing an image threshold: a user's trade-off between misses and false alarms, made explicit.

A decision is ``score > threshold``. Three targets, each needing what it can honestly be judged on:

- ``fpr<=A`` (at most a fraction A of good parts flagged): good images only, which is what a new line
  has. The threshold is the (k+1)-th highest good score with k = floor(A * n_good), so at most k good
  images score above it; A = 0 gives the highest good score. It never looks at defective images, so
  it never drops to the lowest score when there are none.
- ``fnr<=B`` (at most a fraction B of defective parts missed): needs defective images. With
  m = floor(B * n_bad) misses allowed, the threshold sits halfway between the (m+1)-th lowest
  defective score and the highest score below it, as far from both as the data allow.
- ``f1`` (F1-max, defective = positive): needs good and defective images; the threshold is halfway
  between the two scores where F1 peaks.

Pure numpy, no torch: ``stlm-threshold`` uses it on scores from a checkpoint or an engine, and
``stlm-train`` uses :func:`choose_threshold` for its stored policy.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DEFAULT_THRESHOLD_TARGET", "Target", "ThresholdChoice", "ThresholdError", "choose_threshold",
           "parse_target", "TARGET_HELP"]

#: stlm-train's stored threshold: at most 5 % of held-out good images above it (about one false alarm in
#: twenty good parts) instead of the highest held-out score (on a real category: 0 false alarms on 42
#: held-out images and 37 % of real defects missed).
DEFAULT_THRESHOLD_TARGET = "fpr<=0.05"

TARGET_HELP = "f1, fpr<=A (at most a fraction A of good parts flagged) or fnr<=B (at most B of defects missed)"


class ThresholdError(ValueError):
    """A target the data cannot support, or a malformed target; one line."""


@dataclass(frozen=True)
class Target:
    """``kind`` is "f1", "fpr" or "fnr"; ``rate`` the allowed fraction (None for f1)."""

    kind: str
    rate: float | None = None

    def __str__(self) -> str:
        return "f1" if self.kind == "f1" else f"{self.kind}<={self.rate:g}"

    @property
    def needs_defective(self) -> bool:
        return self.kind in ("f1", "fnr")

    @property
    def needs_good(self) -> bool:
        return self.kind in ("f1", "fpr")


def parse_target(text: str) -> Target:
    """"f1", "fpr<=0.05" (also "fpr=0.05", "fpr:5%") or "fnr<=0.1" -> :class:`Target`."""
    t = str(text).strip().lower().replace(" ", "")
    if t in ("f1", "f1-max", "f1max"):
        return Target("f1")
    m = re.fullmatch(r"(fpr|fnr)(<=|=|:)([0-9.eE+-]+?)(%?)", t)
    try:
        rate = float(m.group(3)) / (100.0 if m.group(4) else 1.0) if m else math.nan
    except ValueError:
        rate = math.nan
    if not m or not math.isfinite(rate):
        raise ThresholdError(f"--target: expected {TARGET_HELP}, got {text!r}")
    if not 0.0 <= rate < 1.0:
        raise ThresholdError(f"--target: the rate must be in [0, 1), got {text!r}")
    return Target(m.group(1), rate)


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold and what it does on the images it was chosen on."""

    threshold: float
    target: str
    n_good: int
    n_defective: int
    fpr: float | None  # fraction of good images with score > threshold (None without good images)
    fnr: float | None  # fraction of defective images with score <= threshold
    f1: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def _rates(t: float, good: np.ndarray, bad: np.ndarray) -> tuple[float | None, float | None, float | None]:
    fpr = float(np.mean(good > t)) if good.size else None
    fnr = float(np.mean(bad <= t)) if bad.size else None
    f1 = None
    if good.size and bad.size:
        tp = int(np.sum(bad > t))
        fp = int(np.sum(good > t))
        f1 = 2 * tp / (2 * tp + fp + (bad.size - tp)) if tp else 0.0
    return fpr, fnr, f1


def _between(lo: float, hi: float) -> float:
    """A value strictly between ``lo`` < ``hi`` (their midpoint), or just below ``hi``."""
    mid = 0.5 * (lo + hi)
    return mid if lo < mid < hi else float(np.nextafter(hi, -np.inf))


def choose_threshold(good: Any, defective: Any, target: Target | str) -> ThresholdChoice:
    """The image threshold for ``target`` from scores of good and defective images (either may be empty
    when the target does not need it; :class:`ThresholdError` names what is missing)."""
    tgt = parse_target(target) if isinstance(target, str) else target
    g = np.sort(np.asarray(good if good is not None else [], dtype=np.float64).ravel())
    b = np.sort(np.asarray(defective if defective is not None else [], dtype=np.float64).ravel())
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(b))):
        raise ThresholdError("scores contain NaN or infinite values")
    if tgt.needs_good and not g.size:
        raise ThresholdError(f"target {tgt} needs good images, and none were found")
    if tgt.needs_defective and not b.size:
        raise ThresholdError(f"target {tgt} needs defective images, and none were found "
                             "(with good images only, use fpr<=A)")
    if tgt.kind == "fpr":
        k = int(math.floor(tgt.rate * g.size + 1e-9))
        t = float(g[g.size - 1 - k])  # at most k good scores are strictly above it
    elif tgt.kind == "fnr":
        m = int(math.floor(tgt.rate * b.size + 1e-9))
        below = np.concatenate([g, b])
        below = below[below < b[m]]
        t = _between(float(below.max()), float(b[m])) if below.size else float(np.nextafter(b[m], -np.inf))
    else:  # F1-max over every cut between consecutive distinct scores
        s = np.unique(np.concatenate([g, b]))
        cuts = np.concatenate([[np.nextafter(s[0], -np.inf)], [_between(lo, hi) for lo, hi in zip(s[:-1], s[1:])]])
        tp = b.size - np.searchsorted(b, cuts, side="right")
        fp = g.size - np.searchsorted(g, cuts, side="right")
        f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + (b.size - tp), 1), 0.0)
        t = float(cuts[int(np.argmax(f1))])
    fpr, fnr, f1v = _rates(t, g, b)
    return ThresholdChoice(t, str(tgt), int(g.size), int(b.size), fpr, fnr, f1v)
