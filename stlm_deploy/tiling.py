"""Tiled inference: where the tiles of an image go, how their maps are blended back, and the image score.

One definition for every place that tiles (the Python runtime and the remote client, PyTorch training,
evaluation and the export gates; ``stlm_deploy/cpp/src/tiling.cpp`` mirrors it operation for operation),
numpy only. The graph stays a per-tile graph of ``tile`` x ``tile`` pixels (stlm.json ``img_size``); an
engine whose stlm.json ``preprocessing`` has ``work_size`` is tiled (docs/engine_format.md, "Tiling"):

1. **Work image.** The image (H, W) is resized once, by the engine's resize policy, so that its LONG side is
   ``work_size`` with the aspect kept: ``side = (2 * s * work_size + L) // (2 * L)`` (integer round-half-up of
   ``s * work_size / L``, L = max(H, W)); a side that comes out shorter than the tile is set to the tile (that
   side alone is stretched: no padding, so no artificial border reaches the model).
2. **Tile positions**, per axis of length ``n`` >= ``tile``: ``stride = max(1, floor(tile * (1 - overlap)))``,
   ``count = ceil((n - tile) / stride) + 1``, ``p_i = floor(i * (n - tile) / (count - 1))``: the first tile at 0,
   the last flush with the far edge, spread evenly, neighbours overlapping by at least ``overlap`` of a tile.
   Tiles are taken row by row (y outer, x inner).
3. **Blend** (``tile_blend: "mean"``): each pixel of the work map is the mean of the maps of every tile that
   covers it, summed in float64 in tile order, divided by the number of covering tiles, rounded to float32.
4. **Score** on the stitched work map: the mean of its ``top_k`` largest pixels (stlm.json ``top_k``: STLM 100,
   STFPM 1 = the maximum), summed in float64 from the largest down, rounded to float32.
5. The runtime returns the stitched map resized bilinearly to (H, W), as for untiled engines.

``work_size == tile`` is allowed and gives one tile per square image; ``work_size`` smaller than the tile or an
overlap outside [0, 0.9) is refused (:func:`check_tiling`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["TILE_BLENDS", "DEFAULT_TILE_BLEND", "DEFAULT_TILE_OVERLAP", "MAX_TILE_OVERLAP", "Tiling",
           "check_tiling", "axis_positions", "Stitcher", "TiledResult", "topk_mean", "run_tiled", "stitch_tiles",
           "gate_maps"]

#: blend rules stlm.json ``preprocessing.tile_blend`` may name; the first is what exporters write
TILE_BLENDS: tuple[str, ...] = ("mean",)
DEFAULT_TILE_BLEND = TILE_BLENDS[0]
DEFAULT_TILE_OVERLAP = 0.25
#: overlaps must be below this (0.9: a stride of a tenth of a tile already runs 100 tiles per tile area)
MAX_TILE_OVERLAP = 0.9

Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def _got(value: Any) -> str:
    """A value as JSON shows it (the C++ runtime's messages quote the same way)."""
    try:
        return json.dumps(value.item() if isinstance(value, np.generic) else value)
    except (TypeError, ValueError):
        return repr(value)


def check_tiling(tile: Any, work_size: Any, overlap: Any, blend: Any = DEFAULT_TILE_BLEND) -> list[str]:
    """Problems with a tiling, one phrase per bad field keyed by its name (empty: valid).

    Callers prefix the flag or stlm.json field (``--work-size``, ``preprocessing.work_size``)."""
    problems: list[str] = []

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(tile) or tile <= 0:
        problems.append(f"tile: must be a positive integer, got {_got(tile)}")
    if not is_int(work_size) or work_size <= 0:
        problems.append(f"work_size: must be a positive integer, got {_got(work_size)}")
    elif is_int(tile) and work_size < tile:
        problems.append(f"work_size: must be at least the tile size {tile} (the model input, img_size), "
                        f"got {work_size}")
    ok_number = isinstance(overlap, (int, float, np.floating)) and not isinstance(overlap, bool) \
        and math.isfinite(float(overlap))
    if not ok_number or not 0.0 <= float(overlap) < MAX_TILE_OVERLAP:
        problems.append(f"tile_overlap: must be a number in [0, {MAX_TILE_OVERLAP:g}), got {_got(overlap)}")
    if blend not in TILE_BLENDS:
        problems.append(f"tile_blend: must be one of {', '.join(repr(b) for b in TILE_BLENDS)}, got {_got(blend)}")
    return problems


def axis_positions(length: int, tile: int, stride: int) -> list[int]:
    """Start of every tile along one axis of ``length`` >= ``tile`` pixels (module docstring, point 2)."""
    if length < tile:
        raise ValueError(f"axis of {length} px is shorter than the tile ({tile} px)")
    span = length - tile
    if span == 0:
        return [0]
    count = (span + stride - 1) // stride + 1
    return [(i * span) // (count - 1) for i in range(count)]


@dataclass(frozen=True)
class Tiling:
    """The tiling of one engine/checkpoint: ``tile`` = the graph's input side (img_size)."""

    tile: int
    work_size: int
    overlap: float = DEFAULT_TILE_OVERLAP
    blend: str = DEFAULT_TILE_BLEND

    def __post_init__(self) -> None:
        problems = check_tiling(self.tile, self.work_size, self.overlap, self.blend)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "work_size", int(self.work_size))
        object.__setattr__(self, "overlap", float(self.overlap))

    @property
    def stride(self) -> int:
        """Largest step between neighbouring tiles that keeps ``overlap`` of a tile in common."""
        return max(1, int(math.floor(self.tile * (1.0 - self.overlap))))

    def work_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the image is resized to: long side ``work_size``, aspect kept, no side below the tile."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image of {height}x{width} px has no pixels")
        long_side = max(int(height), int(width))

        def side(s: int) -> int:
            return max(self.tile, (2 * int(s) * self.work_size + long_side) // (2 * long_side))

        return side(height), side(width)

    def grid(self, work_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """(y, x) of every tile of a work image of ``work_hw``, row by row."""
        ys = axis_positions(int(work_hw[0]), self.tile, self.stride)
        xs = axis_positions(int(work_hw[1]), self.tile, self.stride)
        return [(y, x) for y in ys for x in xs]

    def n_tiles(self, height: int, width: int) -> int:
        """Tiles of an image of (height, width) original pixels."""
        return len(self.grid(self.work_shape(height, width)))

    def crop(self, work: np.ndarray, positions: Sequence[tuple[int, int]]) -> np.ndarray:
        """The tiles at ``positions`` of a work image (H, W[, C]) as one contiguous (n, tile, tile[, C]) batch."""
        t = self.tile
        out = np.empty((len(positions), t, t) + work.shape[2:], work.dtype)
        for i, (y, x) in enumerate(positions):
            out[i] = work[y:y + t, x:x + t]
        return out

    def to_preprocessing(self) -> dict[str, Any]:
        """The stlm.json / checkpoint ``preprocessing`` keys of this tiling."""
        return {"work_size": self.work_size, "tile_overlap": self.overlap, "tile_blend": self.blend}

    @classmethod
    def from_preprocessing(cls, tile: int, pre: Mapping[str, Any] | None) -> "Tiling | None":
        """The tiling a ``preprocessing`` dict records (None: no ``work_size``, an untiled model)."""
        if not pre or pre.get("work_size") is None:
            return None
        return cls(tile, pre["work_size"], pre.get("tile_overlap", DEFAULT_TILE_OVERLAP),
                   pre.get("tile_blend", DEFAULT_TILE_BLEND))

    def describe(self) -> str:
        return f"work size {self.work_size}, tile {self.tile}, overlap {self.overlap:g} ({self.blend} blend)"


class Stitcher:
    """Blends tile maps into one work map (module docstring, point 3), tile by tile: bounded memory."""

    def __init__(self, tiling: Tiling, work_hw: tuple[int, int]) -> None:
        self.tiling = tiling
        self.hw = (int(work_hw[0]), int(work_hw[1]))
        self.acc = np.zeros(self.hw, np.float64)
        t, s = tiling.tile, tiling.stride
        # covering counts are separable: count(y, x) = rows covering y * columns covering x
        self._cy = np.zeros(self.hw[0], np.int64)
        self._cx = np.zeros(self.hw[1], np.int64)
        for p in axis_positions(self.hw[0], t, s):
            self._cy[p:p + t] += 1
        for p in axis_positions(self.hw[1], t, s):
            self._cx[p:p + t] += 1

    def add(self, positions: Sequence[tuple[int, int]], maps: np.ndarray) -> None:
        """Accumulate the (n, tile, tile) ``maps`` of the tiles at ``positions`` (in grid order)."""
        t = self.tiling.tile
        maps = np.asarray(maps)
        if maps.shape[1:] != (t, t) or maps.shape[0] != len(positions):
            raise ValueError(f"tile maps of shape {maps.shape} for {len(positions)} tiles of {t} px")
        for (y, x), m in zip(positions, maps):
            self.acc[y:y + t, x:x + t] += m.astype(np.float64)

    def result(self) -> np.ndarray:
        """The blended float32 work map."""
        return (self.acc / np.outer(self._cy, self._cx)).astype(np.float32)


def topk_mean(anomaly_map: np.ndarray, k: int) -> np.float32:
    """Mean of the ``k`` largest pixels (module docstring, point 4): STLM's top-100 score, STFPM's maximum."""
    flat = np.asarray(anomaly_map, np.float32).ravel()
    k = max(1, min(int(k), flat.size))
    top = np.sort(np.partition(flat, flat.size - k)[flat.size - k:])[::-1].astype(np.float64)
    total = float(np.cumsum(top)[-1])  # sequential, largest first, in float64: the C++ runtime's order
    return np.float32(total / k)


@dataclass
class TiledResult:
    """One image's stitched work maps (``anomaly_map`` and any other per-pixel output) and its score."""

    score: np.float32
    maps: dict[str, np.ndarray]
    n_tiles: int


def _pixel_outputs(outs: Mapping[str, np.ndarray], tile: int) -> list[str]:
    return [k for k, v in outs.items() if k != "score" and np.ndim(v) == 3 and np.shape(v)[1:] == (tile, tile)]


def run_tiled(work: np.ndarray, tiling: Tiling, run: Runner, chunk: int, top_k: int) -> TiledResult:
    """Split a work image (h, w, 3) into tiles, ``run`` them ``chunk`` at a time, blend, score.

    ``run(tiles uint8 (n, T, T, 3)) -> {"anomaly_map": (n, T, T), ...}``: a backend, a Triton model or
    PyTorch; every per-pixel output is stitched (``tlm_map`` too), the per-tile ``score`` is not used.
    """
    grid = tiling.grid(work.shape[:2])
    stitchers: dict[str, Stitcher] = {}
    step = max(1, int(chunk))
    for i in range(0, len(grid), step):
        pos = grid[i:i + step]
        outs = run(tiling.crop(work, pos))
        for name in _pixel_outputs(outs, tiling.tile):
            stitchers.setdefault(name, Stitcher(tiling, work.shape[:2])).add(pos, np.asarray(outs[name])[:len(pos)])
    if "anomaly_map" not in stitchers:
        raise ValueError("tiled run: the model returned no per-tile 'anomaly_map'")
    maps = {k: s.result() for k, s in stitchers.items()}
    return TiledResult(topk_mean(maps["anomaly_map"], top_k), maps, len(grid))


def stitch_tiles(outs: Mapping[str, np.ndarray], work_shapes: Iterable[tuple[int, int]], tiling: Tiling,
                 top_k: int) -> list[TiledResult]:
    """Per-image results from the outputs of a stack of tiles of several work images (image by image, each
    image's tiles in grid order): what the export gates compare."""
    results, start = [], 0
    names = _pixel_outputs(outs, tiling.tile)
    for hw in work_shapes:
        grid = tiling.grid(hw)
        maps = {}
        for name in names:
            st = Stitcher(tiling, hw)
            st.add(grid, np.asarray(outs[name])[start:start + len(grid)])
            maps[name] = st.result()
        start += len(grid)
        results.append(TiledResult(topk_mean(maps["anomaly_map"], top_k), maps, len(grid)))
    total = len(np.asarray(outs["anomaly_map"]))
    if start != total:
        raise ValueError(f"{total} tile outputs for work images that have {start} tiles")
    return results


def gate_maps(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image maps as one array for pixel metrics: stacked (N, h, w) when they share a shape, else every
    pixel in one row (1, 1, P), which keeps pixel-to-pixel correspondence (all AUROC and |Δmap| need)."""
    if not maps:
        return np.zeros((0, 0, 0), np.float32)
    if len({m.shape for m in maps}) == 1:
        return np.stack(maps)
    return np.concatenate([np.asarray(m).ravel() for m in maps])[None, None, :]
