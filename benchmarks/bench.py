"""stlm-bench: latency, throughput, memory, parity and accuracy of every engine next to PyTorch eager.

One run measures everything on the same machine, so the speed-up ratios are meaningful even though
absolute numbers vary between machines. Timings are per ``Detector.predict`` call on an img_size
batch (preprocessing + graph + postprocessing), the eager reference is ``STLM.predict`` on the same
batch with the same thread count.

A tiled engine is timed on work_size x work_size images (each cut into the same number of tiles), the
eager reference runs the same tiles through PyTorch and stitches them (:func:`stlm_train.predict_tiled`), and
the report gives milliseconds per image and per tile (p50 / (batch x tiles per image)); accuracy is computed
at the labelled images' own size, where both the engine and the reference return their maps.
"""
from __future__ import annotations

import gc
from functools import partial
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stlm_deploy.backends.base import default_threads

from .measure import Timing, environment, time_fn

log = logging.getLogger("stlm_bench")


@dataclass(frozen=True)
class Variant:
    """One way of running the engine: backend + requested precision (+ the artifact it implies)."""

    backend: str
    precision: str | None

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision or 'default'}"


@dataclass
class VariantResult:
    variant: Variant
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[int, Timing] = field(default_factory=dict)  # batch -> timing of one predict call
    peak_rss_mib: float | None = None
    rss_delta_mib: float | None = None
    parity: dict[str, float] | None = None
    accuracy: dict[str, float] | None = None
    error: str | None = None


# ----------------------------------------------------------------------------------------- memory
def _rss_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, so each variant gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- variants
def default_variants(engine_dir: Path) -> list[Variant]:
    """Every variant the engine directory has artifacts for (availability is checked when loading)."""
    from stlm_deploy.spec import load_spec

    spec = load_spec(engine_dir)
    out = [Variant("ort", "fp32")]
    if spec.find_artifacts("onnx", "fp16"):
        out.append(Variant("ort", "fp16"))
    if spec.find_artifacts("onnx", "int8"):
        out.append(Variant("ort", "int8"))
    if [a for a in spec.find_artifacts("openvino") if spec.artifacts[a].precision != "int8"]:
        out.append(Variant("openvino", "fp32"))
        out.append(Variant("openvino", "bf16"))
        fp16 = spec.variants.get("openvino/fp16")
        if fp16 is not None and fp16.gated:  # tried (and passed) only on CPUs whose OpenVINO has FP16
            out.append(Variant("openvino", "fp16"))
    if spec.find_artifacts("openvino", "int8"):
        out.append(Variant("openvino", "int8"))
    if spec.find_artifacts("tensorrt"):
        out.append(Variant("tensorrt", None))
    return out


def parse_variants(text: str, engine_dir: Path) -> list[Variant]:
    """'all' or a comma list of backend[/precision], e.g. 'ort/fp32,openvino/bf16'."""
    if text == "all":
        return default_variants(engine_dir)
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        backend, _, prec = item.partition("/")
        if backend not in ("ort", "openvino", "tensorrt"):
            raise ValueError(f"--backend: unknown backend {backend!r} in {text!r} (ort, openvino, tensorrt or all)")
        out.append(Variant(backend, prec or None))
    if not out:
        raise ValueError("--backend: empty list")
    return out


# ----------------------------------------------------------------------------------------- metrics
def parity(ref_maps: np.ndarray, ref_scores: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    from stlm_export.gate import spearman

    d = np.abs(maps.astype(np.float64) - ref_maps)
    rho = spearman(ref_scores, scores)  # the export gate's rank correlation
    return {"max_abs_map": float(d.max()), "mean_abs_map": float(d.mean()),
            "max_abs_score": float(np.abs(scores.astype(np.float64) - ref_scores).max()), "spearman": rho}


@dataclass
class LabelledSet:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,)
    masks: np.ndarray  # (N, S, S) uint8
    source: str


