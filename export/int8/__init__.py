"""INT8 (``stlm-export --int8``, docs/int8.md): ``data.py`` (calibration images from the checkpoint's training
split, validation images), ``ort.py`` (static Q/DQ for ONNX Runtime and TensorRT), ``openvino.py`` (NNCF),
``gate.py`` (the INT8 view of the task gate: tolerance, compare, margin) and ``build.py`` (quantise, gate,
publish only what passes)."""
