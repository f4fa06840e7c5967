# Two commands do all the set-up: `make demo` and `make test`. Both create .venv and install
# Kimbho into it. PyTorch: a Python that already has torch lends it to the venv (you keep your
# build); otherwise torch==2.13.0 is installed (pinned: an open range can pull a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kimbho-installed

.PHONY: demo test test-fast test-precision lint bench clean llama-cpp

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

# train.precision=auto picks bf16 on CPUs with AVX512-BF16 or AMX and fp32 elsewhere. The tests
# whose results depend on that choice run here both ways, whatever this CPU is
# (KIMBHO_CPU_BF16 makes the CPU report native bf16, or not). For the whole suite as a bf16
# machine runs it: KIMBHO_CPU_BF16=1 make test.
test-precision: $(STAMP)
	KIMBHO_CPU_BF16=1 $(BIN)/python -m pytest -q -m precision
	KIMBHO_CPU_BF16=0 $(BIN)/python -m pytest -q -m precision

# llama.cpp's Python bindings, compiled from source (3-5 minutes on 2 CPU cores): with them
# installed, `make test` also runs exported GGUF files in llama.cpp. LLAVA_BUILD=OFF skips the
# multimodal library Kimbho does not use. On CPUs with AMX (Intel Sapphire Rapids and later) the
# native build's AMX kernel of this release crashes at its first product (ldtilecfg on an invalid
# tile configuration, llama.cpp PR 26954), so there it is built for AVX512 with VNNI and BF16,
# without AMX.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
LLAMA_CPP_NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
	-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF $$(grep -q amx_int8 /proc/cpuinfo 2>/dev/null && echo '$(LLAMA_CPP_NO_AMX)') $(CMAKE_ARGS)" \
		$(BIN)/pip install "$(LLAMA_CPP_PYTHON)"

lint: $(STAMP)
	$(BIN)/mypy
	$(BIN)/ruff check src tests bench train_kimbho_v1.py
	$(BIN)/ruff format --check src tests bench train_kimbho_v1.py

clean:
	rm -rf $(VENV) runs kimbho_v1_data
