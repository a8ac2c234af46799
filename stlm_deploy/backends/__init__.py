"""Runtime backends behind one :class:`~stlm_deploy.backends.base.Backend` interface.

Modules are imported lazily by name so that importing ``stlm_deploy`` never pulls in onnxruntime,
OpenVINO, TensorRT or CUDA; each backend imports its library inside ``activate``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from ..errors import DeployError
from .base import Backend

__all__ = ["Backend", "BACKEND_NAMES", "backend_class", "create_backend", "available_backends", "module_importable",
           "tensorrt_available"]

BACKEND_NAMES = ("tensorrt", "ort", "openvino")  # also the "auto" preference order (ORT-CUDA before OpenVINO)
_CLASSES = {"ort": ("ort", "OrtBackend"), "openvino": ("openvino", "OpenVinoBackend"),
            "tensorrt": ("tensorrt", "TensorRTBackend")}


def module_importable(name: str) -> bool:
    """Whether ``import name`` could succeed, without importing it (parents are imported)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def tensorrt_available() -> bool:
    """TensorRT and cuda-python are installed: the one check used by export, benchmarks and the runtime.

    Found, not imported: importing them initialises CUDA. A GPU is checked when a plan is built or loaded.
    """
    return module_importable("tensorrt") and (module_importable("cuda.bindings") or module_importable("cuda.cudart"))


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass for ``name`` ('ort', 'openvino', 'tensorrt'); imports only that module."""
    if name not in _CLASSES:
        raise DeployError(f"backend: expected one of auto, {', '.join(BACKEND_NAMES)}, got {name!r}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def create_backend(name: str, path: str | os.PathLike, **options: Any) -> Backend:
    """Instantiate (not activate) backend ``name`` for artifact ``path``."""
    return backend_class(name)(path, **options)


def available_backends() -> dict[str, str]:
    """Backends whose packages are installed here, with what they offer (GPU use is checked at load).

    Cheap except for onnxruntime, which is imported to list its execution providers.
    """
    out: dict[str, str] = {}
    if tensorrt_available():
        out["tensorrt"] = "tensorrt + cuda-python installed (needs an NVIDIA GPU and a matching plan)"
    if module_importable("onnxruntime"):
        from .ort import find_ort_conflict, ort_available_providers, _installed_distribution_names

        conflict = find_ort_conflict(_installed_distribution_names())
        providers = ort_available_providers()
        out["ort"] = ("BROKEN: " + conflict) if conflict else "onnxruntime: " + ", ".join(providers)
    if module_importable("openvino"):
        out["openvino"] = "OpenVINO (CPU)"
    return out
