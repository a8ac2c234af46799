"""Kept for code written against README's client step: the normalized score now lives in
:mod:`stlm_deploy.decision` with the rest of the decision rule."""
from __future__ import annotations

from .decision import FALLBACK_SPAN, normalize_scores, normalized_score, score_span

__all__ = ["FALLBACK_SPAN", "score_span", "normalized_score", "normalize_scores"]
