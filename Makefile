# Two commands do all the set-up: `make demo` and `make test`. Both create .venv and install
# Kimbho into it. PyTorch: a Python that already has torch lends it to the venv (you keep your
# build); otherwise torch==2.13.0 is installed (pinned: an open range can pull a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kimbho-installed

.PHONY: demo test test-fast lint bench clean llama-cpp

$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

demo: $(STAMP)
	$(BIN)/kimbho demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# llama.cpp's Python bindings, compiled from source (about half an hour on 2 CPU cores): with them
# installed, `make test` also runs exported GGUF files in llama.cpp. LLAVA_BUILD=OFF skips the
# multimodal library Kimbho does not use.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $(CMAKE_ARGS)" $(BIN)/pip install "$(LLAMA_CPP_PYTHON)"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench train_kimbho_v1.py
	$(BIN)/ruff format --check src tests bench train_kimbho_v1.py

clean:
	rm -rf $(VENV) runs kimbho_v1_data