def bench_input_size(spec: Any) -> int:
    """Side of the square images an engine is timed on: img_size, or a tiled engine's work size (no resize)."""
    return spec.tiling.work_size if spec.tiling is not None else spec.img_size


def load_labelled(root: str, fmt: str, category: str | None, img_size: int | None,
                  resize: str = "area") -> LabelledSet:
    """The labelled test split at ``img_size`` (None: the images' own size, for tiled engines)."""
    from stlm_train.data import build_dataset

    ds = build_dataset(root, fmt, category=category, split="test", img_size=img_size, resize=resize)
    samples = [ds[i] for i in range(len(ds))]
    return LabelledSet(np.stack([s.image for s in samples]), np.array([s.label for s in samples]),
                       np.stack([s.mask for s in samples]), f"{fmt}:{root}")


def accuracy(scores: np.ndarray, maps: np.ndarray, data: LabelledSet, ref_scores: np.ndarray | None = None,
             threshold: float | None = None) -> dict[str, float]:
    """Metrics on the labelled set, plus ``agreement``: the share of images whose decision at the stored
    image threshold (the export gate's rule, :func:`stlm_export.int8.gate.decision_threshold`) matches
    the eager fp32 reference's."""
    from stlm_export.int8.gate import decision_threshold
    from stlm_train.metrics import compute_metrics

    m = {k: float(v) for k, v in compute_metrics(scores, data.labels, maps, data.masks).items()}
    if ref_scores is not None:
        thr, _ = decision_threshold(threshold, ref_scores)
        m["agreement"] = float(np.mean((np.asarray(ref_scores) > thr) == (np.asarray(scores) > thr)))
    return m


