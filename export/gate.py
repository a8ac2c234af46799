"""The parity gate: every exported artifact against the PyTorch reference on the same uint8 batch.

Every artifact runs through the runtime's own backends (:mod:`stlm_deploy.backends`: ONNX Runtime,
OpenVINO, TensorRT), the code users run, so what passes here is what ships.

Tolerances (max over all pixels of all images; ``score`` is a mean of map pixels, so it gets the
map's tolerance):

=========  ===========  ============  ============  ==============================
precision  |Δmap| max   |Δscore| max  |Δtlm| max    image order
=========  ===========  ============  ============  ==============================
fp32       1e-4         1e-4          1e-4          (not gated: fp32 ranks are exact)
fp16/bf16  5e-3         5e-3          2e-2          no resolvable pair flipped
=========  ===========  ============  ============  ==============================

The TLM map is a product of two cosine distances of decoder features that run in fp16, so its
absolute error is larger than the sigmoid map's; 2e-2 on a [0, 4] range is still a 0.5% error.

Image order. A reduced precision must keep the ranking of the images, but only the part of it that
the precision can resolve: a pair of images is *resolvable* when the reference scores differ by more
than the score tolerance, and the gate fails if any resolvable pair comes out in the opposite order
(or tied). Pairs closer than the tolerance are free to swap; a plain Spearman threshold punished that
(a trained model's good images often score within 1e-3 of each other, so a 7e-4 error, well inside
the 5e-3 tolerance, gave rho 0.976 and failed an artifact whose every number was within bounds).
Since each score may move by up to the tolerance, a flip of a resolvable pair means the two errors
are large and opposite, which is what the rule is there to catch. ``rank_pairs`` and
``rank_flips`` record it; the plain Spearman rank correlation (average ranks, as
``scipy.stats.spearmanr``; plain numpy here so benchmarks need no scipy) is still reported for
n >= 3 images (null if a side is constant), but not gated.

The reference is ``STLM.predict`` (the PyTorch model, fused normalisation, top-k score) on the
same ``img_size`` uint8 batch the engine sees; nothing is resized on either side. A tiled engine's batch is
the tiles of the parity images; both sides' tile outputs are stitched per image (:class:`~stlm_export.calib.
TileLayout`: the runtime's blend and top-k score) and the stitched maps and scores are what is compared.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from stlm_deploy.backends import Backend

from .calib import TileLayout, stitched

if TYPE_CHECKING:  # torch is imported where the reference runs: benchmarks use the rules without it
    from stlm_train import STLM

__all__ = ["Tolerance", "TOLERANCES", "ParityRecord", "ParityGateError", "Gate", "tolerance_for", "reference_outputs",
           "spearman", "compare", "backend_outputs", "ort_outputs", "normalize_images", "write_polygraphy_files",
           "POLYGRAPHY_RUNNER", "POLYGRAPHY_TOLERANCE", "polygraphy_command", "feed_batches", "run_batched",
           "OPENVINO_GATE_CHUNK"]

POLYGRAPHY_RUNNER = "pytorch-reference"
#: Images per OpenVINO gate call on a dynamic-batch graph: one, so the gates judge the batch-1 compilation
#: the runtime runs for single images (stlm_deploy.backends.openvino: "Static batch 1").
OPENVINO_GATE_CHUNK = 1
# Polygraphy's default atol/rtol are 1e-5; ORT vs PyTorch fp32 is within our 1e-4 gate but can
# exceed 1e-5 at a few pixels, so the documented command uses the gate's tolerance.
POLYGRAPHY_TOLERANCE = 1e-4


class ParityGateError(ValueError):
    """An artifact failed its parity gate; the message is one line with the failing numbers."""


@dataclass(frozen=True)
class Tolerance:
    """Limits of one precision class (see the module docstring for why)."""

    map: float
    score: float
    tlm: float
    rank_order: bool  # gate the order of the resolvable image pairs (module docstring)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(map=1e-4, score=1e-4, tlm=1e-4, rank_order=False),
    "fp16": Tolerance(map=5e-3, score=5e-3, tlm=2e-2, rank_order=True),
    "bf16": Tolerance(map=5e-3, score=5e-3, tlm=2e-2, rank_order=True),
}


def tolerance_for(precision: str, overrides: Mapping[str, Tolerance] | None = None) -> Tolerance:
    """The tolerance of ``precision``; ``overrides`` (tests, experiments) win over the table."""
    if overrides and precision in overrides:
        return overrides[precision]
    return TOLERANCES[precision]


@dataclass
class ParityRecord:
    """One artifact's gate result (a ``parity.json`` entry)."""

    artifact: str
    backend: str
    precision: str
    n_images: int
    image_source: str
    max_abs_map: float
    mean_abs_map: float
    max_abs_score: float
    spearman: float | None
    tolerance: Tolerance
    passed: bool
    failures: list[str] = field(default_factory=list)
    max_abs_tlm: float | None = None
    rank_pairs: int = 0
    rank_flips: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"artifact": self.artifact, "backend": self.backend, "precision": self.precision,
             "max_abs_map": self.max_abs_map, "mean_abs_map": self.mean_abs_map,
             "max_abs_score": self.max_abs_score, "spearman": self.spearman, "rank_pairs": self.rank_pairs,
             "rank_flips": self.rank_flips}
        if self.max_abs_tlm is not None:
            d["max_abs_tlm"] = self.max_abs_tlm
        d.update({"tolerance": self.tolerance.to_dict(), "pass": self.passed, "failures": list(self.failures),
                  "n_images": self.n_images, "image_source": self.image_source, **self.details})
        return d

    def line(self) -> str:
        rho = "n/a" if self.spearman is None else f"{self.spearman:.4f}"
        order = f", {self.rank_flips}/{self.rank_pairs} resolvable pairs flipped" if self.tolerance.rank_order else ""
        tlm = "" if self.max_abs_tlm is None else f", max|Δtlm| {self.max_abs_tlm:.2e}"
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (f"{self.artifact} [{self.backend} {self.precision}] max|Δmap| {self.max_abs_map:.2e} "
                f"(tol {self.tolerance.map:g}), mean|Δmap| {self.mean_abs_map:.2e}, max|Δscore| "
                f"{self.max_abs_score:.2e}{tlm}, spearman {rho}{order} on {self.n_images} images: {verdict}")


