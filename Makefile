# Two commands for a fresh machine: `make demo` and `make test` (both create .venv/ when needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: install sysdeps test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 resolves to the local CPU wheel on these machines; the cpu extra is onnxruntime
# (never together with onnxruntime-gpu), dev brings pytest, openvino, onnxslim, polygraphy, matplotlib.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,cpu]'
	touch $@

install: $(STAMP)

# Debian packages for the C++ runtime (OpenCV, nlohmann-json, OpenSSL, cmake); skipped when not root.
sysdeps:
	bash .ci/install-system-deps.sh

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m stlm_bench.demo

clean:
	rm -rf $(VENV) runs .pytest_cache
