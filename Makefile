# beamloop: `make run` (the main job on the simulated microscope) and `make test` set everything up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
OUT ?= out/run
# pytest: -n for parallel needs pytest-xdist; keep it simple and serial
PYTEST_ARGS ?=

.PHONY: install install-gpu system-deps run test test-all lint train bench bench-quick clean

# System tools the FPGA tests need (Icarus Verilog for the cycle-accurate RTL simulation, g++ for the
# hls4ml C simulation); the rest of the RTL flow (yosys, nextpnr-ecp5, ecppack) comes from PyPI as
# WebAssembly (yowasp). Headless Chromium loads the live view (--http) in tests/test_monitor_browser.py.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v iverilog >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || { \
	  echo "installing iverilog and g++ (apt-get)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq iverilog g++; \
	} || echo "warning: could not install iverilog; the RTL and C simulation tests will be skipped" 
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (apt-get) for the live view's browser test"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium; \
	} || echo "warning: could not install chromium; the live view's browser test will be skipped"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Runtime only (what `beamloop run` needs).
$(VENV)/.installed-runtime: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

# Everything the tests need: runtime and every feature's extra (torch is pinned to the local CPU wheel).
EXTRAS ?= test,detector,train,quant,fpga,dkl,bench,nion,fuzz,lint,web,formats
$(VENV)/.installed-test: pyproject.toml | $(PY) system-deps
	$(PIP) install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed-runtime

# The GPU build of ONNX Runtime replaces the CPU one (the two must not be installed together).
install-gpu: $(VENV)/.installed-runtime
	$(PIP) uninstall -y onnxruntime
	$(PIP) install "onnxruntime-gpu>=1.19"

run: $(VENV)/.installed-runtime
	$(VENV)/bin/beamloop run --out $(OUT)

test: $(VENV)/.installed-test
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Lint: ruff (style, imports, correctness), import-linter (the layers in pyproject.toml), mypy on the
# modules listed here (gradual). mypy cannot follow the editable install's package-dir mapping, so it reads
# the package through build/typing/beamloop, a link to this folder.
MYPY_PACKAGES ?= beamloop.edge.frame beamloop.edge.stages beamloop.edge.kernels beamloop.edge.path \
	beamloop.edge.service beamloop.edge.app beamloop.edge.materials beamloop.edge.control \
	beamloop.edge.trigger beamloop.edge.monitor
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	@mkdir -p build/typing && ln -sfn ../.. build/typing/beamloop
	MYPYPATH=build/typing $(VENV)/bin/mypy $(addprefix -p ,$(MYPY_PACKAGES))

test-all: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

# Train the U-Net ensemble on simulated frames and ship it (edge/models/unet); ~20 min on 2 cores.
train: $(VENV)/.installed-test
	$(VENV)/bin/beamloop train

bench: $(VENV)/.installed-test
	$(VENV)/bin/beamloop bench

bench-quick: $(VENV)/.installed-test
	$(VENV)/bin/beamloop bench --quick

clean:
	rm -rf $(VENV) out build *.egg-info .pytest_cache
