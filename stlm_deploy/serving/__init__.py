"""Serving: ``stlm-serve`` (``server.py``: a real Triton server through PyTriton around one in-process
Detector; ``cli.py``: its command line) and the client that scores through it or any Triton serving the stlm
contract (``client.py``: :class:`RemoteDetector`, ``stlm-infer --url``). tritonclient/pytriton are imported
only by the modules that need them."""
