"""Run state (RUN_DIR/last.ckpt): what a resumed run needs to end where an uninterrupted one would,
and the loss history that goes into the final checkpoint."""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, read_file
from .options import TrainError

STATE_FORMAT = "stlm-train-state"
STATE_VERSION = 1
LOSS_KEYS = ("plain", "denoising", "focal", "l1", "total")  # STLM's; every family names its own terms
HISTORY_KEYS = ("step", *LOSS_KEYS, "seconds")  # one row per step; seconds = training time so far


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_tuples(st["python"]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_run_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "last.ckpt"
    if not path.is_file():
        raise TrainError(f"--resume: {path} not found (nothing to resume; drop --resume to start a new run)")
    st = read_file(path)
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state file (format {STATE_FORMAT!r})")
    if int(st.get("version", 0)) > STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {st.get('version')} is newer than supported")
    return st


def save_run_state(path: Path, loss_keys: tuple[str, ...] = LOSS_KEYS, **payload: Any) -> None:
    """Write last.ckpt atomically (temp file + rename): a kill mid-save keeps the previous state.

    ``history`` rows are (step, *loss_keys, seconds).
    """
    from stlm_deploy.files import atomic_output

    history = payload.pop("history")
    payload.update(format=STATE_FORMAT, version=STATE_VERSION, rng=rng_state(),
                   history=torch.tensor(history, dtype=torch.float64).reshape(-1, len(loss_keys) + 2))
    with atomic_output(path, clean_stale=True) as tmp:  # removes temps of killed saves
        torch.save(payload, tmp)


def summarize_history(history: list[list[float]], points: int = 50,
                      loss_keys: tuple[str, ...] = LOSS_KEYS) -> dict[str, Any]:
    """Rows of (step, *loss_keys, seconds) -> {first, last: mean loss terms over the first/last 10 % of the
    steps (at least one), s_per_step: median step time, curve: at most ``points`` rows}."""
    keys = ["step", *loss_keys, "seconds"]
    if not history:
        return {"keys": keys, "first": None, "last": None, "s_per_step_median": None, "curve": []}
    h = np.asarray(history, dtype=np.float64)  # (n, 2 + terms): step, terms, seconds
    k = max(1, len(h) // 10)
    terms = slice(1, 1 + len(loss_keys))

    def mean(rows: np.ndarray) -> dict[str, float]:
        return {key: round(float(v), 6) for key, v in zip(loss_keys, rows[:, terms].mean(axis=0))}
    dts = np.diff(np.r_[0.0, h[:, -1]])
    stride = max(1, math.ceil(len(h) / points))
    curve = [[int(r[0]), *(round(float(v), 5) for v in r[1:-1]), round(float(r[-1]), 2)] for r in h[::stride]]
    return {"keys": keys, "first": mean(h[:k]), "last": mean(h[-k:]), "steps_averaged": k,
            "s_per_step_median": round(float(np.median(dts)), 4), "curve": curve}
