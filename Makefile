# Two commands for a fresh machine: `make demo` and `make test` (both create .venv/ when needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install sysdeps test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 resolves to the local CPU wheel on these machines; the cpu extra is onnxruntime
# (never together with onnxruntime-gpu), dev = the train, export and bench extras + pytest, scikit-learn.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,cpu]'
	touch $@

install: $(STAMP)

# Debian packages for the C++ runtime (OpenCV, nlohmann-json, OpenSSL, cmake); skipped when not root.
sysdeps:
	bash .ci/install-system-deps.sh

# Two pytest processes: the training tests fork (DataLoader workers, torchrun) and must not share a
# process with OpenVINO/ONNX Runtime thread pools, which are not fork-safe (heap corruption seen here).
test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q tests/stlm_train
	$(BIN)/python -m pytest -q tests/export tests/stlm_deploy tests/benchmarks tests/cpp

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) runs .pytest_cache
