"""Shared fixtures: the bundled real MVTec sample (read from ../shared, never copied) and seeds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def sample_root() -> Path | None:
    """The 20-image MVTec 'bottle' sample: $STLM_SAMPLE_DATA or ../shared/data/mvtec_bottle_xs."""
    env = os.environ.get("STLM_SAMPLE_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "mvtec_bottle_xs"]:
        if (cand / "train" / "good").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    root = sample_root()
    if root is None:
        pytest.skip("bundled MVTec sample not found (set STLM_SAMPLE_DATA or place it at ../shared/data/mvtec_bottle_xs)")
    return root
