"""The parity gate: every exported artifact against the PyTorch reference on the same uint8 batch.

Every artifact runs through the runtime's own backends (:mod:`stlm_deploy.backends`: ONNX Runtime,
OpenVINO, TensorRT), the code users run, so what passes here is what ships.

Tolerances (max over all pixels of all images; ``score`` is a mean of map pixels, so it gets the
map's tolerance):

=========  ===========  ============  ============  ========================
precision  |Δmap| max   |Δscore| max  |Δtlm| max    score Spearman (n >= 3)
=========  ===========  ============  ============  ========================
fp32       1e-4         1e-4          1e-4          (not gated: fp32 ranks are exact)
fp16/bf16  5e-3         5e-3          2e-2          >= 0.999
=========  ===========  ============  ============  ========================

The TLM map is a product of two cosine distances of decoder features that run in fp16, so its
absolute error is larger than the sigmoid map's; 2e-2 on a [0, 4] range is still a 0.5% error.
Spearman rank correlation of the image scores (Pearson correlation of average ranks, as
``scipy.stats.spearmanr``; plain numpy here so benchmarks need no scipy) is gated only where a
ranking exists that the precision can be expected to keep:

* n < 3 images: reported as null, not gated (two points always correlate +-1);
* all reference scores within the score tolerance of each other (ptp <= tol, e.g. an untrained
  model whose scores differ by 1e-4): the order is below the precision's resolution, so rho is
  reported (null if a side is constant) but not gated, and ``spearman_gated: false`` says so;
* otherwise rho >= 0.999; a constant backend score against a varying reference counts as rho 0.

The reference is ``STLM.predict`` (the PyTorch model, fused normalisation, top-k score) on the
same ``img_size`` uint8 batch the engine sees; nothing is resized on either side.
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

if TYPE_CHECKING:  # torch is imported where the reference runs: benchmarks use the rules without it
    from stlm_train import STLM

__all__ = ["Tolerance", "TOLERANCES", "ParityRecord", "ParityGateError", "Gate", "tolerance_for", "reference_outputs",
           "spearman", "compare", "backend_outputs", "ort_outputs", "normalize_images", "write_polygraphy_files",
           "POLYGRAPHY_RUNNER", "POLYGRAPHY_TOLERANCE", "polygraphy_command", "feed_batches", "run_batched"]

POLYGRAPHY_RUNNER = "pytorch-reference"
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
    spearman_min: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(map=1e-4, score=1e-4, tlm=1e-4, spearman_min=None),
    "fp16": Tolerance(map=5e-3, score=5e-3, tlm=2e-2, spearman_min=0.999),
    "bf16": Tolerance(map=5e-3, score=5e-3, tlm=2e-2, spearman_min=0.999),
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
    spearman_gated: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"artifact": self.artifact, "backend": self.backend, "precision": self.precision,
             "max_abs_map": self.max_abs_map, "mean_abs_map": self.mean_abs_map,
             "max_abs_score": self.max_abs_score, "spearman": self.spearman, "spearman_gated": self.spearman_gated}
        if self.max_abs_tlm is not None:
            d["max_abs_tlm"] = self.max_abs_tlm
        d.update({"tolerance": self.tolerance.to_dict(), "pass": self.passed, "failures": list(self.failures),
                  "n_images": self.n_images, "image_source": self.image_source, **self.details})
        return d

    def line(self) -> str:
        rho = "n/a" if self.spearman is None else f"{self.spearman:.4f}"
        if self.spearman is not None and not self.spearman_gated:
            rho += " (not gated)"
        tlm = "" if self.max_abs_tlm is None else f", max|Δtlm| {self.max_abs_tlm:.2e}"
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return (f"{self.artifact} [{self.backend} {self.precision}] max|Δmap| {self.max_abs_map:.2e} "
                f"(tol {self.tolerance.map:g}), mean|Δmap| {self.mean_abs_map:.2e}, max|Δscore| "
                f"{self.max_abs_score:.2e}{tlm}, spearman {rho} on {self.n_images} images: {verdict}")


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


def spearman(ref: np.ndarray, got: np.ndarray, score_tol: float) -> tuple[float | None, bool]:
    """(rank correlation of the image scores or None, whether it is gated) - rules in the module docstring."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.size < 3:
        return None, False
    gated = float(np.ptp(ref)) > score_tol
    if np.ptp(ref) == 0 or np.ptp(got) == 0:
        return (0.0 if gated else None), gated
    rho = float(np.corrcoef(_ranks(ref), _ranks(got))[0, 1])
    return (rho if math.isfinite(rho) else 0.0), gated


def compare(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *, artifact: str, backend: str,
            precision: str, tolerance: Tolerance, image_source: str,
            details: dict[str, Any] | None = None) -> ParityRecord:
    """Gate one artifact's outputs against the reference; NaNs and missing outputs fail it."""
    failures: list[str] = []
    for name in ref:
        if name not in got:
            failures.append(f"output {name!r} missing")
    if failures:
        return ParityRecord(artifact, backend, precision, int(ref["anomaly_map"].shape[0]), image_source,
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
    rho, gated = None, False
    if np.isfinite(max_score):
        rho, gated = spearman(ref["score"], got["score"], tolerance.score)
    gated = gated and tolerance.spearman_min is not None
    if gated and rho is not None and rho < tolerance.spearman_min:
        failures.append(f"score spearman {rho:.4f} < {tolerance.spearman_min:g}")
    return ParityRecord(artifact=artifact, backend=backend, precision=precision,
                        n_images=int(ref["anomaly_map"].shape[0]), image_source=image_source,
                        max_abs_map=max_map, mean_abs_map=mean_map, max_abs_score=max_score, spearman=rho,
                        tolerance=tolerance, passed=not failures, failures=failures, max_abs_tlm=max_tlm,
                        spearman_gated=gated, details=details or {})


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
    """One export's gate: compares backend outputs with the reference, keeps the records for parity.json."""

    def __init__(self, ref: Mapping[str, np.ndarray], image_source: str,
                 tolerances: Mapping[str, Tolerance] | None, say: Callable[[str], None]) -> None:
        self.ref, self.image_source, self.tolerances, self.say = ref, image_source, tolerances, say
        self.records: list[ParityRecord] = []

    def check(self, artifact: str, backend: str, precision: str, got: Mapping[str, np.ndarray],
              details: dict[str, Any] | None = None) -> ParityRecord:
        """Compare only (not recorded): used by probes and fallbacks."""
        return compare(self.ref, got, artifact=artifact, backend=backend, precision=precision,
                       tolerance=tolerance_for(precision, self.tolerances), image_source=self.image_source,
                       details=details)

    def require(self, rec: ParityRecord) -> ParityRecord:
        """Record ``rec``; a failure aborts the export (the temp directory is discarded)."""
        self.records.append(rec)
        self.say("parity " + rec.line())
        if not rec.passed:
            raise ParityGateError(f"parity gate failed, nothing published: {rec.line()}")
        return rec