def normalize_images(stlm: STLM, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> the normalised float32 NCHW input of a ``--no-fuse-pre`` graph (same op as the graph)."""
    import torch

    with torch.no_grad():
        return stlm.normalize(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def feed_batches(n: int, batch: int | str, dynamic_chunk: int = 4) -> list[slice]:
    """Chunks of the image list: the fixed batch size, or ``dynamic_chunk`` images for dynamic graphs.

    A fixed-batch graph needs exactly ``batch`` images per call; a last short chunk is padded by
    the caller (:func:`_padded`).
    """
    step = dynamic_chunk if batch == "dynamic" else int(batch)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """Fill a short last chunk up to the fixed batch by repeating its last image."""
    return x if x.shape[0] == size else np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def reference_outputs(stlm: STLM, images: np.ndarray, with_tlm: bool = True, chunk: int = 4) -> dict[str, np.ndarray]:
    """PyTorch reference (the model's ``predict``, STLM or STFPM) on uint8 (N, S, S, 3): anomaly_map, score[, tlm_map]."""
    import torch

    maps, scores, tlms = [], [], []
    for sl in feed_batches(images.shape[0], "dynamic", chunk):
        with torch.no_grad():
            out = stlm.predict(torch.from_numpy(np.ascontiguousarray(images[sl])))
        maps.append(out.anomaly_map.float().cpu().numpy())
        scores.append(out.score.float().cpu().numpy())
        if with_tlm:
            tlms.append(out.tlm_map.float().cpu().numpy())
    ref = {"anomaly_map": np.concatenate(maps), "score": np.concatenate(scores)}
    if with_tlm:
        ref["tlm_map"] = np.concatenate(tlms)
    return ref


Runner = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def run_batched(run: Runner, inputs: np.ndarray, batch: int | str, dynamic_chunk: int = 4) -> dict[str, np.ndarray]:
    """Call ``run`` per chunk (padding the last chunk of a fixed-batch graph) and concatenate."""
    outs: dict[str, list[np.ndarray]] = {}
    for sl in feed_batches(inputs.shape[0], batch, dynamic_chunk):
        x = inputs[sl]
        n = x.shape[0]
        if batch != "dynamic":
            x = _padded(x, int(batch))
        for k, v in run(np.ascontiguousarray(x)).items():
            outs.setdefault(k, []).append(np.asarray(v)[:n])
    return {k: np.concatenate(v) for k, v in outs.items()}


def backend_outputs(backend: Backend, inputs: np.ndarray, batch: int | str = "dynamic",
                    dynamic_chunk: int = 4) -> dict[str, np.ndarray]:
    """Run a runtime backend (activated here if needed) over ``inputs``: the gate's only way to run a graph."""
    with backend:
        return run_batched(lambda x: backend.infer({backend.input_name: x}), inputs, batch, dynamic_chunk)


def ort_outputs(model: Any, inputs: np.ndarray, batch: int | str = "dynamic",
                threads: int | None = None) -> dict[str, np.ndarray]:
    """Run an ONNX model (path or in-memory ModelProto) through the runtime's ONNX Runtime CPU backend.

    An in-memory model (the simplifier's parity probe) is written to a temporary file first: the
    backend loads files, as it does for users.
    """
    from stlm_deploy.backends.ort import OrtBackend

    if not hasattr(model, "SerializeToString"):
        return backend_outputs(OrtBackend(model, threads=threads), inputs, batch)
    with tempfile.TemporaryDirectory(prefix="stlm-gate-") as tmp:
        path = Path(tmp) / "probe.onnx"
        path.write_bytes(model.SerializeToString())
        return backend_outputs(OrtBackend(path, threads=threads), inputs, batch)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing their average rank (``scipy.stats.rankdata(method="average")``)."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(ref: np.ndarray, got: np.ndarray) -> float | None:
    """Spearman rank correlation of two score vectors; None below 3 images or when a side is constant."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.size < 3 or np.ptp(ref) == 0 or np.ptp(got) == 0:
        return None
    rho = float(np.corrcoef(_ranks(ref), _ranks(got))[0, 1])
    return rho if math.isfinite(rho) else None


def rank_flips(ref: np.ndarray, got: np.ndarray, score_tol: float) -> tuple[int, int]:
    """(resolvable pairs, how many of them ``got`` orders the other way or ties) - see the module docstring."""
    ref, got = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
    i, j = np.triu_indices(ref.size, k=1)
    d_ref, d_got = ref[i] - ref[j], got[i] - got[j]
    resolvable = np.abs(d_ref) > score_tol
    flipped = resolvable & ~(np.sign(d_got) == np.sign(d_ref))
    return int(resolvable.sum()), int(flipped.sum())


def compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *, artifact: str, backend: str,
            precision: str, tolerance: Tolerance, image_source: str,
            details: dict[str, Any] | None = None) -> ParityRecord:
    """Gate one artifact's outputs against the reference; NaNs and missing outputs fail it."""
    failures: list[str] = []
    for name in ref:
        if name not in got:
            failures.append(f"output {name!r} missing")
    n_images = int(np.asarray(ref["score"]).size)  # (stitched maps of a tiled engine may be one row of pixels)
    if failures:
        return ParityRecord(artifact, backend, precision, n_images, image_source,
                            math.inf, math.inf, math.inf, None, tolerance, False, failures, details=details or {})

    def diff(name: str) -> np.ndarray:
        a = np.asarray(got[name], np.float64)
        b = np.asarray(ref[name], np.float64)
        if a.shape != b.shape:
            failures.append(f"{name} shape {a.shape} != reference {b.shape}")
            return np.full(1, np.inf)
        d = np.abs(a - b)
        return np.where(np.isfinite(d), d, np.inf)

    dmap, dscore = diff("anomaly_map"), diff("score")
    max_map, mean_map, max_score = float(dmap.max()), float(dmap.mean()), float(dscore.max())
    if max_map > tolerance.map:
        failures.append(f"max|Δmap| {max_map:.3g} > {tolerance.map:g}")
    if max_score > tolerance.score:
        failures.append(f"max|Δscore| {max_score:.3g} > {tolerance.score:g}")
    max_tlm = None
    if "tlm_map" in ref:
        max_tlm = float(diff("tlm_map").max())
        if max_tlm > tolerance.tlm:
            failures.append(f"max|Δtlm| {max_tlm:.3g} > {tolerance.tlm:g}")
    rho, pairs, flips = None, 0, 0
    if np.isfinite(max_score):
        rho = spearman(ref["score"], got["score"])
        pairs, flips = rank_flips(ref["score"], got["score"], tolerance.score)
    if tolerance.rank_order and flips:
        failures.append(f"{flips} of {pairs} image pairs that the reference scores more than "
                        f"{tolerance.score:g} apart come out in the opposite order")
    return ParityRecord(artifact=artifact, backend=backend, precision=precision,
                        n_images=n_images, image_source=image_source,
                        max_abs_map=max_map, mean_abs_map=mean_map, max_abs_score=max_score, spearman=rho,
                        tolerance=tolerance, passed=not failures, failures=failures, max_abs_tlm=max_tlm,
                        rank_pairs=pairs, rank_flips=flips, details=details or {})


def polygraphy_command(model: str = "model.onnx", tolerance: float = POLYGRAPHY_TOLERANCE) -> str:
    """The command that replays the reference with Polygraphy (run inside the engine directory)."""
    return (f"polygraphy run {model} --onnxrt --load-inputs inputs.json --load-outputs outputs.json "
            f"--atol {tolerance:g} --rtol {tolerance:g}")


def write_polygraphy_files(engine_dir: str | os.PathLike, input_name: str, inputs: np.ndarray,
                           reference: Mapping[str, np.ndarray]) -> tuple[Path, Path]:
    """``inputs.json`` (a list of feed dicts, one iteration) and ``outputs.json`` (RunResults).

    Polygraphy's data-loader format is a JSON list of ``{input_name: array}``; its results format
    is ``RunResults`` = [(runner name, [IterationResult(outputs)])], one IterationResult per feed.
    """
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    engine_dir = Path(engine_dir)
    feeds = [{input_name: np.ascontiguousarray(inputs)}]
    results = RunResults()
    outs = {k: np.ascontiguousarray(v) for k, v in reference.items()}
    results.append((POLYGRAPHY_RUNNER, [IterationResult(outputs=outs, runner_name=POLYGRAPHY_RUNNER)]))
    in_path, out_path = engine_dir / "inputs.json", engine_dir / "outputs.json"
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # no "[I] Saving ..." chatter on stdout
        save_json(feeds, str(in_path), description="stlm parity inputs")
        results.save(str(out_path))
    return in_path, out_path


class Gate:
    """One export's gate: compares backend outputs with the reference, keeps the records for parity.json.

    ``layout`` (a tiled engine): ``ref`` and every ``got`` are outputs on the tiles of the parity images, and
    both are stitched per image before the comparison."""

    def __init__(self, ref: Mapping[str, np.ndarray], image_source: str,
                 tolerances: Mapping[str, Tolerance] | None, say: Callable[[str], None],
                 layout: TileLayout | None = None) -> None:
        self.image_source, self.tolerances, self.say, self.layout = image_source, tolerances, say, layout
        self.ref = stitched(ref, layout) if ref else ref
        self.records: list[ParityRecord] = []

    def check(self, artifact: str, backend: str, precision: str, got: Mapping[str, np.ndarray],
              details: dict[str, Any] | None = None) -> ParityRecord:
        """Compare only (not recorded): used by probes and fallbacks."""
        return compare(self.ref, stitched(got, self.layout), artifact=artifact, backend=backend, precision=precision,
                       tolerance=tolerance_for(precision, self.tolerances), image_source=self.image_source,
                       details=details)

    def require(self, rec: ParityRecord) -> ParityRecord:
        """Record ``rec``; a failure aborts the export (the temp directory is discarded)."""
        self.records.append(rec)
        self.say("parity " + rec.line())
        if not rec.passed:
            raise ParityGateError(f"parity gate failed, nothing published: {rec.line()}")
        return rec