# ----------------------------------------------------------------------------------------- runs
def _predict_arrays(det: Any, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in range(0, len(images), batch):
        preds = det.predict(images[i:i + batch])
        maps.extend(p.anomaly_map for p in preds)
        scores.extend(p.score for p in preds)
    return np.stack(maps), np.asarray(scores, np.float32)


class ReferenceMismatch(ValueError):
    """The reference checkpoint is not the file the engine was exported from (one line)."""


def check_reference_source(ckpt: str, sha256: str, recorded_sha256: str, recorded_path: str,
                           allow_other: bool = False) -> bool:
    """True when ``sha256`` (of the reference bytes) is the engine's ``source.sha256``; else raise
    :class:`ReferenceMismatch`, or return False when ``allow_other`` (the report then says so).

    A parity or speed-up measured against another checkpoint would compare two different models.
    An engine that records no source checksum cannot be checked (True).
    """
    if not recorded_sha256 or sha256 == recorded_sha256:
        return True
    if allow_other:
        return False
    raise ReferenceMismatch(f"--reference {ckpt}: sha256 {sha256[:12]}... is not the checkpoint this engine was "
                            f"exported from (stlm.json source.sha256 {recorded_sha256[:12]}..., "
                            f"{recorded_path or 'path not recorded'}); pass --allow-other-reference to compare "
                            "with it anyway")


class Reference:
    """PyTorch eager fp32 on the same inputs (the yardstick every engine is compared with); a tiled checkpoint
    runs each image's tiles and stitches them as the engines do."""

    def __init__(self, ckpt: str, img_size: int, threads: int) -> None:
        import torch

        from stlm_train.checkpoint import read_checkpoint
        from stlm_train.modeling import tiling_of

        torch.set_num_threads(threads)
        self.torch = torch
        record = read_checkpoint(ckpt)  # read once: the checksum is of the bytes loaded
        self.sha256 = record.sha256
        self.model = record.model(img_size)
        self.tiled = tiling_of(self.model) is not None

    def _tiled(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from stlm_deploy.preprocess import resize_map
        from stlm_train.modeling import predict_tiled

        res = [predict_tiled(self.model, im) for im in images]
        return (np.stack([resize_map(r.maps["anomaly_map"], im.shape[:2]) for r, im in zip(res, images)]),
                np.asarray([r.score for r in res], np.float32))

    def predict(self, images: np.ndarray, batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
        if self.tiled:
            return self._tiled(images)
        maps, scores = [], []
        for i in range(0, len(images), batch):
            out = self.model.predict(self.torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
            maps.append(out.anomaly_map.numpy())
            scores.append(out.score.numpy())
        return np.concatenate(maps), np.concatenate(scores)

    def timer(self, images: np.ndarray):
        if self.tiled:
            return lambda: self._tiled(images)
        x = self.torch.from_numpy(np.ascontiguousarray(images))
        return lambda: self.model.predict(x)


def _batch_of(images: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:n])


def run_bench(engine: str, reference: str | None = None, variants: list[Variant] | None = None,
              batches: tuple[int, ...] = (1,), runs: int = 10, warmup: int = 2, threads: int | None = None,
              data: LabelledSet | None = None, parity_images: np.ndarray | None = None,
              parity_source: str = "", allow_other_reference: bool = False) -> dict[str, Any]:
    """Benchmark the engine's variants and (optionally) the PyTorch reference; returns a JSON-able report.

    The reference must be the checkpoint the engine was exported from (``source.sha256``) unless
    ``allow_other_reference`` (:func:`check_reference_source`)."""
    from stlm_deploy import Detector
    from stlm_deploy.spec import load_spec, resolve_engine

    threads = threads or default_threads()
    engine_dir, _ = resolve_engine(engine)
    spec = load_spec(engine_dir)
    variants = variants or default_variants(engine_dir)
    if parity_images is None:
        from stlm_export.calib import calibration_images

        calib = calibration_images(None, bench_input_size(spec), max_images=8, policy=spec.preprocessing.resize)
        parity_images, parity_source = calib.images, calib.source
    tiling = spec.tiling
    report: dict[str, Any] = {"engine": str(engine_dir), "img_size": spec.img_size, "batches": list(batches),
                              "runs": runs, "warmup": warmup, "parity_images": parity_source,
                              "parity_n": int(len(parity_images)), "accuracy_data": data.source if data else None,
                              "environment": environment(threads), "results": []}
    if tiling is not None:  # every timed image is cut into this many tiles (they share one shape)
        report["tiling"] = {**tiling.to_preprocessing(), "image_shape": list(parity_images.shape[1:3]),
                            "tiles_per_image": tiling.n_tiles(*parity_images.shape[1:3])}
    ref_maps = ref_scores = None
    ref_acc = None
    ref_data_scores = None
    threshold = spec.thresholds.image
    ref_t: dict[int, Timing] = {}
    if reference:
        _reset_peak_rss()
        before = _rss_kib("VmRSS")
        ref = Reference(reference, spec.img_size, threads)
        same_source = check_reference_source(reference, ref.sha256, spec.source.sha256, spec.source.checkpoint,
                                             allow_other_reference)
        ref_maps, ref_scores = ref.predict(parity_images)
        for b in batches:
            ref_t[b] = time_fn(ref.timer(_batch_of(parity_images, b)), runs=runs, warmup=warmup)
        if data is not None:
            dm, ref_data_scores = ref.predict(data.images)
            ref_acc = accuracy(ref_data_scores, dm, data, ref_data_scores, threshold)
        peak = _rss_kib("VmHWM")
        report["reference"] = {"label": "pytorch/fp32 (eager)", "checkpoint": reference, "sha256": ref.sha256,
                               "is_engine_source": same_source,
                               "timings": {b: t.to_dict() for b, t in ref_t.items()},
                               "peak_rss_mib": peak / 1024 if peak else None,
                               "rss_delta_mib": (peak - before) / 1024 if peak and before else None,
                               "accuracy": ref_acc}
        del ref
        gc.collect()
    for v in variants:
        res = VariantResult(v)
        _reset_peak_rss()
        before = _rss_kib("VmRSS")
        try:
            det = Detector.load(engine_dir, backend=v.backend, precision=v.precision, threads=threads)
        except Exception as e:  # noqa: BLE001 - a variant that cannot run here is reported, not fatal
            res.error = str(e).splitlines()[0]
            report["results"].append(_result_dict(res, ref_t, report))
            log.warning("%s: %s", v.label, res.error)
            continue
        try:
            res.info = det.info()
            maps, scores = _predict_arrays(det, parity_images, max(batches))
            if ref_maps is not None:
                res.parity = parity(ref_maps, ref_scores, maps, scores)
            for b in batches:
                x = _batch_of(parity_images, b)
                res.timings[b] = time_fn(partial(det.predict, x), runs=runs, warmup=warmup)
            if data is not None:
                dm, ds = _predict_arrays(det, data.images, max(batches))
                res.accuracy = accuracy(ds, dm, data, ref_data_scores, threshold)
            peak = _rss_kib("VmHWM")
            res.peak_rss_mib = peak / 1024 if peak else None
            res.rss_delta_mib = (peak - before) / 1024 if peak and before else None
        finally:
            det.close()
            del det
            gc.collect()
        report["results"].append(_result_dict(res, ref_t, report))
    if "reference" in report and tiling is not None:
        report["reference"]["ms_per_tile"] = _per_tile(ref_t, report)
    return report


def _per_tile(timings: dict[int, Timing], report: dict[str, Any]) -> dict[int, float]:
    """p50 ms per tile of a tiled engine's timings (one call = batch images x tiles per image)."""
    n = report.get("tiling", {}).get("tiles_per_image")
    return {b: t.p50_ms / (b * n) for b, t in timings.items()} if n else {}


def _result_dict(res: VariantResult, ref_t: dict[int, Timing], report: dict[str, Any] | None = None) -> dict[str, Any]:
    speedup = {b: ref_t[b].p50_ms / t.p50_ms for b, t in res.timings.items() if b in ref_t and t.p50_ms > 0}
    info = res.info
    return {"label": res.variant.label, "backend": res.variant.backend, "requested_precision": res.variant.precision,
            "precision_used": info.get("precision"), "providers": info.get("providers"),
            "artifact": info.get("artifact"), "timings": {b: t.to_dict() for b, t in res.timings.items()},
            **({"ms_per_tile": _per_tile(res.timings, report)} if report and "tiling" in report else {}),
            "throughput_ips": {b: b * 1000 / t.mean_ms for b, t in res.timings.items()},
            "speedup_vs_eager_p50": speedup, "peak_rss_mib": res.peak_rss_mib, "rss_delta_mib": res.rss_delta_mib,
            "parity": res.parity, "accuracy": res.accuracy, "error": res.error}


# ----------------------------------------------------------------------------------------- output
def _f(x: Any, fmt: str = ".1f") -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    """Tables: latency per batch, parity, accuracy, environment."""
    env = report["environment"]
    lines = [f"### stlm-bench — `{report['engine']}` at {report['img_size']} px",
             "", f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs, {env['threads']} threads); "
                 f"parity on {report['parity_n']} images ({report['parity_images']})", ""]
    tiles = report.get("tiling")
    if tiles:
        shape = "x".join(str(v) for v in tiles["image_shape"])
        lines += [f"Tiled engine: work size {tiles['work_size']}, overlap {tiles['tile_overlap']:g}; each timed "
                  f"{shape} image is {tiles['tiles_per_image']} tiles of {report['img_size']} px. ms are per call "
                  f"(batch images); ms/tile = p50 / (batch x {tiles['tiles_per_image']}).", ""]
    head = "| variant | precision used | providers | batch | p50 ms | p90 ms | p99 ms | mean ms | img/s | × eager | peak RSS MiB |"
    head += " ms/tile |" if tiles else ""
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    ref = report.get("reference")
    rows = []

    def per_tile(entry: dict[str, Any], b: Any) -> str:
        return f" {_f({str(k): v for k, v in entry.get('ms_per_tile', {}).items()}.get(str(b)), '.2f')} |" \
            if tiles else ""

    if ref:
        for b, t in ref["timings"].items():
            rows.append(f"| {ref['label']} | fp32 | torch | {b} | {_f(t['p50_ms'])} | {_f(t['p90_ms'])} | "
                        f"{_f(t['p99_ms'])} | {_f(t['mean_ms'])} | {_f(int(b) * 1000 / t['mean_ms'], '.2f')} | 1.00 | "
                        f"{_f(ref['peak_rss_mib'], '.0f')} |" + per_tile(ref, b))
    for r in report["results"]:
        if r["error"]:
            rows.append(f"| {r['label']} | – | – | – | not run: {r['error'][:90]} |||||| |")
            continue
        for b, t in r["timings"].items():
            rows.append(f"| {r['label']} | {r['precision_used']} | {','.join(r['providers'] or [])} | {b} | "
                        f"{_f(t['p50_ms'])} | {_f(t['p90_ms'])} | {_f(t['p99_ms'])} | {_f(t['mean_ms'])} | "
                        f"{_f(r['throughput_ips'][b], '.2f')} | {_f(r['speedup_vs_eager_p50'].get(b), '.2f')} | "
                        f"{_f(r['peak_rss_mib'], '.0f')} |" + per_tile(r, b))
    lines += rows
    if ref:
        lines += ["", "| variant | max abs Δmap | mean abs Δmap | max abs Δscore | score Spearman |", "|---|---|---|---|---|"]
        for r in report["results"]:
            p = r["parity"]
            if p:
                lines.append(f"| {r['label']} | {p['max_abs_map']:.2e} | {p['mean_abs_map']:.2e} | "
                             f"{p['max_abs_score']:.2e} | {_f(p['spearman'], '.4f')} |")
    acc_rows = [("pytorch/fp32 (eager)", ref.get("accuracy"))] if ref and ref.get("accuracy") else []
    acc_rows += [(r["label"], r["accuracy"]) for r in report["results"] if r["accuracy"]]
    if acc_rows:
        keys = [k for k in ("i_auroc", "p_auroc", "aupro", "p_ap", "f1_max", "agreement") if k in acc_rows[0][1]]
        lines += ["", f"Accuracy on {report['accuracy_data']} (agreement: decisions at the stored image threshold "
                      "equal to eager fp32's)", "",
                  "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {lab} | " + " | ".join(_f(a.get(k), '.4f') for k in keys) + " |" for lab, a in acc_rows]
    pk = env.get("packages", {})
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in pk.items())]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Latency (p50, batch 1 or the smallest batch) and throughput per variant as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, p50, ips = [], [], []
    b0 = str(min(int(b) for b in report["batches"]))
    ref = report.get("reference")
    entries = ([(ref["label"], ref["timings"])] if ref else []) + \
        [(r["label"], r["timings"]) for r in report["results"] if not r["error"]]
    for lab, t in entries:
        t = {str(k): v for k, v in t.items()}
        if b0 in t:
            labels.append(lab)
            p50.append(t[b0]["p50_ms"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].barh(labels, p50, color="tab:blue")
    axes[0].set_xlabel(f"p50 latency per call, batch {b0} (ms)")
    axes[0].invert_yaxis()
    for lab, t in entries:
        t = {int(k): v for k, v in t.items()}
        bs = sorted(t)
        ips = [b * 1000 / t[b]["mean_ms"] for b in bs]
        axes[1].plot(bs, ips, marker="o", label=lab)
    axes[1].set_xlabel("batch")
    axes[1].set_ylabel("images / s")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{Path(report['engine']).name} at {report['img_size']} px — {report['environment']['cpu']}", fontsize=9)
    fig.tight_layout()
    from stlm_deploy.files import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
